"""The fuzz campaign's device half, at a modest example count (bench/fuzz_campaign.py runs the
same targets for minutes, with CORRAL_FUZZ_EXAMPLES or atheris): every legacy device's ports,
PCI configuration space through both mechanisms, and each virtio device behind its transport
(random registers, hostile rings, resets) from random bytes. Nothing but the declared error may
escape, each input is served within a time bound, and memory stays bounded."""

from __future__ import annotations

import os
import resource
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fuzz_targets import DEVICES, can_tap

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "30"))
PER_INPUT_S = 5.0  # far above any input's cost here (milliseconds): a hang, not a slow machine
RSS_GROWTH = 256 << 20

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def bounded(name: str, data: bytes) -> None:
    start = time.monotonic()
    DEVICES[name](data)
    took = time.monotonic() - start
    assert took < PER_INPUT_S, f"{name}: one input took {took:.1f} s"


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("name", sorted(DEVICES))
@FUZZ
@given(data=st.binary(max_size=1500))
def test_device_survives_random_input(name, data):
    if name == "virtio-net" and not can_tap():
        pytest.skip("needs root for a tap")
    bounded(name, data)


def test_a_long_run_stays_in_bounded_memory():
    """Many inputs through the virtio targets leave the peak RSS where a few left it: nothing
    the guest drives accumulates."""
    import random

    rnd = random.Random(13)
    inputs = [rnd.randbytes(rnd.randrange(1500)) for _ in range(60)]
    for name in ("virtio-blk", "virtio-vsock", "virtio-balloon", "pci-config"):
        for data in inputs[:10]:
            DEVICES[name](data)
    before = rss()
    for name in ("virtio-blk", "virtio-vsock", "virtio-balloon", "pci-config"):
        for data in inputs:
            bounded(name, data)
    assert rss() - before < RSS_GROWTH
