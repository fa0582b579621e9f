#!/usr/bin/env python3
"""Density, side by side in one run with the same probe guest: how fast VMs are created, what an
idle one costs the host, and how many this host holds.

- launch -> first serial byte: `corral run` (a fresh interpreter per VM), the fork server
  (corral.forkserver: a microVM forked from a warm template, timed from the request) given the
  CLI's args (`launch(["firecracker", "--api-sock", ..., "--config-file", ...])`, the daemon's
  Launcher) and through the library (`launch_firecracker`), and QEMU `-M microvm`; interleaved
  (run, fork server x2, QEMU, run, ...) so background load lands on all; median (min-max).
  As root, also `fork server, jailed`: the daemon's jailed VMs (corral.jail.Jail.prepare on the
  host side, the template's child entering the jail, the CLI path), with the jail's set-up time
  per VM (host side + the child's entering, until the VM's own code runs).
- creation rate (VMs/s, request -> every VM's first serial byte): N VMs one after another, and N
  requested at once (from N threads, as a daemon's clients would), for `corral run` processes
  and the fork-server paths.
- private VMM memory per idle VM: every mapping but guest RAM, from /proc/PID/smaps, as
  Firecracker's tests/host_tools/memory.py measures its VMM (it too leaves the guest memory
  mapping out): USS (Private_Clean + Private_Dirty: what the VM alone costs) and PSS (shared
  pages split between their sharers), median (min-max) over the N idle VMs of each kind.
- the most idle 128 MiB probe VMs at once: fork-server VMs (library path, `halt`: the vCPU sleeps in KVM, no
  host CPU) added until --max, or until the host's memory is 80% used (MemAvailable), each
  asked for its API (`GET /`) at the end.
- with --ksm (root): VMs whose guest fills SIZE with the same bytes (`halt SIZE`), once with
  `--ksm` and once without, KSM running fast for a while: how much of their guest RAM it merged
  (/proc/PID/ksm_merging_pages: n VMs filling alike keep one copy of those pages, not n), and
  the host's pages_sharing change (host-wide: other programs' merging counts there too).

The idle guest is the probe's `halt`, 128 MiB, 1 vCPU. Prints a rich table and writes
bench/results/density_bench.{json,md}.

    python bench/density_bench.py [--runs 5] [--vms 10] [--max 50] [--ksm] [--ramp-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from support.qemu_probe import qemu_probe_cmd  # noqa: E402

from corral.forkserver import ForkServer  # noqa: E402
from corral.images.probe import build_probe  # noqa: E402

MEMORY_MIB = 128
HOST_LIMIT = 0.80  # stop the ramp when this share of host memory is in use
FIRST_BYTE_TIMEOUT = 60.0
FS_CLI = "fork server, CLI"  # ForkServer.launch(["firecracker", ...]): the daemon's Launcher
FS_LIB = "fork server, library"  # ForkServer.launch_firecracker(...): no click in the child
FS_JAIL = "fork server, jailed"  # as FS_CLI, each VM in its own jail (the daemon as root)
QEMU = "QEMU -M microvm"
COLUMNS = ("corral run", FS_CLI, FS_LIB, FS_JAIL, QEMU)
JAILS = os.geteuid() == 0


# --- VMs of each kind: start one, get (pid or Popen, the fd its serial output arrives on) ------


class Vm:
    """One VM process and the read end of its console (None once closed)."""

    def __init__(
        self, pid: int, out: int | None, proc: subprocess.Popen[bytes] | None = None, jail: object = None
    ) -> None:
        self.pid, self.out, self.proc, self.jail = pid, out, proc, jail

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc is not None:
            self.proc.wait()
        if self.jail is not None:
            while os.path.exists(f"/proc/{self.pid}"):  # until the template reaped it
                time.sleep(0.005)
            self.jail.cleanup()  # type: ignore[attr-defined]
            self.jail = None
        if self.out is not None:
            os.close(self.out)
            self.out = None


class Kinds:
    """How each kind of VM is started, with the same probe, memory and command line."""

    def __init__(self, work: Path, kernel: Path, cmdline: str = "halt") -> None:
        self.work, self.kernel, self.cmdline = work, kernel, cmdline
        self.config = work / "vm.json"
        self.config.write_text(
            json.dumps(
                {
                    "boot-source": {"kernel_image_path": str(kernel), "boot_args": cmdline},
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": MEMORY_MIB},
                }
            )
        )
        self.fs = ForkServer().start()
        self.n = 0
        self._lock = threading.Lock()  # VMs are started from several threads at once
        self.jail_setup_ms: list[float] = []
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self._env = env

    def _popen(self, cmd: list[str]) -> Vm:
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._env
        )
        assert p.stdout is not None
        fd = os.dup(p.stdout.fileno())
        p.stdout.close()
        return Vm(p.pid, fd, p)

    def corral_run(self) -> Vm:
        return self._popen(
            [
                sys.executable,
                "-m",
                "corral",
                "run",
                "--kernel",
                str(self.kernel),
                "--cmdline",
                self.cmdline,
                "--memory",
                f"{MEMORY_MIB}M",
                "--no-reboot",
            ]
        )

    def qemu(self) -> Vm:
        return self._popen(
            qemu_probe_cmd(
                self.cmdline, 1, "kvm", kernel=self.kernel, machine="microvm", memory=str(MEMORY_MIB)
            )
        )

    def fork_args(self) -> list[str]:
        with self._lock:
            self.n += 1
            n = self.n
        sock = self.work / f"vm{n}.sock"
        return [
            "firecracker",
            "--api-sock",
            str(sock),
            "--id",
            f"vm{n}",
            "--config-file",
            str(self.config),
        ]

    def forked(self) -> Vm:
        r, w = os.pipe()
        try:
            pid = self.fs.launch(self.fork_args(), output_fd=w)
        finally:
            os.close(w)
        return Vm(pid, r)

    def forked_jailed(self) -> Vm:
        """As `forked`, in a jail of its own (as the daemon's VMs, root only)."""
        from corral.jail import Jail, JailOptions, map_firecracker

        args = self.fork_args()
        t0 = time.perf_counter()
        inner = map_firecracker(
            api_sock=Path(args[2]), instance_id=args[4], config_file=self.config, no_api=False,
            log_path=None, level=None, metrics_path=None, boot_timer=False, kvm_path="/dev/kvm",
        )  # fmt: skip
        jail = Jail(JailOptions(id=args[4], chroot_base=self.work / "jails"), inner, pdeathsig=False)
        spec = jail.prepare()
        host_ms = (time.perf_counter() - t0) * 1e3
        r, w = os.pipe()
        try:
            pid, child_ms = self.fs.launch_jailed(spec.argv, output_fd=w, jail=spec)
        finally:
            os.close(w)
        self.jail_setup_ms.append(host_ms + child_ms)
        return Vm(pid, r, jail=jail)

    def forked_lib(self) -> Vm:
        """The same microVM through the library (launch_firecracker: no CLI in the child)."""
        args = self.fork_args()
        r, w = os.pipe()
        try:
            pid = self.fs.launch_firecracker(
                api_sock=args[2], instance_id=args[4], config_file=self.config, output_fd=w
            )
        finally:
            os.close(w)
        return Vm(pid, r)

    def forked_logged(self) -> tuple[Vm, Path, Path]:
        """A library-path VM writing to a log file (as the daemon's do): no pipe to keep open."""
        args = self.fork_args()
        log = self.work / f"vm{self.n}.log"
        pid = self.fs.launch_firecracker(
            api_sock=args[2], instance_id=args[4], config_file=self.config, log_path=log
        )
        return Vm(pid, None), log, Path(args[2])

    def close(self) -> None:
        self.fs.close()


def first_bytes(vms: list[Vm], t0: float, timeout: float = FIRST_BYTE_TIMEOUT) -> list[float]:
    """Seconds from t0 to each VM's first console byte."""
    sel = selectors.DefaultSelector()
    got: dict[int, float] = {}
    for i, vm in enumerate(vms):
        assert vm.out is not None
        sel.register(vm.out, selectors.EVENT_READ, i)
    deadline = t0 + timeout
    while len(got) < len(vms):
        left = deadline - time.perf_counter()
        if left <= 0:
            raise RuntimeError(f"{len(vms) - len(got)} VM(s) sent no serial byte in {timeout:.0f} s")
        for key, _ in sel.select(left):
            i = key.data
            data = os.read(key.fd, 65536)
            if not data:
                raise RuntimeError(f"VM {vms[i].pid} closed its console before any byte")
            got.setdefault(i, time.perf_counter() - t0)
            sel.unregister(key.fd)
    sel.close()
    return [got[i] for i in range(len(vms))]


def drain(vms: list[Vm]) -> None:
    """Read what the consoles said, so no VM blocks on a full pipe."""
    for vm in vms:
        if vm.out is None:
            continue
        os.set_blocking(vm.out, False)
        try:
            while os.read(vm.out, 65536):
                pass
        except BlockingIOError:
            pass


def smaps(pid: int) -> tuple[int, int, int]:
    """(USS, PSS, KSM-merged bytes) of every mapping of `pid` but guest RAM."""
    uss = pss = 0
    guest = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if " " in head or "-" in head:  # a mapping's header line
                guest = "corral-ram" in line
                continue
            if guest:
                continue
            if head == "Pss":
                pss += int(rest.split()[0])
            elif head in ("Private_Clean", "Private_Dirty"):
                uss += int(rest.split()[0])
    return uss << 10, pss << 10, 0


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0]) << 10
    return out


# --- the measures ------------------------------------------------------------------------------------


def measure_launch(kinds: Kinds, runs: int, qemu: bool) -> dict[str, dict[str, float]]:
    starters: dict[str, Callable[[], Vm]] = {
        "corral run": kinds.corral_run,
        FS_CLI: kinds.forked,
        FS_LIB: kinds.forked_lib,
    }
    if JAILS:
        starters[FS_JAIL] = kinds.forked_jailed
    if qemu:
        starters[QEMU] = kinds.qemu
    times: dict[str, list[float]] = {k: [] for k in starters}
    for _ in range(runs):
        for name, start in starters.items():
            t0 = time.perf_counter()
            vm = start()
            try:
                times[name] += first_bytes([vm], t0)
            finally:
                vm.kill()
    return {k: stats([t * 1e3 for t in v]) for k, v in times.items()}


def measure_creation(
    kinds: Kinds, n: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """VMs/s sequential and concurrent for each kind, and the memory of the concurrent set (idle)."""
    rates: dict[str, dict[str, float]] = {}
    memory: dict[str, dict[str, dict[str, float]]] = {}
    kinds_: list[tuple[str, Callable[[], Vm]]] = [
        ("corral run", kinds.corral_run),
        (FS_CLI, kinds.forked),
        (FS_LIB, kinds.forked_lib),
    ]
    if JAILS:
        kinds_.append((FS_JAIL, kinds.forked_jailed))
    for name, start in kinds_:
        vms: list[Vm] = []
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                vms.append(start())
                first_bytes(vms[-1:], t)
            seq = n / (time.perf_counter() - t0)
            for vm in vms:
                vm.kill()
            vms = []
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:  # n requests at once, as a daemon's clients make
                vms = list(pool.map(lambda _, s=start: s(), range(n)))
            firsts = first_bytes(vms, t0)
            conc = n / max(firsts)
            rates[name] = {"sequential": seq, "concurrent": conc}
            time.sleep(2.0)  # idle: the guests have halted, the VMMs wait
            drain(vms)
            m = [smaps(vm.pid) for vm in vms]
            memory[name] = {
                "uss_mib": stats([u / 2**20 for u, _, _ in m]),
                "pss_mib": stats([p / 2**20 for _, p, _ in m]),
            }
        finally:
            for vm in vms:
                vm.kill()
    return rates, memory


def api_answers(sock: Path) -> bool:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        return data.startswith(b"HTTP/1.1 200") and b'"Running"' in data
    except OSError:
        return False


def measure_ramp(kinds: Kinds, most: int) -> dict[str, object]:
    """Add idle fork-server VMs until `most`, or until the host's memory is HOST_LIMIT used."""
    total = meminfo()["MemTotal"]
    before = meminfo()["MemAvailable"]
    vms: list[tuple[Vm, Path, Path]] = []
    reason = f"--max {most}"
    t0 = time.perf_counter()
    try:
        while len(vms) < most:
            if 1 - meminfo()["MemAvailable"] / total >= HOST_LIMIT:
                reason = f"host memory {HOST_LIMIT:.0%} used"
                break
            vms.append(kinds.forked_logged())
            # one at a time, each up before the next: the host's state is read between VMs
            vm, log, _ = vms[-1]
            deadline = time.monotonic() + FIRST_BYTE_TIMEOUT
            while b"probe: halt" not in log.read_bytes():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"VM {vm.pid} did not boot: {log.read_text()[-500:]}")
                time.sleep(0.005)
        seconds = time.perf_counter() - t0
        time.sleep(2.0)
        answering = sum(api_answers(sock) for _, _, sock in vms)
        after = meminfo()["MemAvailable"]
        uss = [smaps(vm.pid)[0] / 2**20 for vm, _, _ in vms]
    finally:
        for vm, _, _ in vms:
            vm.kill()
    return {
        "vms": len(vms),
        "answering": answering,
        "stopped_by": reason,
        "vms_per_s": len(vms) / seconds if seconds else 0.0,
        "host_mib_per_vm": (before - after) / 2**20 / max(1, len(vms)),
        "uss_mib": stats(uss) if uss else None,
    }


KSM = Path("/sys/kernel/mm/ksm")


def measure_ksm(kinds: Kinds, n: int, size: str, settle: float) -> dict[str, object]:
    """n VMs whose guests fill `size` alike, without and with --ksm, KSM scanning fast meanwhile."""
    saved = {p: (KSM / p).read_text().strip() for p in ("run", "pages_to_scan", "sleep_millisecs")}
    result: dict[str, object] = {"vms": n, "fill": size}
    try:
        (KSM / "pages_to_scan").write_text("20000")
        (KSM / "sleep_millisecs").write_text("10")
        (KSM / "run").write_text("1")
        baseline = int((KSM / "pages_sharing").read_text())  # what other programs' merging saves
        for ksm in (False, True):
            vms: list[tuple[Vm, Path, Path]] = []
            try:
                for _ in range(n):
                    args = [
                        "run",
                        "--kernel",
                        str(kinds.kernel),
                        "--cmdline",
                        f"halt {size}",
                        "--memory",
                        f"{MEMORY_MIB}M",
                        "--no-reboot",
                        *(["--ksm"] if ksm else []),
                    ]
                    kinds.n += 1
                    log = kinds.work / f"ksm{kinds.n}.log"
                    vms.append((Vm(kinds.fs.launch(args, log_path=log), None), log, log))
                for vm, log, _ in vms:
                    deadline = time.monotonic() + FIRST_BYTE_TIMEOUT
                    while b"probe: halt" not in log.read_bytes():
                        if time.monotonic() > deadline:
                            raise RuntimeError(
                                f"VM {vm.pid} did not fill its memory: {log.read_text()[-300:]}"
                            )
                        time.sleep(0.05)
                deadline = time.monotonic() + settle
                last = -1
                while time.monotonic() < deadline:  # until KSM stops finding more to merge
                    time.sleep(2.0)
                    sharing = int((KSM / "pages_sharing").read_text())
                    if sharing == last:
                        break
                    last = sharing
                merged = sum(int(Path(f"/proc/{vm.pid}/ksm_merging_pages").read_text()) for vm, _, _ in vms)
                result["with ksm" if ksm else "without"] = {
                    "merged_mib": merged * 4096 / 2**20,
                    # host-wide: another program's merging on this host lands here too
                    "host_sharing_mib": (int((KSM / "pages_sharing").read_text()) - baseline) * 4096 / 2**20,
                }
            finally:
                for vm, _, _ in vms:
                    vm.kill()
    finally:
        for p in ("pages_to_scan", "sleep_millisecs", "run"):
            (KSM / p).write_text(saved[p])
    return result


# --- the report ------------------------------------------------------------------------------------


def fmt(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="launches of each kind for launch -> first byte")
    ap.add_argument("--vms", type=int, default=10, help="VMs per creation-rate and memory round")
    ap.add_argument("--max", type=int, default=50, help="the most VMs the ramp starts")
    ap.add_argument("--ramp-only", action="store_true", help="only the ramp (and --ksm)")
    ap.add_argument("--no-qemu", action="store_true", help="leave QEMU -M microvm out")
    ap.add_argument(
        "--ksm", action="store_true", help="measure KSM (root: turns /sys/kernel/mm/ksm on for a while)"
    )
    ap.add_argument("--ksm-vms", type=int, default=6)
    ap.add_argument("--ksm-fill", default="32M", help="guest memory each KSM VM fills alike")
    ap.add_argument("--ksm-settle", type=float, default=60.0, help="seconds KSM may scan at most")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    qemu = not args.no_qemu and shutil.which("qemu-system-x86_64") is not None
    kernel = build_probe()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="corral-density-") as tmp:
        kinds = Kinds(Path(tmp), kernel)
        results["template_start_s"] = kinds.fs.ready_seconds
        launch = rates = memory = None
        try:
            if not args.ramp_only:
                print(f"[launch -> first byte] x{args.runs} ...", file=sys.stderr, flush=True)
                launch = measure_launch(kinds, args.runs, qemu)
                print(f"[creation + memory] {args.vms} VMs of each kind ...", file=sys.stderr, flush=True)
                rates, memory = measure_creation(kinds, args.vms)
            print(f"[ramp] up to {args.max} idle VMs ...", file=sys.stderr, flush=True)
            ramp = measure_ramp(kinds, args.max)
            ksm = None
            if args.ksm:
                print(f"[ksm] {args.ksm_vms} VMs filling {args.ksm_fill} ...", file=sys.stderr, flush=True)
                ksm = measure_ksm(kinds, args.ksm_vms, args.ksm_fill, args.ksm_settle)
        finally:
            kinds.close()
        jail_ms = stats(kinds.jail_setup_ms) if kinds.jail_setup_ms else None
    results.update(launch_ms=launch, rates=rates, memory=memory, ramp=ramp, ksm=ksm, jail_setup_ms=jail_ms)

    gib = meminfo()["MemTotal"] / 2**30
    host = f"{platform.node()}: {os.cpu_count()} CPUs, {gib:.0f} GiB, kernel {platform.release()}"
    pvm = os.path.isdir("/sys/module/kvm_pvm")
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    rows: list[list[str]] = []

    def row(label: str, cells: dict[str, str]) -> None:
        rows.append([label, *(cells.get(c, "-") for c in COLUMNS)])

    if launch is not None:
        row("launch -> first serial byte (ms)", {k: fmt(v) for k, v in launch.items()})
    if jail_ms is not None:
        row(f"jail set-up per VM (ms; {len(kinds.jail_setup_ms)} VMs)", {FS_JAIL: fmt(jail_ms)})
    if rates is not None and memory is not None:
        for how, said in (("sequential", "one after another"), ("concurrent", "at once")):
            row(f"creation, {args.vms} {said} (VMs/s)", {k: f"{v[how]:.1f}" for k, v in rates.items()})
        for key, label in (("uss_mib", "private (USS)"), ("pss_mib", f"PSS, {args.vms} alike")):
            row(f"VMM memory per idle VM, {label} (MiB)", {k: fmt(v[key], 2) for k, v in memory.items()})
    row(
        f"idle {MEMORY_MIB} MiB VMs at once (stopped by {ramp['stopped_by']})",
        {FS_LIB: f"{ramp['vms']} ({ramp['answering']} answer GET /) at {ramp['vms_per_s']:.1f} VMs/s"},
    )
    uss = ramp["uss_mib"]
    row(
        "  host memory used per VM in the ramp; USS after GET / (MiB)",
        {FS_LIB: f"{ramp['host_mib_per_vm']:.1f}; " + (fmt(uss, 2) if isinstance(uss, dict) else "-")},
    )
    if ksm is not None:
        for label in ("without", "with ksm"):
            k = ksm[label]
            assert isinstance(k, dict)
            row(
                f"KSM, {ksm['vms']} `corral run` VMs filling {ksm['fill']} alike: {label}",
                {
                    FS_CLI: f"{k['merged_mib']:.1f} MiB of guest RAM merged "
                    f"(host pages_sharing {k['host_sharing_mib']:+.1f} MiB)"
                },
            )
    head = ("measure", *COLUMNS)
    note = (
        f"Measured {date} on {host}; /dev/kvm is {'PVM' if pvm else 'hardware-backed'}; probe `halt`, "
        f"{MEMORY_MIB} MiB, 1 vCPU; median (min-max); the fork server's template started in "
        f"{results['template_start_s']:.2f} s (once)."
    )
    md = [note, "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * len(COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows]

    from rich.console import Console
    from rich.table import Table

    table = Table(*head, title="corral density", caption=note)
    for r in rows:
        table.add_row(*r)
    Console(width=150).print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "density_bench.json").write_text(
        json.dumps({"date": date, "host": host, "pvm": pvm, **results}, indent=2)
    )
    (args.out / "density_bench.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
