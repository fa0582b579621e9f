"""Prometheus text (exposition format 0.0.4) for every VM of the daemon.

Per VM: whether its process runs and its state; CPU time of the VM process from /proc (user
and system) and of each vCPU thread (the threads named corral-vcpuN); its memory as the kernel counts it
(/proc/PID/smaps_rollup: RSS, PSS, private, KSM-merged); its cgroup's counters (memory in use,
CPU throttling, tasks); and what the VM's API exposes: GET /corral/stats (always: exits and CPU
per vCPU, each device's I/O counters, guest memory and what KSM merged of it; with exit
stats on, `exit_stats` at create: exits by reason, port and MMIO address, device, and the time
spent on them) and the balloon's guest statistics, when the VM has a balloon.

A scrape asks every running VM's API, one after another: SCRAPE_BUDGET bounds the whole, so a
host of unresponsive VMs cannot hold a scrape for minutes (VMs past it show only what /proc
and the cgroups say, and corral_scrape_skipped_vms counts them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from corral.daemon.cgroups import Cgroups
from corral.daemon.models import VmInfo
from corral.daemon.statedir import VmDir
from corral.daemon.vmapi import ApiError, HttpClient

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_BUDGET = 20.0  # seconds for all the VMs' API calls of one scrape
API_TIMEOUT = 2.0  # seconds for one VM's answer
MAX_THREADS = 4096  # threads of one VM process looked at
TICK = os.sysconf("SC_CLK_TCK")
STATES = ("starting", "not-started", "running", "paused", "unresponsive", "stopped", "dead")
SMAPS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "private", "Private_Dirty": "private", "KSM": "ksm"}

HELP: dict[str, tuple[str, str]] = {
    "corral_vms": ("gauge", "VMs of this daemon, by state."),
    "corral_vm_up": ("gauge", "1 while the VM's process runs."),
    "corral_vm_state": ("gauge", "1 for the VM's current state."),
    "corral_vm_vcpus": ("gauge", "vCPUs of the VM."),
    "corral_vm_guest_memory_bytes": ("gauge", "Guest RAM size."),
    "corral_vm_cpu_seconds_total": ("counter", "CPU time of the VM process (vCPUs, devices, API)."),
    "corral_vm_threads": ("gauge", "Threads of the VM process."),
    "corral_vm_memory_bytes": ("gauge", "Memory of the VM process (smaps_rollup), by kind."),
    "corral_vm_cgroup_memory_bytes": ("gauge", "Memory charged to the VM's cgroup."),
    "corral_vm_cgroup_tasks": ("gauge", "Tasks in the VM's cgroup."),
    "corral_vm_cpu_throttled_periods_total": ("counter", "CFS periods the VM was throttled in."),
    "corral_vm_cpu_throttled_seconds_total": ("counter", "Time the VM was throttled by its CPU limit."),
    "corral_vm_balloon": ("gauge", "The balloon's guest statistics, by name."),
    "corral_vm_exits_total": (
        "counter",
        "KVM exits per vCPU (always counted; without exit_stats, up to the VMM's last slow exit).",
    ),
    "corral_vm_vcpu_seconds_total": ("counter", "CPU time of each vCPU thread."),
    "corral_vm_halts_total": ("counter", "HLTs of each vCPU (KVM's halt_exits: always counted)."),
    "corral_vm_interrupts_injected_total": (
        "counter",
        "Interrupts KVM injected into each vCPU (irq_injections; absent where KVM has no stats fd).",
    ),
    "corral_vm_device_io_total": (
        "counter",
        "Device I/O: virtio-blk requests and bytes, virtio-net frames and bytes.",
    ),
    "corral_vm_ksm_merged_bytes": (
        "gauge",
        "Guest RAM that KSM merged with identical pages (host memory saved).",
    ),
    "corral_vm_ksm_enabled": ("gauge", "1 when the VM's guest RAM is offered to KSM."),
    "corral_vm_exit_stats_enabled": ("gauge", "1 while the VM counts exits by reason (exit_stats)."),
    "corral_vm_exits_by_reason_total": ("counter", "Exits per vCPU by KVM exit reason (exit_stats on)."),
    "corral_vm_exit_handling_seconds_total": (
        "counter",
        "VMM time handling exits, by reason (exit_stats on).",
    ),
    "corral_vm_kvm_run_seconds_total": ("counter", "Time inside KVM_RUN per vCPU (exit_stats on)."),
    "corral_vm_pio_exits_total": ("counter", "Port I/O exits by port, the busiest per vCPU (exit_stats on)."),
    "corral_vm_mmio_exits_total": ("counter", "MMIO exits by address, the busiest per vCPU (exit_stats on)."),
    "corral_vm_device_exits_total": ("counter", "Port and MMIO exits by device (exit_stats on)."),
    "corral_scrape_skipped_vms": ("gauge", "Running VMs whose API this scrape did not ask (budget spent)."),
}


def _labels(**kv: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items())
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def proc_cpu(pid: int) -> tuple[float, float, int] | None:
    """(user seconds, system seconds, threads) of the process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read(4096).rpartition(b")")[2].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK, int(fields[17])
    except (OSError, ValueError, IndexError):
        return None


def proc_vcpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each vCPU thread of a VM process, by vCPU index: the threads the VMM
    names corral-vcpuN, their run time from schedstat (ns; the kernel's, not the VM's word)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")[:MAX_THREADS]
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
                comm = f.read(64).strip()
            if not comm.startswith(b"corral-vcpu") or not comm[11:].isdigit():
                continue
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                out[int(comm[11:])] = int(f.read(128).split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return out


def proc_memory(pid: int) -> dict[str, int]:
    """Bytes by kind (rss, pss, private, ksm) from /proc/PID/smaps_rollup."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read(8192).decode(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        kind = SMAPS.get(key)
        parts = rest.split()
        if kind and parts and parts[0].isdigit():
            out[kind] = out.get(kind, 0) + int(parts[0]) * 1024
    return out


def render(vms: Iterable[tuple[VmInfo, VmDir]], cgroups: Cgroups | None) -> str:
    """The whole scrape."""
    samples: dict[str, list[str]] = {name: [] for name in HELP}

    def put(name: str, value: float, **labels: str) -> None:
        text = str(value) if isinstance(value, int) else repr(float(value))
        samples[name].append(f"{name}{_labels(**labels) if labels else ''} {text}")

    counts = dict.fromkeys(STATES, 0)
    deadline = time.monotonic() + SCRAPE_BUDGET
    skipped = 0
    for info, d in vms:
        vm = info.id
        counts[info.state] = counts.get(info.state, 0) + 1
        put("corral_vm_up", 1 if info.pid is not None else 0, vm=vm)
        put("corral_vm_state", 1, vm=vm, state=info.state)
        if info.vcpus is not None:
            put("corral_vm_vcpus", info.vcpus, vm=vm)
        if info.mem_mib is not None:
            put("corral_vm_guest_memory_bytes", info.mem_mib << 20, vm=vm)
        if info.pid is not None:
            cpu = proc_cpu(info.pid)
            if cpu is not None:
                put("corral_vm_cpu_seconds_total", cpu[0], vm=vm, mode="user")
                put("corral_vm_cpu_seconds_total", cpu[1], vm=vm, mode="system")
                put("corral_vm_threads", cpu[2], vm=vm)
            for index, seconds in sorted(proc_vcpu_seconds(info.pid).items()):
                put("corral_vm_vcpu_seconds_total", seconds, vm=vm, vcpu=str(index))
            for kind, value in sorted(proc_memory(info.pid).items()):
                put("corral_vm_memory_bytes", value, vm=vm, kind=kind)
            if info.state in ("running", "paused") and time.monotonic() >= deadline:
                skipped += 1
            elif info.state in ("running", "paused"):
                _vm_stats(put, vm, _api(d, "/corral/stats"))
                for stat_name, stat_value in _balloon(d).items():
                    put("corral_vm_balloon", stat_value, vm=vm, stat=stat_name)
        if cgroups is not None and info.cgroups.groups:
            stat = cgroups.stat(cgroups.group(vm))
            if "memory_bytes" in stat:
                put("corral_vm_cgroup_memory_bytes", stat["memory_bytes"], vm=vm)
            if "tasks" in stat:
                put("corral_vm_cgroup_tasks", stat["tasks"], vm=vm)
            if "nr_throttled" in stat:
                put("corral_vm_cpu_throttled_periods_total", stat["nr_throttled"], vm=vm)
            if "throttled_usec" in stat:
                put("corral_vm_cpu_throttled_seconds_total", stat["throttled_usec"] / 1e6, vm=vm)
    for state, n in counts.items():
        put("corral_vms", n, state=state)
    put("corral_scrape_skipped_vms", skipped)
    lines = []
    for name, (kind, text) in HELP.items():
        if samples[name]:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


def _api(d: VmDir, path: str) -> Any:
    """GET `path` from the VM's API; None when it does not answer well."""
    try:
        return HttpClient(str(d.api_sock), timeout=API_TIMEOUT).call("GET", path)
    except ApiError:
        return None


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _vm_stats(put: Any, vm: str, stats: object) -> None:
    """The samples of one VM's GET /corral/stats reply (corral.debug.stats.ExitStats), read as
    the untrusted JSON it is: anything not of the expected shape is left out."""
    if not isinstance(stats, dict):
        return
    enabled = stats.get("enabled") is True
    put("corral_vm_exit_stats_enabled", int(enabled), vm=vm)
    for v in _dicts(stats.get("vcpus")):
        cpu = str(_int(v.get("vcpu")))
        if (n := _int(v.get("exits"))) is not None:
            put("corral_vm_exits_total", n, vm=vm, vcpu=cpu)
        if (n := _int(v.get("halts"))) is not None:
            put("corral_vm_halts_total", n, vm=vm, vcpu=cpu)
        if (n := _int(v.get("interrupts"))) is not None:
            put("corral_vm_interrupts_injected_total", n, vm=vm, vcpu=cpu)
        if not enabled:
            continue
        if (ns := _int(v.get("run_ns"))) is not None:
            put("corral_vm_kvm_run_seconds_total", ns / 1e9, vm=vm, vcpu=cpu)
        for c in _dicts(v.get("by_reason")):
            if (n := _int(c.get("count"))) is not None:
                put("corral_vm_exits_by_reason_total", n, vm=vm, vcpu=cpu, reason=_text(c.get("key")))
            if (ns := _int(c.get("ns"))) is not None:
                put(
                    "corral_vm_exit_handling_seconds_total",
                    ns / 1e9,
                    vm=vm,
                    vcpu=cpu,
                    reason=_text(c.get("key")),
                )
        for field, name, label in (
            ("pio_by_port", "corral_vm_pio_exits_total", "port"),
            ("mmio_by_address", "corral_vm_mmio_exits_total", "address"),
            ("by_device", "corral_vm_device_exits_total", "device"),
        ):
            for c in _dicts(v.get(field)):
                if (n := _int(c.get("count"))) is not None:
                    put(name, n, vm=vm, vcpu=cpu, **{label: _text(c.get("key"))})
    for dev in _dicts(stats.get("devices")):
        counters = dev.get("counters")
        for key, n in counters.items() if isinstance(counters, dict) else ():
            if _int(n) is not None:
                put(
                    "corral_vm_device_io_total", n, vm=vm, device=_text(dev.get("device")), counter=_text(key)
                )
    mem = stats.get("memory")
    if isinstance(mem, dict):
        put("corral_vm_ksm_enabled", int(mem.get("ksm") is True), vm=vm)
        if (n := _int(mem.get("ksm_merged_bytes"))) is not None:
            put("corral_vm_ksm_merged_bytes", n, vm=vm)


def _text(v: object) -> str:
    return str(v)[:64]  # a label value from a VM's reply: bounded


def _dicts(v: object) -> list[dict[str, Any]]:
    return [x for x in v if isinstance(x, dict)][:256] if isinstance(v, list) else []


def _balloon(d: VmDir) -> dict[str, float]:
    """The balloon's statistics through the VM's API (nothing when it has no balloon)."""
    raw = d.read(d.config)
    if not raw or b'"balloon"' not in raw:
        return {}
    stats = _api(d, "/balloon/statistics")
    if not isinstance(stats, dict):
        return {}
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}


__all__ = ["CONTENT_TYPE", "proc_cpu", "proc_memory", "proc_vcpu_seconds", "render"]
