"""Hypothesis's packets against a live gdb stub (the probe guest held stopped): whatever a
debugger sends, well-formed or not, gets a reply, and the VMM and the stub answer on."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.gdb_remote import GdbVm, RemoteClient

# packets that resume or end the guest are left out: they are not junk, and they are tested
# one by one in test_gdb.py
HEADS = [b"m", b"M", b"X", b"p", b"P", b"g", b"G", b"H", b"T", b"Z", b"z", b"?", b"q", b"Q", b"qRcmd,"]
HEADS += [b"qXfer:features:read:target.xml:", b"qThreadExtraInfo,", b"vCont?", b"vMustReplyEmpty"]


def _ok(packet: bytes) -> bool:
    return packet[:1] not in (b"k", b"D", b"c", b"C", b"s", b"S", b"v", b"") or packet in (
        b"vCont?",
        b"vMustReplyEmpty",
    )


PACKETS = st.one_of(
    st.binary(min_size=1, max_size=120),
    st.builds(lambda head, body: head + body, st.sampled_from(HEADS), st.binary(max_size=120)),
    st.builds(
        lambda head, a, n: head + b"%x,%x" % (a, n),
        st.sampled_from([b"m", b"Z1,", b"Z2,", b"z2,", b"Z4,"]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**20),
    ),
).filter(_ok)


@pytest.fixture(scope="module")
def stub():
    vm = GdbVm("gdb")
    client = RemoteClient(vm.address)
    assert client.ask(b"QStartNoAckMode") == b"OK"
    yield vm, client
    vm.kill()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=PACKETS, junk=st.binary(max_size=64).map(lambda b: b.replace(b"$", b"").replace(b"#", b"")))
def test_every_packet_gets_a_reply_and_the_stub_answers_on(stub, packet, junk):
    vm, client = stub
    client.send_raw(junk)  # noise between packets is ignored
    client.ask(packet, timeout=20)
    assert client.ask(b"qC") == b"QC1"
    assert vm.proc.poll() is None


def test_after_the_fuzzing_the_machine_still_answers_and_dies_only_when_told(stub):
    vm, client = stub
    assert client.ask(b"qRcmd," + b"status".hex().encode()) == b"paused, 1 vCPU(s), 256 MiB\n".hex().encode()
    client.send(b"k")
    _status, _out, err = vm.finish()
    assert "killed from the debugger" in err and "Traceback" not in err
