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
    {"jitter": 1.01}, {"jitter": -0.1}, {"reset_after": 0}, {"reset_after": float("inf")},
])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**{"base": 0.5, "cap": 30.0, **kwargs})


def test_attempts_count_from_one():
    with pytest.raises(ValueError):
        delay_for(0, base=1.0, cap=2.0)


def test_full_jitter_spans_zero_to_the_step():
    rng = random.Random(7)
    delays = [delay_for(3, base=1.0, cap=10.0, jitter=1.0, rng=rng) for _ in range(2000)]
    assert 0 <= min(delays) < 0.1 and 3.9 < max(delays) <= 4.0


async def test_retry_runs_until_success_with_growing_jittered_delays_and_hooks():
    from discovery.backoff import retry

    slept: list[float] = []
    seen: list[tuple[int, str, float]] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    async def op(attempt: int) -> str:
        if attempt < 3:
            raise ConnectionError(f"try {attempt}")
        return f"ok on {attempt}"

    out = await retry(op, attempts=5, backoff=Backoff(base=0.1, cap=1.0, rng=random.Random(1)),
                      on_retry=lambda a, exc, d: seen.append((a, str(exc), d)), sleep=sleep)
    assert out == "ok on 3"
    assert [a for a, _, _ in seen] == [1, 2] and [e for _, e, _ in seen] == ["try 1", "try 2"]
    assert slept == [d for _, _, d in seen] and 0.05 <= slept[0] <= 0.1 and 0.1 <= slept[1] <= 0.2


async def test_retry_is_bounded_and_raises_what_it_must_not_retry():
    import asyncio

    from discovery.backoff import retry

    calls: list[int] = []

    async def always(attempt: int) -> None:
        calls.append(attempt)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await retry(always, attempts=3)
    assert calls == [1, 2, 3]

    calls.clear()
    with pytest.raises(ValueError):
        await retry(lambda a: always_value_error(calls, a), attempts=3,
                    retry_if=lambda exc: isinstance(exc, ConnectionError))
    assert calls == [1]

    async def cancelled(attempt: int) -> None:
        calls.append(attempt)
        raise asyncio.CancelledError

    calls.clear()
    with pytest.raises(asyncio.CancelledError):
        await retry(cancelled, attempts=3)
    assert calls == [1]
    with pytest.raises(ValueError):
        await retry(always, attempts=0)


async def always_value_error(calls: list[int], attempt: int) -> None:
    calls.append(attempt)
    raise ValueError("bad input: retrying will not help")
