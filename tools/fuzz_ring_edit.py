#!/usr/bin/env python3
"""Fuzz the derived rings' C splice (distserve/router/_ring_edit.c) against its Python specification
(distserve/router/ring_edit.py): random rings with equal neighbouring hashes, leaving points on and off the ring,
joining points new and already there; both must give the same new lists or the same None.

`--sanitize` builds the C module with AddressSanitizer and UndefinedBehaviorSanitizer (tools/sanitized.py) and
runs the fuzzing under them.

    .venv/bin/python tools/fuzz_ring_edit.py [--iterations 100000] [--seed 7] [--sanitize]
"""

from __future__ import annotations

import argparse
import random
import sys
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sanitized import ROOT, load_build, run_sanitized  # noqa: E402

OWNERS = ["a", "b", "c", "d"]


def fuzz(module, iterations: int, seed: int) -> int:
    sys.path.insert(0, str(ROOT))
    from distserve.router import ring_edit

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
        if module.splice(*args) != ring_edit.splice_py(*args):
            print(f"fuzz_ring_edit: splice differs on {args!r}", file=sys.stderr)
            return 1
    print(f"fuzz_ring_edit: {iterations} edits, C and Python alike")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sanitize", action="store_true", help="build with ASan and UBSan (gcc) and run under them")
    p.add_argument("--module", help=argparse.SUPPRESS)  # the sanitized build, in the child run
    args = p.parse_args()
    if args.iterations < 1:
        print("fuzz_ring_edit: --iterations must be >= 1", file=sys.stderr)
        return 2
    if args.sanitize:
        return run_sanitized("distserve/router/_ring_edit.c", "distserve.router._ring_edit", __file__,
                             ["--iterations", str(args.iterations), "--seed", str(args.seed)])
    if args.module:
        module = load_build("distserve.router._ring_edit", args.module)
    else:
        sys.path.insert(0, str(ROOT))
        from distserve.router import ring_edit

        if ring_edit._c is None:
            print("fuzz_ring_edit: the C module is not built here (tools/setup builds it)", file=sys.stderr)
            return 2
        module = ring_edit._c
    return fuzz(module, args.iterations, args.seed)


if __name__ == "__main__":
    sys.exit(main())
