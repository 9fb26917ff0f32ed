#!/usr/bin/env python3
"""Fuzz kv_aware's C shortlist scoring and tie rule (distserve/router/_shortlist.c) against their Python
specification (distserve/router/shortlist.py): random levels, members, samples, blind sets, loads and speeds (the
shapes the router makes and odd ones: huge ints, floats, missing or zero speeds, common levels deeper than
distinctive ones), tied engines with their sizes; the C versions must give the specification's
result, or decline with None where the specification's docstring says they may.

`--sanitize` builds the C module with AddressSanitizer and UndefinedBehaviorSanitizer (tools/sanitized.py) and
runs the fuzzing under them.

    .venv/bin/python tools/fuzz_shortlist.py [--iterations 200000] [--seed 7] [--sanitize]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sanitized import ROOT, fuzz_main  # noqa: E402

ENGINES = [f"p{i}" for i in range(10)]
TOKENS = [0, 1, 16, 100, 999, 1000, 3000, 1 << 40, 1 << 62]
LOADS = [0, 1, 2, 7, 0.5, 1.25, 3.0]
SPEEDS = [1.0, 1.0, 2.0, 0.5, 3.0]
ODD = [1 << 64, 1 << 70, 0.0, -1]  # now and then: what the C version declines (a speed of 0, ints past 64 bits)


class State:
    __slots__ = ("sizes", "synced", "followed_at")

    def __init__(self, sizes: tuple[int, int], synced: bool = True, followed_at: float = 0.0) -> None:
        self.sizes, self.synced, self.followed_at = sizes, synced, followed_at


def fuzz(module, iterations: int, seed: int) -> int:
    sys.path.insert(0, str(ROOT))
    from distserve.router import shortlist

    rnd = random.Random(seed)

    def engines(k: int) -> list[str]:
        return rnd.sample(ENGINES, rnd.randint(0, k))

    def pick(values: list):
        return rnd.choice(ODD) if rnd.random() < 0.005 else rnd.choice(values)

    def outcome(fn, *args):
        try:
            return "ok", fn(*args)
        except (KeyError, ZeroDivisionError, TypeError, ValueError) as exc:
            return type(exc).__name__, str(exc)

    declined = 0
    for _ in range(iterations):
        limit = rnd.randint(0, 4)
        levels = [{e: pick(TOKENS) for e in engines(7)} for _ in range(rnd.randint(0, 5))]
        levels = [holders for holders in levels if holders]
        if rnd.random() < 0.7:
            levels.sort(key=lambda holders: len(holders) > limit)
        members = frozenset(engines(10)) if rnd.random() < 0.5 else None
        sample = engines(8) or ["p0"]
        blind = frozenset(engines(3)) if rnd.random() < 0.5 else None
        current = {e: pick(LOADS) for e in engines(10)}
        speed = {e: pick(SPEEDS) for e in (ENGINES if rnd.random() < 0.95 else engines(10))} if rnd.random() < 0.5 else None
        args = (levels, members, sample, blind, rnd.choice([0, 16, 1000]), current, speed,
                rnd.choice([0.0, 1.0, 2.5]), rnd.choice([0.0, 1.0 / 1024, 0.01]), limit)
        got = module.score(*args)
        if got is None:
            declined += 1
        elif ("ok", got) != outcome(shortlist.score_py, *args):
            print(f"fuzz_shortlist: score differs on {args!r}", file=sys.stderr)
            return 1
        # the tie rule: families, then load, then keys
        tied = sample
        states = {e: State((rnd.randint(0, 2), rnd.randint(0, 2)), rnd.random() < 0.5, rnd.choice([0.0, 4.0, 9.5]))
                  for e in engines(10)}
        if module.least_cached(tied, current, states) != shortlist.least_cached_py(tied, current, states):
            print(f"fuzz_shortlist: least_cached differs on {tied!r} {current!r}", file=sys.stderr)
            return 1
        # the blind members: no stream, or waiting for a snapshot past the timeout
        now, timeout = rnd.choice([0.0, 5.0, 10.0]), rnd.choice([0.0, 5.0])
        if module.blind_members(sample, states, now, timeout) != shortlist.blind_members_py(sample, states, now, timeout):
            print(f"fuzz_shortlist: blind_members differs on {sample!r} at {now}", file=sys.stderr)
            return 1
    print(f"fuzz_shortlist: {iterations} inputs, C and Python alike ({declined} scores declined to the specification)")
    return 0


def main() -> int:
    return fuzz_main(__file__, __doc__, "_shortlist", fuzz, 200_000)


if __name__ == "__main__":
    sys.exit(main())
