"""32-bit guests in the lab (real SVM): Debian's unmodified 686 kernel (bookworm's
linux-image-686, i386) boots to userspace under corral, directly through the 32-bit Linux boot
protocol and through SeaBIOS (QEMU's linuxboot option ROM from fw_cfg, the kernel's own
real-mode setup). Its /init is a static 32-bit program (tests/support/boot32_init.c) that prints
the pointer size and uname's machine, then powers off: the banner proves userspace ran, corral's
exit status 0 that ACPI S5 worked (through SeaBIOS the tables are corral's too, installed by
SeaBIOS from fw_cfg's table-loader)."""

from __future__ import annotations

from support.lab_boot32 import BANNER
from support.lab_debian import LAB_CPU, need
from support.labhost import CORRAL

CMDLINE = "console=ttyS0 panic=-1 quiet"


def boot32(lab, images, extra: str = "", cmdline: str = CMDLINE, timeout: float = 300):
    run = (
        f"{CORRAL} run --kernel {images['kernel']} --initrd {images['initrd']} --memory 256M "
        f"{LAB_CPU} --no-reboot {extra} --cmdline '{cmdline}' </dev/null"
    )
    return lab.run(run, timeout=timeout)


def test_debian_686_kernel_boots_directly_to_userspace(boot32_build, lab):
    res = boot32(lab, need(boot32_build))
    assert BANNER in res.output, res.output
    assert res.status == 0, res.output  # the init's poweroff: ACPI S5 -> corral exits 0


def test_debian_686_kernel_boots_through_seabios(boot32_build, lab):
    # pnpbios=off: no 16-bit PnP BIOS calls (SeaBIOS has none to answer)
    res = boot32(lab, need(boot32_build), "--firmware seabios", f"{CMDLINE} pnpbios=off", 560)
    assert "Booting from ROM" in res.output, res.output
    assert BANNER in res.output, res.output
    assert res.status == 0, res.output
