"""A host-side frame flood into a tap, for virtio-net receive tests and benchmarks (the probe's
`net-rx-bench` counts what reaches the guest).

    with Flood("crlbench0", seconds=30, frames=0) as flood:   # C, built with the host's gcc
        ...                                                  # boot the guest on that tap
    flood.result   # {"sent": N, "refused": M, "seconds": S}

netflood.c sends 60-byte frames with a sequence number through a packet socket, in bursts with a
pause between them so it leaves CPU time to the VMM it feeds; every run has a time cap and a
frame cap and is stopped with SIGTERM (SIGKILL after 5 s) when the caller is done.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType

SOURCE = Path(__file__).with_name("netflood.c")
_LINE = re.compile(r"netflood sent=(\d+) refused=(\d+) seconds=([\d.]+)")


def build_netflood() -> Path:
    """The flooder, compiled once per source version into corral's cache."""
    src = SOURCE.read_bytes()
    out = Path.home() / ".cache" / "corral" / f"netflood-{hashlib.sha256(src).hexdigest()[:12]}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        cc = shutil.which("gcc") or shutil.which("cc") or "gcc"
        subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(tmp), str(SOURCE)], check=True)
        tmp.rename(out)
    return out


class Flood:
    def __init__(
        self, ifname: str, *, seconds: float = 30.0, frames: int = 0, burst: int = 64, gap_us: int = 50
    ) -> None:
        self.cmd = [str(build_netflood()), ifname, str(seconds), str(frames), str(burst), str(gap_us)]
        self.proc: subprocess.Popen[str] | None = None
        self.result: dict[str, float] = {}

    def __enter__(self) -> Flood:
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def stop(self) -> dict[str, float]:
        """End the flood (if its caps have not already) and return what it sent."""
        if self.proc is None:
            return self.result
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        m = _LINE.search(out)
        if not m:
            raise RuntimeError(f"netflood said nothing useful (exit {proc.returncode}): {err.strip()}")
        self.result = {"sent": int(m[1]), "refused": int(m[2]), "seconds": float(m[3])}
        return self.result

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
