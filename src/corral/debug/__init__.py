"""Debugging a running guest from outside: a GDB remote-protocol stub (`corral run --gdb`),
ELF cores of guest memory (dump.py: `corral dump`, `--dump-on-crash`), and exit statistics and
traces (stats.py, trace.py: `corral stats`, `corral run --trace`, `corral trace show`).

The stub sits above the machine (it uses its public pause/resume/snapshot verbs, its vCPUs and
guest memory) and below the CLI; the protocol framing and the x86-64 register file are pure
modules, tested without a guest.
"""

from corral.debug.dump import DumpError, DumpStats, dump_core
from corral.debug.stats import ExitStats, exit_stats
from corral.debug.stub import GdbAddress, GdbError, GdbStub
from corral.debug.trace import TraceError, TraceWriter

__all__ = [
    "DumpError",
    "DumpStats",
    "ExitStats",
    "GdbAddress",
    "GdbError",
    "GdbStub",
    "TraceError",
    "TraceWriter",
    "dump_core",
    "exit_stats",
]
