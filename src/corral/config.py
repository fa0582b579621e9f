"""Machine configuration: one validated schema for the CLI, the library and snapshot metadata.

Errors are FieldErrors naming the config field (`cpus`, `disks[0].serial`), never a CLI flag:
an embedder never typed one; the CLI maps fields back to the flags the user gave. The
`NAME[,key=value]` options (DISK, NET, VSOCK, VIRTIO_CONSOLE) declare their syntax once here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.arch.x86 import layout
from corral.arch.x86.cpuid import HIDEABLE
from corral.backends.tap import check_tap_name, format_mac, parse_mac
from corral.errors import ConfigError, FieldError
from corral.options import FLAG, OPTIONAL, VALUE, OptionSyntax

MAX_CPUS = 254  # xAPIC ids in the MADT; the IOAPIC takes the next id
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int, *, default_unit: str = "M") -> int:
    """'512M', '2G', '1.5G', '4096K' or a plain number of `default_unit`s -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"'{text}' is not a size: write it like 512M, 2G or 4096K")
    number, unit = m.groups()
    unit = unit.upper() or default_unit.upper()
    return int(float(number) * _UNITS[unit])


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
        problems.append((where, err["msg"].removeprefix("Value error, ")))
    return FieldError(*problems[0], *problems[1:])


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
        except ValidationError as exc:
            raise field_error(exc, where) from None


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
        # stable per tap name, locally administered, unicast
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
        except ValidationError as exc:
            raise field_error(exc, where) from None


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
        except ValidationError as exc:
            raise field_error(exc, VSOCK.field) from None


class MachineConfig(BaseModel):
    """Everything needed to build a machine. Paths are checked when the machine is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Path = Field(description="kernel image: bzImage, ELF vmlinux with a PVH note, or Multiboot ELF")
    initrd: Path | None = Field(default=None, description="initial ramdisk loaded beside the kernel")
    cmdline: str = Field(default="", description="kernel command line")
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

    @field_validator("virtio_console")
    @classmethod
    def _virtio_console(cls, v: str) -> str:
        if v:
            try:
                VIRTIO_CONSOLE.parse(v)
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
        except ValidationError as exc:
            raise field_error(exc) from None
