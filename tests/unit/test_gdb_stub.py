"""The gdb stub's pure parts: its address syntax, the debug registers it asks KVM for, and
the parsing of thread ids and breakpoint packets (tests/kvm/test_gdb.py drives the rest
against a real guest with real gdb)."""

import pytest

from corral.debug.session import HwPoint, _hex, _point, _thread, debug_registers
from corral.debug.stub import GdbAddress
from corral.errors import ConfigError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tcp:127.0.0.1:1234", GdbAddress("tcp", host="127.0.0.1", port=1234)),
        ("tcp:1234", GdbAddress("tcp", host="127.0.0.1", port=1234)),
        ("tcp::0", GdbAddress("tcp", host="127.0.0.1", port=0)),
        ("tcp:[::1]:9", GdbAddress("tcp", host="::1", port=9)),
        ("unix:/run/vm.gdb", GdbAddress("unix", path="/run/vm.gdb")),
    ],
)
def test_addresses(text, expected):
    assert GdbAddress.parse(text) == expected


@pytest.mark.parametrize("text", ["1234", "tcp:", "tcp:host:port", "tcp:1:70000", "unix:", "udp:1:2"])
def test_bad_addresses_name_the_syntax(text):
    with pytest.raises(ConfigError, match=r"tcp:\[HOST:\]PORT\|unix:PATH"):
        GdbAddress.parse(text)


def test_debug_registers_put_each_point_in_its_slot_with_kind_and_length():
    regs = debug_registers(
        [HwPoint(1, 0x100088, 1), HwPoint(2, 0x129000, 8), HwPoint(3, 0x2000, 4), HwPoint(4, 0x3000, 2)]
    )
    assert regs[:4] == [0x100088, 0x129000, 0x2000, 0x3000]
    dr7 = regs[7]
    assert [dr7 >> (2 * i) & 3 for i in range(4)] == [0b10] * 4  # G0-G3 enabled
    assert [dr7 >> (16 + 4 * i) & 3 for i in range(4)] == [0b00, 0b01, 0b11, 0b11]  # exec, write, rw, rw
    assert [dr7 >> (18 + 4 * i) & 3 for i in range(4)] == [0b00, 0b10, 0b11, 0b01]  # 1, 8, 4, 2 bytes
    assert debug_registers([]) == [0] * 8


def test_thread_ids_and_point_packets():
    assert _thread(b"2") == 2 and _thread(b"-1") == -1 and _thread(b"p1.a") == 10
    assert _point(b"2,129000,8") == (2, 0x129000, 8)
    assert _point(b"0,100220,1;X1,0") == (0, 0x100220, 1)  # conditions are ignored
    with pytest.raises(ValueError):
        _point(b"q")


@pytest.mark.parametrize("text", [b"", b"-1", b"0x10", b" 1", b"1" * 17, b"zz", b"+5"])
def test_numbers_from_gdb_are_plain_bounded_hex(text):
    with pytest.raises(ValueError):
        _hex(text)
    assert _hex(b"ffffffffffffffff") == 2**64 - 1
