"""Random port accesses against every legacy device: nothing escapes, values fit, state holds."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fakes import FakeClock, FakeIrqLine, FakeVmControl

from corral.devices.legacy import I8042, AcpiPm, CmosRtc, DebugExit, PostSink, ResetRegister, Serial16550


class Out:
    def __init__(self):
        self.n = 0

    def __call__(self, data):
        assert isinstance(data, bytes) and len(data) == 1
        self.n += 1


access = st.tuples(
    st.sampled_from(["r", "w", "tick", "host"]),
    st.integers(0, 15),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 0xFFFFFFFF),
)
accesses = st.lists(access, max_size=200)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(kind, ctl, line, t0):
    clock = FakeClock(t0)
    if kind == "uart":
        return Serial16550(line, Out()), 8, clock, None
    if kind == "i8042":
        return I8042(ctl, line), 6, clock, None
    if kind == "rtc":
        return CmosRtc(line, clock=clock, mem_size=5 << 30), 2, clock, 1.0
    if kind == "acpi_pm":
        clock.t = int(t0 * 1e9)
        return AcpiPm(ctl, line, clock=clock), 12, clock, 10**8
    if kind == "debug_exit":
        return DebugExit(ctl), 2, clock, None
    if kind == "reset":
        return ResetRegister(ctl), 1, clock, None
    return PostSink(), 1, clock, None


def run(kind, ops, t0):
    ctl, line = FakeVmControl(strict=True), FakeIrqLine(strict=True)
    dev, span, clock, step = make(kind, ctl, line, t0)
    for op, off, size, value in ops:
        off %= span + 2  # mostly inside, sometimes past the end
        if op == "r":
            v = dev.pio_read(off, size)
            assert 0 <= v < 1 << (8 * size)
        elif op == "w":
            dev.pio_write(off, size, value & ((1 << (8 * size)) - 1))
        elif op == "tick" and step is not None:
            clock.t += step * (value & 0xFF) / 7 if kind == "rtc" else step * (value & 0xFF)
        elif op == "host":
            if kind == "uart":
                dev.feed(bytes([value & 0xFF]) * (value >> 20))
            elif kind == "acpi_pm":
                dev.press_power_button()
    st_ = dev.save_state()
    twin, *_ = make(kind, FakeVmControl(strict=True), FakeIrqLine(strict=True), t0)
    twin.load_state(type(st_).model_validate_json(st_.model_dump_json()))
    assert twin.save_state() == st_
    return ctl


KINDS = ["uart", "i8042", "rtc", "acpi_pm", "debug_exit", "reset", "post"]


@FUZZ
@given(kind=st.sampled_from(KINDS), ops=accesses, t0=st.floats(0, 4e9, allow_nan=False))
def test_random_accesses_never_raise(kind, ops, t0):
    ctl = run(kind, ops, t0)
    # acpi_pm: SLP_EN with the S3 or S5 sleep type is a guest's legitimate suspend or poweroff
    allowed = {
        "i8042": {"reset"},
        "acpi_pm": {"poweroff", "suspend"},
        "debug_exit": {"exit"},
        "reset": {"reset"},
    }.get(kind, set())
    assert {call[0] for call in ctl.calls} <= allowed


@FUZZ
@given(
    ops=st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(0, 0xFF)), max_size=300),
    t0=st.floats(0, 4e9, allow_nan=False),
)
def test_rtc_register_soup_keeps_a_sane_clock(ops, t0):
    clock = FakeClock(t0)
    rtc = CmosRtc(clock=clock)
    for off, v in ops:
        rtc.pio_write(off, 1, v)
        clock.t += 0.37
    rtc.pio_write(0, 1, 0x0B)
    rtc.pio_write(1, 1, 0x06)  # SET off, binary, 24 h: the clock runs
    fields = []
    for idx in (0x00, 0x02, 0x04, 0x07, 0x08):
        rtc.pio_write(0, 1, idx)
        fields.append(rtc.pio_read(1, 1))
    sec, minute, hour, day, month = fields
    assert sec < 60 and minute < 60 and hour < 24 and 1 <= day <= 31 and 1 <= month <= 12
