"""How a machine stops: guest-driven poweroff, reset and crashes on the real /dev/kvm.

Each guest is a few hand-assembled bytes behind a Multiboot header (address fields), entered in
32-bit protected mode by corral's Multiboot loader.
"""

import struct
import threading

import pytest

from corral.config import MachineConfig
from corral.machine import Machine

LOAD = 0x100000
HEADER = 32


def multiboot_kernel(code: bytes) -> bytes:
    magic, flags = 0x1BADB002, 1 << 16
    image_len = HEADER + len(code)
    header = struct.pack(
        "<8I",
        magic,
        flags,
        (-(magic + flags)) & 0xFFFFFFFF,
        LOAD,
        LOAD,
        LOAD + image_len,
        LOAD + image_len,
        LOAD + HEADER,
    )
    return header + code


def run_code(tmp_path, code: bytes, **cfg):
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(multiboot_kernel(code))
    m = Machine(MachineConfig.build(kernel=kernel, memory="32M", **cfg), console=lambda b: None)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", m.run()), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "machine did not stop"
    return box["r"]


HLT_LOOP = b"\xf4\xeb\xfd"  # hlt; jmp $-1


def test_acpi_s5_poweroff_exits_zero(tmp_path):
    # mov dx, 0x604; mov ax, (5 << 10) | (1 << 13); out dx, ax
    r = run_code(tmp_path, b"\x66\xba\x04\x06\x66\xb8\x00\x34\x66\xef" + HLT_LOOP)
    assert (r.kind, r.status) == ("poweroff", 0)


@pytest.mark.parametrize(
    "name,code",
    [
        ("i8042 pulse", b"\xb0\xfe\xe6\x64"),  # mov al,0xfe; out 0x64,al
        ("ACPI reset register", b"\x66\xba\xf9\x0c\xb0\x06\xee"),  # mov dx,0xcf9; mov al,6; out dx,al
    ],
)
def test_reset_stops_with_no_reboot(tmp_path, name, code):
    r = run_code(tmp_path, code + HLT_LOOP, no_reboot=True)
    assert r.kind == "reset" and r.status == 0 and r.reboots == 0


def test_reset_reboots_the_guest_without_no_reboot(tmp_path):
    """The guest resets at once on every boot: corral must bring it back each time, and stop()
    must still end the run between or during boots."""
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(multiboot_kernel(b"\xb0\xfe\xe6\x64" + HLT_LOOP))
    m = Machine(MachineConfig.build(kernel=kernel, memory="32M"), console=lambda b: None)
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    deadline = 20.0
    import time

    t0 = time.monotonic()
    while m.reboots < 3 and time.monotonic() - t0 < deadline:
        time.sleep(0.01)
    assert m.reboots >= 3
    m.stop()
    t.join(10)
    assert not t.is_alive(), "stop() did not end a rebooting machine"


def test_triple_fault_is_a_crash_with_registers(tmp_path):
    # The boot IDT is empty (limit 0): ud2 -> #UD -> #GP -> #DF -> triple fault.
    r = run_code(tmp_path, b"\x0f\x0b", no_reboot=True)
    assert r.kind == "crash" and r.status == 1
    assert "triple fault" in r.message
    assert "RIP=" in r.message and "CR0=" in r.message


def test_exit_port_value_is_the_status(tmp_path):
    # mov dx, 0x501; mov al, 42; out dx, al
    r = run_code(tmp_path, b"\x66\xba\x01\x05\xb0\x2a\xee" + HLT_LOOP)
    assert (r.kind, r.status) == ("exit", 42)
