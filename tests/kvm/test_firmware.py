"""Firmware boot on real /dev/kvm: Debian's SeaBIOS starts at the reset vector, prints its banner
on the serial line (sercon, from fw_cfg), finds a virtio-blk disk and boots its MBR, a boot
sector built here. The boot sector prints a line on COM1, then reads the i440FX's PAM0 register
through 0xCF8/0xCFC and leaves through the exit port (0xf4) with it: 0x10 is what SeaBIOS writes
when it found the host bridge it looks for and locked its F segment again.

SeaBIOS's POST runs in real and protected mode, which KVM emulates on a PVM host: one boot takes
about 10 s here."""

import os
import time
from pathlib import Path

import pytest
from support.asm import assemble_flat
from support.cli import corral, one_clear_line

from corral.boot import firmware
from corral.config import DiskConfig, HostResources, MachineConfig
from corral.errors import FieldError
from corral.machine import Machine

SEABIOS = next((Path(p) for p in firmware.KNOWN["seabios"] if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(SEABIOS is None, reason="Debian's seabios package is not installed")

MESSAGE = "corral-mbr: hello from the boot sector"
PAM0_LOCKED = 0x10  # SeaBIOS's make_bios_readonly: 0xF0000-0xFFFFF read from RAM, not written

BOOT_SECTOR = rf"""
    .code16
    .text
    .globl _start
_start:
    xor %ax, %ax
    mov %ax, %ds
    cld
    sti                     # let a timer tick pass: SeaBIOS flushes its buffered sercon output
    hlt
    hlt
    cli
    mov $0x3f8, %dx
    mov $(0x7c00 + msg - _start), %si
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  mov $0x80000058, %eax   # 00:00.0, dword 0x58: PAM0 is its byte 1
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfd, %dx
    inb %dx, %al
    outb %al, $0xf4
3:  hlt
    jmp 3b
msg: .asciz "{MESSAGE}\r\n"
    .org 510
    .byte 0x55, 0xaa
"""


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory) -> Path:
    """A 1 MiB raw disk whose first sector is BOOT_SECTOR."""
    d = tmp_path_factory.mktemp("mbr")
    sector = assemble_flat(BOOT_SECTOR, d, "mbr.bin").read_bytes()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    disk = d / "disk.img"
    disk.write_bytes(sector.ljust(1 << 20, b"\0"))
    return disk


def test_seabios_boots_an_mbr_from_virtio_blk(mbr_disk):
    r = corral(
        "run",
        "--firmware",
        "seabios",
        "--disk",
        str(mbr_disk),
        "--debug-exit",
        "iobase=0xf4",
        "--memory",
        "128M",
        timeout=120,
    )
    out = r.stdout.replace("\r", "")
    assert "SeaBIOS (version" in out, (r.stdout, r.stderr)
    banner = out.index("SeaBIOS (version")
    booting = out.index("Booting from Hard Disk", banner)
    assert out.index(MESSAGE + "\n", booting) > booting, out
    assert r.returncode == PAM0_LOCKED, (out, r.stderr)


# A bzImage in miniature: a header (protocol 2.12, LOADED_HIGH) and real-mode setup code that
# prints the command line (at 0x20000, where the loader put it) and the start of its
# protected-mode part (at 1 MiB), then exits with type_of_loader as the loader filled it in.
TINY_BZIMAGE = r"""
    .code16
    .text
    .org 0x1f1
    .byte 1                 # setup_sects
    .org 0x1fe
    .word 0xaa55
    .org 0x200
    jmp start
    .org 0x202
    .ascii "HdrS"
    .word 0x020c
    .org 0x211
    .byte 0x01              # loadflags: LOADED_HIGH
    .org 0x22c
    .long 0x37ffffff        # initrd_addr_max
    .org 0x238
    .long 255               # cmdline_size
    .org 0x280
start:
    sti                     # a timer tick: SeaBIOS flushes its buffered sercon output
    hlt
    hlt
    cli
    mov $0x3f8, %dx
    mov $msg, %si           # ds is the setup's segment (0x1000)
    call puts
    mov $0x2000, %ax
    mov %ax, %ds
    xor %si, %si
    call puts
    mov $0xffff, %ax        # 0xffff:0x10 is 1 MiB (SeaBIOS leaves A20 on)
    mov %ax, %ds
    mov $0x10, %si
    call puts
    mov $0x1000, %ax
    mov %ax, %ds
    mov (0x210), %al
    outb %al, $0xf4
1:  hlt
    jmp 1b
puts:
    lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp puts
2:  ret
msg: .asciz "LINUXBOOT cmdline="
    .org 0x400
    .asciz "|PROT-OK\r\n"
    .org 0x600
"""


def test_seabios_boots_a_kernel_from_fw_cfg(tmp_path):
    """--kernel with --firmware: SeaBIOS runs QEMU's linuxboot option ROM (from fw_cfg), which
    loads the setup, the kernel and the command line where fw_cfg says and enters the setup."""
    if not any(os.path.exists(p) for p in firmware.LINUXBOOT_ROMS):
        pytest.skip("QEMU's linuxboot_dma.bin is not installed")
    kernel = assemble_flat(TINY_BZIMAGE, tmp_path, "bzImage")
    r = corral(
        "run",
        "--firmware",
        "seabios",
        "--kernel",
        str(kernel),
        "--cmdline",
        "console=ttyS0 hello",
        "--debug-exit",
        "iobase=0xf4",
        "--memory",
        "128M",
        timeout=120,
    )
    out = r.stdout.replace("\r", "")
    assert "SeaBIOS (version" in out and "Booting from ROM" in out, (out, r.stderr)
    assert "LINUXBOOT cmdline=console=ttyS0 hello|PROT-OK\n" in out, out
    assert r.returncode == firmware.LOADER_TYPE, (out, r.stderr)


def test_firmware_machine_from_the_library_and_its_config(mbr_disk):
    """The same boot through `Machine`, with the image given as a path: no kernel at all."""
    out = bytearray()
    cfg = MachineConfig.build(
        firmware=str(SEABIOS),
        disks=[DiskConfig.parse(f"{mbr_disk},ro")],
        debug_exit=0xF4,
        memory="64M",
        no_reboot=True,
    )
    assert cfg.kernel is None and cfg.host_resources().firmware == str(SEABIOS)
    m = Machine(cfg, console=out.extend)
    try:
        m.start()
        res = m.wait(90)
    finally:
        m.close()
    text = out.decode(errors="replace")
    assert res is not None, text
    assert (res.kind, res.status) == ("exit", PAM0_LOCKED), text
    assert MESSAGE in text


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda d: d / "missing.bin", "does not exist"),
        (lambda d: d, "is not a regular file"),
        (lambda d: _write(d / "small.bin", 1000), "is 1000 bytes"),
        (lambda d: _link(d / "link.bin", SEABIOS), "is a symbolic link"),
        (lambda d: _fifo(d / "fifo.bin"), "is not a regular file"),
    ],
    ids=["missing", "directory", "odd-size", "symlink", "fifo"],
)
def test_bad_firmware_file_is_one_clear_line(tmp_path, make, expect):
    path = make(tmp_path)
    line = one_clear_line(corral("run", "--firmware", str(path), "--memory", "64M", timeout=60))
    assert "--firmware" in line and expect in line, line


def test_firmware_not_installed_and_no_kernel_are_one_clear_line():
    line = one_clear_line(corral("run", "--firmware", "", "--memory", "64M", timeout=60))
    assert "--firmware" in line, line


def _write(path: Path, size: int) -> Path:
    path.write_bytes(b"\0" * size)
    return path


def _link(path: Path, target: Path | None) -> Path:
    assert target is not None
    path.symlink_to(target)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


# Prints A, waits about 5 s of timer ticks, prints B and exits with 42: a snapshot taken in the
# wait must carry on to B under a restored machine (the ROM mapped again from the grant).
WAITING_SECTOR = r"""
    .code16
    .text
_start:
    xor %ax, %ax
    mov %ax, %ds
    sti
    hlt
    hlt
    mov $0x3f8, %dx
    mov $'A', %al
    outb %al, %dx
    mov $100, %cx
1:  hlt
    loop 1b
    mov $'B', %al
    outb %al, %dx
    mov $42, %al
    outb %al, $0xf4
2:  hlt
    jmp 2b
    .org 510
    .byte 0x55, 0xaa
"""


def test_a_firmware_guest_snapshot_restores_with_its_firmware_granted(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(assemble_flat(WAITING_SECTOR, tmp_path, "w.bin").read_bytes().ljust(1 << 20, b"\0"))
    disks = (DiskConfig(path=disk, read_only=True),)
    out = bytearray()
    cfg = MachineConfig.build(firmware="seabios", disks=disks, debug_exit=0xF4, memory="64M", no_reboot=True)
    m = Machine(cfg, console=out.extend)
    try:
        m.start()
        deadline = time.monotonic() + 60
        while b"A" not in out.rpartition(b"Booting")[2]:
            assert time.monotonic() < deadline, out.decode(errors="replace")
            time.sleep(0.05)
        m.pause()
        assert b"B" not in out.rpartition(b"Booting")[2]  # paused in the wait
        m.snapshot(tmp_path / "snap")
    finally:
        m.close()
    with pytest.raises(FieldError, match="^firmware: the snapshot booted through firmware"):
        Machine.from_snapshot(tmp_path / "snap", host=HostResources(disks=disks))
    out2 = bytearray()
    r = Machine.from_snapshot(
        tmp_path / "snap", console=out2.extend, host=HostResources(firmware="seabios", disks=disks)
    )
    try:
        r.start()
        res = r.wait(60)
    finally:
        r.close()
    assert res is not None and (res.kind, res.status) == ("exit", 42), bytes(out2)
    assert bytes(out2) == b"B"
