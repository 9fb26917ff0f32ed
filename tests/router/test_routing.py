"""Routing against a real etcd and real (null-mode) engine processes, through real router processes.

The records are written here the way agents and distserve-ctl write them, so each test controls engine
states, links and operator flags exactly (the agent's own behaviour is tested in tests/agent). Each test
uses its own cluster name in one shared etcd, and its own router process.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from distserve.cluster.keys import Keys
from distserve.cluster.records import RouterRecord
from distserve.router import compiled
from tests.router.cluster import (
    MODEL,
    engine_metric,
    engine_record,
    handshake,
    link_record,
    null_farm,
    publish_engine,
    publish_link,
    publish_pd,
    router_metric,
    set_flags,
    set_routing,
    start_null_engines,
    start_router,
)
from tests.util import free_port
from distserve.testing.metrics import find

STRATEGY_NAMES = ["random", "round_robin", "min_expected_latency", "power_of_two", "prefix_affinity"]


@pytest.fixture(scope="module")
def farm():
    """One etcd and null engines: 3 prefills, 2 decodes (every pair handshaken), 2 hybrids."""
    with null_farm(prefills=3, decodes=2, hybrids=2) as farm:
        yield farm


@pytest.fixture
def keys():
    return Keys(f"t{uuid.uuid4().hex[:8]}")


def counts(urls: list[str]) -> list[float]:
    return [engine_metric(u, "distserve_engine_requests_total") for u in urls]


async def fire(
    router: str,
    n: int,
    *,
    stream_every: int = 2,
    chat_every: int = 3,
    prompt: str = "hello {i}",
    headers: dict | None = None,
) -> list[int]:
    async with httpx.AsyncClient(base_url=router, timeout=30, headers=headers) as http:

        async def one(i: int) -> int:
            stream = i % stream_every == 0
            if i % chat_every == 0:
                path, body = (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": prompt.format(i=i)}]},
                )
            else:
                path, body = "/v1/completions", {"prompt": prompt.format(i=i)}
            body.update(model=MODEL, max_tokens=4, stream=stream)
            r = await http.post(path, json=body)
            if stream and r.status_code == 200:
                assert r.text.rstrip().endswith("data: [DONE]"), r.text
                assert '"error"' not in r.text, r.text
            return r.status_code

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def wait_metric(router: str, name: str, labels: dict, value: float, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = router_metric(router, name, labels)
        if got == value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name}{labels} = {got}, expected {value}")
        await asyncio.sleep(0.05)


async def test_every_strategy_routes_to_live_routable_engines_only(farm, etcdc, keys):
    """p0, p1 take traffic; p2 is draining (its record), a cordoned prefill and a prefill whose process is
    gone are never served; the strategy changes at run time through config/routing."""
    geometry = farm["geometry"]
    recs = await publish_pd(etcdc, keys, farm, p2="draining")
    cordoned = engine_record("p-cordoned", farm["hybrids"][0], "hybrid", geometry=geometry)
    await publish_engine(etcdc, keys, cordoned)
    await set_flags(etcdc, keys, cordoned.id, cordon=True)
    drained = engine_record("p-drained", farm["hybrids"][1], "hybrid", geometry=geometry)
    await publish_engine(etcdc, keys, drained)
    await set_flags(etcdc, keys, drained.id, drain=True)
    dead = engine_record("p-dead", f"http://127.0.0.1:{free_port()}", "prefill", geometry=geometry)
    await publish_engine(etcdc, keys, dead)
    await publish_link(etcdc, keys, link_record(dead, recs["d0"]))

    proc, router = start_router(farm["etcd"].endpoints, "--cluster", keys.cluster)
    try:
        # the start line names the compiled parts it runs (distserve/router/compiled.py: "c" where built); it
        # is printed just after the router starts serving, so /health/ready may answer a moment before it
        line = f"compiled parts {compiled.summary()}"
        deadline = time.monotonic() + 15
        while line not in proc.tail(20000) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert line in proc.tail(20000), proc.tail(3000)
        for name in STRATEGY_NAMES:
            await set_routing(etcdc, keys, name)
            await wait_metric(router, "distserve_router_strategy", {"strategy": name}, 1)
            before_p, before_h = counts(farm["prefills"]), counts(farm["hybrids"])
            statuses = await fire(router, 24, prompt=f"{name} {{i}}")
            assert statuses == [200] * 24, name
            after_p, after_h = counts(farm["prefills"]), counts(farm["hybrids"])
            served = [a - b for a, b in zip(after_p, before_p)]
            assert served[2] == 0, f"{name}: the draining prefill got {served[2]} requests"
            assert sum(served[:2]) == 24, f"{name}: {served}"
            assert after_h == before_h, f"{name}: drained/cordoned hybrids got requests"
            if name != "prefix_affinity":  # one prompt prefix may legitimately stay on one engine
                assert served[0] > 0 and served[1] > 0, f"{name}: {served}"
            if name == STRATEGY_NAMES[0]:
                # the dead prefill was picked only by requests already in flight when it first refused,
                # then skipped locally by its circuit breaker (its record still says ready)
                assert router_metric(router, "distserve_router_breaker_open", {}) == 1
                dead_picks = router_metric(router, "distserve_router_picks_total", {"engine": "p-dead"})
                assert dead_picks >= 1
        assert router_metric(router, "distserve_router_picks_total", {"engine": "p-dead"}) == dead_picks
    finally:
        proc.stop()


async def test_drain_and_cordon_at_run_time_and_two_replicas_agree(farm, etcdc, keys):
    await publish_pd(etcdc, keys, farm, prefills=farm["prefills"][:2])
    r1, url1 = start_router(farm["etcd"].endpoints, "--cluster", keys.cluster, "--strategy", "round_robin")
    r2, url2 = start_router(farm["etcd"].endpoints, "--cluster", keys.cluster, "--strategy", "round_robin")
    try:
        await set_flags(etcdc, keys, "p0", drain=True)
        await set_flags(etcdc, keys, "d1", cordon=True)
        for url in (url1, url2):
            await wait_metric(url, "distserve_router_engines_routable", {"role": "prefill"}, 1)
            await wait_metric(url, "distserve_router_engines_routable", {"role": "decode"}, 1)
        bp, bd = counts(farm["prefills"][:2]), counts(farm["decodes"])
        assert await fire(url1, 10) == [200] * 10 and await fire(url2, 10) == [200] * 10
        ap, ad = counts(farm["prefills"][:2]), counts(farm["decodes"])
        assert ap[0] == bp[0] and ap[1] - bp[1] == 20
        assert ad[1] == bd[1] and ad[0] - bd[0] == 20
        # lifting the flags brings them back
        await set_flags(etcdc, keys, "p0")
        await set_flags(etcdc, keys, "d1")
        await wait_metric(url1, "distserve_router_engines_routable", {"role": "prefill"}, 2)
        await wait_metric(url1, "distserve_router_engines_routable", {"role": "decode"}, 2)
        bp = counts(farm["prefills"][:2])
        assert await fire(url1, 10) == [200] * 10
        ap = counts(farm["prefills"][:2])
        assert ap[0] > bp[0]
        # both replicas are visible under routers/ with their own lease
        kvs, _ = await etcdc.get_prefix(keys.prefix("routers"))
        records = [RouterRecord.decode(kv.value) for kv in kvs]
        assert sorted(r.url for r in records) == sorted([url1, url2])
        assert all(kv.lease for kv in kvs)
    finally:
        r1.stop()
        r2.stop()
    kvs, _ = await etcdc.get_prefix(keys.prefix("routers"))
    assert kvs == [], "a stopped router revokes its lease"


async def test_refused_connection_opens_the_breaker_until_the_engine_is_back(farm, etcdc, keys):
    geometry = farm["geometry"]
    port = free_port()
    recs = await publish_pd(etcdc, keys, farm, prefills=farm["prefills"][:1], decodes=farm["decodes"][:1])
    gone = engine_record("p-gone", f"http://127.0.0.1:{port}", "prefill", geometry=geometry)
    await publish_engine(etcdc, keys, gone)
    await publish_link(etcdc, keys, link_record(gone, recs["d0"]))
    proc, router = start_router(
        farm["etcd"].endpoints,
        "--cluster",
        keys.cluster,
        "--strategy",
        "round_robin",
        "--breaker-probe-interval",
        "0.2",
    )
    try:
        for _ in range(2):  # round robin: one of these two picks p-gone; refused -> retried on p0
            assert await fire(router, 1) == [200]
        assert router_metric(router, "distserve_router_picks_total", {"engine": "p-gone"}) == 1
        assert router_metric(router, "distserve_router_breaker_open", {}) == 1
        assert router_metric(router, "distserve_router_retries_total", {"phase": "prefill"}) == 1
        assert await fire(router, 12) == [200] * 12  # skipped locally at once: no further attempt on it
        assert router_metric(router, "distserve_router_picks_total", {"engine": "p-gone"}) == 1
        # a probe finds it back once something listens there again (here: a fresh null prefill)
        back, [url] = start_null_engines("prefill", 1, port=port)
        try:
            handshake(url, farm["decodes"][0])
            await wait_metric(router, "distserve_router_breaker_open", {}, 0, timeout=15)
            before = engine_metric(url, "distserve_engine_requests_total")
            assert await fire(router, 10) == [200] * 10
            assert engine_metric(url, "distserve_engine_requests_total") > before
        finally:
            back.kill()
        # killed again: tripped again; then a new incarnation in etcd closes it without a probe success
        assert await fire(router, 6) == [200] * 6
        assert router_metric(router, "distserve_router_breaker_open", {}) == 1
        moved = engine_record("p-gone", farm["prefills"][1], "prefill", geometry=geometry)  # new incarnation
        await publish_engine(etcdc, keys, moved)
        await publish_link(etcdc, keys, link_record(moved, recs["d0"]))
        await wait_metric(router, "distserve_router_breaker_open", {}, 0)
    finally:
        proc.stop()


async def test_api_surface_errors_and_auth(farm, etcdc, keys):
    geometry = farm["geometry"]
    await publish_pd(etcdc, keys, farm, prefills=farm["prefills"][:1], decodes=farm["decodes"][:1])
    for i, url in enumerate(farm["hybrids"]):  # two hybrids serve the same model: /v1/models de-duplicates
        await publish_engine(etcdc, keys, engine_record(f"h{i}", url, "hybrid", geometry=geometry))
    await publish_engine(
        etcdc,
        keys,
        engine_record(
            "other",
            farm["hybrids"][0],
            "hybrid",
            models=("other-model",),
            state="draining",
            geometry=geometry,
        ),
    )
    proc, router = start_router(
        farm["etcd"].endpoints,
        "--cluster",
        keys.cluster,
        "--api-keys",
        "k1",
        "k2",
        "--max-body-bytes",
        "4096",
    )
    auth = {"Authorization": "Bearer k2"}
    try:
        async with httpx.AsyncClient(base_url=router, timeout=10) as http:
            r = await http.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = await http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "x"},
                headers={"Authorization": "Bearer nope"},
            )
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await http.get("/v1/models", headers=auth)
            assert [m["id"] for m in r.json()["data"]] == [MODEL]
            r = await http.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=auth)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await http.post("/v1/completions", json={"model": "other-model", "prompt": "x"}, headers=auth)
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_route"
            r = await http.post("/v1/completions", content=b'{"model": "' + b"x" * 5000 + b'"}', headers=auth)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            for path in ("/distserve/free_cache", "/distserve/p2p_initialize", "/nodes/add"):
                r = await http.post(path, json={}, headers=auth)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await http.get("/v1/completions", headers=auth)
            assert r.status_code == 405 and r.headers["Allow"] == "POST"
            r = await http.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x", "migration_request": {}}, headers=auth
            )
            assert r.status_code == 400 and r.json()["error"]["code"] == "internal_field"
            # request ids: accepted and echoed, or generated
            r = await http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                headers={**auth, "X-Request-Id": "client-chosen-42"},
            )
            assert r.status_code == 200 and r.headers["X-Request-Id"] == "client-chosen-42"
            r = await http.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, headers=auth
            )
            assert len(r.headers["X-Request-Id"]) == 32
            assert (await http.get("/health")).status_code == 200
            ready = (await http.get("/health/ready")).json()
            assert ready["status"] == "ready" and ready["prefill"] == 1 and ready["hybrid"] == 2
            text = (await http.get("/metrics", headers=auth)).text
        assert "client-chosen-42" in proc.output()
        for name in (
            "distserve_router_requests_total",
            "distserve_router_ttft_seconds_bucket",
            "distserve_router_request_duration_seconds_count",
            "distserve_router_phase_seconds_bucket",
            "distserve_router_engines_known",
            "distserve_router_view_revision",
            "distserve_router_view_lag_seconds",
            "distserve_router_retries_total",
            "distserve_router_upstream_errors_total",
        ):
            assert name in text or name.startswith(
                ("distserve_router_retries", "distserve_router_upstream")
            ), name
        assert find(text, "distserve_router_requests_total", {"route": "/v1/completions", "status": "404"}) == 1
        assert find(text, "distserve_router_requests_total", {"route": "/v1/completions", "status": "401"}) == 1
    finally:
        proc.stop()


async def test_not_ready_until_a_path_exists(farm, etcdc, keys):
    proc, router = start_router(
        farm["etcd"].endpoints, "--cluster", keys.cluster, "--route-wait", "1", wait_ready=False
    )
    try:
        async with httpx.AsyncClient(base_url=router, timeout=10) as http:
            r = await http.get("/health/ready")
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_route"
            # an empty view (nothing registered yet, or all re-registering after an etcd blip) says
            # nothing about which models exist: retryable 503 after --route-wait, never 404 model_not_found
            for model in (MODEL, "nope"):
                started = time.monotonic()
                r = await http.post("/v1/completions", json={"model": model, "prompt": "x"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "no_route", r.text
                assert r.headers["Retry-After"] == "1"
                assert time.monotonic() - started >= 1.0  # it waited for a route first
            # a request that arrives while nothing is routable is served once engines appear
            waiting = asyncio.ensure_future(
                http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
            )
            await asyncio.sleep(0.1)
            await publish_pd(etcdc, keys, farm, prefills=farm["prefills"][:1], decodes=farm["decodes"][:1])
            r = await waiting
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
            text = (await http.get("/metrics")).text
            assert find(text, "distserve_router_route_waits_total", {"phase": "entry", "outcome": "timeout"}) == 2
            assert find(text, "distserve_router_route_waits_total", {"phase": "entry", "outcome": "found"}) == 1
            await publish_pd(etcdc, keys, farm, prefills=farm["prefills"][:1], decodes=farm["decodes"][:1])
            for _ in range(100):
                if (await http.get("/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.stop()
