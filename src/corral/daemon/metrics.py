"""Prometheus text (exposition format 0.0.4) for every VM of the daemon.

Per VM: whether its process runs and its state; CPU time of the VM process from /proc (user
and system; the vCPU threads are nearly all of it); its memory as the kernel counts it
(/proc/PID/smaps_rollup: RSS, PSS, private, KSM-merged); its cgroup's counters (memory in use,
CPU throttling, tasks); and what the VM's API exposes (the balloon's guest statistics, when the
VM has a balloon).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from corral.daemon.cgroups import Cgroups
from corral.daemon.models import VmInfo
from corral.daemon.statedir import VmDir
from corral.daemon.vmapi import ApiError, HttpClient

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
            for kind, value in sorted(proc_memory(info.pid).items()):
                put("corral_vm_memory_bytes", value, vm=vm, kind=kind)
            if info.state in ("running", "paused"):
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
    lines = []
    for name, (kind, text) in HELP.items():
        if samples[name]:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


def _balloon(d: VmDir) -> dict[str, float]:
    """The balloon's statistics through the VM's API (nothing when it has no balloon)."""
    raw = d.read(d.config)
    if not raw or b'"balloon"' not in raw:
        return {}
    try:
        stats = HttpClient(str(d.api_sock), timeout=2.0).call("GET", "/balloon/statistics")
    except ApiError:
        return {}
    if not isinstance(stats, dict):
        return {}
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}


__all__ = ["CONTENT_TYPE", "proc_cpu", "proc_memory", "render"]
