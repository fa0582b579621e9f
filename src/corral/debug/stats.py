"""Exit statistics of a running machine as typed data (GET /corral/stats, `corral stats`): per
vCPU the exits by reason, port I/O and MMIO exits by address and by device (the bus mapping
that address belongs to), halts, and the ns the VMM spent on each, plus the time in KVM_RUN.

The exit counters are the vCPUs' own (corral.vstate.exits); this module only reads and shapes
them. Interrupts are injected by KVM's in-kernel irqchip and halts wait there too, so neither
reaches the VMM as an exit: those come from KVM's own per-vCPU counters (corral.vstate.kvm_stats:
halt_exits, irq_injections, ...), counted since the vCPU was created, whether or not exit
statistics are on. Where KVM has no such fd (before Linux 5.14) `kvm_stats` says so and `halts`
falls back to the KVM_EXIT_HLT exits the VMM saw.

Always there, whether or not exits are being counted (none costs anything on the exit path; the
devices pay a few integer adds per request): every vCPU's exit total, each device's I/O
counters (virtio-blk requests and bytes, virtio-net frames and bytes), and guest memory with
what KSM merged of it (the VM's exit total moves on the exits the VMM handles slowly, and on
every exit while exits are counted). The daemon's /metrics is built from this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

from corral.errors import HostError
from corral.kvm import constants as K

if TYPE_CHECKING:
    from corral.devices.bus import Mapping
    from corral.machine import Machine

NO_STATS_FD = "this KVM has no statistics fd (KVM_GET_STATS_FD, Linux 5.14): halts are HLT exits only"
TOP = 32  # addresses listed per vCPU and space (the busiest); devices are always all listed


class Counter(BaseModel):
    """How many exits, and the ns the VMM spent handling them."""

    key: str  # a reason name, "0x3f8", or a device name
    count: int
    ns: int


class VcpuExitStats(BaseModel):
    vcpu: int
    exits: int  # every exit since the vCPU started (counted whether or not stats are on)
    run_ns: int  # time inside KVM_RUN while stats were on
    halts: int  # HLTs: KVM's halt_exits, or the KVM_EXIT_HLT exits where KVM's counters are not read
    interrupts: int | None = None  # interrupts KVM injected (irq_injections); None without KVM's counters
    kvm: dict[str, int]  # every scalar counter of KVM's statistics fd for this vCPU (empty: see kvm_stats)
    by_reason: list[Counter]
    pio_by_port: list[Counter]
    mmio_by_address: list[Counter]
    by_device: list[Counter]


class DeviceCounters(BaseModel):
    """A device's I/O counters, always kept (virtio-blk: requests, bytes; virtio-net: frames)."""

    device: str  # the board's name: virtio-blk0, virtio-net0, ...
    counters: dict[str, int]


class MemoryStats(BaseModel):
    guest_bytes: int
    ksm: bool  # guest RAM is offered to KSM (MADV_MERGEABLE)
    ksm_merged_bytes: int  # what KSM has merged of it (the host memory it saves, at most)


class ExitStats(BaseModel):
    """The reply of GET /corral/stats."""

    enabled: bool  # stats are being counted (`corral run --stats`, PATCH /corral/stats)
    kvm_stats: str  # "read" (KVM's own counters are in each vCPU's `kvm`), or one line saying why not
    vcpus: list[VcpuExitStats]
    devices: list[DeviceCounters] = []
    memory: MemoryStats | None = None


def device_of(mappings: Sequence[Mapping], addr: int) -> str:
    for m in mappings:
        if m.base <= addr < m.end:
            return m.name or type(m.device).__name__
    return "unassigned"


def reason_name(reason: int) -> str:
    return K.EXIT_NAMES.get(reason, str(reason))


def _counters(table: dict[int, list[int]], key: object) -> list[Counter]:
    rows = [Counter(key=key(k) if callable(key) else str(k), count=c, ns=ns) for k, (c, ns) in table.items()]
    return sorted(rows, key=lambda r: (-r.count, r.key))


def device_counters(machine: Machine) -> list[DeviceCounters]:
    out = []
    for name, pci in sorted(machine.virtio.items()):
        counters = getattr(pci.device, "io_counters", None)
        if callable(counters):
            out.append(DeviceCounters(device=name, counters=counters()))
    return out


def exit_stats(machine: Machine) -> ExitStats:
    """The machine's exit statistics now (empty lists for vCPUs never observed)."""
    board = machine.board
    why_not: str | None = None
    pio_maps = list(board.pio.mappings) if board else []
    mmio_maps = list(board.mmio.mappings) if board else []
    out = []
    for v in machine.vcpus:
        obs = machine.exit_observers.get(v.index)
        kvm: dict[str, int] = {}
        if v.kvm_stats is None:
            why_not = NO_STATS_FD
        else:
            try:
                kvm = v.kvm_stats.read()
            except (HostError, OSError) as exc:  # StatsFormatError; a vCPU closed under us
                why_not = f"KVM's statistics fd of vCPU {v.index} cannot be read: {exc}"
        by_reason, pio, mmio, run_ns = obs.snapshot() if obs else ({}, {}, {}, 0)
        devices: dict[str, list[int]] = {}
        for table, maps, space in ((pio, pio_maps, "pio"), (mmio, mmio_maps, "mmio")):
            for addr, (count, ns) in table.items():
                d = devices.setdefault(f"{device_of(maps, addr)} ({space})", [0, 0])
                d[0] += count
                d[1] += ns
        out.append(
            VcpuExitStats(
                vcpu=v.index,
                exits=v.exits,
                run_ns=run_ns,
                halts=kvm.get("halt_exits", by_reason.get(K.EXIT_HLT, [0, 0])[0]),
                interrupts=kvm.get("irq_injections"),
                kvm=kvm,
                by_reason=_counters(by_reason, reason_name),
                pio_by_port=_counters(pio, lambda p: f"{p:#x}")[:TOP],
                mmio_by_address=_counters(mmio, lambda a: f"{a:#x}")[:TOP],
                by_device=[Counter(key=k, count=c, ns=ns) for k, (c, ns) in sorted(devices.items())],
            )
        )
    mem = machine.memory
    memory = None
    if mem is not None:
        memory = MemoryStats(guest_bytes=mem.size, ksm=mem.ksm, ksm_merged_bytes=mem.ksm_merged_bytes())
    return ExitStats(
        enabled=machine.observing_exits,
        kvm_stats=why_not or "read",
        vcpus=out,
        devices=device_counters(machine),
        memory=memory,
    )


__all__ = [
    "Counter",
    "DeviceCounters",
    "ExitStats",
    "MemoryStats",
    "VcpuExitStats",
    "device_counters",
    "device_of",
    "exit_stats",
    "reason_name",
]
