"""MMDS wired into the Firecracker VMM and the builder: the interfaces listed in /mmds/config (and
only they) get an MMDS stack, one service shared by all of them, reading the data store the API
updates; the builder hands each stack to its virtio-net device."""

from __future__ import annotations

import threading

import pytest

from corral.config import MachineConfig, NetConfig
from corral.devices.mmds import Mmds, MmdsStack
from corral.devices.mmds.service import Request
from corral.firecracker.models import BootSource, MmdsConfig, NetworkInterface
from corral.firecracker.vmm import FirecrackerVmm


class Recorder:
    """The Machine verbs the VMM calls at InstanceStart, and the filters it was given."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.net_filters: dict = {}
        self.paused = False
        self.built_with: dict | None = None
        self._stopped = threading.Event()

    def build(self) -> None:
        self.built_with = dict(self.net_filters)

    def start(self) -> None:
        pass

    def wait(self):
        self._stopped.wait()

    def stop(self, reason: str = "") -> None:
        self._stopped.set()

    def close(self) -> None:
        pass


@pytest.fixture
def vmm(tmp_path):
    made: list[Recorder] = []

    def factory(config, snap, console):
        m = Recorder(config)
        made.append(m)
        return m

    v = FirecrackerVmm("wired", machine_factory=factory)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    v.put_boot_source(BootSource(kernel_image_path=str(kernel)))
    for i in range(3):
        v.put_net(NetworkInterface(iface_id=f"eth{i}", host_dev_name=f"tap{i}"))
    v.made = made  # type: ignore[attr-defined]
    yield v
    v.stop()


def get(stack: MmdsStack, path: str, **headers: str):
    return stack.mmds.respond(Request("GET", path, "HTTP/1.1", {k.lower(): v for k, v in headers.items()}))


def test_listed_interfaces_get_one_shared_service(vmm):
    vmm.put_mmds_config(
        MmdsConfig(version="V2", network_interfaces=["eth0", "eth2"], ipv4_address="169.254.170.2")
    )
    vmm.put_mmds({"a": "1"})
    vmm.instance_start()
    (m,) = vmm.made
    filters = m.built_with
    assert sorted(filters) == [0, 2]  # eth1 is not listed: its frames all go to the tap
    s0, s2 = filters[0], filters[2]
    assert s0.mmds is s2.mmds and s0.mmds.version == "V2"
    assert s0.ip == bytes([169, 254, 170, 2])
    token = s0.mmds.new_token(60)
    assert get(s2, "/a", **{"X-metadata-token": token}).body == b"1"  # a token works on both
    vmm.patch_mmds({"a": "2"})
    assert get(s2, "/a", **{"X-metadata-token": token}).body == b"2"  # PATCH seen at once


def test_no_mmds_config_no_filters(vmm):
    vmm.instance_start()
    assert vmm.made[0].built_with == {}


def test_builder_hands_the_stack_to_the_net_device():
    from corral.builder import _virtio_devices

    stack = MmdsStack(Mmds(dict))
    cfg = MachineConfig.build(kernel="-", nets=[NetConfig(tap="t0"), NetConfig(tap="t1")])
    wanted = dict(_virtio_devices(cfg, lambda: None, {1: stack}))  # type: ignore[arg-type,return-value]
    # the constructors are partials over (net config, loop, filter): look, don't open taps
    assert wanted["virtio-net0"].args[2] is None  # type: ignore[attr-defined]
    assert wanted["virtio-net1"].args[2] is stack  # type: ignore[attr-defined]


def test_a_loaded_snapshot_keeps_its_mmds_configuration(monkeypatch):
    """Firecracker persists the MMDS version, address and interfaces across a snapshot, not the
    data: the restored machine gets stacks for the saved configuration."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    import corral.firecracker.vmm as vmm_mod
    from corral.firecracker.models import FullVmConfiguration, SnapshotLoadParams

    config = MachineConfig.build(kernel="k", nets=[NetConfig(tap="t0"), NetConfig(tap="t1")])
    fc = FullVmConfiguration.model_validate(
        {
            "network-interfaces": [
                {"iface_id": "eth0", "host_dev_name": "t0"},
                {"iface_id": "eth1", "host_dev_name": "t1"},
            ],
            "mmds-config": {"version": "V2", "network_interfaces": ["eth1"]},
        }
    )

    @contextmanager
    def staged(state, mem):
        yield SimpleNamespace(manifest=SimpleNamespace(config=config)), fc

    monkeypatch.setattr(vmm_mod, "staged_snapshot", staged)
    made: list[Recorder] = []
    v = FirecrackerVmm("restored", machine_factory=lambda c, s, con: made.append(Recorder(c)) or made[-1])
    try:
        v.load_snapshot(SnapshotLoadParams(snapshot_path="s", mem_file_path="m"), "m")
        (filters,) = [m.built_with for m in made]
        assert sorted(filters) == [1] and filters[1].mmds.version == "V2"
        assert v.mmds_config is not None and v.mmds_config.network_interfaces == ["eth1"]
        assert get(filters[1], "/").status == 401  # V2 kept: no token, no data
    finally:
        v.stop()
