import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.config import MachineConfig, format_size, parse_size
from corral.errors import ConfigError, FieldError


@pytest.mark.parametrize(
    "text,expected",
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("4096K", 4 << 20),
        ("64", 64 << 20),
        ("1T", 1 << 40),
        ("256MiB", 256 << 20),
        ("16mb", 16 << 20),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5M", "5Q", "M"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size(text)


def test_memory_zero_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="memory: 0B is too small: give at least 16M"):
        MachineConfig.build(kernel="k", memory=0)


def test_memory_10t_is_refused():
    with pytest.raises(ConfigError, match="too large"):
        MachineConfig.build(kernel="k", memory="10T")


@pytest.mark.parametrize("cpus", [0, -1, 255, 10000])
def test_cpus_out_of_range(cpus):
    with pytest.raises(ConfigError, match="cpus must be between 1 and 254"):
        MachineConfig.build(kernel="k", cpus=cpus)


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="colour"):
        MachineConfig.build(kernel="k", colour="blue")


def test_valid_config():
    c = MachineConfig.build(kernel="k", memory="1G", cpus=4, cmdline="hello")
    assert c.memory == 1 << 30 and c.cpus == 4


@given(st.integers(min_value=1, max_value=1 << 20))
def test_format_then_parse_round_trips_whole_kib(n):
    assert parse_size(format_size(n * 1024)) == n * 1024


# --- errors name config fields, never CLI flags ---------------------------------------------------


def _field_error(**fields) -> FieldError:
    with pytest.raises(FieldError) as exc:
        MachineConfig.build(kernel="k", **fields)
    assert "--" not in str(exc.value)
    return exc.value


def test_each_bad_field_is_named_with_its_fix():
    err = _field_error(cpus=0, memory="lots", cpu_hide="xsave,warp-drive")
    assert dict(err.problems) == {
        "cpus": "cpus must be between 1 and 254, got 0",
        "memory": "'lots' is not a size: write it like 512M, 2G or 4096K",
        "cpu_hide": err.problems[2][1],
    }
    assert err.problems[2][1].startswith("unknown CPU feature warp-drive: choose from ")
    assert err.field == "cpus"
    assert str(err) == "; ".join(f"{f}: {r}" for f, r in err.problems)


def test_nested_fields_are_named_by_path():
    err = _field_error(disks=[{"path": "a.img"}, {"path": "b.img", "serial": "s" * 21}])
    assert err.field == "disks[1].serial" and "at most 20 characters" in str(err)
    err = _field_error(vsock={"cid": 1, "uds_path": "/tmp/v"})
    assert err.field == "vsock.cid"


@pytest.mark.parametrize(
    "value,needle",
    [
        ("file=", "gives 'file' no value"),
        ("tty", "unknown key 'tty'"),
        ("pty,file=x", "more than one of"),
    ],
)
def test_virtio_console_is_checked_by_its_syntax(value, needle):
    err = _field_error(virtio_console=value)
    assert err.field == "virtio_console" and needle in str(err) and str(err).endswith("use pty|file=PATH")


def test_virtio_console_backends():
    assert MachineConfig.build(kernel="k", virtio_console="pty").virtio_console == "pty"
    assert MachineConfig.build(kernel="k", virtio_console="file=/tmp/c").virtio_console == "file=/tmp/c"


def test_debug_exit_iobase_and_modules():
    from corral.config import HostResources, ModuleConfig

    assert MachineConfig.build(kernel="k").debug_exit == 0x501
    assert MachineConfig.build(kernel="k", debug_exit="iobase=0xf4").debug_exit == 0xF4
    for bad in ("iobase=zz", "port=1", "iobase=0x10000"):
        with pytest.raises(FieldError, match="debug_exit"):
            MachineConfig.build(kernel="k", debug_exit=bad)
    m = ModuleConfig.parse("/m.bin,cmdline=a=1 b", 2)
    assert (str(m.path), m.cmdline) == ("/m.bin", "a=1 b")
    with pytest.raises(FieldError, match=r"modules\[2\]"):
        ModuleConfig.parse("/m.bin,args=1", 2)
    # a snapshot's module paths are never read: a reboot loads the granted ones only
    incoming = MachineConfig.build(kernel="k", modules=[m])
    assert HostResources(kernel="k2").apply(incoming).modules == ()
    with pytest.raises(FieldError, match="modules"):
        HostResources(modules=[m]).apply(incoming)
