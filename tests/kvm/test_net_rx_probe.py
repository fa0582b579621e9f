"""The probe's ring-3 receive driver (`net-rx-bench`) while the host floods the tap: under corral
every counted frame arrives whole and in order (the sequence numbers only ever go up, gaps being
frames the host's tap dropped while the guest was busy), and the same probe passes under QEMU's
virtio-net-pci, the reference device, so the driver is not written to corral's quirks."""

from __future__ import annotations

from pathlib import Path

from support.net import fresh_tap
from support.netflood import Flood
from support.probe import run_probe
from support.qemu_probe import run_qemu_probe

from corral.config import NetConfig

FRAMES = 3000


def _quiet(tap: str) -> None:
    Path(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6").write_text("1")  # no chatter of the host's


def test_corral_receives_a_flood_in_order():
    with fresh_tap("crx", up=True) as tap:
        _quiet(tap)
        with Flood(tap, seconds=60) as flood:
            run = run_probe(f"net-rx-bench {FRAMES} 40", timeout=90, nets=[NetConfig(tap=tap)])
        assert run.status == 0, run.output
    r = run.results
    assert (r["net_rx_frames"], r["net_rx_errors"], r["net_rx_timeout"]) == (str(FRAMES), "0", "0")
    assert int(r["net_rx_bytes"]) == FRAMES * (12 + 60)  # header and the 60-byte frame, each
    assert flood.result["sent"] >= FRAMES


def test_qemu_runs_the_same_receive_driver():
    with fresh_tap("cqx", up=True) as tap:
        _quiet(tap)
        with Flood(tap, seconds=60):
            run = run_qemu_probe(
                f"net-rx-bench {FRAMES} 40",
                accel="kvm",
                extra=[
                    "-netdev",
                    f"tap,id=n0,ifname={tap},script=no,downscript=no",
                    "-device",
                    "virtio-net-pci,netdev=n0,disable-legacy=on",
                ],
                timeout=90,
            )
    assert run.status == 0, run.output
    assert (run.results["net_rx_frames"], run.results["net_rx_errors"]) == (str(FRAMES), "0")
