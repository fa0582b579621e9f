"""A VM's config, seen from inside its jail: every host path it names is bound in at a fixed
place (/vm/kernel, /vm/disk0, ...), sockets go to the jail's run directory, and the command
line the jailed VMM runs names only those in-jail paths.

This is where the jail decides what a VM may touch: the files its config names (read-only
where the config says so, or where the VMM only reads them) and nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import MachineConfig, format_size
from corral.errors import FieldError
from corral.jail.rootfs import Bind, Node

RUN_DIR = "/run/corral"  # the jail's one writable directory (host: <chroot-base>/corral/<id>/run)


@dataclass
class Inner:
    """What runs in the jail: corral's arguments and what they need beyond the interpreter."""

    argv: list[str]
    binds: list[Bind] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    sockets: dict[Path, str] = field(default_factory=dict)  # operator's path -> name in RUN_DIR
    create: list[Path] = field(default_factory=list)  # created 0600 for the VM if missing
    writes: list[tuple[str, Path]] = field(default_factory=list)  # (field, path) the VM writes
    run_files: dict[str, bytes] = field(default_factory=dict)  # written into RUN_DIR before start
    taps: list[tuple[str, str]] = field(default_factory=list)  # (name, host address) made for the VM


def _file(inner: Inner, field_name: str, host: Path, inside: str, writable: bool) -> str:
    if not host.exists() and host not in inner.create:
        raise FieldError(field_name, f"{host} does not exist: check the path")
    if host.exists() and not (host.is_file() or host.is_block_device()):
        raise FieldError(field_name, f"{host} is not a regular file or block device")
    inner.binds.append(Bind(str(host.resolve()), inside, writable=writable))
    if writable:
        inner.writes.append((field_name, host))
    return inside


def _socket(inner: Inner, host: Path, name: str) -> str:
    inner.sockets[host.absolute()] = name
    return f"{RUN_DIR}/{name}"


def map_run(
    config: MachineConfig, api_path: Path | None, kvm_path: str, verbose: bool = False, seccomp: bool = True
) -> Inner:
    """`corral run` of `config` inside a jail: the in-jail command line and what it needs."""
    inner = Inner(argv=[])
    argv = ["-v"] if verbose else []
    if config.firmware is not None or config.kernel is None:
        raise FieldError("firmware", "firmware boot in a jail is not supported yet: run it without --jail")
    argv += ["run", "--kernel", _file(inner, "kernel", config.kernel, "/vm/kernel", False)]
    if config.initrd is not None:
        argv += ["--initrd", _file(inner, "initrd", config.initrd, "/vm/initrd", False)]
    for i, m in enumerate(config.modules):
        spec = _file(inner, f"modules[{i}].path", m.path, f"/vm/module{i}", False)
        argv += ["--module", spec + (f",cmdline={m.cmdline}" if m.cmdline else "")]
    argv += ["--cmdline", config.cmdline, "--cpus", str(config.cpus), "--memory", format_size(config.memory)]
    if config.no_reboot:
        argv.append("--no-reboot")
    if config.cpu_hide:
        argv += ["--cpu-hide", ",".join(config.cpu_hide)]
    for i, d in enumerate(config.disks):
        writable = not d.read_only and d.overlay is None
        spec = _file(inner, f"disks[{i}].path", d.path, f"/vm/disk{i}", writable)
        if d.read_only:
            spec += ",ro"
        if d.serial:
            spec += f",serial={d.serial}"
        if d.overlay is not None:
            if not d.overlay.exists():
                inner.create.append(d.overlay)
            spec += ",overlay=" + _file(inner, f"disks[{i}].overlay", d.overlay, f"/vm/overlay{i}", True)
        argv += ["--disk", spec]
    for n in config.nets:  # the jail makes each tap (root, in the VM's netns) and gives it to the VM
        spec = (
            f"tap={n.tap}"
            + (f",mac={n.mac}" if n.mac else "")
            + (f",host-ip={n.host_ip}" if n.host_ip else "")
        )
        argv += ["--net", spec]
        inner.taps.append((n.tap, n.host_ip))
    if config.nets:
        inner.nodes.append(TUN)
    if config.rng:
        argv.append("--rng")
    if config.debug_exit != MachineConfig.model_fields["debug_exit"].default:
        argv += ["--debug-exit", f"iobase={config.debug_exit:#x}"]
    if config.balloon:
        argv.append("--balloon")
    if config.vsock is not None:
        argv += [
            "--vsock",
            f"cid={config.vsock.cid},uds=" + _socket(inner, config.vsock.uds_path, "vsock.sock"),
        ]
    if config.virtio_console == "pty":
        raise FieldError("virtio_console", "a jail has no pseudo-terminals: give file=PATH")
    if config.virtio_console:
        path = Path(config.virtio_console.partition("=")[2])
        if not path.exists():
            inner.create.append(path)
        argv += ["--virtio-console", "file=" + _file(inner, "virtio_console", path, "/vm/console", True)]
    if api_path is not None:
        argv += ["--api", _socket(inner, api_path, "api.sock")]
    argv += ["--kvm", "/dev/kvm"]
    if not seccomp:
        argv.append("--no-seccomp")  # the operator's --no-seccomp reaches the jailed VMM
    inner.nodes += [Node(os.path.realpath(kvm_path), "/dev/kvm"), *STANDARD_NODES]
    inner.argv = argv
    return inner


TUN = Node("/dev/net/tun", "/dev/net/tun", 0o666)
STANDARD_NODES = (Node("/dev/null", "/dev/null", 0o666), Node("/dev/urandom", "/dev/urandom", 0o666))


def map_firecracker(
    *,
    api_sock: Path,
    instance_id: str,
    config_file: Path | None,
    no_api: bool,
    log_path: Path | None,
    level: str | None,
    metrics_path: Path | None,
    boot_timer: bool,
    kvm_path: str,
    seccomp: bool = True,
) -> Inner:
    """`corral firecracker` inside a jail. As with Firecracker's jailer, paths that arrive later
    through the API are paths inside the jail: put (hard-link) such files into the jail's run
    directory (`<chroot-base>/corral/<id>/run`, /run/corral inside). A config file's paths are
    mapped here like `run`'s; its network interfaces' taps are made by the jail."""
    from corral.firecracker.main import read_config_file

    inner = Inner(argv=["firecracker", "--id", instance_id])
    if no_api:
        inner.argv.append("--no-api")
    else:
        inner.argv += ["--api-sock", _socket(inner, api_sock, "api.sock")]
    if log_path is not None:
        inner.argv += ["--log-path", _made(inner, "--log-path", log_path, "/vm/log")]
    if metrics_path is not None:
        inner.argv += ["--metrics-path", _made(inner, "--metrics-path", metrics_path, "/vm/metrics")]
    if level is not None:
        inner.argv += ["--level", level]
    if boot_timer:
        inner.argv.append("--boot-timer")
    if config_file is not None:
        read_config_file(config_file)  # its errors, as `corral firecracker` gives them
        raw: dict[str, Any] = json.loads(config_file.read_bytes())
        for iface in raw.get("network-interfaces", []):  # made by the jail, as for `run --net`
            inner.taps.append((iface["host_dev_name"], ""))
        boot = raw["boot-source"]
        boot["kernel_image_path"] = _file(
            inner, "kernel_image_path", Path(boot["kernel_image_path"]), "/vm/kernel", False
        )
        if boot.get("initrd_path"):
            boot["initrd_path"] = _file(inner, "initrd_path", Path(boot["initrd_path"]), "/vm/initrd", False)
        for i, d in enumerate(raw.get("drives", [])):
            if d.get("path_on_host"):
                where = f"drives[{i}].path_on_host"
                d["path_on_host"] = _file(
                    inner, where, Path(d["path_on_host"]), f"/vm/drive{i}", not d.get("is_read_only")
                )
        if raw.get("vsock"):
            raw["vsock"]["uds_path"] = _socket(inner, Path(raw["vsock"]["uds_path"]), "vsock.sock")
        for key, name in (("logger", "log_path"), ("metrics", "metrics_path")):
            if raw.get(key, {}).get(name):
                raw[key][name] = _made(inner, f"{key}.{name}", Path(raw[key][name]), f"/vm/{key}")
        inner.run_files["config.json"] = json.dumps(raw).encode()
        inner.argv += ["--config-file", f"{RUN_DIR}/config.json"]
    inner.argv += ["--kvm", "/dev/kvm"]
    if not seccomp:
        inner.argv.append("--no-seccomp")
    inner.nodes += [Node(os.path.realpath(kvm_path), "/dev/kvm"), *STANDARD_NODES]
    if inner.taps:
        inner.nodes.append(TUN)
    return inner


SNAPSHOT_DIR = "/vm/snapshot"


def map_snapshot_load(
    inner: Inner, snapshot_file: Path, mem_file: Path, taps: list[str], vsock_uds: Path | None
) -> tuple[str, str, str | None]:
    """What a `/snapshot/load` into a jailed `corral firecracker` needs (the daemon's clones):
    the snapshot and memory files read-only at SNAPSHOT_DIR, the taps of its network overrides
    made by the jail, its vsock socket in the run directory. Returns the in-jail snapshot,
    memory and vsock paths to send in the request."""
    snap = _file(inner, "snapshot_path", snapshot_file, f"{SNAPSHOT_DIR}/vm.snap", False)
    mem = _file(inner, "mem_backend.backend_path", mem_file, f"{SNAPSHOT_DIR}/vm.mem", False)
    for name in taps:
        inner.taps.append((name, ""))
    if taps and TUN not in inner.nodes:
        inner.nodes.append(TUN)
    uds = None if vsock_uds is None else _socket(inner, vsock_uds, "vsock.sock")
    return snap, mem, uds


def _made(inner: Inner, field_name: str, host: Path, inside: str) -> str:
    """A file the VMM writes (a log): created for it if missing."""
    if not host.exists():
        inner.create.append(host)
    return _file(inner, field_name, host, inside, True)
