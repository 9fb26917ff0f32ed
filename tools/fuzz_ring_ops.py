#!/usr/bin/env python3
"""Fuzz the C ring operations (distserve/router/_ring_ops.c) against their Python specification
(distserve/router/ring_ops.py): random rings with equal neighbouring hashes, leaving points on and off the ring,
joining points new and already there, samples and first-clockwise walks from anywhere; both must give the same
results (the splice's new lists or the same None).

`--sanitize` builds the C module with AddressSanitizer and UndefinedBehaviorSanitizer (tools/sanitized.py) and
runs the fuzzing under them.

    .venv/bin/python tools/fuzz_ring_ops.py [--iterations 100000] [--seed 7] [--sanitize]
"""

from __future__ import annotations

import random
import sys
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sanitized import ROOT, fuzz_main  # noqa: E402

OWNERS = ["a", "b", "c", "d"]


def fuzz(module, iterations: int, seed: int) -> int:
    sys.path.insert(0, str(ROOT))
    from distserve.router import ring_ops

    rnd = random.Random(seed)

    def a_hash() -> int:
        return rnd.randint(0, 40) if rnd.random() < 0.5 else rnd.getrandbits(64)

    for _ in range(iterations):
        points = sorted((a_hash(), rnd.choice(OWNERS)) for _ in range(rnd.randint(0, 60)))
        hashes, owners = array("Q", [p[0] for p in points]), [p[1] for p in points]
        leaving = [rnd.randrange(len(points)) for _ in range(rnd.randint(0, 6))] if points else []
        leave_h, leave_o = [hashes[i] for i in leaving], [owners[i] for i in leaving]
        if leave_h and rnd.random() < 0.1:
            leave_h[0] = a_hash()
        joins = [(a_hash(), rnd.choice(OWNERS)) for _ in range(rnd.randint(0, 6))]
        args = (hashes, owners, leave_h, leave_o, [j[0] for j in joins], [j[1] for j in joins])
        if module.splice(*args) != ring_ops.splice_py(*args):
            print(f"fuzz_ring_ops: splice differs on {args!r}", file=sys.stderr)
            return 1
        counts = {o: rnd.choice([1, 2, 32, 33]) for o in rnd.sample(OWNERS, rnd.randint(0, 4))}
        old_counts = {o: rnd.choice([1, 2, 32, 33]) for o in rnd.sample(OWNERS, rnd.randint(0, 4))}
        if module.count_changes(counts, old_counts) != ring_ops.count_changes_py(counts, old_counts):
            print(f"fuzz_ring_ops: count_changes differs on {counts!r} {old_counts!r}", file=sys.stderr)
            return 1
        start, k = a_hash(), rnd.randint(0, 6)
        if module.sample(hashes, owners, start, k) != ring_ops.sample_py(hashes, owners, start, k):
            print(f"fuzz_ring_ops: sample differs on {hashes!r} {owners!r} {start} {k}", file=sys.stderr)
            return 1
        i, tied = rnd.randint(0, len(owners)), rnd.sample(OWNERS + ["z"], rnd.randint(1, 3))
        if module.first_clockwise(owners, i, tied) != ring_ops.first_clockwise_py(owners, i, tied):
            print(f"fuzz_ring_ops: first_clockwise differs on {owners!r} {i} {tied!r}", file=sys.stderr)
            return 1
    print(f"fuzz_ring_ops: {iterations} rings, C and Python alike")
    return 0


def main() -> int:
    return fuzz_main(__file__, __doc__, "_ring_ops", fuzz, 100_000)


if __name__ == "__main__":
    sys.exit(main())
