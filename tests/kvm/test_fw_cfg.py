"""fw_cfg on real /dev/kvm: the probe guest reads the signature, CPU count and RAM size through
the ports and through DMA, and they match the machine's config; test-kernel boot bits (the exit
port moved, the Multiboot command line's argv[0])."""

import pytest
from support.probe import run_probe


@pytest.mark.parametrize("cpus,memory,ram", [(1, "64M", 64 << 20), (2, "4100M", 4100 << 20)])
def test_probe_reads_fw_cfg_through_ports_and_dma(cpus, memory, ram):
    run = run_probe("fwcfg", cpus=cpus, memory=memory)
    r = run.results
    assert run.status == 0, run.output
    assert (r["fwcfg_sig"], r["fwcfg_id"], r["fwcfg_files"]) == ("QEMU", "3", "3")
    assert (int(r["fwcfg_cpus"]), int(r["fwcfg_ram"])) == (cpus, ram)
    assert (r["dma_sig"], int(r["dma_cpus"]), int(r["dma_ram"])) == ("QEMU", cpus, ram)
    assert r["dma_ok"] == "1"
    assert r["dma_bad"] == "1"  # a descriptor aimed outside RAM came back with the error bit
