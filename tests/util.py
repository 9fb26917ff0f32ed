"""The tests' own helpers; ports, processes, engines and `wait_http` come from the shared harness
`distserve.testing` (re-exported here for the suites that import them from tests.util)."""

from __future__ import annotations

from pathlib import Path

from distserve.testing.cluster import spawn_engine
from distserve.testing.ports import free_port, free_port_range, port_free
from distserve.testing.procs import Proc, wait_http

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "Proc", "free_port", "free_port_range", "port_free", "spawn_engine", "wait_http"]
