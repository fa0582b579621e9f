"""The daemon's /metrics from each VM's GET /corral/stats, with real probe VMs: a VM reading its
virtio-blk disk shows requests and bytes that grow between scrapes, exit counts and vCPU time
that grow, and (created with `exit_stats`) its exits by reason, port and device; a VM without
exit_stats shows its exit total but no per-reason counts; `ksm` at create reaches the VM's
guest RAM (MADV_MERGEABLE) through the config's `corral` key and shows in the metrics."""

from __future__ import annotations

import re
import time

import pytest
from support.daemon import Daemon
from support.disks import patterned_image
from support.results import progress_rounds

from corral.daemon.vmapi import ApiError
from corral.images.probe import build_probe


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state")
    yield d
    d.close()


def _samples(text: str, name: str, vm: str) -> dict[str, float]:
    """{labels after vm=...: value} of one metric of one VM."""
    out = {}
    for m in re.finditer(rf'^{name}\{{vm="{vm}"(,?[^}}]*)\}} (\S+)$', text, re.M):
        out[m.group(1).lstrip(",")] = float(m.group(2))
    return out


def _wait(daemon: Daemon, pred, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = daemon.api.call("GET", "/metrics")
        if pred(text):
            return text
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.2)


def test_metrics_show_device_io_exits_and_vcpu_time_that_move(daemon, tmp_path):
    disk = patterned_image(tmp_path / "disk.img", 8192)
    drive = {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False, "is_read_only": True}
    config = {
        "boot-source": {"kernel_image_path": str(build_probe()), "boot_args": "blk-bench rand4k 100000000"},
        "drives": [drive],
    }
    daemon.api.call("POST", "/vms", {"id": "io", "config": config})
    daemon.create("busy", "mem-touch 16M forever", exit_stats=True, ksm=True)

    def reading(text: str) -> bool:
        io = _samples(text, "corral_vm_device_io_total", "io")
        return io.get('device="virtio-blk0",counter="requests"', 0) > 100

    first = _wait(daemon, reading)
    daemon.wait_rounds("busy", max(progress_rounds(daemon.console("busy")), default=0) + 2)
    second = _wait(daemon, reading)
    for vm, name, key in (
        ("io", "corral_vm_device_io_total", 'device="virtio-blk0",counter="requests"'),
        ("io", "corral_vm_device_io_total", 'device="virtio-blk0",counter="read_bytes"'),
        ("io", "corral_vm_vcpu_seconds_total", 'vcpu="0"'),
        ("busy", "corral_vm_vcpu_seconds_total", 'vcpu="0"'),
        ("busy", "corral_vm_exits_total", 'vcpu="0"'),
        ("busy", "corral_vm_exits_by_reason_total", 'vcpu="0",reason="IO"'),
        ("busy", "corral_vm_pio_exits_total", 'vcpu="0",port="0x3f8"'),
    ):
        a, b = _samples(first, name, vm).get(key), _samples(second, name, vm).get(key)
        assert a is not None and b is not None and b > a, (vm, name, key, a, b)
    # counters read while the device runs are not one atomic snapshot: paused, they are still
    daemon.api.call("POST", "/vms/io/pause")
    io = _samples(daemon.api.call("GET", "/metrics"), "corral_vm_device_io_total", "io")
    assert io['device="virtio-blk0",counter="write_bytes"'] == 0  # blk-bench only reads
    assert io['device="virtio-blk0",counter="errors"'] == 0
    assert (
        io['device="virtio-blk0",counter="read_bytes"']
        == 4096 * io['device="virtio-blk0",counter="requests"']
    )
    # exit_stats: counted since boot, by device and with the time in KVM_RUN
    assert _samples(second, "corral_vm_exit_stats_enabled", "busy") == {"": 1.0}
    by_device = _samples(second, "corral_vm_device_exits_total", "busy")
    assert by_device.get('vcpu="0",device="com1 (pio)"', 0) > 0, by_device
    assert _samples(second, "corral_vm_kvm_run_seconds_total", "busy")['vcpu="0"'] > 0
    # without exit_stats: the exit total only (off costs nothing), and no KSM
    assert 'vcpu="0"' in _samples(second, "corral_vm_exits_total", "io")
    assert 'vcpu="0"' in _samples(second, "corral_vm_halts_total", "io")  # KVM's own, always there
    assert _samples(second, "corral_vm_exit_stats_enabled", "io") == {"": 0.0}
    assert _samples(second, "corral_vm_exits_by_reason_total", "io") == {}
    assert _samples(second, "corral_vm_ksm_enabled", "busy") == {"": 1.0}
    assert _samples(second, "corral_vm_ksm_enabled", "io") == {"": 0.0}
    assert "" in _samples(second, "corral_vm_ksm_merged_bytes", "busy")
    assert re.search(r"^corral_scrape_skipped_vms 0$", second, re.M)


def _flags_of_size(pid: int, size: int) -> list[list[str]]:
    """VmFlags of the process's mappings of exactly `size` bytes (guest RAM)."""
    out, current = [], 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if m := re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line):
                current = int(m.group(2), 16) - int(m.group(1), 16)
            elif line.startswith("VmFlags:") and current == size:
                out.append(line.split()[1:])
    return out


def test_ksm_through_the_daemon_marks_guest_ram_mergeable(daemon):
    pid = daemon.create("k", "halt 8M", ksm=True)["pid"]
    config = (daemon.state / "vms" / "k" / "config.json").read_text()
    assert '"ksm": true' in config  # the config's `corral` key, beside Firecracker's
    deadline = time.monotonic() + 30
    while not (flags := _flags_of_size(pid, 128 << 20)):
        assert time.monotonic() < deadline, "no guest RAM mapping found"
        time.sleep(0.1)
    assert all("mg" in f for f in flags), flags
    plain = daemon.create("p", "halt 8M")["pid"]
    assert _flags_of_size(plain, 128 << 20) and not any("mg" in f for f in _flags_of_size(plain, 128 << 20))


def test_ksm_is_for_a_vm_from_a_config(daemon, tmp_path):
    with pytest.raises(ApiError, match="ksm"):
        daemon.api.call("POST", "/vms", {"snapshot": str(tmp_path), "ksm": True})
