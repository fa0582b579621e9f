"""The 32-bit Linux boot protocol on real /dev/kvm: a bzImage in miniature whose setup header
has no 64-bit entry (as an i386/686 kernel's) boots directly, and its 32-bit code checks the
state Documentation/arch/x86/boot.rst promises a 32-bit kernel at its entry:

* protected mode with paging off, interrupts off; CS = __BOOT_CS (0x10), DS = ES = SS =
  __BOOT_DS (0x18), flat 4 GiB (base 0: the strings it prints are read at their absolute
  addresses; limit: it reads the LAPIC's version register at 0xFEE00030 through DS);
* %esi = struct boot_params ("HdrS" at 0x202), %ebp = %edi = %ebx = 0;
* code32_start = where the kernel was loaded (it runs there), the command line and the initrd
  where boot_params says, an e820 map.

It prints the command line and the initrd's text on COM1 and leaves through the exit port with
0x80 | a bit per failed check. Ring 0 is emulated on a PVM host: the kernel is a few hundred
instructions."""

from pathlib import Path

import pytest
from support.asm import assemble_flat
from support.cli import corral

from corral.boot import bzimage

LOAD = 0x1000000  # pref_address, as a Debian 686 kernel's (CONFIG_PHYSICAL_START)
OK = 0x80
INITRD_TEXT = "corral-initrd-32"

TINY_BZIMAGE32 = rf"""
    .text
    .code16
    .org 0x1f1
    .byte 1                 # setup_sects: the setup is 2 sectors, the 32-bit part follows
    .org 0x1f4
    .long (pend - pstart + 15) / 16   # syssize
    .org 0x1fe
    .word 0xaa55
    .org 0x200
    jmp setup               # its displacement says where the header ends
    .org 0x202
    .ascii "HdrS"
    .word 0x020f            # protocol 2.15
    .org 0x211
    .byte 0x01              # loadflags: LOADED_HIGH
    .org 0x214
    .long 0x100000          # code32_start as a build leaves it: the loader writes the real one
    .org 0x22c
    .long 0x7fffffff        # initrd_addr_max
    .long 0x200000          # kernel_alignment
    .byte 0                 # relocatable_kernel: no, it runs at pref_address
    .org 0x236
    .word 0                 # xloadflags: no XLF_KERNEL_64, a 32-bit kernel
    .long 255               # cmdline_size
    .org 0x258
    .quad {LOAD:#x}         # pref_address
    .long 0x10000           # init_size
    .org 0x280
setup:                      # real-mode setup: direct boot never runs it
    hlt
    jmp setup
    .org 0x400

    .code32
pstart:
    xor %ecx, %ecx          # a bit per failed check
    or %ebx, %ebp
    or %edi, %ebp
    jz 1f
    or $0x01, %ecx          # %ebp/%edi/%ebx not zero
1:  mov $(stack_top - pstart + {LOAD:#x}), %esp
    mov %cs, %ax
    cmp $0x10, %ax
    jne 2f
    mov %ds, %ax
    cmp $0x18, %ax
    jne 2f
    mov %es, %ax
    cmp $0x18, %ax
    jne 2f
    mov %ss, %ax
    cmp $0x18, %ax
    je 3f
2:  or $0x02, %ecx          # selectors are not __BOOT_CS/__BOOT_DS
3:  mov 0xfee00030, %eax  # the LAPIC's version register, just below 4 GiB, through DS
    cmp $0x14, %al          # (a limit under 4 GiB faults: no IDT, so the guest shuts down)
    je 5f
    or $0x04, %ecx          # not the in-kernel LAPIC at its address: DS is not flat
5:  mov %cr0, %eax
    and $0x80000001, %eax
    cmp $0x00000001, %eax
    je 6f
    or $0x08, %ecx          # not protected mode with paging off
6:  pushf
    pop %eax
    test $0x200, %eax
    jz 7f
    or $0x10, %ecx          # interrupts on
7:  cmpl $0x53726448, 0x202(%esi)
    je 8f
    or $0x20, %ecx          # %esi is not boot_params
    jmp done
8:  cmpl ${LOAD:#x}, 0x214(%esi)
    je 9f
    or $0x40, %ecx          # code32_start is not where we run
9:  cmpb $0, 0x1e8(%esi)
    jne 10f
    or $0x40, %ecx          # no e820 map
10: mov $0x3f8, %dx
    mov $(msg - pstart + {LOAD:#x}), %ebx
    call puts
    mov 0x228(%esi), %ebx   # cmd_line_ptr
    call puts
    mov $(msg2 - pstart + {LOAD:#x}), %ebx
    call puts
    mov 0x218(%esi), %ebx   # ramdisk_image (its text is NUL-terminated)
    call puts
    mov $(nl - pstart + {LOAD:#x}), %ebx
    call puts
done:
    mov %ecx, %eax
    or $0x80, %al
    outb %al, $0xf4
11: hlt
    jmp 11b
puts:
    movb (%ebx), %al
    test %al, %al
    jz 12f
    outb %al, %dx
    inc %ebx
    jmp puts
12: ret
msg:  .asciz "BOOT32 cmdline="
msg2: .asciz " initrd="
nl:   .asciz "\r\n"
    .balign 16
    .fill 256, 1, 0
stack_top:
pend:
"""


@pytest.fixture(scope="module")
def tiny_bzimage32(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("boot32")
    kernel = assemble_flat(TINY_BZIMAGE32, d, "bzImage32")
    assert bzimage.entry_protocol(kernel.read_bytes()) == "linux32"
    (d / "initrd").write_bytes(INITRD_TEXT.encode() + b"\0")
    return kernel


def test_a_32bit_bzimage_boots_directly_in_the_state_the_protocol_promises(tiny_bzimage32):
    r = corral(
        "run",
        "--kernel",
        str(tiny_bzimage32),
        "--initrd",
        str(tiny_bzimage32.parent / "initrd"),
        "--cmdline",
        "console=ttyS0 hello32",
        "--debug-exit",
        "iobase=0xf4",
        "--memory",
        "128M",
        timeout=60,
    )
    out = r.stdout.replace("\r", "")
    assert f"BOOT32 cmdline=console=ttyS0 hello32 initrd={INITRD_TEXT}\n" in out, (out, r.stderr)
    assert r.returncode == OK, f"failed checks {r.returncode & 0x7F:#x}: {out} {r.stderr}"
