"""Helpers for the distserve-ctl suite: run the CLI as users do (a separate process), plant records."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from typing import Any

import pytest

from tests.ctl.plant import Planter
from tests.util import REPO


@dataclass
class Result:
    rc: int
    out: str
    err: str
    elapsed: float

    def json(self) -> Any:
        assert self.out.strip(), f"no output (rc={self.rc}, stderr={self.err!r})"
        return json.loads(self.out)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def ctl_env(endpoints: list[str] | str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTSERVE_ETCD")}
    env["DISTSERVE_ETCD_ENDPOINTS"] = endpoints if isinstance(endpoints, str) else ",".join(endpoints)
    env["COLUMNS"] = "250"
    env.update(extra)
    return env


def ctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "distserve.ctl.main", *args]


def run_ctl(endpoints: list[str] | str, *args: str, timeout: float = 60, **env: str) -> Result:
    started = time.monotonic()
    proc = subprocess.run(ctl_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env=ctl_env(endpoints, **env), cwd=str(REPO))
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


_STDIO = threading.Lock()


def run_ctl_inprocess(endpoints: list[str] | str, *args: str, timeout: float = 60) -> Result:
    """distserve-ctl's entry point (distserve.ctl.main:main) with its stdout/stderr captured.

    It runs in a thread with its own event loop, as the console script would in its own process, but
    without paying an interpreter start-up per call (the suite's CI budget is small)."""
    from distserve.ctl.main import main

    endpoint_text = endpoints if isinstance(endpoints, str) else ",".join(endpoints)
    with _STDIO:
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        started = time.monotonic()
        pool = ThreadPoolExecutor(1)
        try:
            rc = pool.submit(_exit_code, main, ["--etcd", endpoint_text, *args]).result(timeout)
        except FuturesTimeout:
            raise AssertionError(f"distserve-ctl {' '.join(args)} did not finish within {timeout} s; "
                                 f"output so far:\n{out.getvalue()}\n{err.getvalue()}") from None
        finally:
            pool.shutdown(wait=False)
            sys.stdout, sys.stderr = saved
        return Result(rc, out.getvalue(), err.getvalue(), time.monotonic() - started)


def _exit_code(main: Any, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture
def ctl(etcd, monkeypatch):
    """ctl(*args) runs distserve-ctl against the test's etcd (in this process; see run_ctl_inprocess)."""
    monkeypatch.setenv("COLUMNS", "250")
    for name in [k for k in os.environ if k.startswith("DISTSERVE_ETCD")]:
        monkeypatch.delenv(name)

    def call(*args: str, **kwargs: Any) -> Result:
        return run_ctl_inprocess(etcd.endpoints, *args, **kwargs)

    return call


@pytest.fixture
def ctl_proc(etcd):
    """ctl_proc(*args): distserve-ctl as its own OS process (endpoints from DISTSERVE_ETCD_ENDPOINTS)."""

    def call(*args: str, **kwargs: Any) -> Result:
        return run_ctl(etcd.endpoints, *args, **kwargs)

    return call


@pytest.fixture
async def planter(etcd_client):
    return await Planter(etcd_client).start(ttl=60)
