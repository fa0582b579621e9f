"""Debugging a running guest from outside: a GDB remote-protocol stub (`corral run --gdb`).

The stub sits above the machine (it uses its public pause/resume/snapshot verbs, its vCPUs and
guest memory) and below the CLI; the protocol framing and the x86-64 register file are pure
modules, tested without a guest.
"""

from corral.debug.stub import GdbAddress, GdbError, GdbStub

__all__ = ["GdbAddress", "GdbError", "GdbStub"]
