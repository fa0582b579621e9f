"""`corral restore --gdb`: a restored guest is debugged with real gdb, held (--gdb-wait) at the
snapshot's instruction until gdb continues it."""

from __future__ import annotations

import re
import shutil

import pytest
from support.gdb_remote import GdbVm, gdb_batch, wait_for
from support.results import parse_results

from corral import Machine, MachineConfig
from corral.images.probe import build_probe

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def test_a_restored_guest_is_held_for_gdb_which_reads_changes_and_releases_it(tmp_path, probe64, symbols):
    out = bytearray()
    m = Machine(MachineConfig.build(kernel=build_probe(), cmdline="gdb", memory="256M"), console=out.extend)
    try:
        m.start()
        wait_for(lambda: out, b"gdb target ready")
        m.pause()
        held = m.memory.read(symbols["gdb_counter"], 8)  # the probe maps its data 1:1
        m.snapshot(tmp_path / "snap")
    finally:
        m.stop()
        m.close()
    vm = GdbVm("", "--gdb-wait", command=("restore", str(tmp_path / "snap")))
    try:
        assert re.search(rb"gdb stub on tcp:127\.0\.0\.1:\d+; the guest waits", vm.err), vm.err
        out = gdb_batch(
            vm.target,
            probe64,
            "print/x *(unsigned long *)&gdb_counter",
            "set var *(long *)&gdb_value = 5",
            "set var *(long *)&gdb_release = 1",
            "detach",
        )
        # held at the snapshot's instruction: not one turn since
        assert f"$1 = {int.from_bytes(held, 'little'):#x}" in out, out
        code, stdout, err = vm.finish(60)
        assert code == 0, err
        assert parse_results(stdout) == {"gdb_value": "5", "released": "1"}
    finally:
        vm.kill()


def test_restore_gdb_options_are_checked_first(tmp_path):
    from support.cli import corral, one_clear_line

    r = corral("restore", str(tmp_path / "none"), "--gdb-wait")
    assert "--gdb-wait needs --gdb" in one_clear_line(r)
    r = corral("restore", str(tmp_path / "none"), "--gdb", "udp:1")
    assert "gdb address 'udp:1'" in one_clear_line(r)
