"""corral.lazymodel: lazy models become their pydantic class on first use, and the quick path
(what a launch validates with, without pydantic) accepts only what pydantic accepts, with the
same values; everything else it leaves to pydantic. Both are driven by the same inputs here."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.config import DiskConfig, HostResources, MachineConfig, ModuleConfig, NetConfig, VsockConfig
from corral.devices.base import DeviceState
from corral.devices.legacy.rtc import RtcState
from corral.devices.legacy.uart import SerialState
from corral.devices.virtio.pci import QueueState, VirtioPciState
from corral.devices.virtio.queue import VirtqueueState
from corral.errors import CorralError
from corral.lazymodel import quick, real
from corral.state.model import CpuModel
from corral.state.snapshot import Manifest

QUICK_MODELS = [DiskConfig, NetConfig, ModuleConfig, VsockConfig, MachineConfig, HostResources, CpuModel]
STATE_MODELS = [SerialState, RtcState, QueueState, VirtqueueState, VirtioPciState]

# values a user, a test or a saved state hands over: right and wrong types, in and out of range
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([0xF4, 0xFFFE, 0xFFFF, 0xFFFF_FFFE, 0xFFFF_FFFF, 1 << 64, 254, 255, 4096, 64 << 20]),
    st.floats(allow_nan=False, max_value=1e6, min_value=-1e6),
    st.sampled_from(
        [
            "",
            "64M",
            "2G",
            "1.5G",
            "4097",
            "3M",
            "x",
            "7",
            "tap0",
            "corral0",
            "a" * 16,
            "52:54:00:12:34:56",
            "52:54:00:12:34",
            "10.0.2.1/24",
            "10.0.2.1",
            "pty",
            "file=/tmp/c",
            "file",
            "ovmf",
            "ovmf,vars=/v",
            "ovmf,bogus=1",
            "seabios",
            "iobase=0xf4",
            "iobase=zz",
            "avx",
            "avx,x2apic",
            "nope",
            "a\0b",
            "GenuineIntel",
        ]
    ),
    st.text(max_size=30),
    st.sampled_from([Path("/k"), Path(""), Path("disk.img")]),
    st.binary(max_size=8),
)
VALUES = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner), max_leaves=6
)


QUEUE = {"size": 64, "desc": 0, "avail": 1, "used": 2, "last_avail": 3, "used_idx": 3, "signalled_used": 0}
QUEUE["ready"] = True


def _nested() -> st.SearchStrategy[Any]:
    """Quick and pydantic instances of the nested config models, as the CLI hands them over."""
    made = [
        DiskConfig(path=Path("/d.img")),
        DiskConfig(path=Path("/d.img"), read_only=True, serial="s1"),
        NetConfig(tap="tap0"),
        ModuleConfig(path=Path("/m"), cmdline="x"),
        VsockConfig(cid=3, uds_path=Path("/v.sock")),
        real(DiskConfig)(path="/e.img"),
        RtcState(),
    ]
    return st.sampled_from(made)


def _fields(model: Any) -> st.SearchStrategy[dict[str, Any]]:
    names = sorted(real(model).model_fields) + ["bogus"]
    value = VALUES | _nested() | st.lists(_nested(), max_size=3) | st.tuples(_nested())
    return st.dictionaries(st.sampled_from(names), value, max_size=5)


def _pydantic(model: Any, fields: dict[str, Any]) -> Any:
    try:
        return real(model)(**fields)
    except (pydantic.ValidationError, CorralError, ValueError, TypeError):
        return None


def _same(quick_value: Any, pydantic_value: Any) -> None:
    """The quick instance holds what pydantic made, value for value and type for type."""
    assert quick_value == pydantic_value
    assert quick_value.model_dump() == pydantic_value.model_dump()
    assert quick_value.model_fields_set == pydantic_value.model_fields_set
    for name in real(type(pydantic_value)).model_fields:
        q, p = getattr(quick_value, name), getattr(pydantic_value, name)
        assert real(type(q)) is type(p), name
        if isinstance(p, (tuple, list)):
            assert [real(type(x)) for x in q] == [type(x) for x in p], name


@pytest.mark.parametrize("model", QUICK_MODELS + STATE_MODELS, ids=lambda m: m.__name__)
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_the_quick_path_accepts_only_what_pydantic_accepts_with_the_same_values(model, data):
    fields = data.draw(_fields(model))
    made = quick(model, fields)
    expected = _pydantic(model, fields)
    if made is not None:
        assert expected is not None, f"quick accepted what pydantic refuses: {fields!r}"
        _same(made, expected)


@pytest.mark.parametrize(
    "model,fields",
    [
        (MachineConfig, {"kernel": Path("/k"), "memory": "64M", "cpus": 2, "cpu_hide": "avx,x2apic"}),
        (MachineConfig, {"kernel": "/k", "cmdline": "hello", "no_reboot": True, "debug_exit": "iobase=0xf4"}),
        (MachineConfig, {"firmware": "ovmf,vars=/v", "disks": [DiskConfig(path=Path("/d"))], "rng": True}),
        (MachineConfig, {"nets": (NetConfig(tap="tap0"),), "vsock": VsockConfig(cid=3, uds_path=Path("/s"))}),
        (MachineConfig, {"virtio_console": "file=/tmp/c", "modules": [ModuleConfig(path=Path("/m"))]}),
        (NetConfig, {"tap": "tap0", "mac": "52:54:00:12:34:56", "host_ip": "10.0.2.1/24"}),
        (DiskConfig, {"path": "/d", "read_only": True, "serial": "s" * 20}),
        (CpuModel, {"vendor": "GenuineIntel", "signature": 0x906EA}),
        (SerialState, {}),
        (RtcState, {"cmos": [1] * 128}),
        (
            VirtqueueState,
            QUEUE,
        ),
    ],
)
def test_what_a_launch_builds_takes_the_quick_path(model, fields):
    made = quick(model, fields)
    assert made is not None and type(made) is model  # (the list above is not vacuous)
    _same(made, real(model)(**fields))


@pytest.mark.parametrize(
    "model,fields",
    [
        (MachineConfig, {"cpus": 0}),
        (MachineConfig, {"memory": "3M"}),
        (MachineConfig, {"memory": 4097 << 10 | 1}),
        (MachineConfig, {"cpus": True}),  # pydantic takes it; the quick path leaves it to pydantic
        (MachineConfig, {"bogus": 1}),
        (MachineConfig, {"cpu_hide": "nope"}),
        (MachineConfig, {"debug_exit": 0xFFFF}),
        (NetConfig, {"tap": "a" * 16}),
        (DiskConfig, {"path": "/d", "serial": "s" * 21}),
        (VsockConfig, {"cid": 2, "uds_path": "/s"}),
        (RtcState, {"cmos": [1] * 127}),
        (SerialState, {"lcr": 0x100}),
    ],
)
def test_anything_else_is_left_to_pydantic(model, fields):
    assert quick(model, fields) is None


def test_bad_input_still_fails_with_one_field_error():
    with pytest.raises(CorralError, match="cpus must be between 1 and 254, got 0"):
        MachineConfig.build(kernel="/k", cpus=0)
    with pytest.raises(CorralError, match=r"^disks\[0\]\.serial"):
        DiskConfig.parse("/d,serial=" + "s" * 21)


def test_a_quick_instance_behaves_as_a_pydantic_one():
    cfg = MachineConfig.build(
        kernel="/k", memory="64M", disks=[DiskConfig.parse("/d,ro")], nets=[NetConfig(tap="t")]
    )
    twin = real(MachineConfig)(
        kernel="/k", memory="64M", disks=[DiskConfig.parse("/d,ro")], nets=[NetConfig(tap="t")]
    )
    assert type(cfg) is MachineConfig and isinstance(cfg, MachineConfig) and isinstance(twin, MachineConfig)
    assert cfg == twin and twin == cfg and hash(cfg) == hash(twin) and repr(cfg) == repr(twin)
    assert cfg.model_dump(mode="json") == twin.model_dump(mode="json")
    assert cfg.model_dump_json() == twin.model_dump_json()
    assert cfg.for_clone(1) == twin.for_clone(1)
    assert cfg.host_resources() == twin.host_resources()
    assert cfg.nets[0].guest_mac() == twin.nets[0].guest_mac()
    assert copy.deepcopy(cfg) == cfg
    assert cfg.model_copy(update={"cpus": 2}).cpus == 2 and cfg.cpus == 1
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.cpus = 2  # type: ignore[misc]
    # as a field of a pydantic model, validated and serialized as its pydantic instance
    m = Manifest(
        format="f",
        format_version=1,
        corral_version="v",
        created=0.0,
        cpu=CpuModel(vendor="v", signature=1),
        config=cfg,
        memory_size=1,
        state_sha256="",
    )
    assert m.config == twin and Manifest.model_validate_json(m.model_dump_json()) == m
    assert twin.model_copy(update={"disks": cfg.disks}).model_dump(mode="json") == twin.model_dump(
        mode="json"
    )


def test_a_mutable_quick_instance_changes_as_pydantic_lets_it():
    state = SerialState()
    state.lcr = 3
    assert state.lcr == 3 and state.model_dump()["lcr"] == 3 and state.model_fields_set == {"lcr"}
    with pytest.raises(ValueError, match="no field"):  # (pydantic's own refusal)
        state.bogus = 1  # type: ignore[attr-defined]


def test_a_lazy_class_is_pydantic_once_used():
    assert issubclass(real(SerialState), real(DeviceState)) and issubclass(
        real(DeviceState), pydantic.BaseModel
    )
    assert SerialState.model_fields == real(SerialState).model_fields
    assert (
        SerialState.__name__ == real(SerialState).__name__
        and SerialState.__doc__ == real(SerialState).__doc__
    )
    assert real(int) is int  # anything else as it is


def test_the_fork_servers_template_builds_every_lazy_model_for_its_children():
    code = (
        "import corral.machine, corral.forkserver as f, corral.lazymodel as lm\n"
        "assert not any(lm._built(c) for c in lm._DEFINED), 'built at import'\n"
        "f._build_deferred_models()\n"
        "left = [c for c in lm._DEFINED[1:]  # (the root is pydantic's BaseModel)\n"
        "          if not lm._built(c) or not lm.real(c).__pydantic_complete__]\n"
        "print(len(lm._DEFINED), left)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, left = proc.stdout.split(" ", 1)
    assert int(count) > 20 and left.strip() == "[]"
