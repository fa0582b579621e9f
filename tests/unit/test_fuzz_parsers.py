"""The fuzz campaign's parser half, at a modest example count (bench/fuzz_campaign.py runs the
same targets for minutes, under hypothesis and atheris): option syntax and sizes, machine
configs, snapshot manifests and state, the migration handshake and its framed records,
Firecracker request bodies, control-socket requests, the kernel loaders, overlay files and
saved device state, each from random bytes (raw, a valid input changed, or JSON built from the
parser's own field names). Only the declared CorralError may escape, as one line."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.fuzz_targets import PARSERS, warm

from corral.config import MachineConfig, parse_size
from corral.errors import ConfigError

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "50"))
warm()
PER_INPUT_S = 5.0

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.binary(max_size=2000))
@example(data=b"")
@example(data=b"\x01" * 64)
@example(data=b"\xff" * 300)
def test_parser_refuses_with_one_line(name, data):
    start = time.monotonic()
    PARSERS[name](data)
    assert time.monotonic() - start < PER_INPUT_S


# -- what the campaign found, each pinned ---------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], {}, True, "9" * 400 + "G", "1e999"])
def test_a_size_that_is_not_one_is_a_config_error(value):
    """A manifest or migration hello with `"memory": null` (or a list, or a number too large
    for a float) ended in a TypeError/OverflowError traceback instead of one line."""
    with pytest.raises(ConfigError, match="size"):
        parse_size(value)
    with pytest.raises(ConfigError, match="^memory: "):
        MachineConfig.build(kernel="k", memory=value)


DEEP = b"[" * 100_000


def test_a_deeply_nested_manifest_is_a_snapshot_error(tmp_path):
    """json.loads raises RecursionError (not a ValueError) past its depth: restore showed it
    as a traceback."""
    from corral.state.snapshot import MANIFEST, SnapshotError, read_snapshot

    (tmp_path / MANIFEST).write_bytes(DEEP)
    with pytest.raises(SnapshotError, match="manifest.json is unreadable"):
        read_snapshot(tmp_path)


def test_a_deeply_nested_firecracker_body_is_a_400():
    from corral.firecracker.routes import Router
    from corral.firecracker.vmm import FirecrackerVmm

    router = Router(FirecrackerVmm("x"))
    for method in ("PUT", "PATCH"):
        reply = router.handle(method, "/mmds", DEEP[:51200])
        assert reply.status == 400 and "not JSON" in reply.body["fault_message"]


def test_a_token_file_that_is_a_directory_is_one_line(tmp_path):
    from corral.migration import load_token

    with pytest.raises(ConfigError, match="is not a regular file"):
        load_token(tmp_path)


def test_a_tls_certificate_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    from support.hostile import fifo

    from corral.migration import server_tls

    with fifo(tmp_path / "cert.pem", after=3.0) as cert:
        start = time.monotonic()
        with pytest.raises(ConfigError, match="is not a regular file"):
            server_tls(cert, cert)
        assert time.monotonic() - start < 2  # the load would block until a writer came


def test_a_field_name_from_outside_is_shown_on_one_bounded_line():
    """An unknown config key holding a newline (from a manifest or a migration hello) split the
    error into two lines; a huge one made a huge error. Found by atheris."""
    with pytest.raises(ConfigError) as err:
        MachineConfig.build(kernel="k", **{"\x0e\nforged: line": None, "y" * 10_000: 1})
    text = str(err.value)
    assert "\n" not in text and len(text) < 1000 and "\\n" in text
