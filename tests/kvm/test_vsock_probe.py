"""The probe's ring-3 virtio-vsock driver against real host Unix sockets, both ways: a guest
stream to a host listener (`vsock-tx-bench`, the guest connects to CID 2) and a host stream into
a guest listener (`vsock-rx-bench`, the host connects through the uds with `CONNECT <port>`).
Every byte arrives once and in order (the CRC-32 of each end's stream agree), credit is honoured
both ways (corral resets a guest that overruns it; the probe would stall on a host that did), and
a stream ends with the clean disconnect of the spec (SHUTDOWN, then the host's RST)."""

from __future__ import annotations

from pathlib import Path

from support.probe import ProbeRun, run_probe
from support.vsock_peer import MiB, Sink, Source

from corral.config import VsockConfig


def _run(tmp_path: Path, cmdline: str) -> ProbeRun:
    return run_probe(cmdline, timeout=60, vsock=VsockConfig(cid=3, uds_path=tmp_path / "v.sock"))


def _same_stream(run: ProbeRun, peer: Sink | Source, way: str, size: int) -> None:
    """The guest and the host end counted `size` bytes each, and the same CRC-32."""
    assert run.status == 0, run.output
    assert peer.result["error"] is None
    assert int(run.results[f"vsock_{way}_bytes"]) == peer.result["bytes"] == size
    assert run.results[f"vsock_{way}_crc"] == f"0x{peer.result['crc']:08x}"


def test_a_guest_stream_reaches_the_host_whole(tmp_path):
    with Sink(tmp_path / "v.sock", 5000, timeout=60) as sink:
        run = _run(tmp_path, "vsock-tx-bench 5000 8M")
    _same_stream(run, sink, "tx", 8 * MiB)
    r = run.results
    assert (r["vsock_complete"], r["vsock_rst"]) == ("1", "1")  # the host's RST ended it cleanly
    # 256 KiB of host credit: the guest had to wait for corral's credit updates on the way
    assert int(r["vsock_tx_packets"]) >= 8 * MiB // (64 << 10)


def test_a_host_stream_reaches_a_guest_listener_whole(tmp_path):
    # 4 KiB receive buffers as Linux posts them: ~2,000 packets and ~130 credit updates
    with Source(tmp_path / "v.sock", 5001, 8 * MiB, timeout=60) as source:
        run = _run(tmp_path, "vsock-rx-bench 5001 8M 4K")
    _same_stream(run, source, "rx", 8 * MiB)
    assert int(run.results["vsock_rx_packets"]) >= 8 * MiB // 4096
    assert source.result["eof_at"]  # the guest's SHUTDOWN closed the host's socket


def test_a_connect_to_a_port_nobody_listens_on_is_refused(tmp_path):
    run = _run(tmp_path, "vsock-tx-bench 5003 1M")
    assert run.status == 1, run.output
    assert run.results["vsock_error"] == "refused"


def test_what_the_guest_sent_before_a_full_shutdown_reaches_a_slow_host(tmp_path):
    """As Linux's close() does: the last bytes, then SHUTDOWN both ways at once. The host reads
    nothing for a while, so corral still holds up to its 256 KiB of the guest's bytes when the
    SHUTDOWN comes: they are delivered before the RST that ends the stream (they were dropped)."""
    with Sink(tmp_path / "v.sock", 5002, timeout=60, hold_s=1.5) as sink:
        run = _run(tmp_path, "vsock-tx-bench 5002 384K 64K close")
    _same_stream(run, sink, "tx", 384 << 10)
    assert run.results["vsock_rst"] == "1"
