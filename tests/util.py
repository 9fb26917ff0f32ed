"""The tests' own helpers; ports, processes, engines and `wait_http` come from the shared harness
`distserve.testing` (re-exported here for the suites that import them from tests.util)."""

from __future__ import annotations

import os
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


__all__ = ["REPO", "SLOW", "Proc", "examples", "free_port", "free_port_range", "port_free", "spawn_engine",
           "wait_http"]
