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

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "60"))
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
