"""A GDB remote-protocol stub for a running machine: `gdb -ex 'target remote :1234'`.

All-stop, as QEMU's: when gdb stops the guest (Ctrl-C, a breakpoint, a finished step) the whole
machine pauses through Machine.pause() (vCPUs at an instruction boundary, devices and clock
held), and every vCPU is a gdb thread (id = vCPU index + 1). Registers come from KVM_GET_REGS /
SREGS / FPU of the selected vCPU; memory is read and written at guest-virtual addresses through
that vCPU's page tables (KVM_TRANSLATE), page by page; `monitor xp` reads guest-physical memory.
Breakpoints: Z0 writes int3 and asks KVM for its exits (KVM_GUESTDBG_USE_SW_BP); Z1-Z4 use the
four debug registers (KVM_GUESTDBG_USE_HW_BP); steps use KVM_GUESTDBG_SINGLESTEP.

On a PVM host (/dev/kvm without VT-x/AMD-V), measured: a guest int3 goes to the guest (ring 3)
or fails KVM's emulator (ring 0), debug registers catch only ring-0 (emulated) code, and a
single step in ring 3 becomes a #DB inside the guest. So there Z0 and ring-3 steps are refused
with a line saying why, and hardware breakpoints come with a warning.

The peer is hostile like any other: packets are bounded (PacketSize), checksummed, and a
malformed one gets an error reply; nothing it sends can stop the VMM (only `k` can stop the
guest, which is what a debugger is for: the socket is the operator's, loopback or 0600).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from corral.backends.unix_socket import listen_unix, peer_allowed
from corral.debug.packets import PacketReader, frame
from corral.debug.session import Session
from corral.errors import ConfigError, CorralError
from corral.host import probe_host
from corral.seccomp import enter as enter_seccomp

if TYPE_CHECKING:
    from corral.machine import Machine
    from corral.vstate.vcpu import Vcpu

log = logging.getLogger(__name__)

BUSY = "E.another debugger is attached to this VM: detach it first (one debugger at a time)"


class GdbError(CorralError):
    """The gdb stub cannot start as asked (bad address, port in use)."""


@dataclass(frozen=True)
class GdbAddress:
    """Where the stub listens: tcp:[HOST:]PORT (HOST defaults to 127.0.0.1) or unix:PATH."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    SYNTAX = "tcp:[HOST:]PORT|unix:PATH"

    @classmethod
    def parse(cls, text: str) -> GdbAddress:
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest:
            return cls("unix", path=rest)
        if kind == "tcp" and rest:
            host, _, port = rest.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            if port.isdigit() and 0 <= int(port) <= 65535:
                return cls("tcp", host=host, port=int(port))
        raise ConfigError(f"gdb address {text!r}: expected {cls.SYNTAX} (e.g. tcp:127.0.0.1:1234)")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


class GdbStub:
    """Serves one debugger at a time for `machine`; `wait` holds the guest at its first
    instruction until a debugger attaches and continues it (call before machine.start())."""

    def __init__(self, machine: Machine, address: GdbAddress | str, *, wait: bool = False) -> None:
        self.machine = machine
        self.address = GdbAddress.parse(address) if isinstance(address, str) else address
        self.pvm = probe_host(machine.kvm_path).is_pvm
        self._session: Session | None = None
        self._lock = threading.Lock()
        self._closing = False
        if self.address.kind == "unix":
            self._sock = listen_unix(self.address.path, "gdb socket", "--gdb", backlog=2)
        else:
            try:
                self._sock = socket.create_server((self.address.host, self.address.port), backlog=2)
            except OSError as exc:
                raise GdbError(f"cannot listen for gdb on {self.address}: {exc.strerror}") from None
        # a guest held for the debugger (--gdb-wait) counts as running: detach lets it go
        self.holding = wait
        if wait:
            machine.hold_at_start = True
        self._thread = threading.Thread(target=self._accept_loop, name="gdb-stub", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The TCP port listened on (the one the OS chose for tcp:HOST:0)."""
        return int(self._sock.getsockname()[1]) if self.address.kind == "tcp" else 0

    @property
    def where(self) -> str:
        """The address listened on, as --gdb takes it (tcp:HOST:PORT with the port chosen)."""
        return f"tcp:{self.address.host}:{self.port}" if self.address.kind == "tcp" else str(self.address)

    @property
    def attached(self) -> bool:
        return self._session is not None

    def close(self) -> None:
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        session = self._session
        if session is not None:
            session.close()
        self._thread.join(2.0)
        if self.address.kind == "unix":
            try:
                os.unlink(self.address.path)
            except OSError:
                pass

    # -- DebugHook: called on a vCPU thread at a debug exit -------------------------------------
    def debug_exit(self, vcpu: Vcpu, exception: int, pc: int, dr6: int, dr7: int) -> None:
        session = self._session
        if session is None:
            vcpu.resume()  # the debugger left between the exit and now: run on
            return
        session.events.put((vcpu.index, exception, pc, dr6))

    # -- connections -----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        enter_seccomp("gdb", "corral-gdb")  # its threads (a session, a refusal) inherit it
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self.address.kind == "unix" and not peer_allowed(conn):
                conn.close()
                continue
            with self._lock:
                busy = self._session is not None
                if not busy:
                    self._session = Session(
                        self.machine,
                        conn,
                        hook=self,
                        pvm=self.pvm,
                        was_paused=self.machine.paused and not self.holding,
                    )
                    self.holding = False
            if busy:
                threading.Thread(target=_refuse, args=(conn,), name="gdb-refuse", daemon=True).start()
                continue
            threading.Thread(target=self._serve, name="gdb-session", daemon=True).start()

    def _serve(self) -> None:
        session = self._session
        assert session is not None
        try:
            enter_seccomp("gdb", "corral-gdb")  # named, and linecache kept quiet on it
            session.run()
        except Exception:
            log.exception("gdb session failed")
        finally:
            session.cleanup()
            with self._lock:
                self._session = None


def _refuse(conn: socket.socket) -> None:
    """Answer a second debugger's first packet with one clear line, then hang up."""
    conn.settimeout(5.0)
    reader = PacketReader()
    try:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            if any(ev.kind == "packet" for ev in reader.feed(data)):
                conn.sendall(b"+" + frame(BUSY.encode()))
                return
    except OSError:
        pass
    finally:
        conn.close()
