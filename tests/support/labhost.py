"""The lab: a QEMU TCG virtual machine with emulated AMD SVM, in which corral runs on a real
SVM-backed /dev/kvm.

Our dev/CI machines' /dev/kvm is PVM (guest ring 0 is emulated at ~1 M instructions/s), so a stock
Linux kernel cannot boot under corral there. `qemu-system-x86_64 -accel tcg -cpu max` exposes SVM
to its guest; its kvm-amd gives a /dev/kvm where guest ring 0 runs ~250 M instructions/s.

    with LabHost() as lab:
        res = lab.run("ls -l /dev/kvm", timeout=30)
        assert res.status == 0, res.output

How it is built (see /work/shared/notes/kvm-here.md for the measured facts behind it):

- Kernel: Debian's generic kernel (it has 9p; the cloud kernel has not), fetched with
  corral.images.debian into corral's cache; the lab's kernel and initramfs are cached under
  <corral cache>/lab/<kernel>-<hash>/ (vmlinuz, initrd.img), keyed by everything that goes into them.
- Initramfs (built here, uncompressed newc cpio): static busybox (busybox-static), the virtio + 9p
  modules and the kvm modules of that kernel, /init and the command agent.
- /init loads the modules, mounts the host's root (shared read-only over virtio-9p) on /newroot,
  binds /dev, /proc, /sys, mounts tmpfs on /tmp, /run, /var/tmp, /dev/shm, and chroots into the
  host's root to run the agent there: commands see the host's files (the repo, the venv, the
  host's corral cache: read-only) and the lab's own /dev/kvm. The 9p mount uses cache=loose
  (fast: `python -c pass` ~0.6 s in the lab): build on the host what the lab needs *before*
  booting it; files created or changed on the host later may not be seen in the lab.
- ttyS0 is the kernel console (written to a log file: `serial_log()`). The command channel is a
  virtio-serial port named lab.ctl (/dev/vportNpM in the lab) on QEMU's stdin/stdout pipes: no
  tty line discipline, and virtio's flow control loses nothing. (A second 16550 UART was tried
  first and dropped input bytes now and then: about one command line in a hundred.)

Command protocol on the channel (bytes pass unchanged):
    host -> lab:  "RUN <id> <timeout_s> <base64 of the shell script>\\n"
    lab -> host:  "__LAB_BEGIN__ <id>\\n" <the command's stdout+stderr> "\\n__LAB_DONE__ <id> <status>\\n"
<id> is random per command, so a command's own output cannot fake the end marker. The script runs
under the host's /bin/sh in its own session (process group); when it outlives <timeout_s> the
agent kills the whole group (status 137), and stragglers in that group are killed after every
command, so a command cannot leave background processes writing into the channel.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Module load order (from the notes): the virtio stack and 9p, then KVM for AMD.
LAB_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "tun",
    "irqbypass",
    "kvm",
    "ccp",
    "kvm-amd",
]

# the interpreter running the tests (the checkout's venv under `make test`), wherever the checkout
# is: the lab sees the host's root, so these paths are the same in there
VENV_BIN = Path(sys.executable).parent
CORRAL = str(VENV_BIN / "corral")
PYTHON = str(VENV_BIN / "python")
LAB_PATH = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY = "__LAB_READY__"
INIT_FAILED = "__LAB_INIT_FAILED__"

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
fail() {
    echo "@INIT_FAILED@ $*"
    [ -n "$CTL" ] && echo "@INIT_FAILED@ $*" 1<>$CTL
    sleep 1
    poweroff -f
}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mkdir -p /dev/pts /dev/shm
echo "lab-init: loading modules"
for m in @MODULES@; do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
CTL=
for i in $(seq 100); do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = lab.ctl ] && CTL=/dev/${p##*/}
    done
    [ -n "$CTL" ] && [ -e "$CTL" ] && break
    CTL=
    sleep 0.1
done
[ -n "$CTL" ] || fail "no virtio port lab.ctl"
echo "lab-init: mounting the host root over 9p"
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /newroot \
    || fail "mount 9p host root"
mount --bind /dev /newroot/dev || fail "bind /dev"
mount --bind /proc /newroot/proc || fail "bind /proc"
mount --bind /sys /newroot/sys || fail "bind /sys"
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts || echo "lab-init: no devpts"
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm || echo "lab-init: no /dev/shm"
# lab.keep=DIR: a checkout under /tmp (or /run, /var/tmp) stays visible through the tmpfs below
KEEP=$(sed -n 's/.*lab[.]keep=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$KEEP" ]; then
    mkdir -p /keep && mount --bind /newroot$KEEP /keep || fail "bind $KEEP"
fi
for d in /tmp /run /var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs /newroot$d || fail "tmpfs on $d"
done
if [ -n "$KEEP" ]; then
    mkdir -p /newroot$KEEP && mount --bind /keep /newroot$KEEP || fail "rebind $KEEP"
fi
mkdir -p /newroot/tmp/.lab
cp /bin/busybox /newroot/tmp/.lab/busybox || fail "copy busybox"
cp /agent.sh /newroot/tmp/.lab/agent.sh || fail "copy agent"
[ -e /dev/kvm ] && echo "lab-init: /dev/kvm present" || echo "lab-init: no /dev/kvm"
echo "lab-init: starting the agent on $CTL"
exec chroot /newroot /tmp/.lab/busybox sh /tmp/.lab/agent.sh 0<>$CTL 1>&0 2>&0
"""

AGENT_SCRIPT = r"""# The lab's command agent: runs in the chroot (the host's root), stdin/stdout on the lab.ctl port.
B=/tmp/.lab/busybox
D=/tmp/.lab
# LAB_TRACE=1 on the kernel command line (LabHost(extra_append=...)) traces the agent on ttyS0.
[ -n "$LAB_TRACE" ] && { exec 2>/dev/console; set -x; }
export PATH=@PATH@
export HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1
cd /
echo "@READY@"
while IFS= read -r line; do
    set -- $line
    case "$1" in
    RUN)
        id=$2; t=$3
        if ! echo "$4" | $B base64 -d > $D/cmd-$id.sh 2>/dev/null; then
            printf '__LAB_BEGIN__ %s\nbad command encoding\n__LAB_DONE__ %s 254\n' "$id" "$id"
            continue
        fi
        printf '__LAB_BEGIN__ %s\n' "$id"
        # busybox timeout execs its PROG in place (a forked grandchild watches and SIGKILLs it
        # at $t), and setsid, not being a process-group leader here, does too: so $! is the
        # command's shell and leads its own process group, which is killed afterwards.
        $B timeout -s KILL $t $B setsid /bin/sh $D/cmd-$id.sh </dev/null 2>&1 &
        pid=$!
        wait $pid
        rc=$?
        kill -KILL -$pid 2>/dev/null
        $B rm -f $D/cmd-$id.sh
        printf '\n__LAB_DONE__ %s %s\n' "$id" "$rc"
        ;;
    PING)
        printf '__LAB_PONG__ %s\n' "$2"
        ;;
    POWEROFF)
        $B sync
        $B poweroff -f
        ;;
    esac
done
$B poweroff -f
"""


# the checkout these tests run from (its venv, probe build and tests are used inside the lab)
REPO = Path(__file__).resolve().parents[2]
LAB_TMPFS = ("/tmp", "/run", "/var/tmp")


def _hidden_by_lab_tmpfs(path: Path) -> str | None:
    """`path` if the lab's tmpfs mounts would hide it (the lab binds it back), else None."""
    text = str(path)
    if any(text == d or text.startswith(d + "/") for d in LAB_TMPFS) and " " not in text:
        return text
    return None


class LabError(RuntimeError):
    """The lab failed (boot, channel, timeout); the message carries the lab's serial log."""

    def __init__(self, message: str, log: str = "") -> None:
        self.log = log
        super().__init__(f"{message}\n--- lab serial log ---\n{log}" if log else message)


@dataclass
class LabResult:
    status: int
    output: str

    @property
    def ok(self) -> bool:
        return self.status == 0


def _init_text() -> str:
    return INIT_SCRIPT.replace("@MODULES@", " ".join(LAB_MODULES)).replace("@INIT_FAILED@", INIT_FAILED)


def _agent_text() -> str:
    return AGENT_SCRIPT.replace("@PATH@", LAB_PATH).replace("@READY@", READY)


def build_lab_initramfs(busybox: Path, modules_dir: Path, out: Path) -> None:
    """The lab's initramfs: busybox, LAB_MODULES from modules_dir (lib/modules/<kver>), /init,
    /agent.sh. Uncompressed (nothing to decompress under TCG)."""
    from corral.images.initramfs import CpioWriter, read_module

    index: dict[str, Path] = {}
    for p in modules_dir.rglob("*.ko*"):
        name = p.name.split(".ko", 1)[0]
        index.setdefault(name, p)
        index.setdefault(name.replace("-", "_"), p)
    w = CpioWriter(mtime=0)
    for d in ("bin", "dev", "proc", "sys", "newroot", "tmp", "lib", "lib/modules"):
        w.add_dir(d)
    w.add_device("dev/console", "c", 5, 1)
    w.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    w.add_symlink("bin/sh", "busybox")
    for m in LAB_MODULES:
        src = index.get(m) or index.get(m.replace("-", "_"))
        if src is None:
            raise LabError(f"kernel module {m} not found under {modules_dir}")
        w.add_file(f"lib/modules/{m}.ko", read_module(src))
    w.add_file("init", _init_text().encode(), 0o755)
    w.add_file("agent.sh", _agent_text().encode())
    out.write_bytes(w.to_bytes())


def _recipe_hash() -> str:
    h = hashlib.sha256()
    for part in (_init_text(), _agent_text(), " ".join(LAB_MODULES), "lab-initramfs-v1"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def lab_cache_dir() -> Path:
    from corral.images.cache import cache_root

    return cache_root() / "lab"


def ensure_lab_images(progress: bool = False) -> tuple[Path, Path]:
    """(vmlinuz, initrd.img) for the lab, from the cache or built now (downloads Debian's
    generic kernel and busybox-static once, with apt-get)."""
    from corral.images.cache import atomic_dir, debs_dir
    from corral.images.debian import extract_deb, fetch_debs, resolve_kernel_package

    root = lab_cache_dir()
    recipe = _recipe_hash()
    # Reuse any complete entry with this recipe, so no apt look-up is needed once built.
    for cand in sorted(root.glob(f"linux-image-*-{recipe}"), reverse=True) if root.is_dir() else []:
        if (cand / "vmlinuz").is_file() and (cand / "initrd.img").is_file():
            return cand / "vmlinuz", cand / "initrd.img"

    kpkg = resolve_kernel_package("generic")
    final = root / f"{kpkg}-{recipe}"
    debs = debs_dir()
    have = {p.name.split("_", 1)[0]: p for p in debs.glob("*.deb")} if debs.is_dir() else {}
    want = [p for p in (kpkg, "busybox-static") if p not in have]
    if want:
        have.update(fetch_debs(want, debs, progress=progress))
    with tempfile.TemporaryDirectory(prefix="corral-lab-") as tmp:
        ex = Path(tmp) / "root"
        extract_deb(have[kpkg], ex)
        extract_deb(have["busybox-static"], ex)
        vmlinuz = next(iter(sorted((ex / "boot").glob("vmlinuz-*"))), None)
        mods = next(iter(sorted((ex / "lib" / "modules").glob("*"))), None) or next(
            iter(sorted((ex / "usr" / "lib" / "modules").glob("*"))), None
        )
        busybox = ex / "bin" / "busybox"
        if vmlinuz is None or mods is None or not busybox.is_file():
            raise LabError(f"unexpected package contents in {kpkg} / busybox-static")
        with atomic_dir(final) as out:
            shutil.copyfile(vmlinuz, out / "vmlinuz")
            build_lab_initramfs(busybox, mods, out / "initrd.img")
            (out / "kernel-version").write_text(mods.name + "\n")
    # Entries of older recipes or kernels are dead weight (~14 MB each).
    for old in root.glob("linux-image-*"):
        if old != final and old.is_dir() and ".tmp-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return final / "vmlinuz", final / "initrd.img"


# --- the lab VM ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: QEMU gets SIGKILL when the test process goes away.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class LabHost:
    """One QEMU TCG VM with emulated SVM; corral runs inside it on a real /dev/kvm."""

    def __init__(
        self,
        *,
        memory: str = "4G",
        cpus: int = 1,
        tcg_thread: str | None = None,
        boot_timeout: float = 240.0,
        qemu: str = "qemu-system-x86_64",
        qemu_data: Path | None = None,
        kernel: Path | None = None,
        initrd: Path | None = None,
        extra_append: str = "",
    ) -> None:
        self.memory = memory
        # One lab CPU. With two (single-threaded TCG running them in turn), Debian guests under
        # KVM in the lab stalled in 4 of 5 boots with a CPU hog beside the VMM, under QEMU as
        # under corral: a timer interrupt taken inside an interrupts-off section. With one,
        # 12 of 12 boots passed, hog or not, in half the time (2026-11-29).
        self.cpus = cpus
        # Multi-threaded TCG only pays with spare host cores: on a 2-core host single-threaded
        # TCG booted faster (7.7-8.3 s vs 9.3 s) and ran `corral doctor` faster (6-7.5 s vs 9.5 s).
        self.tcg_thread = tcg_thread or ("multi" if (os.cpu_count() or 1) >= 4 else "single")
        self.boot_timeout = boot_timeout
        self.qemu = qemu
        # another QEMU's data directory (-L), for one run from corral's cache (support/lab_qemu.py)
        self.qemu_data = qemu_data
        self.kernel = kernel
        self.initrd = initrd
        self.extra_append = extra_append
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None
        self._workdir: Path | None = None
        self._buf = bytearray()
        self._transcript = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._broken: str | None = None
        self._lock = threading.Lock()

    # -- logs --
    @property
    def console_path(self) -> Path | None:
        return self._workdir / "console.log" if self._workdir else None

    def serial_log(self) -> str:
        """The kernel console (ttyS0) so far, then QEMU's stderr and the command channel's tail."""
        parts = []
        if self._workdir:
            for name, title in (("console.log", "console (ttyS0)"), ("qemu.stderr", "qemu stderr")):
                with contextlib.suppress(OSError):
                    text = (self._workdir / name).read_bytes().decode(errors="replace")
                    if text.strip():
                        parts.append(f"=== {title} ===\n{text}")
        with self._cond:
            tail = bytes(self._transcript[-8000:]).decode(errors="replace")
        if tail.strip():
            parts.append(f"=== command channel (lab.ctl, last 8000 bytes) ===\n{tail}")
        return "\n".join(parts)

    # -- lifecycle --
    def __enter__(self) -> LabHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.cleanup()

    def qemu_args(self) -> list[str]:
        assert self._workdir is not None
        append = "console=ttyS0 panic=-1 mitigations=off tsc=reliable no_timer_check"
        keep = _hidden_by_lab_tmpfs(REPO)
        if keep:
            append += f" lab.keep={keep}"
        if self.extra_append:
            append += " " + self.extra_append
        return [
            self.qemu,
            "-accel",
            f"tcg,thread={self.tcg_thread}",
            "-cpu",
            "max",
            "-m",
            self.memory,
            "-smp",
            str(self.cpus),
            "-M",
            "pc",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            append,
            "-chardev",
            f"file,id=con,path={self._workdir / 'console.log'}",
            "-serial",
            "chardev:con",
            "-device",
            "virtio-serial-pci,id=vser",
            "-chardev",
            "stdio,id=ctl,signal=off",
            "-device",
            "virtserialport,bus=vser.0,chardev=ctl,name=lab.ctl",
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ] + (["-L", str(self.qemu_data)] if self.qemu_data else [])

    def start(self) -> None:
        if self.kernel is None or self.initrd is None:
            self.kernel, self.initrd = ensure_lab_images()
        if shutil.which(self.qemu) is None:
            raise LabError(f"{self.qemu} not found")
        self._workdir = Path(tempfile.mkdtemp(prefix="corral-lab-run-"))
        t0 = time.monotonic()
        stderr = open(self._workdir / "qemu.stderr", "wb")
        try:
            self.proc = subprocess.Popen(
                self.qemu_args(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        finally:
            stderr.close()
        self._reader = threading.Thread(target=self._pump, name="lab-serial", daemon=True)
        self._reader.start()
        try:
            idx = self._wait_for(lambda buf: self._find_ready(buf), time.monotonic() + self.boot_timeout)
            if idx is None:
                raise LabError(f"the lab did not come up within {self.boot_timeout:.0f} s", self.serial_log())
            with self._cond:
                del self._buf[:idx]
            self.boot_seconds = time.monotonic() - t0
        except BaseException:
            self.close()  # the LabError already carries the serial log
            self.cleanup()
            raise

    def _find_ready(self, buf: bytearray) -> int | None:
        if INIT_FAILED.encode() in buf:
            raise LabError("the lab's init failed", self.serial_log())
        i = buf.find(READY.encode())
        if i < 0:
            return None
        j = buf.find(b"\n", i)
        return None if j < 0 else j + 1

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += chunk
                self._transcript += chunk
                if len(self._transcript) > 1 << 20:
                    del self._transcript[: len(self._transcript) - (1 << 19)]
                self._cond.notify_all()

    def _wait_for(self, pred, deadline: float):
        """Wait until pred(buffer) returns non-None; None on timeout. Raises if QEMU exits."""
        with self._cond:
            while True:
                res = pred(self._buf)
                if res is not None:
                    return res
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))
        rc = self.proc.wait(timeout=10) if self.proc else None
        raise LabError(f"QEMU exited (status {rc})", self.serial_log())

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.stdin.write(b"POWEROFF\n")
                    proc.stdin.flush()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(Exception):
                    f.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None

    def cleanup(self) -> None:
        """Remove the run directory (logs); call after close() once the logs are no longer needed."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._broken is None

    # -- commands --
    def run(
        self, cmd: str, timeout: float = 120.0, *, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> LabResult:
        """Run `cmd` with the host's /bin/sh inside the lab (chrooted into the host's root).
        stdout and stderr come back merged. status 137 means the lab killed it at `timeout`."""
        with self._lock:
            if self._broken:
                raise LabError(f"the lab is unusable: {self._broken}", self.serial_log())
            if self.proc is None or self.proc.poll() is not None:
                raise LabError("the lab is not running", self.serial_log())
            script = ""
            for k, v in (env or {}).items():
                script += f"export {k}={shlex.quote(v)}\n"
            if cwd:
                script += f"cd {shlex.quote(cwd)} || exit 253\n"
            script += cmd + "\n"
            cid = secrets.token_hex(8)
            payload = base64.b64encode(script.encode()).decode()
            t = max(1, int(timeout + 0.999))
            try:
                self.proc.stdin.write(f"RUN {cid} {t} {payload}\n".encode())
                self.proc.stdin.flush()
            except OSError as exc:
                raise LabError(f"cannot write to the lab: {exc}", self.serial_log()) from exc
            begin = f"__LAB_BEGIN__ {cid}\n".encode()
            done = f"\n__LAB_DONE__ {cid} ".encode()

            def finished(buf: bytearray):
                i = buf.find(begin)
                if i < 0:
                    return None
                j = buf.find(done, i + len(begin))
                if j < 0:
                    return None
                k = buf.find(b"\n", j + len(done))
                if k < 0:
                    return None
                return i, j, k

            # The lab kills the command at `timeout`; allow for that and a slow channel.
            res = self._wait_for(finished, time.monotonic() + t + 30)
            if res is None:
                self._broken = f"command did not finish within {t + 30} s: {cmd[:200]!r}"
                with self._cond:
                    partial = bytes(self._buf).decode(errors="replace")
                raise LabError(f"{self._broken}\npartial output:\n{partial[-4000:]}", self.serial_log())
            i, j, k = res
            with self._cond:
                out = bytes(self._buf[i + len(begin) : j])
                status_text = bytes(self._buf[j + len(done) : k]).decode(errors="replace").strip()
                del self._buf[: k + 1]
            try:
                status = int(status_text)
            except ValueError:
                status = 255
            return LabResult(status, out.decode(errors="replace"))

    def check(self, cmd: str, timeout: float = 120.0, **kw) -> str:
        """run() that raises LabError (with the output) unless the command exits 0."""
        res = self.run(cmd, timeout, **kw)
        if res.status != 0:
            raise LabError(f"lab command failed (status {res.status}): {cmd}\n{res.output}")
        return res.output
