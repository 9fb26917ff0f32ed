"""A bad routing config written around distserve-ctl (etcdctl) never takes a router down.

Real etcd, real null-engine processes, real router processes. The value fails the schema the router reads
config/routing with, so the router keeps its last good config (or the defaults when it never had one),
logs it once per bad revision, sets distserve_router_routing_config_invalid and says so in /health/ready's
body, while staying ready and answering every request.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from distserve.cluster.keys import Keys
from distserve.cluster.records import RoutingConfig
from tests.router.cluster import (
    MODEL,
    null_farm,
    publish_pd,
    router_metric,
    start_router,
)

INVALID = "distserve_router_routing_config_invalid"


@pytest.fixture(scope="module")
def farm():
    with null_farm(prefills=2, decodes=1) as farm:
        yield farm


async def publish(client, keys: Keys, farm) -> None:
    await publish_pd(client, keys, farm)


async def put_raw(client, keys: Keys, value: dict) -> int:
    """What `etcdctl put` can write: no schema in the way."""
    await client.put(keys.config(), json.dumps(value).encode())
    return (await client.get(keys.config())).mod_revision


async def fire(router: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=router, timeout=30) as http:

        async def one(i: int) -> int:
            body = {"model": MODEL, "prompt": f"doc {i} " * 20, "max_tokens": 2, "stream": i % 2 == 0}
            r = await http.post("/v1/completions", json=body)
            return r.status_code

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def ready(router: str) -> tuple[int, dict]:
    r = httpx.get(f"{router}/health/ready", timeout=5)
    return r.status_code, r.json()


async def wait_config(router: str, revision: int, timeout: float = 10.0) -> dict:
    """/health/ready's routing_config once the router has read `revision`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status, body = ready(router)
        if status == 200 and body.get("routing_config", {}).get("revision") == revision:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"router did not read revision {revision}: {status} {body}")
        await asyncio.sleep(0.05)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_a_bad_routing_config_keeps_the_last_good_one_and_is_reported(farm, etcdc):
    keys = Keys("badcfg")
    await publish(etcdc, keys, farm)
    good = RoutingConfig(strategy="prefix_affinity", params={"vnodes": 32}, weights={"p0": 2.0})
    await etcdc.put(keys.config(), good.encode())
    good_rev = (await etcdc.get(keys.config())).mod_revision
    proc, router = start_router(farm["etcd"].endpoints, "--cluster", keys.cluster)
    late = None
    try:
        body = await wait_config(router, good_rev)
        assert body["routing_config"] == {"valid": True, "error": None, "revision": good_rev,
                                          "applied_revision": good_rev}
        assert router_metric(router, INVALID) == 0
        assert await fire(router, 8) == [200] * 8

        # the value: load_factor "abc" under prefix_affinity
        bad = {"schema_version": 1, "strategy": "prefix_affinity", "weights": {}, "params": {"load_factor": "abc"},
               "updated_at": 1.0}
        bad_rev = await put_raw(etcdc, keys, bad)
        body = await wait_config(router, bad_rev)
        assert body["status"] == "ready" and body["strategy"] == "prefix_affinity"
        config = body["routing_config"]
        assert config["valid"] is False and config["applied_revision"] == good_rev
        assert "params.load_factor" in config["error"] and "'abc'" in config["error"]
        assert router_metric(router, INVALID) == 1
        assert await fire(router, 16) == [200] * 16

        # a ring of 100M points per engine: refused, the router stays small
        huge_rev = await put_raw(etcdc, keys, {**bad, "params": {"vnodes": 100_000_000}})
        body = await wait_config(router, huge_rev)
        assert "params.vnodes" in body["routing_config"]["error"]
        assert await fire(router, 16) == [200] * 16
        assert rss_mb(proc.pid) < 400, f"router RSS {rss_mb(proc.pid):.0f} MB"

        # an unknown strategy and out-of-range weights
        for value, text in (({**bad, "strategy": "teleport", "params": {}}, "strategy"),
                            ({**bad, "params": {}, "weights": {"p0": 1e12}}, "weights.p0"),
                            ({**bad, "params": {}, "weights": {"p0": 0}}, "weights.p0")):
            rev = await put_raw(etcdc, keys, value)
            body = await wait_config(router, rev)
            assert body["routing_config"]["valid"] is False and text in body["routing_config"]["error"], body
            assert body["routing_config"]["applied_revision"] == good_rev
            assert await fire(router, 6) == [200] * 6

        # a router started while the bad value is stored runs the defaults (it never had a good one)
        late, late_url = start_router(farm["etcd"].endpoints, "--cluster", keys.cluster, "--strategy", "round_robin")
        status, body = ready(late_url)
        assert status == 200 and body["strategy"] == "round_robin"
        assert body["routing_config"]["valid"] is False and body["routing_config"]["applied_revision"] == 0
        assert router_metric(late_url, INVALID) == 1
        assert await fire(late_url, 8) == [200] * 8

        # repaired: both routers apply it, the gauge falls back to 0
        fixed = RoutingConfig(strategy="round_robin")
        await etcdc.put(keys.config(), fixed.encode())
        fixed_rev = (await etcdc.get(keys.config())).mod_revision
        for url in (router, late_url):
            body = await wait_config(url, fixed_rev)
            assert body["routing_config"]["valid"] and body["strategy"] == "round_robin"
            assert router_metric(url, INVALID) == 0
        # deleted: the defaults, valid
        await etcdc.delete(keys.config())
        body = await wait_config(router, 0)
        assert body["routing_config"]["valid"] and body["strategy"] == "min_expected_latency"
    finally:
        proc.stop()
        if late is not None:
            late.stop()
    # logged once per bad revision, never a traceback
    log = await asyncio.to_thread(Path(proc.log_path).read_text, errors="replace")
    assert log.count("is invalid, keeping the") == 5, log[-3000:]
    assert "Traceback" not in log and " -> 500 " not in log
