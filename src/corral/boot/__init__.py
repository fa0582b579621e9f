"""Kernel loaders: each turns a kernel image into guest memory contents plus a boot CPU state."""
