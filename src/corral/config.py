"""Machine configuration: one validated schema for the CLI, the library and snapshot metadata.

Errors are FieldErrors naming the config field (`cpus`, `disks[0].serial`), never a CLI flag:
an embedder never typed one; the CLI maps fields back to the flags the user gave. The
`NAME[,key=value]` options (DISK, NET, VSOCK, VIRTIO_CONSOLE) declare their syntax once here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from corral.arch.x86 import layout
from corral.arch.x86.cpuid import HIDEABLE
from corral.backends.tap import check_tap_name, format_mac, parse_mac
from corral.errors import ConfigError, FieldError
from corral.lazymodel import BaseModel, ConfigDict, Field, field_validator, quick_init, validation_error
from corral.options import FLAG, OPTIONAL, VALUE, OptionSyntax

if TYPE_CHECKING:
    from pydantic import ValidationError

MAX_CPUS = 254  # xAPIC ids in the MADT; the IOAPIC takes the next id
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int, *, default_unit: str = "M") -> int:
    """'512M', '2G', '1.5G', '4096K' or a plain number of `default_unit`s -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ConfigError(f"{str(text)[:40]!r} is not a size: write it like 512M, 2G or 4096K")
    number, unit = m.groups()
    unit = unit.upper() or default_unit.upper()
    value = float(number) * _UNITS[unit]
    if value >= 1 << 64:  # (and a float overflowed to infinity)
        raise ConfigError(f"{str(text).strip()[:40]!r} is too large a size")
    return int(value)


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


DISK = OptionSyntax(
    "disks",
    "PATH[,ro][,serial=ID][,overlay=FILE]",
    positional="path",
    keys={"ro": FLAG, "serial": VALUE, "overlay": VALUE},
)
NET = OptionSyntax(
    "nets",
    "tap[=NAME][,mac=MAC][,host-ip=ADDR/LEN]",
    keys={"tap": OPTIONAL, "mac": VALUE, "host-ip": VALUE},
    one_of=(("tap",),),
)
VSOCK = OptionSyntax(
    "vsock", "cid=N,uds=PATH", keys={"cid": VALUE, "uds": VALUE}, one_of=(("cid",), ("uds",))
)
MODULE = OptionSyntax("modules", "PATH[,cmdline=ARGS]", positional="path", keys={"cmdline": VALUE})
DEBUG_EXIT = OptionSyntax("debug_exit", "iobase=PORT", keys={"iobase": VALUE}, one_of=(("iobase",),))
OVMF = OptionSyntax("firmware", "ovmf[,vars=PATH]", positional="name", keys={"vars": VALUE})
VIRTIO_CONSOLE = OptionSyntax(
    "virtio_console", "pty|file=PATH", keys={"pty": FLAG, "file": VALUE}, one_of=(("pty", "file"),)
)


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's ('disks', 0, 'serial') -> 'disks[0].serial'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def field_error(exc: ValidationError, prefix: str = "") -> FieldError:
    """pydantic's report as one FieldError naming each bad field (under `prefix`)."""
    problems = []
    for err in exc.errors():
        where = ".".join(p for p in (prefix, field_path(err["loc"])) if p) or "config"
        problems.append((_printable(where, 100), _printable(err["msg"].removeprefix("Value error, "), 400)))
    return FieldError(*problems[0], *problems[1:])


def _printable(text: str, limit: int) -> str:
    """Text from outside (an unknown field's name, a value quoted back) as one bounded line:
    escapes for what is not printable, cut at `limit` characters."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


@quick_init
class DiskConfig(BaseModel):
    """A virtio-blk disk backed by a raw image file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="raw disk image")
    read_only: bool = Field(default=False, description="the guest cannot write (image opened read-only)")
    serial: str = Field(default="", max_length=20, description="device serial (VIRTIO_BLK_T_GET_ID)")
    overlay: Path | None = Field(
        default=None,
        description="copy-on-write overlay file (created if "
        "missing): the guest writes there, the image stays untouched",
    )

    @classmethod
    def parse(cls, spec: str, index: int = 0) -> DiskConfig:
        """DISK.syntax ('PATH[,ro][,serial=ID][,overlay=FILE]') for disks[index]."""
        where = f"disks[{index}]"
        o = DISK.parse(spec, where)
        try:
            return cls(
                path=o["path"],
                read_only=bool(o.get("ro")),
                serial=o.get("serial", ""),
                overlay=o.get("overlay"),
            )
        except validation_error() as exc:
            raise field_error(exc, where) from None


@quick_init
class NetConfig(BaseModel):
    """A virtio-net NIC whose host end is a tap device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tap: str = Field(description="tap interface name (created if it does not exist)")
    mac: str = Field(default="", description="guest MAC; empty: derived from the tap name")
    host_ip: str = Field(default="", description="address for the host end, CIDR (e.g. 10.0.2.1/24)")

    @field_validator("tap")
    @classmethod
    def _tap(cls, v: str) -> str:
        try:
            return check_tap_name(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        try:
            return format_mac(parse_mac(v)) if v else v
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("host_ip")
    @classmethod
    def _host_ip(cls, v: str) -> str:
        if v:
            try:
                iface = ipaddress.ip_interface(v)
            except ValueError:
                raise ValueError(
                    f"'{v}' is not an address with a prefix: write it like 10.0.2.1/24"
                ) from None
            if "/" not in v:
                raise ValueError(f"'{v}' has no prefix length: write it like {v}/24")
            return str(iface)
        return v

    def guest_mac(self) -> bytes:
        if self.mac:
            return parse_mac(self.mac)
        # stable per tap name, locally administered, unicast. hashlib (OpenSSL) is imported here,
        # off the launch of a machine without a network; a builder under a seccomp filter has
        # it already (corral.machine.preload imports the snapshot module, which uses it).
        import hashlib

        return bytes([0x52, 0x54, 0x00]) + hashlib.sha256(self.tap.encode()).digest()[:3]

    @classmethod
    def parse(cls, spec: str, index: int = 0) -> NetConfig:
        """NET.syntax ('tap[=NAME][,mac=MAC][,host-ip=ADDR/LEN]') for nets[index]."""
        where = f"nets[{index}]"
        if spec.split(",")[0].partition("=")[0] not in NET.keys:
            raise NET.error(spec, "is not a tap: only tap networking exists", where)
        o = NET.parse(spec, where)
        try:
            return cls(tap=o["tap"] or f"corral{index}", mac=o.get("mac", ""), host_ip=o.get("host-ip", ""))
        except validation_error() as exc:
            raise field_error(exc, where) from None


@quick_init
class ModuleConfig(BaseModel):
    """A Multiboot module: a file the boot loader puts in memory, with its own command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="the module's file")
    cmdline: str = Field(
        default="", max_length=4096, description="its arguments; the guest sees 'PATH ARGS', as GRUB passes"
    )

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        if "\0" in v:
            raise ValueError("a module command line cannot hold a NUL character")
        return v

    @classmethod
    def parse(cls, spec: str, index: int = 0) -> ModuleConfig:
        """MODULE.syntax ('PATH[,cmdline=ARGS]') for modules[index]."""
        where = f"modules[{index}]"
        o = MODULE.parse(spec, where)
        try:
            return cls(path=o["path"], cmdline=o.get("cmdline", ""))
        except validation_error() as exc:
            raise field_error(exc, where) from None


@quick_init
class VsockConfig(BaseModel):
    """A virtio-vsock device; the host side is Unix sockets (Firecracker's scheme)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cid: int = Field(ge=3, lt=0xFFFF_FFFF, description="the guest's context id")
    uds_path: Path = Field(description="host programs connect here; guest connects reach <path>_<port>")

    @classmethod
    def parse(cls, spec: str) -> VsockConfig:
        """VSOCK.syntax ('cid=N,uds=PATH')."""
        o = VSOCK.parse(spec)
        try:
            return cls(cid=o["cid"], uds_path=o["uds"])
        except validation_error() as exc:
            raise field_error(exc, VSOCK.field) from None


def _check_console_spec(v: str) -> str:
    """A virtio_console value, checked against its syntax (shared by the config and the grant)."""
    if v:
        try:
            VIRTIO_CONSOLE.parse(v)
        except FieldError as exc:
            raise ValueError(exc.problems[0][1]) from None
    return v


@quick_init
class MachineConfig(BaseModel):
    """Everything needed to build a machine. Paths are checked when the machine is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    firmware: str | None = Field(
        default=None,
        max_length=4096,
        description="boot through this firmware ('seabios', 'ovmf[,vars=PATH]' or a BIOS image's path) "
        "instead of loading the kernel "
        "directly; with a kernel, the firmware boots it from fw_cfg",
    )
    kernel: Path | None = Field(
        default=None,
        description="kernel image: bzImage, ELF vmlinux with a PVH note, or Multiboot ELF (a fresh boot "
        "needs it or a firmware; a restored guest may have none)",
    )
    initrd: Path | None = Field(default=None, description="initial ramdisk loaded beside the kernel")
    cmdline: str = Field(default="", description="kernel command line")
    modules: tuple[ModuleConfig, ...] = Field(
        default=(), max_length=15, description="Multiboot modules after the initrd, in order"
    )
    cpus: int = Field(default=1, description="number of vCPUs")
    memory: int = Field(default=512 * layout.MiB, description="guest RAM in bytes")
    no_reboot: bool = Field(default=False, description="stop instead of rebooting when the guest resets")
    cpu_hide: tuple[str, ...] = Field(default=(), description="CPU features hidden from the guest")
    disks: tuple[DiskConfig, ...] = Field(default=(), description="virtio-blk disks, in PCI slot order")
    rng: bool = Field(default=False, description="give the guest a virtio-rng device")
    nets: tuple[NetConfig, ...] = Field(default=(), description="virtio-net NICs on tap devices")
    vsock: VsockConfig | None = Field(default=None, description="a virtio-vsock device")
    balloon: bool = Field(default=False, description="a virtio-balloon device (with free page reporting)")
    virtio_console: str = Field(default="", description="hvc0 on 'pty' or 'file=PATH'; empty: none")
    ksm: bool = Field(
        default=False, description="let KSM merge guest RAM with identical pages (MADV_MERGEABLE)"
    )
    debug_exit: int = Field(
        default=layout.DEBUG_EXIT_PORT,
        ge=0,
        le=0xFFFE,
        description="first of the exit port's two ports (QEMU's isa-debug-exit iobase; tests use 0xf4)",
    )

    @field_validator("debug_exit", mode="before")
    @classmethod
    def _debug_exit(cls, v: object) -> object:
        """A port number, or DEBUG_EXIT.syntax text ('iobase=0xf4')."""
        if isinstance(v, str):
            text = DEBUG_EXIT.parse(v)["iobase"]
            assert isinstance(text, str)
            try:
                return int(text, 0)
            except ValueError:
                raise ValueError(f"iobase {text!r} is not a port number: write it like 0xf4") from None
        return v

    @field_validator("virtio_console")
    @classmethod
    def _virtio_console(cls, v: str) -> str:
        return _check_console_spec(v)

    @field_validator("firmware")
    @classmethod
    def _firmware(cls, v: str | None) -> str | None:
        if v is not None and (not v or "\0" in v):
            raise ValueError("give `seabios`, `ovmf[,vars=PATH]` or the path of a BIOS image")
        if v is not None and v.startswith("ovmf,"):
            try:
                OVMF.parse(v)
            except FieldError as exc:
                raise ValueError(exc.problems[0][1]) from None
        return v

    def for_clone(self, index: int) -> MachineConfig:
        """The config of clone `index` of a snapshot: host resources that cannot be shared get
        their own names (tap devices, the vsock socket) and the vsock CID its own number."""
        nets = tuple(n.model_copy(update={"tap": f"{n.tap[:11]}c{index}"}) for n in self.nets)
        vsock = self.vsock and self.vsock.model_copy(
            update={"cid": self.vsock.cid + index, "uds_path": Path(f"{self.vsock.uds_path}.{index}")}
        )
        return self.model_copy(update={"nets": nets, "vsock": vsock})

    def host_resources(self) -> HostResources:
        """The host resources this config names, as a grant: for an operator (or a test) who
        built this config and gives the same resources again to a snapshot of it."""
        return HostResources(
            firmware=self.firmware,
            kernel=self.kernel,
            initrd=self.initrd,
            modules=self.modules,
            disks=self.disks,
            nets=self.nets,
            vsock=self.vsock,
            virtio_console=self.virtio_console,
        )

    @field_validator("cpu_hide", mode="before")
    @classmethod
    def _cpu_hide(cls, v: object) -> tuple[str, ...]:
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)):
            raise ValueError("give CPU feature names, comma-separated")
        names = tuple(str(n).strip() for n in items if str(n).strip())
        unknown = [n for n in names if n not in HIDEABLE]
        if unknown:
            raise ValueError(
                f"unknown CPU feature {', '.join(unknown)}: choose from {', '.join(sorted(HIDEABLE))}"
            )
        return names

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: int) -> int:
        if not 1 <= v <= MAX_CPUS:
            raise ValueError(f"cpus must be between 1 and {MAX_CPUS}, got {v}")
        return v

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: int | str) -> int:
        try:
            return parse_size(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("memory", mode="after")
    @classmethod
    def _memory_range(cls, v: int) -> int:
        if v < layout.MIN_MEMORY:
            raise ValueError(f"{format_size(v)} is too small: give at least {format_size(layout.MIN_MEMORY)}")
        if v > layout.MAX_MEMORY:
            raise ValueError(
                f"{format_size(v)} is too large: corral supports at most {format_size(layout.MAX_MEMORY)}"
            )
        if v % 4096:
            raise ValueError(f"{v} bytes is not a multiple of 4 KiB")
        return v

    @classmethod
    def build(cls, **fields: object) -> MachineConfig:
        """Validate `fields`; a FieldError names each bad field (`cpus`, `disks[0].serial`)."""
        try:
            return cls(**fields)
        except validation_error() as exc:
            raise field_error(exc) from None


@quick_init
class HostResources(BaseModel):
    """What a machine may use on this host when the rest of its config comes from elsewhere.

    A snapshot's manifest and a migration peer's hello are untrusted: they name disk images
    (opened read-write), tap devices with host addresses, socket paths (unlinked, then bound),
    a console file and a kernel. So the operator restoring or receiving names the host side
    here (as Firecracker's `network_overrides`/`vsock_override`), and the incoming config
    only says what the guest has: devices are matched by kind and position, the guest-visible
    parts (disk serial and read-only flag, MAC, vsock CID, device presence) must agree, and
    every host path, tap and address comes from here. Anything incoming that was not granted
    is refused by field name. The kernel and initrd are only read again when the guest
    reboots; without them here the machine stops on a guest reset instead of booting a file
    the incoming config named.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    firmware: str | None = Field(
        default=None,
        max_length=4096,
        description="the BIOS image ('seabios' or a path) of a guest that booted from one",
    )
    kernel: Path | None = Field(default=None, description="what a guest reboot boots; none: stop on reset")
    initrd: Path | None = Field(default=None, description="the initrd a guest reboot loads")
    modules: tuple[ModuleConfig, ...] = Field(default=(), description="the Multiboot modules a reboot loads")
    disks: tuple[DiskConfig, ...] = Field(default=(), description="one image per incoming disk, in order")
    nets: tuple[NetConfig, ...] = Field(default=(), description="one tap per incoming NIC, in order")
    vsock: VsockConfig | None = Field(default=None, description="the vsock socket, if the guest has vsock")
    virtio_console: str = Field(default="", description="'pty' or 'file=PATH', if the guest has hvc0")

    @field_validator("virtio_console")
    @classmethod
    def _virtio_console(cls, v: str) -> str:
        return _check_console_spec(v)

    def apply(self, incoming: MachineConfig, origin: str = "the snapshot") -> MachineConfig:
        """`incoming` with every host resource taken from this grant; FieldError otherwise.
        `origin` names where `incoming` came from in the errors ("the snapshot", "the source")."""
        problems: _Problems = []
        disks = _match(problems, "disks", "disk", incoming.disks, self.disks, origin, _disk_fits)
        nets = _match(problems, "nets", "NIC", incoming.nets, self.nets, origin, _net_fits)
        vsock = self.vsock
        if incoming.vsock is not None and vsock is None:
            problems.append(
                ("vsock", f"{origin} has a vsock device (cid {incoming.vsock.cid}): give its socket")
            )
        elif incoming.vsock is None and vsock is not None:
            problems.append(("vsock", f"{origin} has no vsock device: give none"))
        elif incoming.vsock is not None and vsock is not None and vsock.cid != incoming.vsock.cid:
            problems.append(("vsock.cid", f"the guest's CID is {incoming.vsock.cid}, not {vsock.cid}"))
        console = self.virtio_console
        if incoming.virtio_console and not console:
            if incoming.virtio_console == "pty":
                console = "pty"  # a fresh pseudo-terminal names nothing on the host
            else:
                problems.append(("virtio_console", f"{origin} has a virtio-console: give where it goes"))
        elif console and not incoming.virtio_console:
            problems.append(("virtio_console", f"{origin} has no virtio-console: give none"))
        if incoming.firmware is not None and self.firmware is None:
            problems.append(
                ("firmware", f"{origin} booted through firmware: give its image (seabios or a path)")
            )
        elif incoming.firmware is None and self.firmware is not None:
            problems.append(("firmware", f"{origin} did not boot through firmware: give none"))
        if self.initrd is not None and self.kernel is None:
            problems.append(("initrd", "give the kernel a reboot boots with it"))
        if self.modules and self.kernel is None:
            problems.append(("modules", "give the kernel a reboot boots with them"))
        if problems:
            raise FieldError(*problems[0], *problems[1:])
        update: dict[str, object] = {"disks": disks, "nets": nets, "vsock": vsock, "virtio_console": console}
        # never read a module file the incoming config named: a reboot loads the granted ones
        update["modules"] = self.modules
        update["firmware"] = self.firmware  # never map a firmware file the incoming config named
        if self.kernel is not None:
            update.update(kernel=self.kernel, initrd=self.initrd)
        else:
            update["kernel"] = update["initrd"] = None  # never read a file the incoming config named
            # a firmware guest reboots into its (granted) firmware; any other stops on a reset
            update["no_reboot"] = incoming.no_reboot if self.firmware is not None else True
        return incoming.model_copy(update=update)


_Device = TypeVar("_Device", DiskConfig, NetConfig)
_Problems = list[tuple[str, str]]


def _match(
    problems: _Problems,
    field: str,
    kind: str,
    incoming: tuple[_Device, ...],
    granted: tuple[_Device, ...],
    origin: str,
    fits: Callable[[_Problems, str, _Device, _Device], _Device],
) -> tuple[_Device, ...]:
    """Pair incoming devices with granted ones by position; record what does not fit."""
    out = []
    for i in range(max(len(incoming), len(granted))):
        where = f"{field}[{i}]"
        if i >= len(granted):
            problems.append((where, f"{origin} has {len(incoming)} {kind}(s): give one for each, in order"))
        elif i >= len(incoming):
            problems.append((where, f"{origin} has only {len(incoming)} {kind}(s): give no more"))
        else:
            out.append(fits(problems, where, incoming[i], granted[i]))
    return tuple(out)


def _disk_fits(problems: _Problems, where: str, want: DiskConfig, have: DiskConfig) -> DiskConfig:
    """The granted image, with the guest's serial; the read-only flag must agree (the guest saw it)."""
    if want.read_only != have.read_only:
        problems.append(
            (
                f"{where}.read_only",
                f"the guest's disk is {'read-only' if want.read_only else 'writable'}: "
                f"give it {'with' if want.read_only else 'without'} ro",
            )
        )
    if have.serial and have.serial != want.serial:
        problems.append((f"{where}.serial", f"the guest's disk has serial {want.serial!r}"))
    return have.model_copy(update={"serial": want.serial})


def _net_fits(problems: _Problems, where: str, want: NetConfig, have: NetConfig) -> NetConfig:
    """The granted tap and host address, with the guest's MAC (kept even where it was derived
    from the old tap's name)."""
    mac = format_mac(want.guest_mac())
    if have.mac and have.mac != mac:
        problems.append((f"{where}.mac", f"the guest's MAC is {mac}"))
    return have.model_copy(update={"mac": mac})
