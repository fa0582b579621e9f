"""Firecracker's API contract end to end below HTTP (corral/firecracker/routes.py and vmm.py):
the phases with Firecracker's refusals, resources mapped onto a corral MachineConfig, the
snapshot file mapping, MMDS storage, --config-file, and the paths corral does not implement.
The machine is a fake that records the verbs (tests/kvm/test_firecracker_api.py boots real ones)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from corral.config import MachineConfig, NetConfig, VsockConfig
from corral.devices.virtio.balloon import BalloonInfo
from corral.errors import CorralError
from corral.firecracker import models as m
from corral.firecracker.main import apply_config, read_config_file
from corral.firecracker.routes import Router
from corral.firecracker.server import Reply
from corral.firecracker.vmm import (
    DEFAULT_BOOT_ARGS,
    LOAD_NOT_ALLOWED,
    POST_BOOT_ONLY,
    PRE_BOOT_ONLY,
    FirecrackerError,
    FirecrackerVmm,
    merge_patch,
)
from corral.machine import ExitResult
from corral.state.snapshot import MANIFEST, MEMORY, STATE


class FakeMachine:
    """The Machine verbs the VMM calls, recorded."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.calls: list[tuple[object, ...]] = []
        self.paused = False
        self._stopped = threading.Event()

    def build(self) -> None:
        self.calls.append(("build",))

    def start(self) -> None:
        self.calls.append(("start",))

    def pause(self) -> None:
        self.calls.append(("pause",))
        self.paused = True

    def resume(self) -> None:
        self.calls.append(("resume",))
        self.paused = False

    def snapshot(self, path: Path, pages: object = None) -> None:
        self.calls.append(("snapshot", path))
        path.mkdir()
        (path / MANIFEST).write_text('{"manifest": 1}')
        (path / STATE).write_text('{"state": 1}')
        (path / MEMORY).write_bytes(b"RAM" * 100)

    def set_balloon(self, target: int) -> None:
        self.calls.append(("set_balloon", target))

    def balloon_info(self) -> BalloonInfo:
        return BalloonInfo(
            target_bytes=64 << 20,
            actual_bytes=32 << 20,
            host_resident_bytes=0,
            inflated=0,
            deflated=0,
            reported_bytes=0,
            bad_pfns=0,
            stats={"free_memory": 1234, "total_memory": 5678, "unknown_stat": 1},
        )

    def request_reset(self) -> None:
        self.calls.append(("request_reset",))
        self._stopped.set()

    def stop(self, message: str = "") -> None:
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> ExitResult:
        self._stopped.wait()
        return ExitResult("stopped", 0, "done")

    def close(self) -> None:
        pass


class Api:
    """Requests to a Router as a client makes them: (status, JSON body, headers)."""

    def __init__(self, vmm: FirecrackerVmm) -> None:
        self.router = Router(vmm)

    def __call__(self, method: str, path: str, body: object = None) -> Reply:
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.router.handle(method, path, data)


@pytest.fixture
def made() -> list[FakeMachine]:
    return []


@pytest.fixture
def vmm(made):
    def factory(config, snap, console):
        machine = FakeMachine(config)
        made.append(machine)
        return machine

    v = FirecrackerVmm("vm-1", machine_factory=factory)
    yield v
    v.stop()


@pytest.fixture
def api(vmm):
    return Api(vmm)


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF")
    return str(k)


def fault_of(reply: Reply, status: int = 400) -> str:
    assert reply.status == status, reply
    return reply.body["fault_message"]


def boot(api: Api, kernel: str, **boot_source: object) -> None:
    assert api("PUT", "/boot-source", {"kernel_image_path": kernel, **boot_source}).status == 204
    assert api("PUT", "/actions", {"action_type": "InstanceStart"}).status == 204


def test_instance_info_and_version(api):
    r = api("GET", "/")
    assert r.status == 200
    assert r.body == {"app_name": "corral", "id": "vm-1", "state": "Not started", "vmm_version": "1.17.0"}
    assert api("GET", "/version").body == {"firecracker_version": "1.17.0"}


def test_machine_config_put_patch_get(api):
    assert api("GET", "/machine-config").body == {
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    assert api("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}).status == 204
    assert api("PATCH", "/machine-config", {"mem_size_mib": 512}).status == 204
    body = api("GET", "/machine-config").body
    assert (body["vcpu_count"], body["mem_size_mib"]) == (2, 512)
    assert "The number of vCPUs" in fault_of(
        api("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 1})
    )
    assert "The number of vCPUs" in fault_of(
        api("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 128, "smt": True})
    )
    assert "either 0" in fault_of(api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 0}))
    assert "too small" in fault_of(api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 4}))
    assert "huge_pages" in fault_of(
        api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"})
    )
    r = api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"})
    assert "CPU templates" in fault_of(r) and r.headers["Deprecation"] == "true"
    assert api("GET", "/machine-config").body["mem_size_mib"] == 512  # refusals changed nothing


def test_bad_requests_get_firecrackers_messages(api, kernel, tmp_path):
    assert "unknown field `vcpus`" in fault_of(api("PUT", "/machine-config", {"vcpus": 1}))
    assert "`vcpu_count`" in fault_of(api("PUT", "/machine-config", {"vcpu_count": "1", "mem_size_mib": 128}))
    assert (
        fault_of(api("PUT", "/drives/bad-id", {"drive_id": "bad-id", "is_root_device": False}))
        == m.INVALID_ID
    )
    assert fault_of(api("PUT", "/drives", {"drive_id": "a", "is_root_device": False})) == m.EMPTY_ID
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 512)
    body = {"drive_id": "b", "path_on_host": str(img), "is_root_device": False}
    assert "does not match" in fault_of(api("PUT", "/drives/a", body))
    r = api("PUT", "/boot-source", {"kernel_image_path": str(tmp_path / "none")})
    assert fault_of(r).startswith("Boot source error: The kernel file cannot be opened: No such file")
    assert "initrd" in fault_of(
        api("PUT", "/boot-source", {"kernel_image_path": kernel, "initrd_path": "/nx"})
    )
    assert fault_of(api("GET", "/nowhere")) == "Invalid request method and/or path: GET /nowhere."
    assert fault_of(api("POST", "/actions", {})) == "Invalid request method and/or path: POST /actions."
    assert fault_of(api("GET", "/", {})) == "GET request cannot have a body."
    assert fault_of(api("PUT", "/boot-source")) == "Empty PUT request."
    assert fault_of(api("PUT", "/snapshot", {})) == "Missing snapshot operation type."
    assert "Cannot start microvm without kernel" in fault_of(
        api("PUT", "/actions", {"action_type": "InstanceStart"})
    )
    for method, path in [("PUT", "/cpu-config"), ("PUT", "/pmem/p"), ("PATCH", "/balloon/hinting/start")]:
        assert "corral does not implement" in fault_of(api(method, path, {}))
    assert api("GET", "/").body["state"] == "Not started"


def test_drives_and_network(api, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 512)
    root = {"drive_id": "root", "path_on_host": str(img), "is_root_device": True, "is_read_only": True}
    assert api("PUT", "/drives/root", root).status == 204
    assert "A root block device already exists!" in fault_of(
        api("PUT", "/drives/other", {**root, "drive_id": "other"})
    )
    missing = {"drive_id": "x", "path_on_host": str(tmp_path / "nx"), "is_root_device": False}
    assert "Unable to create the virtio block device" in fault_of(api("PUT", "/drives/x", missing))
    assert "vhost-user" in fault_of(
        api("PUT", "/drives/v", {"drive_id": "v", "socket": "/s", "is_root_device": False})
    )
    assert "before starting" in fault_of(api("PATCH", "/drives/root", {"drive_id": "root"}))
    net = {"iface_id": "eth0", "host_dev_name": "fctap0", "guest_mac": "06:00:AC:10:00:02"}
    assert api("PUT", "/network-interfaces/eth0", net).status == 204
    assert "MAC address is already in use" in fault_of(
        api("PUT", "/network-interfaces/eth1", {**net, "iface_id": "eth1", "host_dev_name": "fctap1"})
    )
    assert "not a MAC address" in fault_of(
        api("PUT", "/network-interfaces/eth2", {"iface_id": "eth2", "host_dev_name": "t2", "guest_mac": "zz"})
    )
    cfg = api("GET", "/vm/config").body
    assert [d["drive_id"] for d in cfg["drives"]] == ["root"]
    assert cfg["network-interfaces"][0]["host_dev_name"] == "fctap0"


def test_resources_become_a_corral_machine_config(vmm, api, kernel, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        p.write_bytes(b"\0" * 512)
    assert api("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}).status == 204
    assert (
        api(
            "PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(a), "is_root_device": False}
        ).status
        == 204
    )
    root = {"drive_id": "rootfs", "path_on_host": str(b), "is_root_device": True, "is_read_only": False}
    assert api("PUT", "/drives/rootfs", root).status == 204
    assert (
        api("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "fctap0"}).status == 204
    )
    assert api("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}).status == 204
    assert api("PUT", "/entropy", {}).status == 204
    assert api("PUT", "/balloon", {"amount_mib": 16, "deflate_on_oom": True}).status == 204
    assert api("PUT", "/boot-source", {"kernel_image_path": kernel}).status == 204
    cfg = vmm.corral_config()
    assert (cfg.cpus, cfg.memory, cfg.no_reboot, cfg.rng, cfg.balloon) == (2, 256 << 20, True, True, True)
    assert cfg.cmdline == f"{DEFAULT_BOOT_ARGS} root=/dev/vda rw"
    assert [d.path for d in cfg.disks] == [b, a]  # the root drive is /dev/vda
    assert [n.tap for n in cfg.nets] == ["fctap0"] and cfg.vsock is not None and cfg.vsock.cid == 3
    assert "unknown field" in fault_of(api("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/x", "cid": 1}))
    assert (
        api("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/x", "vsock_id": "v"}).headers["Deprecation"]
        == "true"
    )


def test_phases_after_boot(vmm, api, kernel, made):
    assert fault_of(api("PATCH", "/vm", {"state": "Paused"})) == POST_BOOT_ONLY
    assert fault_of(api("PUT", "/actions", {"action_type": "SendCtrlAltDel"})) == POST_BOOT_ONLY
    boot(api, kernel, boot_args="mem-touch 16M forever")
    (machine,) = made
    assert machine.config.cmdline == "mem-touch 16M forever"
    assert machine.calls == [("build",), ("start",)]
    assert api("GET", "/").body["state"] == "Running"
    assert fault_of(api("PUT", "/boot-source", {"kernel_image_path": kernel})) == PRE_BOOT_ONLY
    assert fault_of(api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})) == PRE_BOOT_ONLY
    assert fault_of(api("PUT", "/actions", {"action_type": "InstanceStart"})) == PRE_BOOT_ONLY
    load = {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}
    assert fault_of(api("PUT", "/snapshot/load", load)) == PRE_BOOT_ONLY
    assert api("PATCH", "/vm", {"state": "Paused"}).status == 204
    assert api("GET", "/").body["state"] == "Paused"
    assert api("PATCH", "/vm", {"state": "Resumed"}).status == 204
    assert machine.calls[-2:] == [("pause",), ("resume",)]
    assert api("GET", "/machine-config").status == 200  # reads work in every phase
    assert api("PUT", "/actions", {"action_type": "FlushMetrics"}).status == 204
    assert api("PUT", "/actions", {"action_type": "SendCtrlAltDel"}).status == 204
    assert machine.calls[-1] == ("request_reset",)
    assert vmm.exited.wait(2) and vmm.exit_result is not None


def test_balloon(vmm, api, kernel, made):
    assert "No balloon device found" in fault_of(api("GET", "/balloon"))
    assert "too large" in fault_of(api("PUT", "/balloon", {"amount_mib": 4096, "deflate_on_oom": False}))
    body = {"amount_mib": 8, "deflate_on_oom": False, "stats_polling_interval_s": 1}
    assert api("PUT", "/balloon", body).status == 204
    assert fault_of(api("GET", "/balloon/statistics")) == POST_BOOT_ONLY
    boot(api, kernel)
    assert made[0].calls[-1] == ("set_balloon", 8 << 20)  # the target asked for before boot
    assert fault_of(api("PUT", "/balloon", body)) == PRE_BOOT_ONLY
    assert api("PATCH", "/balloon", {"amount_mib": 64}).status == 204
    assert made[0].calls[-1] == ("set_balloon", 64 << 20)
    assert api("GET", "/balloon").body["amount_mib"] == 64
    stats = api("GET", "/balloon/statistics").body
    assert stats == {
        "target_pages": 16384,
        "actual_pages": 8192,
        "target_mib": 64,
        "actual_mib": 32,
        "free_memory": 1234,
        "total_memory": 5678,
    }
    assert "enabled/disabled" in fault_of(
        api("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 0})
    )
    assert api("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5}).status == 204


def test_snapshot_files_map_onto_corral_snapshot_directories(vmm, api, kernel, made, tmp_path):
    boot(api, kernel)
    assert api("PATCH", "/vm", {"state": "Paused"}).status == 204
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    r = api(
        "PUT",
        "/snapshot/create",
        {"snapshot_path": str(snap), "mem_file_path": str(mem), "snapshot_type": "Full"},
    )
    assert r.status == 204
    assert mem.read_bytes() == b"RAM" * 100  # corral's memory.bin, moved
    bundle = json.loads(snap.read_text())
    assert bundle["format"] == "corral-firecracker-snapshot"
    assert (bundle["manifest"], bundle["state"]) == ('{"manifest": 1}', '{"state": 1}')
    assert bundle["firecracker"]["boot-source"]["kernel_image_path"] == kernel
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left behind
    assert "dirty page tracking disabled" in fault_of(  # Firecracker's rule: Diff needs tracking
        api(
            "PUT",
            "/snapshot/create",
            {"snapshot_path": str(snap), "mem_file_path": str(mem), "snapshot_type": "Diff"},
        )
    )
    assert "not a directory" in fault_of(
        api(
            "PUT",
            "/snapshot/create",
            {"snapshot_path": str(tmp_path / "nx" / "s"), "mem_file_path": str(mem)},
        )
    )


def test_snapshot_load_rules(api, kernel, tmp_path):
    missing = api("PUT", "/snapshot/load", {"snapshot_path": "/s"})
    assert "either `mem_backend` or `mem_file_path` is required" in fault_of(missing) and not missing.fatal
    both = {
        "snapshot_path": "/s",
        "mem_file_path": "/m",
        "mem_backend": {"backend_type": "File", "backend_path": "/m"},
    }
    assert "exclusively" in fault_of(api("PUT", "/snapshot/load", both))
    uffd = {"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}
    assert "from a file only" in fault_of(api("PUT", "/snapshot/load", uffd))
    # a load that fails is fatal (the process ends), and the deprecated field is flagged
    r = api("PUT", "/snapshot/load", {"snapshot_path": str(tmp_path / "nx"), "mem_file_path": "/m"})
    assert r.fatal and r.headers["Deprecation"] == "true"
    assert fault_of(r).startswith("Load snapshot error: Failed to restore from snapshot: ")
    bad = tmp_path / "bad.snap"
    bad.write_text('{"format": "something else"}')
    r = api("PUT", "/snapshot/load", {"snapshot_path": str(bad), "mem_file_path": "/m"})
    assert r.fatal and "not a snapshot written by corral firecracker" in fault_of(r)


def test_load_is_refused_once_boot_resources_are_configured(api, kernel):
    assert api("PUT", "/boot-source", {"kernel_image_path": kernel}).status == 204
    r = api(
        "PUT",
        "/snapshot/load",
        {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}},
    )
    assert fault_of(r) == LOAD_NOT_ALLOWED and not r.fatal


def test_mmds_is_stored(api):
    assert api("GET", "/mmds").body == {}
    assert "not initialized" in fault_of(api("PATCH", "/mmds", {"a": 1}))
    assert api("PUT", "/mmds", {"latest": {"meta-data": {"id": "i-1", "tags": ["a"]}}}).status == 204
    assert api("PATCH", "/mmds", {"latest": {"meta-data": {"tags": None, "zone": "z"}}}).status == 204
    assert api("GET", "/mmds").body == {"latest": {"meta-data": {"id": "i-1", "zone": "z"}}}
    big = api("PUT", "/mmds", {"x": "y" * 60000})
    assert big.status == 413 and "doesn't fit" in big.body["fault_message"]
    assert "interface" in fault_of(api("PUT", "/mmds/config", {"network_interfaces": ["eth9"]}))
    assert merge_patch({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_config_file(vmm, made, kernel, tmp_path):
    path = tmp_path / "vm.json"
    path.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": kernel, "boot_args": "hello"},
                "drives": [],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
            }
        )
    )
    apply_config(vmm, read_config_file(path))
    vmm.instance_start()
    assert made[0].config.cpus == 2 and made[0].config.cmdline == "hello"
    path.write_text('{"boot-source": {"kernel_image_path": "/k"}, "drivez": []}')
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown field `drivez`"):
        read_config_file(path)
    with pytest.raises(FirecrackerError, match="boot-source is required"):
        apply_config(FirecrackerVmm(), m.FullVmConfiguration())


def test_a_loaded_vm_that_never_ran_is_not_snapshotted(vmm, api, tmp_path):
    vmm.machine, vmm.started = FakeMachine(MachineConfig(kernel="k")), False  # as after a load
    assert api("GET", "/").body["state"] == "Paused"
    body = {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}
    assert "resume it first" in fault_of(api("PUT", "/snapshot/create", body))
    assert not (tmp_path / "s").exists()
    assert api("PATCH", "/vm", {"state": "Resumed"}).status == 204  # resuming starts it
    assert vmm.machine.calls == [("start",)] and vmm.started


def test_network_and_vsock_overrides_on_load(vmm):
    config = MachineConfig.build(
        kernel="k",
        nets=[NetConfig(tap="old0"), NetConfig(tap="old1", mac="06:00:00:00:00:01")],
        vsock=VsockConfig(cid=3, uds_path=Path("/old.sock")),
    )
    fc = m.FullVmConfiguration.model_validate_json(
        '{"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "old0"}, '
        '{"iface_id": "eth1", "host_dev_name": "old1"}]}'
    )
    params = m.SnapshotLoadParams.model_validate_json(
        '{"snapshot_path": "s", "mem_file_path": "m", "vsock_override": {"uds_path": "/new.sock"}, '
        '"network_overrides": [{"iface_id": "eth0", "host_dev_name": "new0"}]}'
    )
    out = vmm._apply_overrides(config, fc, params)
    assert [n.tap for n in out.nets] == ["new0", "old1"]
    assert out.nets[0].guest_mac() == config.nets[0].guest_mac()  # the guest keeps its MAC
    assert out.vsock is not None and out.vsock.uds_path == Path("/new.sock")
    bad = params.model_copy(
        update={"network_overrides": [m.NetworkOverride(iface_id="eth7", host_dev_name="x")]}
    )
    with pytest.raises(CorralError, match="no network interface 'eth7'"):
        vmm._apply_overrides(config, fc, bad)
