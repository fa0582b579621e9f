"""The one state contract (devices/base.py): every stateful component declares `state_model`;
saved data goes back through it, and data that does not fit is refused with one StateError line
before the component changes."""

from __future__ import annotations

import json
import struct

import pytest
from support.fakes import FakeIrqLine, FakeVmControl
from support.virtio_driver import Driver

from corral.backends.disk import open_disk
from corral.devices.base import DeviceState, StateError
from corral.devices.bus import MmioBus
from corral.devices.legacy import I8042, AcpiPm, CmosRtc, DebugExit, PostSink, ResetRegister, Serial16550
from corral.devices.legacy.rtc import RtcTime
from corral.devices.pci.root import ConfigPorts, PciRoot
from corral.devices.virtio.balloon import VirtioBalloon
from corral.devices.virtio.blk import VirtioBlock
from corral.devices.virtio.pci import QueueState, VirtioPciState
from corral.devices.virtio.queue import VirtqueueState
from corral.devices.virtio.vsock import VirtioVsock
from corral.lazymodel import real


def components() -> dict[str, object]:
    root = PciRoot(MmioBus())
    return {
        "com1": Serial16550(FakeIrqLine(), lambda b: None),
        "i8042": I8042(FakeVmControl(), FakeIrqLine()),
        "rtc": CmosRtc(FakeIrqLine()),
        "post": PostSink(),
        "debug-exit": DebugExit(FakeVmControl()),
        "acpi-pm": AcpiPm(FakeVmControl(), FakeIrqLine()),
        "reset": ResetRegister(FakeVmControl()),
        "pci": root,
        "pci-cfg": ConfigPorts(root),
    }


@pytest.mark.parametrize("name", list(components()))
def test_state_goes_back_through_the_declared_model(name):
    dev = components()[name]
    assert issubclass(dev.state_model, DeviceState)
    saved = dev.save_state()
    assert real(type(saved)) is real(dev.state_model)  # quick or pydantic (corral.lazymodel)
    data = json.loads(saved.model_dump_json())
    twin = components()[name]
    twin.load_state(twin.state_model.model_validate(data))  # as the machine does
    assert twin.save_state().model_dump(exclude={"timer"}) == saved.model_dump(exclude={"timer"})
    with pytest.raises(StateError, match=r"^saved \w+ does not fit this machine: bogus: .*damaged"):
        dev.state_model.model_validate({**data, "bogus": 1})


@pytest.mark.parametrize(
    "model,field,value",
    [
        (Serial16550.state_model, "lcr", 0x100),
        (I8042.state_model, "ctr", -1),
        (AcpiPm.state_model, "sts", 0x10000),
        (ConfigPorts.state_model, "address", 1 << 32),
        (PciRoot.state_model, "config", {"32": ""}),
    ],
)
def test_registers_are_bounded_by_their_width(model, field, value):
    with pytest.raises(StateError, match=f"^saved {model.__name__} does not fit this machine: {field}"):
        model.model_validate({field: value})


def test_every_field_is_documented():
    models = {type(d).state_model for d in components().values()}
    models |= {VirtioBlock.state_model, VirtioBalloon.state_model, VirtioVsock.state_model}
    models |= {QueueState, VirtioPciState, VirtqueueState, RtcTime}
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


@pytest.fixture
def blk(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(64 * 512))
    d = Driver(VirtioBlock(open_disk(str(image))))
    d.setup()
    yield d
    d.close()


def test_virtio_state_names_its_queue_registers(blk):
    data = json.loads(blk.fn.save_state().model_dump_json())
    q = data["queues"][0]
    assert set(q) == {"size", "enable", "desc", "avail", "used", "vector"} and q["enable"] == 1
    assert set(data["active"][0]) == {
        "size",
        "desc",
        "avail",
        "used",
        "last_avail",
        "used_idx",
        "signalled_used",
        "ready",
    }
    with pytest.raises(StateError, match=r"queues\.0\.size"):
        blk.fn.state_model.model_validate({**data, "queues": [{**q, "size": 65536}]})


def test_a_damaged_device_state_is_refused_before_anything_changes(blk):
    state = blk.fn.save_state()
    status = blk.fn.status
    bad = state.model_copy(update={"status": 0, "device": {"bogus": 1}})
    with pytest.raises(StateError, match="^saved NoState does not fit this machine: bogus"):
        blk.fn.load_state(bad)
    assert blk.fn.status == status != 0


def test_balloon_state_travels_through_the_transport(tmp_path):
    dev = VirtioBalloon()
    d = Driver(dev)
    try:
        d.setup()
        dev.set_target_bytes(8 << 20)
        d.fn.bar_write(0, 0x2000 + 4, 4, 2048)  # driver writes `actual`
        data = json.loads(d.fn.save_state().model_dump_json())
        assert data["device"] == {"target_pages": 2048, "actual_pages": 2048}
        data["device"]["actual_pages"] = 1 << 32
        with pytest.raises(StateError, match="BalloonState .*actual_pages"):
            d.fn.load_state(d.fn.state_model.model_validate(data))
        assert struct.unpack("<I", d.fn.device.config_bytes()[4:8])[0] == 2048
    finally:
        d.close()
