"""Fuzz targets: every device register interface and every parser corral feeds with outside
input, each as one function of a byte string, so the same target serves hypothesis (the unit
tests, `st.binary()`) and atheris (bench/fuzz_campaign.py, coverage-guided).

A target returns normally when the input was handled: accepted, or refused with the error the
code declares for it (a CorralError subclass, one line). Anything else escaping is a bug, and so
is a target that runs past its time bound (checked by the callers). The bytes are read as a
little program (`Ops`): which mode, which register, what value, so a random string drives the
device through sequences of accesses, and a parser gets either raw bytes, a valid input with
bytes changed, or a JSON value built from its own field names.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.errors import CorralError
from support.fakes import FakeClock, FakeIrqLine, FakeLoop, FakeVmControl
from support.virtio_driver import Driver

MiB = 1 << 20
Target = Callable[[bytes], None]


class Ops:
    """Reads small integers, choices and strings off the front of the fuzzer's bytes; past the
    end, everything is 0 (so every input is a complete, short program)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def int(self, nbytes: int = 1) -> int:
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk, "little")

    def below(self, n: int) -> int:
        return self.int(1 if n <= 256 else 2 if n <= 65536 else 4) % n

    def choice(self, items: list[Any] | tuple[Any, ...]) -> Any:
        return items[self.below(len(items))]

    def bytes(self, limit: int) -> bytes:
        n = self.below(limit + 1)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self, limit: int, alphabet: str = "") -> str:
        raw = self.bytes(limit)
        if alphabet:
            return "".join(alphabet[b % len(alphabet)] for b in raw)
        return raw.decode("utf-8", errors="replace")

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def nested(self) -> bytes:
        """JSON nested deeper than a recursive parser goes (arrays or objects, maybe cut)."""
        n = self.choice((2000, 20_000, 100_000))
        opener, closer = (b"[", b"]") if self.int() & 1 else (b'{"a":', b"}")
        return opener * n + (b"1" + closer * n if self.int() & 1 else b"")

    def json_value(self, keys: list[str], depth: int = 0) -> Any:
        """A JSON value whose object keys mostly come from `keys` (the model's own fields)."""
        kind = self.below(9 if depth < 3 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.int() & 1)
        if kind == 2:
            return self.choice([0, 1, -1, 4096, 1 << 31, 1 << 32, 1 << 63, 1 << 64, -(1 << 63), self.int(4)])
        if kind == 3:
            return self.choice([0.5, -1.0, 1e308, 1e-308])
        if kind == 4:
            return self.choice(
                ["", "x" * 300, "../../etc/passwd", "/dev/zero", "1G", "0", "\x00", self.text(24)]
            )
        if kind in (5, 6):
            return {
                (self.choice(keys) if keys and self.int() % 8 else self.text(8)): self.json_value(
                    keys, depth + 1
                )
                for _ in range(self.below(6))
            }
        return [self.json_value(keys, depth + 1) for _ in range(self.below(5))]


def mutate(seed: bytes, ops: Ops) -> bytes:
    """`seed` with a few bytes changed, cut or repeated, as `ops` says."""
    out = bytearray(seed)
    for _ in range(ops.below(8)):
        how, pos = ops.below(4), ops.below(max(len(out), 1))
        if how == 0 and out:
            out[pos] = ops.int()
        elif how == 1:
            del out[pos:]
        elif how == 2:
            out[pos:pos] = ops.bytes(16)
        else:
            out[pos : pos + 4] = ops.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\0\0\0\x80", b"\x01\0\0\0"])
    return bytes(out)


def one_line(exc: BaseException) -> None:
    """A declared error must read as one line, not a report."""
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


# -- legacy devices -------------------------------------------------------------------------------


def _legacy(kind: str, ctl: FakeVmControl, line: FakeIrqLine, clock: FakeClock) -> tuple[Any, int]:
    from corral.devices.legacy import I8042, AcpiPm, CmosRtc, DebugExit, PostSink, ResetRegister, Serial16550

    if kind == "uart":
        return Serial16550(line, lambda b: None), 8
    if kind == "i8042":
        return I8042(ctl, line), 6
    if kind == "rtc":
        return CmosRtc(line, clock=clock, mem_size=5 << 30), 2
    if kind == "pm":
        return AcpiPm(ctl, line, clock=lambda: int(clock.t * 1e9)), 12
    if kind == "debug-exit":
        return DebugExit(ctl), 2
    if kind == "reset":
        return ResetRegister(ctl), 1
    return PostSink(), 1


def legacy_target(kind: str) -> Target:
    def run(data: bytes) -> None:
        ops = Ops(data)
        ctl, line, clock = FakeVmControl(strict=True), FakeIrqLine(strict=True), FakeClock(ops.int(4))
        dev, span = _legacy(kind, ctl, line, clock)
        while ops.more():
            op, off, size = ops.below(4), ops.below(span + 2), ops.choice((1, 2, 4))
            if op == 0:
                assert 0 <= dev.pio_read(off, size) < 1 << (8 * size)
            elif op == 1:
                dev.pio_write(off, size, ops.int(size))
            elif op == 2:
                clock.t += ops.int(2) / 7
            elif kind == "uart":
                dev.feed(ops.bytes(64))
        state = dev.save_state()  # whatever the guest did, the state round-trips
        twin, _ = _legacy(kind, FakeVmControl(strict=True), FakeIrqLine(strict=True), clock)
        twin.load_state(type(state).model_validate_json(state.model_dump_json()))
        assert twin.save_state() == state

    return run


# -- PCI configuration and virtio devices ---------------------------------------------------------

VIRTIO_KINDS = ("blk", "rng", "console", "balloon", "vsock", "net")


class _Host:
    """Host-side resources shared by every example in one process (a scratch directory)."""

    dir: Path | None = None
    n = 0

    @classmethod
    def path(cls, name: str) -> Path:
        if cls.dir is None:
            cls.dir = Path(tempfile.mkdtemp(prefix="corral-fuzz-"))
        cls.n += 1
        return cls.dir / f"{cls.n}-{name}"


def can_tap() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


def virtio_device(kind: str, loop: FakeLoop) -> Any:
    from corral.backends.console import ConsoleBackend
    from corral.backends.disk import open_disk
    from corral.backends.unix_socket import listen_unix
    from corral.devices.virtio.balloon import VirtioBalloon
    from corral.devices.virtio.blk import VirtioBlock
    from corral.devices.virtio.console import VirtioConsole
    from corral.devices.virtio.rng import VirtioRng
    from corral.devices.virtio.vsock import VirtioVsock

    if kind == "blk":
        img = _Host.path("d.img")
        img.write_bytes(bytes(64 * 512))
        return VirtioBlock(open_disk(str(img)))
    if kind == "rng":
        return VirtioRng()
    if kind == "console":
        return VirtioConsole(ConsoleBackend(f"file={_Host.path('hvc.log')}"), loop)
    if kind == "balloon":
        return VirtioBalloon()
    if kind == "vsock":
        return VirtioVsock(5, listen_unix(_Host.path("v.sock"), "vsock socket", "vsock.uds_path"), loop)
    import uuid

    from corral.backends.tap import Tap
    from corral.devices.virtio.net import VirtioNet

    return VirtioNet(Tap("crlf" + uuid.uuid4().hex[:8]), bytes.fromhex("525400000001"), loop)


def _cleanup(d: Driver) -> None:
    d.close()


def virtio_target(kind: str) -> Target:
    """The device behind its virtio-pci transport: random register traffic on BAR0 (common
    config, ISR, device config, notify, MSI-X table and PBA, as any size at any offset), random
    descriptor tables, avail entries and buffer contents on every queue, kicks, resets and a
    driver bring-up in between. The transport must keep answering and a reset must always
    bring the device back."""
    from corral.devices.virtio.pci import BAR_SIZE, COMMON_OFF

    def run(data: bytes) -> None:
        ops = Ops(data)
        loop = FakeLoop()
        d = Driver(virtio_device(kind, loop), loop=loop)
        try:
            if ops.int() & 1:
                d.setup()
            nq = len(d.device.queue_sizes)
            steps = 0
            while ops.more() and steps < 400:
                steps += 1
                op = ops.below(8)
                if op == 0:  # anywhere in BAR0, any size
                    off, size = ops.below(BAR_SIZE + 8), ops.choice((1, 2, 4, 8, 3))
                    d.fn.bar_write(0, off, size, ops.int(size))
                elif op == 1:
                    d.fn.bar_read(0, ops.below(BAR_SIZE + 8), ops.choice((1, 2, 4, 8)))
                elif op == 2:  # the common config registers, where a driver writes
                    off, size = ops.below(0x40), ops.choice((1, 2, 4))
                    d.fn.bar_write(0, COMMON_OFF + off, size, ops.int(size))
                elif op == 3 and d.sizes:  # a descriptor
                    q = ops.below(nq) % max(len(d.sizes), 1)
                    table, _, _ = d.rings(q)
                    addr = ops.choice((ops.int(4) % (32 * MiB), ops.int(8), 0x100000 + ops.int(2)))
                    entry = struct.pack("<QIHH", addr, ops.int(4) % 70000, ops.int(1) & 7, ops.int(2) % 300)
                    d.mem.write(table + 16 * ops.below(64), entry)
                elif op == 4 and d.sizes:  # an avail entry and a kick
                    q = ops.below(len(d.sizes))
                    d.put_avail(q, ops.int(2) % 300, kick=bool(ops.int() & 1))
                elif op == 5:  # junk where requests and packet headers are read from
                    d.mem.write(0x100000 + ops.below(0x10000), ops.bytes(64))
                elif op == 6:
                    d.kick(ops.below(nq + 2))
                else:  # a fresh driver bring-up, after whatever came before
                    d.setup(queue_size=ops.choice((1, 2, 64, 256)))
                loop.run_ready(timeout=0)
            d.status()  # the transport still answers
            d.setup()  # and a reset brings the device back
            assert not d.device.broken
        finally:
            _cleanup(d)

    return run


def pci_target(data: bytes) -> None:
    """PCI configuration space through both mechanisms (ports 0xCF8/0xCFC, ECAM), with a host
    bridge and a virtio function (capabilities, MSI-X, BARs) behind them."""
    from corral.devices.bus import MmioBus
    from corral.devices.pci.root import ConfigPorts, Ecam, PciRoot
    from corral.devices.virtio.pci import VirtioPciDevice
    from corral.devices.virtio.rng import VirtioRng
    from corral.memory import GuestMemory
    from support.fakes import FakeDoorbells

    ops = Ops(data)
    mmio = MmioBus()
    root = PciRoot(mmio)
    mem = GuestMemory(16 * MiB)
    try:
        root.add(VirtioPciDevice(VirtioRng(), mem, FakeIrqLine(), FakeLoop(), FakeDoorbells()))
        ports, ecam = ConfigPorts(root), Ecam(root)
        while ops.more():
            op, size = ops.below(4), ops.choice((1, 2, 4, 3, 8))
            if op == 0:
                ports.pio_write(ops.below(8), size if size in (1, 2, 4) else 4, ops.int(4))
            elif op == 1:
                ports.pio_read(ops.below(8), size if size in (1, 2, 4) else 4)
            elif op == 2:
                ecam.mmio_write(ops.int(3) % (1 << 21), size, ops.int(size))
            else:
                ecam.mmio_read(ops.int(3) % (1 << 21), size)
        assert ecam.mmio_read(0, 4) == 0x0008_1B36  # the host bridge's identity stays
        state = root.save_state()
        type(state).model_validate_json(state.model_dump_json())
    finally:
        mem.close()


# -- parsers --------------------------------------------------------------------------------------


def options_target(data: bytes) -> None:
    """Every option syntax (--disk, --net, --vsock, --virtio-console) and the config it builds,
    plus sizes (--memory)."""
    from corral import config

    ops = Ops(data)
    syntax = ops.choice([config.DISK, config.NET, config.VSOCK, config.VIRTIO_CONSOLE])
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789=,/.:-_ \x00\n"
    text = ops.text(120, alphabet) if ops.int() & 1 else ops.text(120)
    try:
        syntax.parse(text, where="--x")
    except CorralError as exc:
        one_line(exc)
    try:
        config.parse_size(ops.text(24, "0123456789kKmMgGtTbB .-x"))
    except (CorralError, ValueError) as exc:
        one_line(exc)


def _config_keys() -> list[str]:
    from corral.config import DiskConfig, MachineConfig, NetConfig, VsockConfig

    keys: set[str] = set()
    for model in (MachineConfig, DiskConfig, NetConfig, VsockConfig):
        keys.update(model.model_fields)
    return sorted(keys)


def config_target(data: bytes) -> None:
    """MachineConfig from a JSON value (what a snapshot manifest, a migration hello or a
    Firecracker config file hands over), and the operator's HostResources applied to it."""
    from corral.config import HostResources, MachineConfig

    ops = Ops(data)
    fields = ops.json_value(_config_keys())
    if not isinstance(fields, dict):
        fields = {"kernel": "k", "cpus": fields}
    try:
        cfg = MachineConfig.build(**{str(k): v for k, v in fields.items()})
    except CorralError as exc:
        one_line(exc)
        return
    try:
        HostResources().apply(cfg, "the fuzzer")
    except CorralError as exc:
        one_line(exc)


_SNAP: dict[str, bytes] = {}


def _seed_snapshot() -> dict[str, bytes]:
    """A manifest written by corral's own model and a real (older) snapshot's state: the seed
    that the snapshot target mutates (no VM needed)."""
    if not _SNAP:
        import hashlib
        import time

        from corral._version import __version__
        from corral.config import MachineConfig
        from corral.state.snapshot import FORMAT, FORMAT_VERSION, Manifest

        state = (Path(__file__).parents[1] / "data" / "snapshot-format1" / "state.json").read_bytes()
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            corral_version=__version__,
            created=time.time(),
            cpu={"vendor": "AuthenticAMD", "signature": 0xA00F11},
            config=MachineConfig(kernel="k", memory="16M"),
            memory_size=16 * MiB,
            state_sha256=hashlib.sha256(state).hexdigest(),
        )
        _SNAP["manifest"] = manifest.model_dump_json().encode()
        _SNAP["state"] = state
    return _SNAP


def snapshot_target(data: bytes) -> None:
    """read_snapshot over a directory whose manifest.json and state.json are mutated (raw,
    edited or rebuilt from field names) and whose memory.bin has any size."""
    import hashlib

    from corral.state.snapshot import MANIFEST, MEMORY, STATE, SnapshotError, read_snapshot

    ops = Ops(data)
    seed = _seed_snapshot()
    d = _Host.path("snap")
    d.mkdir()
    try:
        mode = ops.below(4)
        if mode == 3:
            manifest = ops.nested()
        elif mode == 0:
            manifest = mutate(seed["manifest"], ops)
        elif mode == 1:
            obj = json.loads(seed["manifest"])
            obj[ops.choice(sorted(obj))] = ops.json_value(sorted(obj) + _config_keys())
            manifest = json.dumps(obj).encode()
        else:
            manifest = ops.bytes(200)
        state = mutate(seed["state"], ops) if ops.int() & 1 else seed["state"]
        if ops.int() & 1:  # the checksum made to match, so the state is parsed too
            try:
                obj = json.loads(manifest)
                if isinstance(obj, dict):
                    obj["state_sha256"] = hashlib.sha256(state).hexdigest()
                    manifest = json.dumps(obj).encode()
            except (ValueError, RecursionError):
                pass
        (d / MANIFEST).write_bytes(manifest)
        (d / STATE).write_bytes(state)
        with open(d / MEMORY, "wb") as f:
            f.truncate(ops.choice((16 * MiB, 0, 4096, 16 * MiB + 1)))
        try:
            read_snapshot(d)
        except SnapshotError as exc:
            one_line(exc)
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


class _Tcp:
    """One loopback listener per process: each example gets a fresh connected pair."""

    srv: socket.socket | None = None

    @classmethod
    def pair(cls) -> tuple[socket.socket, socket.socket]:
        if cls.srv is None:
            cls.srv = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(cls.srv.getsockname())
        accepted, _ = cls.srv.accept()
        return accepted, client


def _feed(sock: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError:
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def migration_handshake_target(data: bytes) -> None:
    """The receiver's side of the handshake against a peer sending these bytes (raw, or a
    well-formed proof with fields changed): refused with MigrationError, never anything else."""
    from corral.migration import _PROOF, MAGIC, PROTOCOL, MigrationError, _accept

    ops = Ops(data)
    if ops.int() & 1:
        payload = mutate(_PROOF.pack(MAGIC, PROTOCOL, bytes(32), bytes(32)), ops) + ops.rest()
    else:
        payload = ops.rest()
    mine, peer = _Tcp.pair()
    t = _feed(peer, payload)
    try:
        _accept(mine, b"0123456789abcdef-fuzz", None, 1.0).close()
    except MigrationError as exc:
        one_line(exc)
    except OSError:
        pass  # the receiver logs the errno and listens on (migration.receive)
    finally:
        mine.close()
        t.join(5)
        peer.close()


def migration_stream_target(data: bytes) -> None:
    """Framed records after the handshake (hello, pages, state, go) from a peer that holds the
    token but sends anything: each refused with MigrationError, pages only into guest memory."""
    from corral.memory import GuestMemory
    from corral.migration import _JSON, _PAGES, MigrationError, _Link

    ops = Ops(data)
    records = bytearray()
    while ops.more() and len(records) < 1 << 16:
        kind = ops.below(4)
        if kind == 0:
            body = ops.json_value(["config", "state", "go", "ok", "error", "protocol", "cpu"])
            raw = json.dumps(body).encode() if ops.int() % 4 else ops.nested()[: 1 << 16]
            records += _JSON.pack(b"J", ops.choice((len(raw), ops.int(4)))) + raw
        elif kind == 1:
            length = ops.choice((4096, ops.int(4), 0, 1 << 20))
            records += _PAGES.pack(b"P", ops.choice((0, ops.int(8), 16 * MiB - 4096)), length)
            records += ops.bytes(64)
        else:
            records += ops.bytes(32)
    mem = GuestMemory(16 * MiB)
    mine, peer = _Tcp.pair()
    t = _feed(peer, bytes(records))
    try:
        link = _Link(mine, timeout=1.0)
        for _ in range(16):
            link.recv(mem.offset_view, limit=1 << 16)
    except MigrationError as exc:
        one_line(exc)
    except CorralError as exc:  # a page run outside guest memory: the memory's own error
        one_line(exc)
    finally:
        mine.close()
        t.join(5)
        peer.close()
        mem.close()


_FC_PATHS = [
    "/",
    "/version",
    "/vm",
    "/machine-config",
    "/boot-source",
    "/drives/rootfs",
    "/drives/x",
    "/network-interfaces/eth0",
    "/vsock",
    "/entropy",
    "/balloon",
    "/balloon/statistics",
    "/actions",
    "/snapshot/create",
    "/snapshot/load",
    "/mmds",
    "/mmds/config",
    "/logger",
    "/metrics",
    "/serial",
    "/cpu-config",
    "/vm/config",
]
_FC_KEYS = [
    "vcpu_count",
    "mem_size_mib",
    "smt",
    "track_dirty_pages",
    "kernel_image_path",
    "boot_args",
    "initrd_path",
    "drive_id",
    "path_on_host",
    "is_root_device",
    "is_read_only",
    "iface_id",
    "host_dev_name",
    "guest_mac",
    "guest_cid",
    "uds_path",
    "vsock_id",
    "amount_mib",
    "deflate_on_oom",
    "stats_polling_interval_s",
    "action_type",
    "state",
    "snapshot_path",
    "mem_file_path",
    "mem_backend",
    "backend_path",
    "backend_type",
    "resume_vm",
    "snapshot_type",
    "rate_limiter",
    "bandwidth",
    "size",
    "refill_time",
    "one_time_burst",
    "log_path",
    "level",
    "metrics_path",
    "serial_out_path",
    "cache_type",
    "io_engine",
    "network_interfaces",
]


class _NoMachine:
    """A machine factory for the router: InstanceStart and loads fail as a host would."""

    def __call__(self, *args: Any) -> Any:
        from corral.errors import ConfigError

        raise ConfigError("the fuzzer starts no VM")


def firecracker_target(data: bytes) -> None:
    """Firecracker's API router, pre-boot, with any method, path and body: every request gets
    a Firecracker reply (never a 500, never an exception)."""
    from corral.firecracker.routes import Router
    from corral.firecracker.vmm import FirecrackerVmm

    ops = Ops(data)
    router = Router(FirecrackerVmm("fuzz", machine_factory=_NoMachine()))
    while ops.more():
        method = ops.choice(["GET", "PUT", "PATCH", "DELETE", "POST"])
        path = ops.choice(_FC_PATHS) if ops.int() % 8 else "/" + ops.text(20)
        kind = ops.below(4)
        if kind == 0:
            body: bytes | None = json.dumps(ops.json_value(_FC_KEYS)).encode()
        elif kind == 1:
            body = ops.bytes(100)
        elif kind == 2:
            body = ops.nested()[:51200]  # the server's body cap
        else:
            body = None
        reply = router.handle(method, path, body)
        assert reply.status in (200, 204, 400, 404, 405), (method, path, body, reply.status, reply.body)
        if reply.status >= 400 and reply.body:
            assert "fault_message" in reply.body


def control_target(data: bytes) -> None:
    """The bodies of corral's own endpoints on the control socket (/corral/snapshot, /balloon,
    /migrate), read as the router reads them: a request model, or one bounded fault line."""
    from corral.firecracker import models
    from corral.firecracker.routes import parse
    from corral.firecracker.vmm import FirecrackerError

    ops = Ops(data)
    model = ops.choice([models.CorralSnapshot, models.CorralBalloon, models.CorralMigrate])
    mode = ops.below(3)
    if mode == 2:
        body = ops.nested()[:51200]  # the server's body cap
    elif mode == 1:
        keys = ["path", "target", "to", "token", "tls_pin", "downtime_ms", "insecure"]
        body = json.dumps(ops.json_value(keys)).encode()
    else:
        body = ops.rest()
    try:
        parse(model, body)
    except FirecrackerError as exc:
        text = str(exc)
        assert "\n" not in text and len(text) < 4000, text


_KERNELS: list[bytes] = []


def _seed_kernels() -> list[bytes]:
    """Valid images of each kind (bzImage, ELF with a PVH note, Multiboot), as the loader's
    unit tests build them."""
    if not _KERNELS:
        import importlib.util

        path = Path(__file__).parents[1] / "unit" / "test_boot_loader.py"
        spec = importlib.util.spec_from_file_location("_fuzz_loader_seeds", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _KERNELS.extend(module.VALID_IMAGES)
    return _KERNELS


_MEM: list[Any] = []


def loader_target(data: bytes) -> None:
    """The kernel loaders (ELF/PVH, bzImage, Multiboot) on raw bytes or a valid image of each
    kind with its header changed."""
    from corral.boot.loader import load_kernel
    from corral.memory import GuestMemory

    if not _MEM:
        _MEM.append(GuestMemory(32 * MiB))
    ops = Ops(data)
    mode = ops.below(3)
    image = ops.rest() if mode == 0 else mutate(ops.choice(_seed_kernels()), ops)
    try:
        load_kernel(
            _MEM[0],
            image,
            cmdline=ops.text(40),
            initrd=b"i" * 100 if mode == 2 else None,
            prefer="multiboot" if ops.int() & 1 else None,
        )
    except CorralError as exc:
        one_line(exc)


def overlay_target(data: bytes) -> None:
    """An existing overlay file with any contents (a real header changed or cut, or junk)
    opened over a base image: refused with ConfigError or used, never reset."""
    from corral.backends.disk import open_disk

    ops = Ops(data)
    base = _Host.path("base.img")
    base.write_bytes(bytes(ops.choice((4096, 65536, 1 << 20))))
    seed_path, overlay = _Host.path("seed.cow"), _Host.path("o.cow")
    try:
        open_disk(str(base), overlay=str(seed_path)).close()
        seed = seed_path.read_bytes()[:4096]
        content = mutate(seed, ops) if ops.int() & 1 else ops.bytes(600)
        overlay.write_bytes(content)
        try:
            disk = open_disk(str(base), overlay=str(overlay))
            disk.close()
        except CorralError as exc:
            one_line(exc)
        if content:
            assert overlay.read_bytes()[: len(content)] == content  # never reset
    finally:
        for p in (base, seed_path, overlay):
            p.unlink(missing_ok=True)


def device_state_target(data: bytes) -> None:
    """A virtio-pci function's saved state (transport registers, queues, MSI-X, the device's
    own record) from a snapshot or a migration peer, changed: refused with StateError at load
    or loaded, and then the device still serves its driver after a reset."""
    from corral.devices.base import StateError
    from corral.devices.virtio.balloon import VirtioBalloon
    from corral.devices.virtio.rng import VirtioRng

    ops = Ops(data)
    dev = VirtioBalloon() if ops.int() & 1 else VirtioRng()
    d = Driver(dev)
    try:
        d.setup()
        state = json.loads(d.fn.save_state().model_dump_json())
        keys = sorted(state) + sorted(state.get("device", {})) + ["num_pages", "actual", "last_avail"]
        for _ in range(1 + ops.below(4)):
            if ops.int() & 1 and state.get("device") is not None:
                sub = state["device"] if isinstance(state["device"], dict) else {}
                sub[ops.choice(keys)] = ops.json_value(keys)
                state["device"] = sub
            else:
                state[ops.choice(sorted(state))] = ops.json_value(keys)
        try:
            d.fn.load_state(d.fn.state_model.model_validate_json(json.dumps(state)))
        except StateError as exc:
            one_line(exc)
            return
        for _ in range(ops.below(20)):  # the guest carries on with the loaded state
            off, size = ops.below(0x4000), ops.choice((1, 2, 4))
            d.fn.bar_read(0, off, size)
            d.fn.bar_write(0, ops.below(0x40), size, ops.int(size))
        d.setup()
        assert not dev.broken
    finally:
        d.close()


# -- fw_cfg and the firmware's ACPI table loader -------------------------------------------------


def fw_cfg_target(data: bytes) -> None:
    """fw_cfg as a firmware machine has it (every item, the ACPI/SMBIOS files and the table
    loader included): port writes and reads, and DMA descriptors whose addresses, lengths and
    controls come from the input (inside RAM, past it, or straddling its end)."""
    from corral.arch.x86 import layout
    from corral.devices.legacy import fw_cfg as F
    from corral.memory import GuestMemory

    if not _MEM:
        _MEM.append(GuestMemory(32 * MiB))
    mem = _MEM[0]
    ops = Ops(data)
    dev = F.machine_fw_cfg(mem, cpus=1 + ops.below(8), e820=layout.e820_map(mem.size), bootorder=["/x"])
    F.add_firmware_tables(dev, cpus=1 + ops.below(8), mem_size=mem.size)
    F.add_kernel_items(dev, lambda: b"k" * 4096, None, "console=ttyS0")
    desc = 0x10000
    while ops.more():
        op = ops.below(4)
        if op == 0:
            dev.pio_write(F.SELECTOR_OFFSET, 2, ops.choice([F.FILE_DIR, *dev.files().values(), ops.int(2)]))
        elif op == 1:
            off, size = ops.below(F.SPAN + 2), ops.choice((1, 2, 4))
            assert 0 <= dev.pio_read(off, size) < 1 << (8 * size)
        elif op == 2:
            dev.pio_write(ops.below(F.SPAN + 2), ops.choice((1, 2, 4, 8)), ops.int(8))
        else:
            control = ops.choice([F.DMA_READ, F.DMA_SKIP, F.DMA_WRITE, F.DMA_SELECT | F.DMA_READ, ops.int(4)])
            control |= ops.int(2) << 16
            length = ops.choice([ops.int(2), 0xFFFF_FFFF, mem.size])
            target = ops.choice([0x20000 + ops.int(2), mem.size - ops.int(2), ops.int(8)])
            mem.write(desc, struct.pack(">IIQ", control, length, target))
            addr = ops.choice([desc, mem.size - 8, ops.int(8)])
            dev.pio_write(F.DMA_OFFSET, 4, int.from_bytes((addr >> 32).to_bytes(4, "big"), "little"))
            dev.pio_write(
                F.DMA_OFFSET + 4, 4, int.from_bytes((addr & 0xFFFF_FFFF).to_bytes(4, "big"), "little")
            )
    state = dev.save_state()
    assert type(state).model_validate_json(state.model_dump_json()) == state


def table_loader_target(data: bytes) -> None:
    """A table-loader script (corral's own with bytes changed, or raw) run as a firmware runs
    it over corral's files: it patches them or fails with one TableLoaderError line."""
    from corral.arch.x86 import acpi_loader as L

    fw = L.firmware_acpi(2, 64 * MiB)
    ops = Ops(data)
    blob = ops.rest() if ops.below(3) == 0 else mutate(fw.loader, ops)
    try:
        L.run(L.decode(blob), fw.files(), lambda name, size, align, zone: 0xF0000 if zone == 2 else 0x100000)
    except L.TableLoaderError as exc:
        one_line(exc)


def pflash_target(data: bytes) -> None:
    """A flash bank driven by command and data writes at any offset and width (inside the bank,
    straddling its end, past it): the bank stays its size, a read answers within its width, the
    mapped view flips only between array and not, and the store sees only in-bank ranges."""
    from corral.devices.legacy import pflash as P

    ops = Ops(data)
    size = P.BLOCK * (1 + ops.below(4))
    stored: list[tuple[int, int]] = []
    modes: list[bool] = [True]

    def on_mode(array: bool) -> None:
        assert array != modes[-1]
        modes.append(array)

    dev = P.Pflash(
        bytearray(size),
        readonly=ops.below(4) == 0,
        store=lambda o, d: stored.append((o, len(d))),
        on_mode=on_mode,
    )
    cmds = [P.READ_ARRAY, P.READ_STATUS, P.CLEAR_STATUS, P.READ_ID, P.CFI_QUERY, P.BLOCK_ERASE, P.CONFIRM]
    cmds += [P.PROGRAM, P.PROGRAM_ALT, P.LOCK_SETUP]
    while ops.more():
        off = ops.choice([ops.below(size), size - 1 - ops.below(4), size + ops.below(16), ops.int(4)])
        width = ops.choice((1, 2, 4, 8))
        if ops.below(3) == 0:
            assert 0 <= dev.mmio_read(off, width) < 1 << (8 * width)
        else:
            dev.mmio_write(off, width, ops.choice([*cmds, ops.int(width)]))
        assert len(dev.data) == size and modes[-1] == (dev.mode == P.ARRAY)
    assert all(0 <= o and o + n <= size for o, n in stored)
    assert not (dev.readonly and stored)


def warm() -> None:
    """Build the seeds up front (the loaders' are made by the loader tests' own builders,
    which hypothesis must not see being defined inside a running example)."""
    _seed_kernels()
    _seed_snapshot()


LEGACY = ["uart", "rtc", "i8042", "pm", "reset", "debug-exit", "post"]
PARSERS: dict[str, Target] = {
    "options": options_target,
    "config": config_target,
    "snapshot-manifest": snapshot_target,
    "migration-handshake": migration_handshake_target,
    "migration-stream": migration_stream_target,
    "firecracker-api": firecracker_target,
    "control-api": control_target,
    "kernel-loaders": loader_target,
    "overlay-file": overlay_target,
    "device-state": device_state_target,
    "acpi-table-loader": table_loader_target,
}
DEVICES: dict[str, Target] = {
    **{f"legacy-{k}": legacy_target(k) for k in LEGACY},
    "pci-config": pci_target,
    "legacy-fw-cfg": fw_cfg_target,
    "legacy-pflash": pflash_target,
    **{f"virtio-{k}": virtio_target(k) for k in VIRTIO_KINDS},
}
TARGETS: dict[str, Target] = {**DEVICES, **PARSERS}

__all__ = ["DEVICES", "PARSERS", "TARGETS", "Ops", "can_tap", "mutate", "warm"]
