"""The `corral firecracker` process: Firecracker's command line, its config file, the API on
its socket, and the exit when the guest stops (or a snapshot load fails).

The serial console goes to stdout (or PUT /serial's file) and the log to stderr (or
--log-path), as Firecracker's do. A config file (`--config-file`, Firecracker's JSON: boot-source,
drives, machine-config, network-interfaces, vsock, ...) is applied as the matching requests
would be, and the microVM boots at once; the API then serves the running VM, unless --no-api.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from corral.backends.tap import preload as tap_preload
from corral.errors import ConfigError, CorralError
from corral.firecracker.logs import configure_logging
from corral.firecracker.models import FullVmConfiguration, IdError, Metrics, body_error, check_instance_id
from corral.firecracker.routes import Router
from corral.firecracker.server import ApiServer
from corral.firecracker.vmm import FirecrackerError, FirecrackerVmm
from corral.machine import preload as preload_machine
from corral.seccomp import enabled as seccomp_enabled
from corral.seccomp import enter as enter_seccomp

log = logging.getLogger(__name__)

CONFIG_FILE_MAX = 1 << 20


def apply_config(vmm: FirecrackerVmm, cfg: FullVmConfiguration) -> None:
    """Configure `vmm` from a whole configuration, in the order the requests would come."""
    if cfg.boot_source is None:
        raise FirecrackerError("boot-source is required: give the kernel_image_path to boot")
    if cfg.logger is not None:
        vmm.put_logger(cfg.logger)
    if cfg.metrics is not None:
        vmm.put_metrics(cfg.metrics)
    if cfg.machine_config is not None:
        vmm.put_machine_config(cfg.machine_config)
    vmm.put_boot_source(cfg.boot_source)
    for drive in cfg.drives:
        vmm.put_drive(drive)
    for iface in cfg.network_interfaces:
        vmm.put_net(iface)
    if cfg.vsock is not None:
        vmm.put_vsock(cfg.vsock)
    if cfg.entropy is not None:
        vmm.put_entropy(cfg.entropy)
    if cfg.balloon is not None:
        vmm.put_balloon(cfg.balloon)
    if cfg.mmds_config is not None:
        vmm.put_mmds_config(cfg.mmds_config)
    if cfg.corral is not None:
        vmm.corral_options = cfg.corral


def read_config_file(path: Path) -> FullVmConfiguration:
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_FILE_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    if len(raw) > CONFIG_FILE_MAX:
        raise ConfigError(f"the config file {path} is larger than {CONFIG_FILE_MAX >> 20} MiB")
    try:
        return FullVmConfiguration.model_validate_json(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {body_error(exc, FullVmConfiguration)}") from None


def run(
    *,
    api_sock: Path,
    instance_id: str = "anonymous-instance",
    config_file: Path | None = None,
    no_api: bool = False,
    log_path: Path | None = None,
    level: str | None = None,
    metrics_path: Path | None = None,
    boot_timer: bool = False,
    kvm_path: str = "/dev/kvm",
) -> int:
    """Serve one microVM until its guest stops; returns the process's exit status."""
    try:
        check_instance_id(instance_id)
    except IdError as exc:
        raise ConfigError(f"--id {instance_id!r} is not an instance id: {exc}") from None
    if no_api and config_file is None:
        raise ConfigError("--no-api needs --config-file: nothing else could configure the microVM")
    try:
        configure_logging(str(log_path) if log_path else None, level)
    except CorralError as exc:
        raise ConfigError(str(exc)) from None
    vmm = FirecrackerVmm(instance_id, kvm_path=kvm_path, boot_timer=boot_timer)
    if metrics_path is not None:
        try:
            vmm.put_metrics(Metrics(metrics_path=str(metrics_path)))
        except FirecrackerError as exc:
            raise ConfigError(str(exc)) from None
    if seccomp_enabled():
        # InstanceStart and snapshot loads build the machine on the API's filtered thread, which
        # cannot map an extension module's code: import now what making one (a tap) imports
        preload_machine()
        tap_preload()
    if config_file is not None:
        cfg = read_config_file(config_file)
        try:
            apply_config(vmm, cfg)
            vmm.instance_start()
        except FirecrackerError as exc:
            raise ConfigError(f"{config_file}: {exc}") from None

    fatal = threading.Event()

    def on_fatal() -> None:
        fatal.set()
        vmm.wake.set()

    server = None
    if not no_api:
        try:
            server = ApiServer(api_sock, Router(vmm).handle, on_fatal=on_fatal)
        except ConfigError:
            vmm.stop()
            raise

    enter_seccomp("vmm", "corral-vmm")  # this thread only waits from here on
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        vmm.wake.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        while not (vmm.exited.is_set() or fatal.is_set() or stopping.is_set()):
            vmm.wake.wait()  # no timeout: an idle VM's main thread never wakes
            vmm.wake.clear()
    except KeyboardInterrupt:
        stopping.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.close()
    if fatal.is_set():
        vmm.stop()
        return 1
    if stopping.is_set():
        vmm.stop()
        vmm.exited.wait(5)
        return 0
    result = vmm.exit_result
    if result is None:
        return 0
    log.info("the microVM stopped: %s", result.message)
    return result.status & 0xFF


__all__ = ["apply_config", "read_config_file", "run"]
