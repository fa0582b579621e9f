"""corral.forkserver's jailed launches: a JailSpec crosses the wire intact; as root, a real
template forks a child that enters a real jail (namespaces, tmpfs root, its own uid) and runs a
corral command in-process, and a jail that cannot be built fails its request with the step that
failed while the template serves on."""

from __future__ import annotations

import os
import time

import pytest

from corral.forkserver import ForkServer, ForkServerError, LaunchRequest, decode_request, encode
from corral.jail import Inner, Jail, JailOptions, JailSpec
from corral.jail.launch import UID_LOCKS, _take_uid, release_uid
from corral.jail.mapping import STANDARD_NODES
from corral.jail.rootfs import Bind, Plan

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")


def _spec(**over: object) -> JailSpec:
    fields: dict = {
        "id": "vm-1", "root": "/srv/x/root", "plan": Plan(binds=[Bind("/a", "/a", writable=True)]),
        "uid": 900123, "gid": 900123, "argv": ["openapi"], "env": {"PATH": "/nonexistent"},
        "rlimits": {"nofile": 64}, "taps": [("tap0", "10.0.0.1/24")], "pdeathsig": False,
    }  # fmt: skip
    return JailSpec(**{**fields, **over})


def test_a_jail_spec_crosses_the_wire_intact():
    spec = _spec()
    got = decode_request(encode(LaunchRequest(op="launch", args=["openapi"], log_path="/x", jail=spec)))
    assert isinstance(got, LaunchRequest) and got.jail == spec
    assert spec.namespaces == ["mnt", "pid", "ipc", "uts"]
    assert _spec(netns="/run/netns/x").namespaces[-1] == "net"


def test_a_bad_jail_spec_is_one_line():
    raw = encode(LaunchRequest(op="launch", args=["openapi"], log_path="/x", jail=_spec()))
    bad = raw.replace(b'"uid":900123', b'"uid":"root"')
    with pytest.raises(ForkServerError, match="jail.uid"):
        decode_request(bad)


@root_only
def test_a_jailed_child_runs_in_process_and_a_broken_jail_names_its_step(tmp_path):
    log = tmp_path / "out"
    inner = Inner(["openapi"], nodes=list(STANDARD_NODES))
    jail = Jail(JailOptions(id="fsunit", chroot_base=tmp_path), inner, pdeathsig=False)
    spec = jail.prepare()
    try:
        with ForkServer() as server:
            broken = spec.model_copy(update={"plan": Plan(binds=[Bind("/no/such/file", "/vm/x")])})
            with pytest.raises(ForkServerError, match="jail fsunit: building the root: .*No such file"):
                server.launch_jailed(["openapi"], log_path=log, jail=broken)
            pid, ms = server.launch_jailed(["openapi"], log_path=log, jail=spec)  # the template serves on
            assert 0 < ms < 10_000
            deadline = time.monotonic() + 30
            while server.returncode(pid) is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert server.returncode(pid) == 0, log.read_text()[-2000:]
        assert '"openapi"' in log.read_text()  # the command ran, in the jail, without an exec
    finally:
        jail.cleanup()
    assert not (tmp_path / "corral" / "fsunit").exists()
    assert not (UID_LOCKS / str(spec.uid)).exists()


@root_only
def test_a_released_uid_loses_its_lock_file_unless_someone_holds_it():
    uid, fd = _take_uid(None)
    assert fd is not None and (UID_LOCKS / str(uid)).exists()
    release_uid(uid, None)  # a restarted daemon's release: the lock is held, so it stays
    assert (UID_LOCKS / str(uid)).exists()
    release_uid(uid, fd)
    assert not (UID_LOCKS / str(uid)).exists()
    uid2, fd2 = _take_uid(None)  # and it is free again
    try:
        assert uid2 <= uid
    finally:
        release_uid(uid2, fd2)
