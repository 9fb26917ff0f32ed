"""Bounded, jittered exponential back-off, and the one retry executor built on it.

Every retry and restart loop of discovery and distserve takes its delays from here (one calculator) and,
where it retries one operation, runs it through `retry` (one executor): attempts bounded, delays jittered,
hooks for logging, metrics and tracing.

    delay = delay_for(attempt, base=0.5, cap=30.0)       # attempt 1, 2, 3, ...: ~base, ~2*base, ... <= cap

    backoff = Backoff(base=0.5, cap=30.0, reset_after=60.0)
    delay = backoff.after_run(ran_for)   # a process that ran >= reset_after starts over at attempt 1
    delay = backoff.next_delay()         # one more failure in a row
    backoff.reset(); backoff.attempts    # failures since the last reset

    result = await retry(op, attempts=3, backoff=Backoff(0.05, 1.0), retry_if=is_transient,
                         on_retry=lambda attempt, exc, delay: log.warning(...))

The step doubles per attempt up to `cap`; the delay is drawn from [step * (1 - jitter), step], so it never
exceeds the cap, callers that fail together spread out, and with jitter <= 0.5 a delay is never shorter
than the one before it (a crash loop really slows down). jitter=1 is "full jitter" (anywhere in
[0, step]), for short in-call retries where a zero wait is fine.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

_MAX_DOUBLINGS = 62  # 2**62 * any sane base is far past any cap; keeps the arithmetic finite


def _check(base: float, cap: float, jitter: float) -> None:
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a finite number > 0, got {base!r}")
    if not (math.isfinite(cap) and cap >= base):
        raise ValueError(f"cap must be a finite number >= base ({base}), got {cap!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be in [0, 1], got {jitter!r}")


def delay_for(attempt: int, *, base: float, cap: float, jitter: float = 0.5,
              rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1-based)."""
    _check(base, cap, jitter)
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt!r}")
    step = min(cap, base * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
    return step * (1.0 - jitter * (rng or random).random())


class Backoff:
    """Back-off state of one retried thing: consecutive failures, reset after a long enough success."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, *, jitter: float = 0.5,
                 reset_after: float | None = None, rng: random.Random | None = None) -> None:
        _check(base, cap, jitter)
        if reset_after is not None and not (math.isfinite(reset_after) and reset_after > 0):
            raise ValueError(f"reset_after must be a finite number > 0 or None, got {reset_after!r}")
        self.base, self.cap, self.jitter, self.reset_after = base, cap, jitter, reset_after
        self._rng = rng
        self.attempts = 0

    def next_delay(self) -> float:
        """One more failure in a row: the delay before the next try."""
        self.attempts += 1
        return delay_for(self.attempts, base=self.base, cap=self.cap, jitter=self.jitter, rng=self._rng)

    def after_run(self, ran_for: float) -> float:
        """The thing failed after running `ran_for` seconds; a run of at least reset_after counts as a
        recovery, so the count (and the delay) starts over."""
        if self.reset_after is not None and ran_for >= self.reset_after:
            self.reset()
        return self.next_delay()

    def reset(self) -> None:
        self.attempts = 0

    def __repr__(self) -> str:
        return f"Backoff(base={self.base}, cap={self.cap}, jitter={self.jitter}, attempts={self.attempts})"


async def retry(
    op: Callable[[int], Awaitable[T]],
    *,
    attempts: int,
    backoff: Backoff | None = None,
    retry_if: Callable[[BaseException], bool] = lambda exc: isinstance(exc, Exception),
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run `op(attempt)` (attempt = 1, 2, ...) until it returns, at most `attempts` times.

    An exception for which `retry_if` is false, or the last attempt's, is raised as is (cancellation is
    never retried). Before each retry `on_retry(attempt_that_failed, exc, delay)` is called, then the
    executor waits `delay` from `backoff` (0 without one: the caller spreads attempts otherwise, e.g. by
    trying another server)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts!r}")
    attempt = 1
    while True:
        try:
            return await op(attempt)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if attempt >= attempts or not retry_if(exc):
                raise
            delay = backoff.next_delay() if backoff is not None else 0.0
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            if delay > 0:
                await sleep(delay)
            attempt += 1
