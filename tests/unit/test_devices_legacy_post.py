"""The POST / bench sink port (corral.devices.legacy.post)."""

from corral.devices.legacy.post import PostSink, PostSinkState


def test_post_sink():
    dev = PostSink()
    assert dev.pio_read(0, 1) == 0xFF
    assert dev.pio_read(0, 4) == 0xFFFFFFFF
    dev.pio_write(0, 1, 0x42)
    assert dev.last == 0x42
    other = PostSink()
    other.load_state(PostSinkState.model_validate_json(dev.save_state().model_dump_json()))
    assert other.last == 0x42
