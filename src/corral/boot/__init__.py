"""Kernel loaders: each turns a kernel image into guest memory contents plus a boot CPU state."""

from corral.boot._common import BootInfo
from corral.boot.loader import load_kernel, load_kernel_file

__all__ = ["BootInfo", "load_kernel", "load_kernel_file"]
