"""discovery.backoff: bounded, jittered, growing delays for restart and retry loops."""

from __future__ import annotations

import random

import pytest

from discovery.backoff import Backoff, delay_for


def test_delays_grow_with_each_failure_until_the_cap_and_never_exceed_it():
    for seed in range(50):
        backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(seed))
        delays = [backoff.next_delay() for _ in range(12)]
        # Steps 0.5, 1, 2, 4, 8: a crash loop never gets a shorter wait than the one before...
        assert delays[:5] == sorted(delays[:5]), delays
        assert 0.25 <= delays[0] <= 0.5
        # ...and from the cap on every wait stays in the cap's band [cap * (1 - jitter), cap].
        assert all(4.0 <= d <= 8.0 for d in delays[4:]), delays
    assert backoff.attempts == 12


def test_delays_are_jittered_not_a_fixed_schedule():
    delays = {round(delay_for(3, base=1.0, cap=60.0), 9) for _ in range(200)}
    assert len(delays) > 150
    assert min(delays) >= 2.0 and max(delays) <= 4.0


def test_a_long_enough_run_resets_to_the_base_delay():
    backoff = Backoff(base=1.0, cap=30.0, jitter=0.0, reset_after=10.0)
    assert [backoff.after_run(0.1) for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff.after_run(9.9) == 16.0  # not up long enough: still crashing
    assert backoff.after_run(10.0) == 1.0 and backoff.attempts == 1
    backoff.reset()
    assert backoff.attempts == 0 and backoff.next_delay() == 1.0


def test_without_reset_after_only_reset_starts_over():
    backoff = Backoff(base=1.0, cap=4.0, jitter=0.0)
    assert [backoff.after_run(1e9) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]


def test_huge_attempt_numbers_stay_finite_and_capped():
    assert delay_for(10**6, base=0.1, cap=5.0, jitter=0.0) == 5.0


@pytest.mark.parametrize("kwargs", [
    {"base": 0}, {"base": -1}, {"base": float("nan")}, {"cap": 0.1}, {"cap": float("inf")},
    {"jitter": 1.0}, {"jitter": -0.1}, {"reset_after": 0}, {"reset_after": float("inf")},
])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**{"base": 0.5, "cap": 30.0, **kwargs})


def test_attempts_count_from_one():
    with pytest.raises(ValueError):
        delay_for(0, base=1.0, cap=2.0)
