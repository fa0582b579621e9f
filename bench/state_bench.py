#!/usr/bin/env python3
"""VM state side by side: corral beside QEMU (KVM, same host, same probe guest and memory size,
in one run).

* live migration over TCP on this host (destination on 127.0.0.1): downtime, total time and
  bytes sent, for an idle guest (`idle`) and one rewriting memory (`mem-touch SIZE forever`).
  Downtime is the guest's whole pause: corral's own figure (its pause to the destination's word
  that the guest runs), QEMU's from the source's STOP event to the destination's RESUME
  (microsecond timestamps, one host clock); a second row gives each the way QEMU counts its
  own (whole milliseconds, the stop to the source's last byte);
* snapshot to a file/directory: time and size on disk (QEMU: `migrate` to `exec:cat > FILE`);
* restore-to-running latency for 256 MiB, 2 GiB and 8 GiB guests: corral's
  `Machine.from_snapshot()` + `start()` (in a child process, timed inside it), cold (the KVM VM
  and its RAM slots made in the restore) and into a `WarmVm` (made before the clock starts);
  QEMU: from `migrate-incoming` (QEMU started with `-incoming defer`, so its VM and RAM are
  there before) until `query-status` says running (process start-up excluded on both sides).
  corral maps the guest's RAM from the snapshot file, which is sparse, so an 8 GiB guest fits a
  host with less free memory.

corral and QEMU alternate run by run (bench/interleave.py: corral, QEMU, corral, ...), the whole
bench (every VMM it starts) pinned to `--cpus`; every run is capped (`--timeout` seconds, and a
QEMU snapshot at 4 GiB on disk): one that runs past its cap is stopped, left out and said in
one line. Prints a Markdown table, median (min-max), also written to bench/results/.

    python bench/state_bench.py [--runs 5] [--cpus 0-1] [--sizes 256M,2G,8G]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from corral.api import ControlClient  # noqa: E402
from corral.images.probe import build_probe  # noqa: E402
from interleave import RunFailed, capped, host_line, interleave, ratio, spread  # noqa: E402
from probe_bench import corral_cmd, qemu_cmd  # noqa: E402

DIRTY_SIZE = "128M"
CAP_S = 120.0  # every run's cap (--timeout)


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
            raise RunFailed(f"{path.name} never appeared")
        time.sleep(0.02)


class Qmp:
    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rwb")
        self.f.readline()  # greeting
        self.events: dict[str, float] = {}  # event name -> its first timestamp (s, QEMU's clock)
        self.cmd("qmp_capabilities")

    def _line(self) -> dict:
        line = self.f.readline()
        if not line:
            raise RunFailed("QEMU closed its QMP socket")
        r = json.loads(line)
        if "event" in r:
            ts = r.get("timestamp", {})
            self.events.setdefault(r["event"], ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6)
        return r

    def cmd(self, name: str, **args: object) -> dict:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._line()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RunFailed(f"QMP {name}: {r['error']}")

    def event(self, name: str, timeout: float) -> float:
        """The timestamp of event `name`, waiting up to `timeout` s for it."""
        self.s.settimeout(timeout)
        try:
            while name not in self.events:
                self._line()
        except TimeoutError:
            raise RunFailed(f"QEMU sent no {name} event in {timeout:.0f} s") from None
        finally:
            self.s.settimeout(None)
        return self.events[name]

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
            raise RunFailed(f"the guest never started: {log.read_bytes()[-300:]!r}")
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
            # QEMU's own count ends when the source has sent its last byte; corral's goes on
            # through the destination's load of the state and `go`
            "sent_ms": sum(r.downtime_ms.get(k, 0.0) for k in ("pause", "final pages", "state")),
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
        q, qdst = Qmp(qs), Qmp(qd)
        # throttle a guest that dirties faster than the link, as corral does
        q.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True}])
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + CAP_S
        while True:
            info = q.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                q.cmd("migrate_cancel")
                raise RunFailed(f"QEMU's migration had not converged after {CAP_S:.0f} s: cancelled")
            time.sleep(0.01)
        if info["status"] != "completed":
            raise RunFailed(f"QEMU migration {info['status']}")
        # QEMU counts its downtime in whole milliseconds, from the stop to the source's last
        # byte; the source's STOP event to the destination's RESUME (microsecond timestamps from
        # one host clock) is the guest's whole pause, as corral counts its own
        paused = q.event("STOP", 5.0)
        resumed = qdst.event("RESUME", 5.0)
        q.close()
        qdst.close()
        return {
            "downtime_ms": (resumed - paused) * 1000,
            "sent_ms": info["downtime"],
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
        deadline = time.monotonic() + CAP_S
        while q.cmd("query-migrate").get("status") not in ("completed", "failed"):
            if time.monotonic() > deadline or (out.exists() and out.stat().st_size > 4 << 30):
                q.cmd("migrate_cancel")
                raise RunFailed(f"QEMU's snapshot took over {CAP_S:.0f} s or 4 GiB: cancelled")
            time.sleep(0.005)
        ms = (time.perf_counter() - t0) * 1000
        q.close()
        return {"ms": ms, "disk_mib": os.stat(out).st_blocks * 512 / (1 << 20)}, out
    finally:
        stop(src)


def restore_here(snap: Path, warm: bool = False) -> float:
    """corral's restore to running, in this process (`--restore-one`): ms. `warm`: into a
    WarmVm made before the clock starts (its VM and RAM slots there, as QEMU's are when it is
    started with -incoming defer before its restore is timed)."""
    from corral.machine import Machine, WarmVm
    from corral.state.snapshot import read_snapshot

    prepared = WarmVm(read_snapshot(snap).manifest.config.memory) if warm else None
    t0 = time.perf_counter()
    m = Machine.from_snapshot(snap, console=lambda b: None, warm=prepared)
    m.start()
    ms = (time.perf_counter() - t0) * 1000
    m.stop()
    m.wait(5)
    m.close()
    return ms


def corral_restore(snap: Path) -> dict[str, float]:
    """restore_here in a child process, so the cap can stop it: its second restore, timed (the
    first pays the imports and the page cache, as the first of many in a service would), and a
    third into a WarmVm."""
    out = capped([sys.executable, __file__, "--restore-one", str(snap)], CAP_S)
    try:
        cold, warm = (float(w) for w in out.split()[-2:])
    except ValueError:
        raise RunFailed(f"corral's restore printed no times: {out[-300:]!r}") from None
    return {"ms": cold, "warm_ms": warm}


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
        deadline = time.monotonic() + CAP_S
        while (status := q.cmd("query-status").get("status")) != "running":
            if status == "paused" and q.cmd("query-migrate").get("status") == "completed":
                q.cmd("cont")
            if time.monotonic() > deadline:
                raise RunFailed(f"QEMU's restore did not run the guest within {CAP_S:.0f} s ({status})")
            time.sleep(0.001)
        ms = (time.perf_counter() - t0) * 1000
        q.close()
        return ms
    finally:
        stop(dst)


def cpu_set(spec: str) -> set[int]:
    """ "0-1,3" -> {0, 1, 3}."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def main() -> int:
    global CAP_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="pairs (corral, QEMU) per measure")
    ap.add_argument("--cpus", default=None, help="pin the bench and every VMM it starts, e.g. 0-1")
    ap.add_argument("--sizes", default="256M,2G,8G", help="guest sizes for the restore rows")
    ap.add_argument("--only", default="migration,snapshot,restore", help="which measures")
    ap.add_argument("--timeout", type=float, default=CAP_S, help="cap per run, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--restore-one", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.restore_one:
        restore_here(args.restore_one)  # untimed: the imports a long-lived process has done
        print(f"{restore_here(args.restore_one):.3f} {restore_here(args.restore_one, warm=True):.3f}")
        return 0
    CAP_S = args.timeout
    if args.cpus:
        os.sched_setaffinity(0, cpu_set(args.cpus))  # inherited by every VMM started below
    only = set(args.only.split(","))
    kernel = build_probe()
    rows: list[str] = []

    def row(label: str, runs: dict[str, list[dict[str, float]]], key: str, fmt: str, ckey: str = "") -> None:
        c, q = [r[ckey or key] for r in runs["corral"]], [r[key] for r in runs["QEMU"]]
        rows.append(
            f"| {label} | {spread(c, fmt)} | {spread(q, fmt)} | {ratio(c, q, higher_is_better=False)} |"
        )

    with tempfile.TemporaryDirectory(prefix="corral-state-bench-") as t:
        tmp = Path(t)
        if "migration" in only:
            for label, cmdline in (
                ("idle guest", "idle"),
                (f"guest rewriting {DIRTY_SIZE}", f"mem-touch {DIRTY_SIZE} forever"),
            ):
                print(f"migration, {label}", file=sys.stderr, flush=True)
                runs = interleave(
                    args.runs,
                    {
                        "corral": lambda c=cmdline: corral_migrate(kernel, c, "512M", tmp),
                        "QEMU": lambda c=cmdline: qemu_migrate(kernel, c, "512M", tmp),
                    },
                )
                row(f"migration, {label} (512 MiB): downtime (ms)", runs, "downtime_ms", "{:,.1f}")
                row(
                    f"migration, {label}: downtime to the source's last byte, as QEMU counts (ms)",
                    runs,
                    "sent_ms",
                    "{:,.1f}",
                )
                row(f"migration, {label}: total time (ms)", runs, "total_ms", "{:,.0f}")
                row(f"migration, {label}: sent (MiB)", runs, "mib", "{:,.1f}")
        cmd = "mem-touch 64M forever"
        if "snapshot" in only:
            print("snapshots of a 512 MiB guest", file=sys.stderr, flush=True)
            runs = interleave(
                args.runs,
                {
                    "corral": lambda: corral_snapshot(kernel, cmd, "512M", tmp)[0],
                    "QEMU": lambda: qemu_snapshot(kernel, cmd, "512M", tmp)[0],
                },
            )
            row("snapshot of a 512 MiB guest (64 MiB touched), paused: time (ms)", runs, "ms", "{:,.0f}")
            row("snapshot: size on disk (MiB)", runs, "disk_mib", "{:,.1f}")
        if "restore" in only:
            for memory in args.sizes.split(","):
                print(f"restores, {memory}", file=sys.stderr, flush=True)
                try:
                    _, csnap = corral_snapshot(kernel, cmd, memory, tmp)
                    _, qstate = qemu_snapshot(kernel, cmd, memory, tmp)
                except RunFailed as exc:
                    print(f"  skipped {memory}: {exc}", file=sys.stderr, flush=True)
                    continue
                runs = interleave(
                    args.runs,
                    {
                        "corral": lambda s=csnap: corral_restore(s),
                        "QEMU": lambda m=memory, q=qstate: {"ms": qemu_restore(kernel, cmd, m, q, tmp)},
                    },
                )
                row(f"restore to running, {memory} guest (ms)", runs, "ms", "{:,.1f}")
                row(
                    f"restore to running, {memory} guest, into a WarmVm (ms)",
                    runs,
                    "ms",
                    "{:,.1f}",
                    "warm_ms",
                )
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    md = [
        host_line(args.runs, args.cpus)
        + f" QEMU {qemu.stdout.split()[3]} (KVM, -M pc); ratio > 1: corral is better (lower).",
        "",
        "| measure | corral | QEMU | corral vs QEMU |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    table = "\n".join(md)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "state_bench.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
