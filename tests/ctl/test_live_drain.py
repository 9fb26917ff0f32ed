"""`drain --wait` on a live cluster with work in flight: reference engines (a real torch model, so requests
take time) registered by their agents, two router replicas, traffic through the routers throughout."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.ctl.conftest import ctl_argv, ctl_env, run_ctl_inprocess
from tests.ctl.live import LiveCluster, http_json, metric, wait_for

ROUTERS = ["r1", "r2"]


@pytest.fixture(scope="module")
def live():
    cluster = LiveCluster(ttl=3)
    try:
        for name in ("H1", "H2"):
            cluster.start_engines(name, "hybrid", null=False)
        for router_id in ROUTERS:
            cluster.start_router(router_id, "--strategy", "round_robin")
        cluster.wait_engines(["H1", "H2"])
        cluster.wait_routers_ready(ROUTERS)
        for router_id in ROUTERS:
            wait_for(lambda r=router_id: http_json(f"{cluster.urls[r]}/health/ready")["hybrid"] == 2, 60,
                     f"{router_id} routes to both engines")
        yield cluster
    finally:
        cluster.stop()


def _in_flight(url: str) -> float:
    return metric(url, "distserve_engine_requests_running") + metric(url, "distserve_engine_requests_waiting")


async def test_drain_wait_returns_after_in_flight_work_and_routers_stop_sending(live):
    h1, h2 = live.urls["H1"], live.urls["H2"]
    model = http_json(f"{live.urls['r1']}/v1/models")["data"][0]["id"]

    def complete(router_id: str, max_tokens: int, tag: str) -> dict:
        return http_json(f"{live.urls[router_id]}/v1/completions", {
            "model": model, "prompt": f"drain test {tag}", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}, timeout=120)

    pool = ThreadPoolExecutor(8)
    long_jobs = [pool.submit(complete, ROUTERS[i % 2], 400, f"long {i}") for i in range(6)]
    await asyncio.to_thread(wait_for, lambda: _in_flight(h1) > 0, 30, "work in flight on H1", 0.02)

    # new traffic keeps flowing through both routers while H1 drains
    stop = threading.Event()
    short_done: list[float] = []

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            complete(ROUTERS[i % 2], 2, f"short {i}")
            short_done.append(time.monotonic())
            i += 1

    traffic_job = pool.submit(traffic)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *ctl_argv("--cluster", live.name, "drain", "H1", "--wait", "--timeout", "120", "--json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ctl_env(live.endpoints))
    # while it waits, H1 still has work: the drain must not return before that work is done
    busy_seen_while_waiting = False
    while proc.returncode is None:
        if _in_flight(h1) > 0:
            busy_seen_while_waiting = True
        try:
            await asyncio.wait_for(proc.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    returned = time.monotonic()
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["drained"]
    assert busy_seen_while_waiting, "H1 had no work in flight while the drain waited: the test proves nothing"
    # returned only after H1's in-flight work finished ...
    assert _in_flight(h1) == 0
    # ... and the routers stopped sending to it: 2 more seconds of traffic all lands on H2
    served_h1 = metric(h1, "distserve_engine_requests_total")
    served_h2 = metric(h2, "distserve_engine_requests_total")
    await asyncio.sleep(2.0)
    stop.set()
    traffic_job.result(timeout=60)
    assert metric(h1, "distserve_engine_requests_total") == served_h1
    assert metric(h2, "distserve_engine_requests_total") > served_h2
    assert sum(1 for t in short_done if t > returned) > 0
    # every long request finished normally (a drain never cuts work off)
    for job in long_jobs:
        assert job.result(timeout=120)["choices"][0]["finish_reason"] == "length"
    pool.shutdown()
    assert returned - started > 0.5

    # the engine is out of every view; undo, and it serves again
    status = run_ctl_inprocess(live.endpoints, "--cluster", live.name, "engines", "--json").json()
    assert "H1" not in {r["id"] for r in status["engines"] if r["routable"]}
    assert run_ctl_inprocess(live.endpoints, "--cluster", live.name, "uncordon", "H1").rc == 0
    try:
        for router_id in ROUTERS:
            await asyncio.to_thread(wait_for, lambda r=router_id: http_json(f"{live.urls[r]}/health/ready")["hybrid"] == 2,
                                    30, f"{router_id} routes to H1 again")
    except AssertionError:
        engines = run_ctl_inprocess(live.endpoints, "--cluster", live.name, "engines", "--table").out
        raise AssertionError(f"{engines}\n{live.procs['H1'].output()[-3000:]}") from None
