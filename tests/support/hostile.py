"""Hostile neighbours for tests: another local user knocking on a socket, a FIFO where a file
should be (that cannot hang the test even when the code under test would block on it), and
a umask that takes nothing away."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534


def _knock(path: str, line: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
    except OSError as e:
        return "connect: " + errno.errorcode.get(e.errno or 0, str(e.errno))
    try:
        s.sendall(line.encode() + b"\n")
    except OSError:
        pass  # refused before the server read it: the reply still waits to be read
    try:
        return "reply: " + s.makefile("rb").readline().decode().strip()
    except OSError as e:
        return "reply: " + type(e).__name__


def knock_as(uid: int, path: str | os.PathLike[str], line: str = '{"op": "status"}') -> str:
    """Connect to the Unix socket at `path` as `uid` (a forked child that drops to that uid,
    with no supplementary groups) and send `line`: "connect: EACCES" when the connect fails,
    else "reply: " and the first line the server answered ("reply: " alone when it hung up)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os and socket calls, then _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = _knock(str(path), line)
        except OSError as e:
            out = f"child failed: {e!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with open(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert not out.startswith("child failed"), out
    return out


@contextlib.contextmanager
def open_dir() -> Iterator[Path]:
    """A new directory any user may enter (pytest's tmp_path is the owner's alone)."""
    d = Path(tempfile.mkdtemp(prefix="corral-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def fifo(path: Path, after: float = 3.0) -> Iterator[Path]:
    """A FIFO at `path`. Code that opens it blocking would wait forever for a partner: after
    `after` seconds partners come and go, so such code ends (and its test fails) instead."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        if done.wait(after):
            return
        while not done.is_set():
            # a partner for a blocked reader (ENXIO when none waits) and for a blocked writer
            for flags in (os.O_WRONLY, os.O_RDONLY):
                try:
                    os.close(os.open(path, flags | os.O_NONBLOCK))
                except OSError:
                    pass
            done.wait(0.05)

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    try:
        yield path
    finally:
        done.set()
        t.join(5)
