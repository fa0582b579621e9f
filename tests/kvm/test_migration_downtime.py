"""What keeps a migration's stop-and-copy short, on the real /dev/kvm: nothing is built there
(every pydantic state model, nested ones too, is ready before the pause, on both sides), the
state is serialised once, and the destination's vCPUs exist before the state arrives, with the
CPUID the source most likely gave them: loading the state into them gives the machine the source
had (its CPUID too, when it differs), and a load that fails leaves a machine that never runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from corral.arch.x86.cpuid import vcpu_cpuid
from corral.config import MachineConfig
from corral.images.probe import build_probe
from corral.machine import Machine, VmStateError, state_models
from corral.migration import state_message
from corral.state.model import MachineState
from corral.state.snapshot import SnapshotError
from corral.vstate.kvm_state import VcpuState, VmKvmState, cpuid_bytes

pytestmark = pytest.mark.kvm

MSR_TSC = 0x10  # ticks on between a save and a read back


def config(cpus: int = 2) -> MachineConfig:
    return MachineConfig.build(kernel=build_probe(), cmdline="idle", cpus=cpus, memory="64M", no_reboot=True)


@pytest.fixture(scope="module")
def saved() -> MachineState:
    """The state of a paused 2-vCPU idle probe."""
    m = Machine(config(), console=lambda _: None)
    try:
        m.start()
        m.pause()
        return m.save_state()
    finally:
        m.close()


@pytest.fixture
def dst():
    """An incoming 2-vCPU machine, built (its vCPUs created), waiting for its state."""
    m = Machine(config(), console=lambda _: None, incoming=True)
    m.build()
    yield m
    m.close()


def test_state_models_reach_the_models_inside_the_state():
    found = state_models([MachineState])
    assert found[0] is MachineState
    assert VcpuState in found and VmKvmState in found
    assert len(found) == len(set(found))


# a fresh interpreter: in this one other tests have built the models already
_NOTHING_BUILT = textwrap.dedent(
    """
    import time
    from pydantic import BaseModel
    from corral import lazymodel
    from corral.config import MachineConfig
    from corral.images.probe import build_probe
    from corral.machine import Machine
    from corral.migration import state_message
    from corral.state.model import MachineState

    def unbuilt():
        seen, todo = set(), list(BaseModel.__subclasses__())
        while todo:
            cls = todo.pop()
            if cls not in seen:
                seen.add(cls)
                todo += cls.__subclasses__()
        return {c for c in seen if c.__module__.startswith("corral.") and not c.__pydantic_complete__}

    planned = []  # the quick path's plans made (each ~0.1 ms): none in the stop-and-copy either
    plan = lazymodel._plan
    lazymodel._plan = lambda cls: planned.append(cls.__name__) or plan(cls)

    cfg = MachineConfig.build(kernel=build_probe(), cmdline="idle", cpus=2, memory="64M", no_reboot=True)
    src = Machine(cfg, console=lambda _: None)
    src.start()
    time.sleep(0.2)
    src.prepare_state_models()
    before, planned[:] = unbuilt(), []
    src.pause()
    msg = state_message(src.save_state())
    print("source", sorted(c.__name__ for c in before - unbuilt()), planned)
    src.close()

    dst = Machine(cfg, console=lambda _: None, incoming=True)
    dst.build()
    dst.prepare_state_models()
    before, planned[:] = unbuilt(), []
    dst.load_incoming(MachineState.model_validate_json(msg[len(b'{"state":') : -1]))
    print("destination", sorted(c.__name__ for c in before - unbuilt()), planned)
    dst.close()
    """
)


def test_nothing_is_built_in_the_stop_and_copy():
    out = subprocess.run([sys.executable, "-c", _NOTHING_BUILT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["source [] []", "destination [] []"]


def test_the_state_message_is_the_state_serialised_once(saved):
    msg = json.loads(state_message(saved))
    assert list(msg) == ["state"]
    assert msg["state"] == json.loads(saved.model_dump_json())
    assert MachineState.model_validate(msg["state"]) == saved


def _comparable(state: MachineState) -> dict:
    """The state less what follows the host's clock between a save and a read back: the TSC,
    kvmclock, the PIT's load time and the ACPI PM timer."""
    out = state.model_dump(exclude={"vm": {"clock", "pit"}})
    for v in out["vcpus"]:
        v["msrs"].pop(MSR_TSC, None)
    out["devices"]["acpi-pm"].pop("timer")
    return out


def test_state_loaded_into_the_blank_vcpus_is_the_sources(saved, dst):
    assert len(dst.vcpus) == 2 and all(v.thread is None for v in dst.vcpus)  # before the state
    with pytest.raises(VmStateError, match="once its state has arrived"):
        dst.start()
    dst.load_incoming(MachineState.model_validate(json.loads(state_message(saved))["state"]))
    again = dst.save_state()
    assert _comparable(again) == _comparable(saved)
    assert [v.index for v in again.vcpus] == [0, 1]


def test_a_state_that_does_not_load_leaves_a_machine_that_never_runs(saved, dst):
    bad = saved.model_copy(deep=True)
    bad.vcpus[1].sregs = bad.vcpus[1].sregs[:-8]  # vCPU 0 loads, then vCPU 1 fails
    with pytest.raises(ValueError, match="sregs"):
        dst.load_incoming(bad)
    assert dst.vm is None and dst.vcpus == []  # closed, not half loaded
    with pytest.raises(VmStateError):
        dst.load_incoming(saved)


def test_an_incoming_machine_refuses_a_state_for_other_devices(saved, dst):
    bad = saved.model_copy(deep=True)
    bad.devices.pop("com1")
    with pytest.raises(SnapshotError, match="do not match"):
        dst.load_incoming(bad)
    assert dst.vm is None


def test_the_preset_cpuid_stays_when_the_state_carries_it_and_goes_when_not(saved, dst):
    assert dst.vm is not None
    # vCPU 1's state from a source that hid a feature this host has
    mine = cpuid_bytes(dst.vcpus[1].cpuid)
    hidden = (vcpu_cpuid(dst.vm.supported_cpuid, 1, 2, (f,)) for f in ("tsc-deadline", "x2apic", "xsave"))
    other = next(cpuid_bytes(c) for c in hidden if cpuid_bytes(c) != mine)
    state = saved.model_copy(deep=True)
    state.vcpus[1].cpuid = other
    assert state.vcpus[0].cpuid == cpuid_bytes(dst.vcpus[0].cpuid)
    calls: dict[int, int] = {0: 0, 1: 0}
    for v in dst.vcpus:
        real = v.fd.set_cpuid2

        def counted(entries, i=v.index, real=real):
            calls[i] += 1
            real(entries)

        v.fd.set_cpuid2 = counted  # type: ignore[method-assign]
    dst.load_incoming(state)
    assert calls == {0: 0, 1: 1}  # the preset kept, the other replaced
    assert [cpuid_bytes(v.cpuid) for v in dst.vcpus] == [s.cpuid for s in state.vcpus]
    assert [s.cpuid for s in dst.save_state().vcpus] == [s.cpuid for s in state.vcpus]
