"""fw_cfg on real /dev/kvm: the probe guest reads the signature, CPU count and RAM size through
the ports and through DMA, and they match the machine's config; test-kernel boot bits (the exit
port moved, the Multiboot command line's argv[0])."""

import shutil
import subprocess

import pytest
from support.probe import run_probe

from corral.config import MachineConfig, ModuleConfig
from corral.machine import Machine


@pytest.mark.parametrize("cpus,memory,ram", [(1, "64M", 64 << 20), (2, "4100M", 4100 << 20)])
def test_probe_reads_fw_cfg_through_ports_and_dma(cpus, memory, ram):
    run = run_probe("fwcfg", cpus=cpus, memory=memory)
    r = run.results
    assert run.status == 0, run.output
    assert (r["fwcfg_sig"], r["fwcfg_id"], r["fwcfg_files"]) == ("QEMU", "3", "3")
    assert (int(r["fwcfg_cpus"]), int(r["fwcfg_ram"])) == (cpus, ram)
    assert (r["dma_sig"], int(r["dma_cpus"]), int(r["dma_ram"])) == ("QEMU", cpus, ram)
    assert r["dma_ok"] == "1"
    assert r["dma_bad"] == "1"  # a descriptor aimed outside RAM came back with the error bit


# A Multiboot kernel linked at 0x8000, over where corral puts the Multiboot information: it
# prints its command line and module strings on COM1, writes 7 to the default exit port (which
# must do nothing once the port has moved) and leaves through port 0xf4 with 42.
TINY_KERNEL = r"""
    .code32
    .text
    .globl _start
    .align 4
    .long 0x1BADB002, 0x00000002, -(0x1BADB002 + 0x00000002)
_start:
    mov %ebx, %edi
    mov $0x501, %dx
    mov $7, %al
    outb %al, %dx
    mov $s_cmd, %esi
    call puts
    mov 16(%edi), %esi
    call puts
    mov $s_nl, %esi
    call puts
    mov 20(%edi), %ecx
    mov 24(%edi), %ebx
1:  test %ecx, %ecx
    jz 2f
    mov $s_mod, %esi
    call puts
    mov 8(%ebx), %esi
    call puts
    mov $s_nl, %esi
    call puts
    add $16, %ebx
    dec %ecx
    jmp 1b
2:  mov $0xf4, %dx
    mov $42, %al
    outb %al, %dx
3:  hlt
    jmp 3b
puts:
    lodsb
    test %al, %al
    jz 4f
    mov $0x3f8, %dx
    outb %al, %dx
    jmp puts
4:  ret
s_cmd: .asciz "CMDLINE "
s_mod: .asciz "MODULE "
s_nl:  .asciz "\n"
"""


@pytest.fixture(scope="module")
def tiny_kernel(tmp_path_factory):
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("binutils (as, ld) are not installed")
    d = tmp_path_factory.mktemp("tiny")
    (d / "k.S").write_text(TINY_KERNEL)
    subprocess.run(["as", "--32", "-o", str(d / "k.o"), str(d / "k.S")], check=True)
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_i386",
            "-N",
            "-Ttext=0x8000",
            "-e",
            "_start",
            "-o",
            str(d / "k.elf"),
            str(d / "k.o"),
        ],
        check=True,
    )
    return d / "k.elf"


def test_low_multiboot_kernel_with_moved_exit_port_and_module_strings(tiny_kernel, tmp_path):
    initrd, mod = tmp_path / "initrd.img", tmp_path / "mod.bin"
    initrd.write_bytes(b"I" * 100)
    mod.write_bytes(b"M" * 5000)
    out = bytearray()
    m = Machine(
        MachineConfig.build(
            kernel=tiny_kernel,
            cmdline="hello world",
            initrd=initrd,
            modules=[ModuleConfig.parse(f"{mod},cmdline=answer=42 x")],
            debug_exit="iobase=0xf4",
            memory="64M",
            no_reboot=True,
        ),
        console=out.extend,
    )
    try:
        m.start()
        res = m.wait(60)
        assert res is not None, out.decode(errors="replace")
    finally:
        m.close()
    lines = out.decode(errors="replace").replace("\r", "").splitlines()
    assert (res.kind, res.status) == ("exit", 42), lines  # 0xf4, not 0x501 (7)
    assert lines[:3] == [
        f"CMDLINE {tiny_kernel} hello world",
        f"MODULE {initrd}",
        f"MODULE {mod} answer=42 x",
    ]


def test_exit_port_over_another_device_is_one_field_error(tiny_kernel):
    from corral.errors import FieldError

    m = Machine(MachineConfig.build(kernel=tiny_kernel, debug_exit=0x3F8, memory="64M", no_reboot=True))
    try:
        with pytest.raises(FieldError, match=r"debug_exit: iobase 0x3f8 overlaps"):
            m.start()
    finally:
        m.close()


def test_cli_debug_exit_and_module_flags(tiny_kernel, tmp_path):
    from support.cli import corral

    mod = tmp_path / "m"
    mod.write_bytes(b"m")
    args = ["run", "--kernel", str(tiny_kernel), "--memory", "64M", "--no-reboot"]
    ok = corral(*args, "--debug-exit", "iobase=0xf4", "--module", f"{mod},cmdline=k=v")
    assert ok.returncode == 42, ok.stderr
    assert f"MODULE {mod} k=v" in ok.stdout
    bad = corral(*args, "--debug-exit", "iobase=zz")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--debug-exit" in bad.stderr and "0xf4" in bad.stderr
