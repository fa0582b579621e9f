"""The POST / bench sink port (corral.devices.legacy.post)."""

from corral.devices.bus import PioBus
from corral.devices.legacy.post import PostSink, PostSinkState


def test_post_sink():
    dev = PostSink()
    assert dev.pio_read(0, 1) == 0xFF
    assert dev.pio_read(0, 4) == 0xFFFFFFFF
    dev.pio_write(0, 1, 0x42)
    assert dev.save_state() == PostSinkState()
    PostSink().load_state(PostSinkState.model_validate_json(dev.save_state().model_dump_json()))


def test_the_bus_serves_a_sink_without_calling_it():
    """A sink's ports are served by the bus (and the compiled vCPU loop) from `ports` alone: a
    sink whose methods fail is never reached, and its ports still belong to it."""

    class Calls(PostSink):
        def pio_read(self, offset: int, size: int) -> int:
            raise AssertionError("a sink was called")

        pio_write = pio_read  # type: ignore[assignment]

    bus = PioBus()
    bus.register(0x504, 1, Calls(), "bench-sink")
    bus.write(0x504, 4, 0x1234)
    assert bus.read(0x504, 2) == 0xFFFF and bus.ports[0x504] is None
    assert [m.name for m in bus.mappings] == ["bench-sink"]
