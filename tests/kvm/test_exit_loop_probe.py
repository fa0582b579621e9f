"""Both vCPU loops on the real /dev/kvm: the compiled one (vstate/_exitloop.c, the default
where it is built) and the Python reference (vcpu.EXIT_LOOP off) run the same probe guests,
whose port I/O, MMIO and fw_cfg reads go through them, to the same results. (Their agreement
exit by exit is tests/unit/test_exitloop.py's; every other test on /dev/kvm runs the default.)"""

from __future__ import annotations

import pytest
from support.probe import run_probe

from corral.vstate import vcpu as vcpu_mod

pytestmark = pytest.mark.skipif(
    not vcpu_mod.EXIT_LOOP, reason="the compiled vCPU loop is not built or is off"
)

# what depends on nothing but the guest's own work (not the TSC, not timings)
SCENARIOS = {
    "fwcfg": ("fwcfg_sig", "fwcfg_id", "fwcfg_files", "fwcfg_cpus", "fwcfg_ram"),
    "pio-bench 3000": ("pio_exits", "per_cpu", "cpus"),
    "mmio-bench 3000": ("mmio_exits", "per_cpu", "cpus"),
    "chaos 11 1500": ("chaos",),
}


@pytest.mark.parametrize("cmdline", list(SCENARIOS))
def test_both_loops_run_the_guest_to_the_same_results(cmdline, monkeypatch):
    runs = {}
    for compiled in (True, False):
        monkeypatch.setattr(vcpu_mod, "EXIT_LOOP", compiled)
        r = run_probe(cmdline, memory="64M", timeout=120)
        assert r.status == 0, f"{'compiled' if compiled else 'Python'} loop: {r.result}\n{r.output[-1500:]}"
        runs[compiled] = {k: r.results.get(k) for k in SCENARIOS[cmdline]}
    assert None not in runs[True].values(), runs
    assert runs[True] == runs[False]
