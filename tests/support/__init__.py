"""What the tests share, on pytest's `pythonpath` (pyproject.toml): `from support.fakes import ...`.

    fakes          IrqLine, VmControl, event loop, doorbells, MSI vector, clock stand-ins
    virtio_driver  the driver side of a virtio-pci device, in Python
    disks          patterned disk images and sector reads
    net            a fresh tap device (root)
    results        the one parser of the probe guest's RESULT and PROGRESS lines
    scenarios      the probe scenarios every runner (corral, QEMU, the lab) boots
    probe          the probe under corral, through the library
    live_probe     a probe kept running, for pause/snapshot/migration tests
    qemu_probe     the probe under QEMU
    cli            `corral ...` as a user runs it: a subprocess
    labhost, lab_rootfs, lab_debian   the nested TCG lab and what its tests share

Modules here import corral and each other, never a test module.
"""
