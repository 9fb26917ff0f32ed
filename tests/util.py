"""The tests' own helpers; ports, processes, engines and `wait_http` come from the shared harness
`distserve.testing` (re-exported here for the suites that import them from tests.util)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from distserve.testing.cluster import spawn_engine
from distserve.testing.ports import free_port, free_port_range, port_free
from distserve.testing.procs import Proc, wait_http

REPO = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("DISTSERVE_SLOW", "0") == "1"  # the long forms too (tools/test)


def examples(n: int) -> int:
    """Hypothesis examples for a C-against-its-specification test: all `n` in the long form, a third (at least
    200) in the default run, which CI's time bounds; every run draws new examples, so the runs add up."""
    return n if SLOW else max(200, n // 3)


def wait_until_interruptible(pid: int, timeout: float = 30.0) -> None:
    """Until process `pid`'s interpreter has installed its SIGINT handler (/proc/<pid>/status SigCgt): before that, a
    Ctrl-C kills it outright, with no output, whatever the program (on a loaded machine that can last a second or
    more after it was started). Returns early if it is gone."""
    deadline = time.monotonic() + timeout
    bit = 1 << (signal.SIGINT - 1)
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as status:
                caught = next((int(line.split()[1], 16) for line in status if line.startswith("SigCgt:")), 0)
        except (FileNotFoundError, ProcessLookupError):
            return
        if caught & bit:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} installed no SIGINT handler within {timeout}s")


__all__ = ["REPO", "SLOW", "Proc", "examples", "free_port", "free_port_range", "port_free", "spawn_engine",
           "wait_http", "wait_until_interruptible"]
