"""The daemon's metrics from a VM's GET /corral/stats reply (metrics._vm_stats): the samples a
well-formed reply gives, and a reply of the wrong shape (the VM process is not trusted) leaving
out what does not fit, never failing the scrape, with bounded label values."""

from __future__ import annotations

from typing import Any

from corral.daemon import metrics


def _collect(stats: object) -> list[tuple[str, float, dict[str, str]]]:
    out: list[tuple[str, float, dict[str, str]]] = []

    def put(name: str, value: float, **labels: str) -> None:
        out.append((name, value, labels))

    metrics._vm_stats(put, "a", stats)
    return out


def _reply(enabled: bool) -> dict[str, Any]:
    counter = {"key": "IO", "count": 7, "ns": 2_000_000_000}
    return {
        "enabled": enabled,
        "vcpus": [
            {
                "vcpu": 0,
                "exits": 11,
                "run_ns": 3_000_000_000,
                "halts": 4,
                "interrupts": 9,
                "by_reason": [counter],
                "pio_by_port": [{"key": "0x3f8", "count": 5, "ns": 1}],
                "mmio_by_address": [],
                "by_device": [{"key": "com1 (pio)", "count": 5, "ns": 1}],
            }
        ],
        "devices": [{"device": "virtio-blk0", "counters": {"requests": 3, "read_bytes": 12288}}],
        "memory": {"guest_bytes": 1 << 27, "ksm": True, "ksm_merged_bytes": 4096},
    }


def test_a_reply_with_exit_stats_gives_every_family():
    got = {(n, tuple(sorted(lb.items()))): v for n, v, lb in _collect(_reply(True))}
    assert got[("corral_vm_exits_total", (("vcpu", "0"), ("vm", "a")))] == 11
    assert got[("corral_vm_exits_by_reason_total", (("reason", "IO"), ("vcpu", "0"), ("vm", "a")))] == 7
    assert (
        got[("corral_vm_exit_handling_seconds_total", (("reason", "IO"), ("vcpu", "0"), ("vm", "a")))] == 2.0
    )
    assert got[("corral_vm_kvm_run_seconds_total", (("vcpu", "0"), ("vm", "a")))] == 3.0
    assert got[("corral_vm_halts_total", (("vcpu", "0"), ("vm", "a")))] == 4
    assert got[("corral_vm_interrupts_injected_total", (("vcpu", "0"), ("vm", "a")))] == 9
    assert got[("corral_vm_pio_exits_total", (("port", "0x3f8"), ("vcpu", "0"), ("vm", "a")))] == 5
    assert got[("corral_vm_device_exits_total", (("device", "com1 (pio)"), ("vcpu", "0"), ("vm", "a")))] == 5
    key = (("counter", "read_bytes"), ("device", "virtio-blk0"), ("vm", "a"))
    assert got[("corral_vm_device_io_total", key)] == 12288
    assert got[("corral_vm_ksm_merged_bytes", (("vm", "a"),))] == 4096
    assert got[("corral_vm_ksm_enabled", (("vm", "a"),))] == 1
    assert got[("corral_vm_exit_stats_enabled", (("vm", "a"),))] == 1


def test_without_exit_stats_only_the_always_on_counters():
    names = {n for n, _, _ in _collect(_reply(False))}
    assert "corral_vm_exits_total" in names and "corral_vm_device_io_total" in names
    assert not names & {
        "corral_vm_exits_by_reason_total",
        "corral_vm_kvm_run_seconds_total",
        "corral_vm_pio_exits_total",
        "corral_vm_device_exits_total",
    }


def test_a_reply_of_the_wrong_shape_is_left_out_not_fatal():
    for junk in (None, [], "x", 5, {"vcpus": "x"}, {"vcpus": [1, None, {"exits": "many"}]}, {"memory": []}):
        names = {n for n, _, _ in _collect(junk)}
        assert names <= {"corral_vm_exit_stats_enabled"}, (junk, names)
    hostile = _reply(True)
    hostile["vcpus"][0]["exits"] = True  # a bool is not a count
    hostile["vcpus"][0]["by_reason"] = [{"key": "K" * 10_000, "count": 1, "ns": 1}] * 10_000
    hostile["devices"] = [{"device": "d" * 500, "counters": {"x" * 500: 1, "y": "nan"}}]
    got = _collect(hostile)
    assert not any(n == "corral_vm_exits_total" for n, _, _ in got)
    assert all(len(v) <= 64 for _, _, lb in got for v in lb.values())
    assert sum(n == "corral_vm_exits_by_reason_total" for n, _, _ in got) == 256  # bounded
    io = [lb for n, _, lb in got if n == "corral_vm_device_io_total"]
    assert io == [{"vm": "a", "device": "d" * 64, "counter": "x" * 64}]
