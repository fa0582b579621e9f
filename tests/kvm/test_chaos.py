"""The chaos guest in CI (issue 13): the probe's `chaos SEED N` scenario writes random ports,
MMIO over every virtio BAR, the ECAM window and the unclaimed hole, random PCI configuration,
and virtqueues on random rings with random descriptors and doorbells, from ring 3, against a
VM with every virtio device. For several seeds the VMM must survive: the guest gets through
(RESULT chaos=N) or is stopped with the VMM's own report, never a Python traceback, never a
hang. A failing seed replays: `corral run --image probe --memory 64M --cmdline "chaos SEED N"`
with the devices below."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
from support.cli import corral
from support.results import parse_results

SEEDS = [int(s) for s in os.environ.get("CORRAL_CHAOS_SEEDS", "1,2,3,4,5").split(",")]
N = int(os.environ.get("CORRAL_CHAOS_N", "3000"))
BOUND_S = 150  # one seed's run, launch included: ~5 s on a quiet machine, ~90 s seen under heavy load


def devices(tmp_path) -> list[str]:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    args = [
        "--disk",
        str(img),
        "--rng",
        "--balloon",
        "--virtio-console",
        f"file={tmp_path / 'hvc.log'}",
        "--vsock",
        f"cid=3,uds={tmp_path / 'v.sock'}",
    ]
    if os.geteuid() == 0 and os.path.exists("/dev/net/tun"):
        args += ["--net", f"tap=chaos{uuid.uuid4().hex[:6]}"]
    return args


@pytest.mark.parametrize("seed", SEEDS)
def test_the_vmm_survives_a_chaos_guest(tmp_path, seed):
    start = time.monotonic()
    try:
        r = corral(
            "run",
            "--image",
            "probe",
            "--memory",
            "64M",
            "--cmdline",
            f"chaos {seed} {N}",
            *devices(tmp_path),
            timeout=BOUND_S,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"seed {seed}: the VMM hung (no end in {BOUND_S} s)") from None
    took = time.monotonic() - start
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    results = parse_results(r.stdout)
    assert results.get("functions") is None  # (parse sanity: RESULT lines only)
    assert "CHAOS seed=" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    if r.returncode == 0:
        assert results.get("chaos") == str(N), r.stdout[-2000:]
    else:
        # the guest was stopped: by its own exception report (3) or the VMM's crash report (1),
        # each said in words, not by an error inside the VMM
        assert r.returncode in (1, 3), (r.returncode, r.stderr[-2000:])
        assert r.stderr.strip() or "EXCEPTION" in r.stdout
    print(f"seed {seed}: exit {r.returncode} in {took:.1f} s")
