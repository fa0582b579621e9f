"""When pre-copy stops (corral.migration.precopy_step), against simulated guests: a round of
`sent` bytes takes sent / link seconds, during which the guest dirties what its pattern says;
the pause then sends what is left. The real migrations are tests/kvm/test_migration.py's."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from corral.migration import SETTLED, precopy_step

MiB = 1 << 20
LINK = 2_000 * MiB  # bytes/s, loopback-like
LIMIT = 0.3  # seconds, the default downtime limit


def migrate(dirtied: Callable[[float, float], int], first: int, max_rounds: int = 30) -> tuple[int, int, int]:
    """(rounds, bytes left for the pause, throttle steps) of a migration whose guest dirties
    dirtied(start, seconds) bytes in a round starting at `start` lasting `seconds`."""
    now, sent = 0.0, first
    pending = dirtied(now, first / LINK)
    now += first / LINK
    least, rounds, throttled = pending, 0, 0
    while True:
        rounds += 1
        took = pending / LINK
        sent, pending = pending, dirtied(now, took)
        now += took
        least = min(least, pending)
        step = precopy_step(pending, sent, least, LINK, LIMIT)
        if step == "stop" or rounds >= max_rounds:
            return rounds, pending, throttled
        throttled += step == "throttle"


def steady(rate: float, working_set: int) -> Callable[[float, float], int]:
    return lambda start, seconds: min(working_set, int(rate * seconds))


def test_an_idle_guest_stops_after_one_round() -> None:
    rounds, left, _ = migrate(steady(0, 0), 2 * MiB)
    assert (rounds, left) == (1, 0)


def test_a_guest_dirtying_at_half_the_link_goes_on_until_little_is_left() -> None:
    # 128 MiB rewritten at 1 GB/s: the first round leaves all of it; stopping there (the rule
    # before) left 64 MiB for the pause, 32 ms; rounds that halve it end under SETTLED
    rounds, left, throttled = migrate(steady(LINK / 2, 128 * MiB), 130 * MiB)
    assert rounds > 3 and left / LINK <= SETTLED and throttled == 0


def test_a_guest_faster_than_the_link_is_throttled_not_chased() -> None:
    # 2 GiB rewritten at 8 GB/s never fits 0.3 s of a 2 GB/s link (the simulated guest does
    # not slow down: the round limit ends it)
    rounds, left, throttled = migrate(steady(4 * LINK, 2048 * MiB), 2100 * MiB, max_rounds=8)
    assert throttled == rounds - 1 and rounds == 8 and left == 2048 * MiB


def test_a_bursty_guest_is_paused_between_bursts() -> None:
    """Writes 120 MiB in the first tenth of each second, nothing the rest: a round that ends
    amid a burst does not end the pre-copy, one that ends after it does."""

    def bursts(start: float, seconds: float) -> int:
        t, written = start, 0.0
        while t < start + seconds:
            phase = t % 1.0
            step = min(start + seconds - t, (0.1 - phase) if phase < 0.1 else 1.0 - phase)
            written += step * 1200 * MiB if phase < 0.1 else 0
            t += step
        return min(120 * MiB, int(written))

    # the first round (1 s) leaves the whole burst; the second ends amid the next one
    rounds, left, _ = migrate(bursts, 2000 * MiB)
    assert rounds > 2 and left <= 8 * MiB, (rounds, left / MiB)


def test_a_round_that_lands_in_a_burst_does_not_end_the_precopy() -> None:
    """119 MiB left after a round of 6 MiB (which had left 6): not converging, but far above
    the least seen, so another round; at the least seen, the pause."""
    assert precopy_step(119 * MiB, 6 * MiB, 6 * MiB, LINK, LIMIT) == "copy"
    assert precopy_step(7 * MiB, 6 * MiB, 6 * MiB, LINK, LIMIT) == "stop"


@given(
    pending=st.integers(0, 1 << 34),
    sent=st.integers(0, 1 << 34),
    least=st.integers(0, 1 << 34),
    rate=st.floats(50e6, 1e11),
    limit=st.floats(1e-6, 10),
)
def test_it_stops_only_when_the_rest_fits_and_throttles_only_when_it_does_not(
    pending: int, sent: int, least: int, rate: float, limit: float
) -> None:
    step = precopy_step(pending, sent, min(least, pending), rate, limit)
    fits = pending / rate <= limit
    assert step in ("stop", "copy", "throttle")
    assert step != "stop" or fits
    assert step != "throttle" or not fits
