"""A small live cluster for the distserve-ctl suites: real etcd, engines registered by their real agents
(`distserve engine ... --etcd`), real router replicas, each an OS process."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
import uuid
from typing import Any

from discovery.embedded import EmbeddedEtcd
from distserve.testing.metrics import scrape, value as metric_value
from tests.util import Proc, free_port, free_port_range, wait_http


def http_json(url: str, body: dict | None = None, timeout: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def metric(url: str, name: str) -> float:
    return metric_value(scrape(url), name)


class LiveCluster:
    def __init__(self, ttl: int = 2) -> None:
        self.etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
        self.name = f"ctl{uuid.uuid4().hex[:6]}"
        self.ttl = ttl
        self.procs: dict[str, Proc] = {}
        self.urls: dict[str, str] = {}  # engine id / router id -> URL

    @property
    def endpoints(self) -> list[str]:
        return self.etcd.endpoints

    def start_engines(self, name: str, role: str, count: int = 1, *, null: bool = True, extra: tuple = ()) -> list[str]:
        """`count` engines with ids `<name>-<i>` (or `<name>` alone), registered by their in-process agents."""
        port = free_port_range(count)
        args = ["distserve", "engine", "--role", role, "--host", "127.0.0.1", "--port", str(port),
                "--etcd", ",".join(self.endpoints), "--cluster", self.name, "--ttl", str(self.ttl),
                "--engine-id", name, "--log-level", "WARNING", *extra]
        if null:
            args += ["--null", "--count", str(count)]
        self.procs[name] = Proc.python(args, name=f"ctl-engine-{name}")
        ids = [f"{name}-{i}" for i in range(count)] if count > 1 else [name]
        for i, engine_id in enumerate(ids):
            self.urls[engine_id] = f"http://127.0.0.1:{port + i}"
        return ids

    def wait_engines(self, ids: list[str], timeout: float = 90) -> None:
        for engine_id in ids:
            try:
                wait_http(f"{self.urls[engine_id]}/health", timeout=timeout)
            except TimeoutError:
                owner = next(p for n, p in self.procs.items() if engine_id.startswith(n))
                raise RuntimeError(f"engine {engine_id} did not start:\n{owner.output()[-3000:]}") from None

    def start_router(self, router_id: str, *extra: str) -> str:
        port = free_port()
        self.procs[router_id] = Proc.python(
            ["distserve", "router", "--host", "127.0.0.1", "--port", str(port), "--etcd", ",".join(self.endpoints),
             "--cluster", self.name, "--router-id", router_id, "--lease-ttl", str(self.ttl), "--log-level",
             "WARNING", *extra], name=f"ctl-router-{router_id}")
        url = f"http://127.0.0.1:{port}"
        self.urls[router_id] = url
        return url

    def wait_routers_ready(self, ids: list[str], timeout: float = 60) -> None:
        for router_id in ids:
            try:
                wait_http(f"{self.urls[router_id]}/health/ready", timeout=timeout)
            except TimeoutError:
                raise RuntimeError(f"router {router_id} not ready:\n{self.procs[router_id].output()[-3000:]}") from None

    def stop(self) -> None:
        # SIGTERM everything at once (graceful stops run in parallel), then reap
        for proc in self.procs.values():
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            proc.stop(timeout=5)
        self.etcd.stop()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
