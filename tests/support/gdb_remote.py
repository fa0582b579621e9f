"""A minimal GDB remote-protocol client over a real socket, for the stub's tests: what gdb
itself cannot be made to send (malformed packets, a raw Ctrl-C, a second debugger)."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from corral.debug.packets import PacketReader, frame
from support.cli import corral_popen


class RemoteClient:
    def __init__(self, address: tuple[str, int] | str, timeout: float = 20.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.reader = PacketReader()
        self.packets: list[bytes] = []
        self.raw = bytearray()  # every byte received, acks included

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def receive(self, timeout: float = 20.0) -> bytes:
        """The next packet from the stub (acks are skipped; they stay in `raw`)."""
        deadline = time.monotonic() + timeout
        while not self.packets:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the stub closed the connection")
            self.raw += data
            self.packets += [ev.data for ev in self.reader.feed(data) if ev.kind == "packet"]
        return self.packets.pop(0)

    def ask(self, payload: bytes, timeout: float = 20.0) -> bytes:
        self.send(payload)
        return self.receive(timeout)

    def close(self) -> None:
        self.sock.close()


class GdbVm:
    """`corral run --gdb ...` of the probe (or `corral COMMAND... --gdb ...`: `command`), with
    the address its stub listens on."""

    def __init__(
        self, cmdline: str, *extra: str, gdb: str = "tcp:127.0.0.1:0", command: tuple[str, ...] = ()
    ) -> None:
        run = command or ("run", "--image", "probe", "--memory", "256M", "--cmdline", cmdline)
        self.proc = corral_popen(*run, "--gdb", gdb, *extra)
        self.err = b""
        deadline = time.monotonic() + 60
        while b"gdb stub on" not in self.err:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.err.decode()
            if select.select([self.proc.stderr], [], [], 0.2)[0]:
                self.err += os.read(self.proc.stderr.fileno(), 4096)
        where = re.search(rb"gdb stub on (\S+?)(;|\n)", self.err).group(1).decode()
        self.address: tuple[str, int] | str = where[5:]
        if where.startswith("tcp:"):
            host, _, port = where[4:].rpartition(":")
            self.address = (host, int(port))
        self.target = where[5:] if where.startswith("unix:") else f"{self.address[0]}:{self.address[1]}"

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(errors="replace"), (self.err + err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(read: Callable[[], bytes | str], text: bytes | str, timeout: float = 30) -> None:
    """Wait until `read()` (a console so far) holds `text`."""
    deadline = time.monotonic() + timeout
    while text not in read():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{text!r} never came: {read()[-2000:]!r}"
        time.sleep(0.05)


def gdb_batch(target: str, elf: Path, *commands: str, timeout: float = 90) -> str:
    """Real gdb in batch mode: `target remote TARGET`, then each command; its whole output."""
    args = ["gdb", "-batch", "-nx", "-ex", f"target remote {target}"]
    for c in commands:
        args += ["-ex", c]
    r = subprocess.run([*args, str(elf)], capture_output=True, text=True, timeout=timeout)
    return r.stdout + r.stderr


# --- Debian's kernel under corral in the lab: gdb, a dump, KVM's counters -------------------------
# Run inside the lab (`python -m support.gdb_remote ...` from tests/, see tests/lab/test_lab_debug.py)
# with the host's gdb: one boot of the Debian guest answers every question, and the outputs come
# back as one JSON line for the test to judge.

# What the guest prints before it waits on its console: the kallsyms lines of the symbols we need
# and where the kernel image lies in physical memory (to read symbols from the core).
GUEST_SYMBOLS = ("linux_banner", "init_uts_ns", "__x64_sys_newuname", "_text")
GUEST_SCRIPT = (
    "grep -w " + " ".join(f"-e {s}" for s in GUEST_SYMBOLS) + " /proc/kallsyms; grep Kernel /proc/iomem; "
    "echo GUEST_READY; read a; uname -r; echo UNAME_DONE; read b; echo GUEST_BYE"
)
UTS_FIELD = 65  # struct new_utsname: six char[65] fields (sysname, nodename, release, ...)


class ConsoleVm:
    """`corral run` with its serial console on a FIFO (lines go to the guest) and its output
    gathered by a thread; `wait_for` waits for a pattern in it."""

    def __init__(self, argv: list[str], workdir: str) -> None:
        import subprocess
        import threading

        fifo = os.path.join(workdir, "console.in")
        os.mkfifo(fifo)
        self.fifo = fifo
        rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._wfd = os.open(fifo, os.O_WRONLY)  # held open: the guest never sees end-of-file
        os.set_blocking(rfd, True)
        self.proc = subprocess.Popen(argv, stdin=rfd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        os.close(rfd)
        self.output = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while data := os.read(self.proc.stdout.fileno(), 65536):
            with self._lock:
                self.output += data

    def text(self) -> str:
        with self._lock:
            return bytes(self.output).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"{pattern!r} not seen in corral's output:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def type_line(self, line: str) -> None:
        os.write(self._wfd, line.encode() + b"\n")

    def finish(self, timeout: float) -> int:
        """corral's exit status; killed (-9) if it outlives `timeout`."""
        import subprocess

        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            os.close(self._wfd)


def _gdb(*commands: str, timeout: float = 180) -> str:
    import subprocess

    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off"]
    for c in commands:
        argv += ["-ex", c]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return res.stdout + res.stderr


def _guest_session(
    argv: list[str], workdir: str, steps: Callable[[ConsoleVm, str, dict[str, object]], None]
) -> dict[str, object]:
    """Run `corral run --gdb unix:...` (argv) on a guest that prints GUEST_READY and then waits on
    its console; once it is ready, steps(vm, gdb target, out) does the session's work; then the
    guest is told `bye` and ends. `out` gets the guest's exit status (or the error) and console."""
    vm = ConsoleVm(argv, workdir)
    out: dict[str, object] = {}
    try:
        target = vm.wait_for(r"gdb stub on unix:(\S+?)[;\s]", 300).group(1)
        vm.wait_for(r"GUEST_READY", 300)
        steps(vm, target, out)
        vm.type_line("bye")
        out["status"] = vm.finish(120)
    except Exception as exc:  # noqa: BLE001 - the test shows it with the console
        out["error"] = f"{type(exc).__name__}: {exc}"
        vm.finish(1)
    out["console"] = vm.text()
    return out


def debian_debug_session(corral: str, kernel: str, initrd: str, cmdline: str, cpu: str) -> dict[str, object]:
    """Boot Debian's kernel under `corral run --gdb --api` and, while its shell waits on the
    console: stop it with gdb, read linux_banner, detach, make the guest run uname; then `corral
    dump` the running guest and read its uts name from the core with gdb; then `corral stats`
    twice. Everything seen, as a dict."""
    import subprocess
    import tempfile

    from corral.api import ControlClient

    work = tempfile.mkdtemp(prefix="corral-debuglab-")
    api = os.path.join(work, "vm.sock")
    argv = [corral, "run", "--kernel", kernel, "--initrd", initrd, "--memory", "512M", *cpu.split()]
    # a Unix socket: the lab's loopback interface is down (no TCP to 127.0.0.1 in there)
    argv += ["--no-reboot", "--gdb", f"unix:{work}/gdb.sock", "--api", api]
    argv += ["--cmdline", f'{cmdline} -- sh -c "{GUEST_SCRIPT}"']

    def steps(vm: ConsoleVm, target: str, out: dict[str, object]) -> None:
        text = vm.text()
        syms = {name: int(addr, 16) for addr, name in re.findall(r"^([0-9a-f]{16}) \w (\w+)\s*$", text, re.M)}
        code = re.search(r"^\s*([0-9a-f]+)-[0-9a-f]+ : Kernel code", text, re.M)
        out["symbols"] = {k: hex(v) for k, v in syms.items()}
        out["gdb_live"] = _gdb(
            "set remotetimeout 60",
            "set architecture i386:x86-64",
            f"target remote {target}",  # stops every vCPU
            f"x/s {syms['linux_banner']:#x}",
            'printf "STOPPED_AT %#lx\\n", $pc',
            "detach",
        )
        vm.type_line("go")  # the guest's `read a` returns: it runs on after the detach
        vm.wait_for(r"UNAME_DONE", 120)
        out["console_after_uname"] = vm.text()
        # a dump of the running guest; its kernel symbols are read by physical address
        core = os.path.join(work, "guest.core")
        dump = subprocess.run(
            [corral, "dump", "--api", api, core], capture_output=True, text=True, timeout=120
        )
        out["dump"] = dump.stderr + dump.stdout
        out["dump_status"] = dump.returncode
        if code is not None and dump.returncode == 0:
            phys = lambda sym: int(code.group(1), 16) + syms[sym] - syms["_text"]  # noqa: E731
            uts = phys("init_uts_ns")
            out["gdb_core"] = _gdb(
                "set architecture i386:x86-64",
                f"core-file {core}",
                f"x/s {phys('linux_banner'):#x}",
                *(f"x/s {uts + i * UTS_FIELD:#x}" for i in range(5)),
            )
        # KVM's own counters: the guest sat in `read b` (halted, woken by timer interrupts)
        first = ControlClient(api).stats()
        time.sleep(2)
        second = ControlClient(api).stats()
        out["stats"] = [first.model_dump(), second.model_dump()]
        cli = subprocess.run([corral, "stats", "--api", api], capture_output=True, text=True, timeout=60)
        out["stats_cli"] = cli.stdout + cli.stderr

    return _guest_session(argv, work, steps)


# A breakpoint round: gdb stops the guest, sets a breakpoint of this kind on the syscall entry, lets
# the guest's shell read a line (typed through the console FIFO by gdb itself, so it comes only once
# the breakpoint is in place) and continues: the guest's `uname` enters the kernel there.
BREAK_SYMBOL = "__x64_sys_newuname"
BREAK_KINDS = ("hbreak", "break")


def _break_guest_script(rounds: int) -> str:
    script = f"grep -w -e {BREAK_SYMBOL} /proc/kallsyms; echo GUEST_READY; "
    for n in range(1, rounds + 1):
        script += f"read a; uname -r; echo UNAME_DONE{n}; "
    return script + "read b; echo GUEST_BYE"


def debian_break_session(
    corral: str, kernel: str, initrd: str, cmdline: str, cpu: str, kinds: str = ",".join(BREAK_KINDS)
) -> dict[str, object]:
    """Boot Debian's kernel under `corral run --gdb` and, for each breakpoint kind in `kinds`
    (gdb's `hbreak`, `break`), one round: break on the entry of uname's syscall at its
    /proc/kallsyms address, continue, let the guest run `uname`, print the pc where it stopped,
    delete the breakpoint and detach; the guest's uname must then finish. Everything seen, as a
    dict ({"rounds": [{"kind", "gdb", "console_after"}], "address", "console", "status"})."""
    import subprocess
    import tempfile

    work = tempfile.mkdtemp(prefix="corral-breaklab-")
    order = [k for k in kinds.split(",") if k]
    argv = [corral, "run", "--kernel", kernel, "--initrd", initrd, "--memory", "512M", *cpu.split()]
    argv += ["--no-reboot", "--gdb", f"unix:{work}/gdb.sock"]
    argv += ["--cmdline", f'{cmdline} -- sh -c "{_break_guest_script(len(order))}"']

    def steps(vm: ConsoleVm, target: str, out: dict[str, object]) -> None:
        rounds: list[dict[str, str]] = []
        out["rounds"] = rounds
        m = re.search(rf"^([0-9a-f]{{16}}) \w {BREAK_SYMBOL}\s*$", vm.text(), re.M)
        if m is None:
            raise RuntimeError(f"{BREAK_SYMBOL} not in the guest's /proc/kallsyms")
        addr = int(m.group(1), 16)
        out["address"] = hex(addr)
        for n, kind in enumerate(order, 1):
            commands = (
                "set remotetimeout 60",
                "set architecture i386:x86-64",
                f"target remote {target}",
                f"{kind} *{addr:#x}",
                f"shell echo go{n} > {vm.fifo}",
                "continue",
                'printf "HIT_AT %#lx\\n", $pc',
                "delete",
                "detach",
            )
            try:
                text = _gdb(*commands, timeout=120)
            except subprocess.TimeoutExpired as exc:  # the breakpoint never fired: gdb still waits
                seen = [
                    x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                    for x in (exc.stdout, exc.stderr)
                ]
                text = "".join(seen) + "\nGDB_TIMED_OUT"
            rounds.append({"kind": kind, "gdb": text})
            vm.wait_for(rf"UNAME_DONE{n}", 120)
            rounds[-1]["console_after"] = vm.text()

    return _guest_session(argv, work, steps)


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1] == "--breakpoints":
        print("BREAKLAB_JSON " + json.dumps(debian_break_session(*sys.argv[2:8])))
    else:
        print("DEBUGLAB_JSON " + json.dumps(debian_debug_session(*sys.argv[1:6])))
