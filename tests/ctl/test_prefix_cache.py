"""distserve-ctl on prefix caches (issue 18): `describe engine` shows the cache-state stream and hit rate,
`top` shows hit rates. The engine is a loopback HTTP server (its own thread and loop: the ctl runs in this
process and blocks the test's loop) serving /metrics and one snapshot of the cache-state stream."""

from __future__ import annotations

import asyncio
import threading

import orjson
import pytest
from aiohttp import web

from tests.ctl.plant import engine

METRICS = (
    "# TYPE distserve_engine_prompt_tokens_total counter\n"
    "distserve_engine_prompt_tokens_total 400\n"
    "distserve_engine_prefix_cache_hit_tokens_total 300\n"
    "distserve_engine_prefix_cache_blocks 12\n"
)
SNAPSHOT = {"type": "snapshot", "incarnation": "inst-1", "seq": 7, "block_size": 16, "chunk_bytes": 64,
            "keys": [["00000000000000aa", 16], ["00000000000000bb", 32], ["00000000000000cc", 48]]}
CAP = {"cache_events": {"path": "/distserve/cache/events", "version": 1, "chunk_bytes": 64, "block_size": 16}}


class ThreadedEngine:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _authorized(self, request: web.Request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    async def metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        return web.Response(text=METRICS)

    async def events(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(orjson.dumps(SNAPSHOT) + b"\n")
        while True:  # a live stream never ends by itself: the ctl must read one line and go
            await asyncio.sleep(0.2)
            await resp.write(b'{"type":"heartbeat","seq":7,"incarnation":"inst-1"}\n')

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/distserve/cache/events", self.events)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> "ThreadedEngine":
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            await self.runner.shutdown()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def cache_engine():
    with ThreadedEngine() as eng:
        yield eng


async def test_describe_engine_shows_cache_stream_and_hit_rate(ctl, planter, cache_engine):
    await planter.engine(engine("P1", "prefill", cache_engine.url, **CAP))
    res = ctl("describe", "engine", "P1", "--json")
    assert res.rc == 0, res.err
    cache = res.json()["cache"]
    assert cache["stream"] == "/distserve/cache/events" and cache["stream_state"] == "ok"
    assert cache["cached_keys"] == 3 and cache["seq"] == 7 and cache["incarnation"] == "inst-1"
    assert cache["hit_rate"] == 0.75 and cache["cached_blocks"] == 12
    table = ctl("--table", "describe", "engine", "P1")
    assert "hit_rate" in table.out and "cached_keys" in table.out and "0.75" in table.out, table.out
    assert res.elapsed < 5  # one snapshot read, not the endless stream


async def test_describe_engine_without_stream_or_unreachable_still_answers(ctl, planter, cache_engine):
    await planter.engine(engine("P2", "prefill", cache_engine.url))  # no capability: metrics only
    cache = ctl("describe", "engine", "P2", "--json").json()["cache"]
    assert cache["stream"].startswith("none") and cache["hit_rate"] == 0.75 and "stream_state" not in cache
    await planter.engine(engine("P3", "prefill", "http://127.0.0.1:1", **CAP))
    res = ctl("describe", "engine", "P3", "--json")
    assert res.rc == 0
    cache = res.json()["cache"]
    assert cache["stream_state"].startswith("unreachable") and "metrics_error" in cache


async def test_describe_engine_sends_the_cluster_token(ctl, planter, monkeypatch):
    with ThreadedEngine(token="tok-1") as eng:
        await planter.engine(engine("P1", "prefill", eng.url, **CAP))
        monkeypatch.setenv("DISTSERVE_CLUSTER_TOKEN", "tok-1")
        cache = ctl("describe", "engine", "P1", "--json").json()["cache"]
        assert cache["stream_state"] == "ok" and cache["hit_rate"] == 0.75
        monkeypatch.delenv("DISTSERVE_CLUSTER_TOKEN")
        cache = ctl("describe", "engine", "P1", "--json").json()["cache"]
        assert "401" in cache["stream_state"] and "401" in cache["metrics_error"]


async def test_top_shows_hit_rates(ctl, planter, cache_engine):
    await planter.engine(engine("P1", "prefill", cache_engine.url, **CAP))
    await planter.engine(engine("P2", "prefill", "http://127.0.0.1:1"))
    res = ctl("top", "--once", "--json")
    assert res.rc == 0, res.err
    rates = {e["id"]: e["prefix_hit_rate"] for e in res.lines()[0]["engines"]}
    assert rates == {"P1": 0.75, "P2": None}
    table = ctl("--table", "top", "--once")
    assert "HIT RATE" in table.out and "75%" in table.out, table.out


async def test_config_set_strategy_kv_aware_and_its_params(ctl, etcd_client):
    assert ctl("config", "set", "strategy", "kv_aware").rc == 0
    assert ctl("config", "set", "params.cache_weight", "2.5").rc == 0
    doc = ctl("config", "get", "--json").json()["config"]
    assert doc["strategy"] == "kv_aware" and doc["params"] == {"cache_weight": 2.5}
    bad = ctl("config", "set", "params.cache_weight", "-1")
    assert bad.rc == 2 and "cache_weight" in bad.err and len(bad.err.strip().splitlines()) == 1
