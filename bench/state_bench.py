#!/usr/bin/env python3
"""VM state side by side: corral beside QEMU (KVM, same host, same probe guest and memory size,
in one run).

* live migration over TCP on this host (destination on 127.0.0.1): downtime, total time and
  bytes sent, for an idle guest (`idle`) and one rewriting memory (`mem-touch SIZE forever`);
* snapshot to a file/directory: time and size on disk (QEMU: `migrate` to `exec:cat > FILE`);
* restore-to-running latency for 256 MiB and 2 GiB guests: corral's `Machine.from_snapshot()`
  + `start()` in-process; QEMU: from `migrate-incoming` (QEMU started with `-incoming defer`)
  until `query-status` says running (process start-up excluded on both sides).

    python bench/state_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from corral.api import ControlClient  # noqa: E402
from corral.images.probe import build_probe  # noqa: E402
from probe_bench import corral_cmd, qemu_cmd  # noqa: E402

DIRTY_SIZE = "128M"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.02)


class Qmp:
    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rwb")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> dict:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")

    def close(self) -> None:
        self.s.close()


_logs: dict[int, Path] = {}


def spawn(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL)
    if log:
        _logs[p.pid] = log
    return p


def guest_started(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the guest's scenario is under way (QEMU's firmware takes seconds on PVM hosts),
    then a second more so the guest is in its steady state."""
    log = _logs[proc.pid]
    deadline = time.monotonic() + timeout
    while not any(n in log.read_bytes() for n in (b"probe: idle", b"PROGRESS")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the guest never started: {log.read_bytes()[-500:]!r}")
        time.sleep(0.05)
    time.sleep(1.0)


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.kill()
        p.wait()


# -- migration ------------------------------------------------------------------------------------


def corral_migrate(kernel: Path, cmdline: str, memory: str, tmp: Path) -> dict:
    api, dapi = tmp / "src.sock", tmp / "dst.sock"
    port = free_port()
    exe = corral_cmd(kernel, cmdline, 1, memory)
    src = spawn(exe + ["--api", str(api)], tmp / "csrc.log")
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    receive = [exe[0], "receive", "--listen", f"127.0.0.1:{port}", "--token-file", str(token)]
    dst = spawn([*receive, "--api", str(dapi), "--timeout", "60"])
    try:
        wait_for(api, src)
        guest_started(src)
        r = ControlClient(api).migrate(f"127.0.0.1:{port}", token=token.read_text())
        wait_for(dapi, dst)
        return {
            "downtime_ms": r.downtime_seconds * 1000,
            "total_ms": r.total_seconds * 1000,
            "mib": r.bytes_sent / (1 << 20),
        }
    finally:
        stop(src, dst)


def qemu_migrate(kernel: Path, cmdline: str, memory: str, tmp: Path) -> dict:
    qs, qd = tmp / "qsrc.sock", tmp / "qdst.sock"
    port = free_port()
    base = qemu_cmd(kernel, cmdline, 1, memory, "kvm", "pc")
    src = spawn(base + ["-qmp", f"unix:{qs},server=on,wait=off"], tmp / "qsrc.log")
    dst = spawn(base + ["-qmp", f"unix:{qd},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"])
    try:
        wait_for(qs, src)
        wait_for(qd, dst)
        guest_started(src)
        q = Qmp(qs)
        # throttle a guest that dirties faster than the link, as corral does
        q.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True}])
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            info = q.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                q.cmd("migrate_cancel")
                return {"downtime_ms": float("nan"), "total_ms": float("nan"), "mib": float("nan")}
            time.sleep(0.01)
        q.close()
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU migration {info['status']}")
        return {
            "downtime_ms": info["downtime"],
            "total_ms": info["total-time"],
            "mib": info["ram"]["transferred"] / (1 << 20),
        }
    finally:
        stop(src, dst)


# -- snapshot and restore ---------------------------------------------------------------------------


def corral_snapshot(kernel: Path, cmdline: str, memory: str, tmp: Path) -> tuple[dict, Path]:
    api = tmp / "snap.sock"
    src = spawn(corral_cmd(kernel, cmdline, 1, memory) + ["--api", str(api)], tmp / "csnap.log")
    try:
        wait_for(api, src)
        guest_started(src)
        snap = tmp / f"snap-{time.monotonic_ns()}"
        r = ControlClient(api).snapshot(snap)
        return {"ms": r.seconds * 1000, "disk_mib": r.disk_bytes / (1 << 20)}, snap
    finally:
        stop(src)


def qemu_snapshot(kernel: Path, cmdline: str, memory: str, tmp: Path) -> tuple[dict, Path]:
    qs = tmp / "qsnap.sock"
    base = qemu_cmd(kernel, cmdline, 1, memory, "kvm", "pc")
    src = spawn(base + ["-qmp", f"unix:{qs},server=on,wait=off"], tmp / "qsnap.log")
    out = tmp / f"qemu-{time.monotonic_ns()}.state"
    try:
        wait_for(qs, src)
        guest_started(src)
        q = Qmp(qs)
        t0 = time.perf_counter()
        # stopped first, as corral's snapshot pauses the guest: a live stream of a guest that keeps
        # rewriting memory need never converge (it once wrote 34 GB before it was stopped)
        q.cmd("stop")
        q.cmd("migrate", uri=f"exec:cat > {out}")
        deadline = time.monotonic() + 120
        while q.cmd("query-migrate").get("status") not in ("completed", "failed"):
            if time.monotonic() > deadline or (out.exists() and out.stat().st_size > 4 << 30):
                q.cmd("migrate_cancel")
                raise RuntimeError("QEMU's snapshot took over 120 s or 4 GiB: cancelled")
            time.sleep(0.005)
        ms = (time.perf_counter() - t0) * 1000
        q.close()
        return {"ms": ms, "disk_mib": os.stat(out).st_blocks * 512 / (1 << 20)}, out
    finally:
        stop(src)


def corral_restore(snap: Path) -> float:
    from corral.machine import Machine

    t0 = time.perf_counter()
    m = Machine.from_snapshot(snap, console=lambda b: None)
    m.start()
    ms = (time.perf_counter() - t0) * 1000
    m.stop()
    m.wait(5)
    m.close()
    return ms


def qemu_restore(kernel: Path, cmdline: str, memory: str, state: Path, tmp: Path) -> float:
    qd = tmp / f"qres-{time.monotonic_ns()}.sock"
    base = qemu_cmd(kernel, cmdline, 1, memory, "kvm", "pc")
    base[base.index("-serial") + 1] = "null"
    dst = spawn(base + ["-qmp", f"unix:{qd},server=on,wait=off", "-incoming", "defer"])
    try:
        wait_for(qd, dst)
        q = Qmp(qd)
        t0 = time.perf_counter()
        q.cmd("migrate-incoming", uri=f"exec:cat {state}")
        # the stream was taken from a stopped guest (as corral's snapshot pauses): once it is in,
        # QEMU holds the guest paused, and `cont` runs it, as `corral restore` runs its guest
        deadline = time.monotonic() + 120
        while (status := q.cmd("query-status").get("status")) != "running":
            if status == "paused" and q.cmd("query-migrate").get("status") == "completed":
                q.cmd("cont")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's restore did not run the guest within 120 s ({status})")
            time.sleep(0.001)
        ms = (time.perf_counter() - t0) * 1000
        q.close()
        return ms
    finally:
        stop(dst)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print("(a migration that has not converged after 120 s is cancelled and shown as nan)", file=sys.stderr)
    kernel = build_probe()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="corral-state-bench-") as t:
        tmp = Path(t)
        for label, cmdline in (
            ("idle guest", "idle"),
            (f"guest rewriting {DIRTY_SIZE}", f"mem-touch {DIRTY_SIZE} forever"),
        ):
            res = {}
            for name, fn in (("corral", corral_migrate), ("qemu", qemu_migrate)):
                print(f"[{name}] migration, {label} x{args.runs} ...", file=sys.stderr, flush=True)
                runs = [fn(kernel, cmdline, "512M", tmp) for _ in range(args.runs)]
                res[name] = {k: med([r[k] for r in runs]) for k in runs[0]}
            for key, unit in (("downtime_ms", "ms"), ("total_ms", "ms"), ("mib", "MiB")):
                rows.append(
                    (
                        f"migration, {label} (512 MiB): {key.split('_')[0]}",
                        f"{res['corral'][key]:.1f} {unit}",
                        f"{res['qemu'][key]:.1f} {unit}",
                    )
                )
        # snapshot of a 512 MiB guest that touched 64 MiB
        cmd = "mem-touch 64M forever"
        print(f"snapshots x{args.runs} ...", file=sys.stderr, flush=True)
        cs = [corral_snapshot(kernel, cmd, "512M", tmp) for _ in range(args.runs)]
        qs = [qemu_snapshot(kernel, cmd, "512M", tmp) for _ in range(args.runs)]
        rows.append(
            (
                "snapshot of 512 MiB guest (64 MiB touched): time",
                f"{med([c[0]['ms'] for c in cs]):.0f} ms",
                f"{med([q[0]['ms'] for q in qs]):.0f} ms",
            )
        )
        rows.append(
            (
                "snapshot: size on disk",
                f"{med([c[0]['disk_mib'] for c in cs]):.1f} MiB",
                f"{med([q[0]['disk_mib'] for q in qs]):.1f} MiB",
            )
        )
        for memory in ("256M", "2G"):
            print(f"restores, {memory} x{args.runs} ...", file=sys.stderr, flush=True)
            _, csnap = corral_snapshot(kernel, cmd, memory, tmp)
            _, qstate = qemu_snapshot(kernel, cmd, memory, tmp)
            cr = med([corral_restore(csnap) for _ in range(args.runs)])
            qr = med([qemu_restore(kernel, cmd, memory, qstate, tmp) for _ in range(args.runs)])
            rows.append((f"restore to running, {memory} guest", f"{cr:.1f} ms", f"{qr:.1f} ms"))
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    print(
        f"VM state, corral vs QEMU {qemu.stdout.split()[3]} "
        f"(KVM), median of {args.runs}; {when}, {platform.node()}, {os.cpu_count()} CPUs"
    )
    print()
    print("| measure | corral | QEMU |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
