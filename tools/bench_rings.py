#!/usr/bin/env python3
"""What one candidate-set change costs prefix_affinity's ring (`_Rings.ring`: the counts and the derivation),
per source tree, at 500 prefills (the routing-table benchmark's sets):

- `one-left`: one prefill leaves the set, then returns (20 different prefills), as `tools/bench_table.py`'s
  "a new set" row;
- `step`: new sets of 496 and 497 prefills in turn, where int(16384 / n) steps (the "496 <-> 497" row).

Each tree runs in its own child process (its own `distserve` on PYTHONPATH), every set is seen once before
timing. `--callgrind` counts instructions instead of CPU time: the child under `valgrind --tool=callgrind` at
two run lengths (2 and 6 passes over the sets), differenced so start-up and the warm-up cancel out, divided by
the calls in between: the work, nearly free of a shared machine's noise (needs valgrind).

    .venv/bin/python tools/bench_rings.py --trees /tmp/base . --sets one-left step --weighted both
    .venv/bin/python tools/bench_rings.py --trees /tmp/base . --callgrind
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFILLS = 500


def _sets(kind: str, candidates: list[str]) -> list[list[str]]:
    from bench_table import sets_across_a_step, sets_one_left  # the routing-table benchmark's very sets

    return sets_one_left(candidates) if kind == "one-left" else sets_across_a_step(candidates)


def child(kind: str, weighted: bool, passes: int) -> None:
    from distserve.router import strategies as S

    candidates = [f"prefill-{i:04d}" for i in range(PREFILLS)]
    weights = {c: 2.0 for c in candidates[::4]} if weighted else {}
    ctx = S.PickContext(load=S.LoadTracker(), weights=weights)
    rings = S._Rings(64)
    rings.sort_ahead = True  # as kv_aware's rings
    rings.ring(candidates, ctx)
    sets = _sets(kind, candidates)
    for members in sets:  # every set seen once: every point hashed
        rings.ring(members, ctx)
    times = []
    for _ in range(passes):
        for members in sets:
            c0 = time.thread_time()
            rings.ring(members, ctx)
            times.append(time.thread_time() - c0)
    print(f"calls {len(times)} mean_us {statistics.mean(times) * 1e6:.1f} p50_us "
          f"{statistics.median(times) * 1e6:.1f} max_us {max(times) * 1e6:.1f}")


def _run(tree: Path, kind: str, weighted: bool, passes: int, valgrind: bool) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--passes", str(passes)]
    if weighted:
        cmd.append("--child-weighted")
    if valgrind:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", *cmd]
            out = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True, timeout=1800)
            found = re.search(r"Collected : (\d+)", out.stderr)
            if out.returncode != 0 or found is None:
                raise SystemExit(f"bench_rings: callgrind run in {tree} failed:\n{out.stderr[-2000:]}")
            return found.group(1)
    out = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"bench_rings: the run in {tree} failed:\n{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=["."], help="source trees (git archive ...); default this one")
    parser.add_argument("--sets", nargs="+", choices=("one-left", "step"), default=["one-left", "step"])
    parser.add_argument("--weighted", choices=("no", "yes", "both"), default="both",
                        help="every fourth prefill weight 2 (default: both ways)")
    parser.add_argument("--passes", type=int, default=10, help="timed passes over the sets (CPU time mode)")
    parser.add_argument("--callgrind", action="store_true", help="instructions per call under callgrind")
    parser.add_argument("--child", choices=("one-left", "step"), help=argparse.SUPPRESS)
    parser.add_argument("--child-weighted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.passes < 1:
        parser.error("--passes must be at least 1")
    if args.child:
        child(args.child, args.child_weighted, args.passes)
        return 0
    if args.callgrind and shutil.which("valgrind") is None:
        print("bench_rings: --callgrind needs valgrind on PATH", file=sys.stderr)
        return 2
    trees = [Path(t).resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "distserve" / "router" / "strategies.py").is_file():
            print(f"bench_rings: {tree} has no distserve/router/strategies.py", file=sys.stderr)
            return 2
    weightings = {"no": [False], "yes": [True], "both": [False, True]}[args.weighted]
    for kind in args.sets:
        for weighted in weightings:
            calls = len(_sets(kind, [f"p{i}" for i in range(PREFILLS)]))
            for tree in trees:
                label = f"{kind}{', weighted' if weighted else ''}"
                if args.callgrind:
                    short = int(_run(tree, kind, weighted, 2, True))
                    long = int(_run(tree, kind, weighted, 6, True))
                    print(f"{label:20s} {tree}: {(long - short) / (4 * calls) / 1e6:.2f} M instructions per change")
                else:
                    print(f"{label:20s} {tree}: {_run(tree, kind, weighted, args.passes, False)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
