"""The halves of a migration between daemons that need no KVM: PUT /corral/receive's refusals
and its timeout (the process is told to end, the source would run on), PUT /corral/gdb before
boot, where the source sends the guest, the jailed target's refusal of host files, and a source
daemon whose target cannot be reached (one line; nothing started)."""

from __future__ import annotations

import json

import pytest

from corral.config import DiskConfig, HostResources
from corral.daemon.fleet import Fleet, FleetError, _check_jailed_grant, _reachable
from corral.daemon.launcher import SpawnLauncher
from corral.daemon.models import MigrateVm
from corral.daemon.server import DaemonApi, DaemonServer
from corral.daemon.statedir import StateDir
from corral.daemon.vmapi import ApiError, HttpClient
from corral.firecracker.routes import Router
from corral.firecracker.vmm import FirecrackerVmm

TOKEN = "a-token-for-this-migration-only"


def put(router: Router, path: str, body: dict) -> tuple[int, dict]:
    reply = router.handle("PUT", path, json.dumps(body).encode())
    return reply.status, reply.body


def test_receive_refusals_and_a_timeout_that_ends_the_process():
    router = Router(FirecrackerVmm("r1"))
    status, body = put(router, "/corral/receive", {"listen": "127.0.0.1:0"})
    assert status == 400 and "token" in body["fault_message"]
    status, body = put(router, "/corral/receive", {"token": TOKEN, "listen": "127.0.0.1:99999"})
    assert status == 400 and body["fault_message"].startswith("Receive error:"), body
    status, body = put(router, "/corral/gdb", {"address": "tcp:127.0.0.1:0"})
    assert status == 400 and "before starting" in body["fault_message"]

    status, body = put(router, "/corral/receive", {"token": TOKEN, "timeout_s": 0.3})
    assert status == 200 and body["address"].startswith("127.0.0.1:"), body
    port = int(body["address"].rpartition(":")[2])
    assert port > 0
    status, again = put(router, "/corral/receive", {"token": TOKEN})
    assert status == 400 and "already waits" in again["fault_message"]
    status, body = put(router, "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    assert status == 400 and "waits for a migration" in body["fault_message"]  # its shape comes with it
    vmm = router.vmm
    assert vmm.exited.wait(10)  # no source came: the process is told to end
    assert vmm.exit_result is not None and vmm.exit_result.status == 1
    assert "no migration arrived in time" in vmm.exit_result.message

    fresh = Router(FirecrackerVmm("r2"))
    put(fresh, "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    status, body = put(fresh, "/corral/receive", {"token": TOKEN})
    assert status == 400 and "boot resources are configured" in body["fault_message"]


def test_where_the_source_sends_the_guest():
    assert _reachable("127.0.0.1:4567", "/run/corral-b/corral.sock") == "127.0.0.1:4567"
    assert _reachable("0.0.0.0:4567", "tcp:10.1.2.3:7777") == "10.1.2.3:4567"
    assert _reachable("10.1.2.3:4567", "tcp:[::1]:7777") == "::1:4567"


def test_a_jailed_target_refuses_host_files_for_a_migrated_guest(tmp_path):
    _check_jailed_grant(HostResources())  # nothing to bind: fine
    with pytest.raises(FleetError, match="--no-jail"):
        _check_jailed_grant(HostResources(disks=(DiskConfig(path=tmp_path / "d.img"),)))


def test_an_unreachable_target_is_one_line_and_starts_nothing(tmp_path):
    state = StateDir(tmp_path / "state")
    fleet = Fleet(state, SpawnLauncher(), None)
    server = DaemonServer(DaemonApi(fleet), state.root / "corral.sock")
    try:
        api = HttpClient(str(server.path))
        with pytest.raises(ApiError, match="no VM with id 'x'"):
            api.call("POST", "/vms/x/migrate", {"to": str(tmp_path / "none.sock")})
        with pytest.raises(ApiError, match="timeout_s"):
            api.call("POST", "/incoming", {"timeout_s": 0})
        with pytest.raises(ApiError, match="to"):
            api.call("POST", "/vms/x/migrate", {})
        assert api.call("GET", "/vms") == []
        with pytest.raises(ValueError):
            MigrateVm.model_validate({"to": "/x", "token": "short"})
    finally:
        server.close()
