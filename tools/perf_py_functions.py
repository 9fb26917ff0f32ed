#!/usr/bin/env python3
"""Where a Python process's CPU goes, by Python function, from `perf` samples: each sample is charged to the
innermost Python function on its stack (its own bytecode and the C it calls: dict lookups, bytes methods,
orjson, a future's set_result...), and counted as "sys" where a system call lies between that function and the
sample. Unlike cProfile it adds no cost per call; unlike py-spy it counts CPU only (perf's cpu-clock).

Needs CPython 3.12+ with perf trampolines (PYTHONPERFSUPPORT=1) and Debian's linux-perf. For the router's hot
path (tools/bench_hot_path.py's child; a 3.12 venv with this tree's requirements):

    PYTHONPERFSUPPORT=1 <venv312>/bin/python tools/bench_hot_path.py --concurrency 16 --seconds 14 --repeats 1 &
    sleep 9; perf record --call-graph dwarf,32768 -F 499 -p "$(pgrep -f 'bench_hot_path.py --child')" \\
        -o /tmp/perf.data -- sleep 6
    perf script -i /tmp/perf.data -F ip,sym > /tmp/perf.txt
    python3 tools/perf_py_functions.py /tmp/perf.txt [--top 45]
"""

from __future__ import annotations

import argparse
import collections
import sys


def samples(path: str):
    """Each sample's stack, innermost frame first (perf script -F ip,sym: one `ip sym` line per frame, a blank
    line between samples)."""
    stack: list[str] = []
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.split(None, 1)
            if not parts:
                if stack:
                    yield stack
                stack = []
                continue
            stack.append(parts[1].strip() if len(parts) > 1 else "?")
    if stack:
        yield stack


def charge(stack: list[str]) -> tuple[str, bool]:
    """(the innermost Python function, whether a system call lies between it and the sample)."""
    syscall = False
    for sym in stack:
        if sym.startswith("py::"):  # py::<qualname>:<file>
            name, _, path = sym[4:].partition(":")
            return f"{name} {path.rsplit('/', 1)[-1]}", syscall
        if sym.startswith(("do_syscall", "entry_SYSCALL")):
            syscall = True
    return "(no Python frame)", syscall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("script", help="perf script -F ip,sym output")
    p.add_argument("--top", type=int, default=45)
    args = p.parse_args()
    user: collections.Counter[str] = collections.Counter()
    sys_: collections.Counter[str] = collections.Counter()
    n = 0
    for stack in samples(args.script):
        n += 1
        name, syscall = charge(stack)
        (sys_ if syscall else user)[name] += 1
    if not n:
        print("perf_py_functions: no samples in", args.script, file=sys.stderr)
        return 2
    print(f"samples {n}")
    both = user + sys_
    for name, count in both.most_common(args.top):
        print(f"{100 * count / n:5.1f}%  user {100 * user[name] / n:5.1f}%  sys {100 * sys_[name] / n:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
