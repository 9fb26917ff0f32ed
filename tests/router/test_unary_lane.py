"""The unary lane (distserve/router/unary.py): a non-streamed PD request served by callbacks, with no task of
its own, and the fast path's connection handling around it. Its behaviour on every failure is the coroutine
path's, checked by the router suites that send non-streamed requests (test_wire, test_pd, test_retry_or_fail,
test_client_io ...); here what only the lane could break.

A real etcd, a real router (in process where the test counts its tasks), wire stubs as engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.cluster.keys import Keys
from tests.router.cluster import MODEL, engine_record, link_record, publish_engine, publish_link, start_router
from tests.router.test_wire import WireStub

ANSWER = {"id": "x", "remote_session_id": 7, "remote_token_ids": [5], "cache_block_ids": [1]}


def _request(body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = await reader.readexactly(length)
    if b"transfer-encoding: chunked" in head.lower():  # pragma: no cover - not sent for these requests
        raise AssertionError("chunked")
    return status, body


@pytest.fixture
async def engines(etcd):
    prefill, decode = WireStub(), WireStub()
    prefill.prefill_answer = dict(ANSWER)
    for stub in (prefill, decode):
        await stub.start()
    keys = Keys(f"u{uuid.uuid4().hex[:6]}")
    client = EtcdClient(EtcdConfig(endpoints=etcd.endpoints))
    await client.connect()
    p = engine_record("p0", prefill.url, "prefill")
    d = engine_record("d0", decode.url, "decode")
    await publish_engine(client, keys, p)
    await publish_engine(client, keys, d)
    await publish_link(client, keys, link_record(p, d))
    try:
        yield {"etcd": etcd, "keys": keys, "client": client, "prefill": prefill, "decode": decode}
    finally:
        await client.close()
        for stub in (prefill, decode):
            await stub.stop()


@contextlib.asynccontextmanager
async def _router_in_process(engines: dict) -> AsyncIterator:
    """A router in this process (its tasks countable, its parts patchable), once it has a route to MODEL;
    stopped on exit."""
    from distserve.router.app import Router
    from distserve.router.settings import RouterSettings

    router = Router(RouterSettings(cluster=engines["keys"].cluster, port=0, host="127.0.0.1"), engines["client"])
    await router.start()
    try:
        for _ in range(100):
            if router.view.table().entries.get(MODEL):
                break
            await asyncio.sleep(0.05)
        yield router
    finally:
        await router.stop()


async def test_a_non_streamed_pd_request_runs_no_router_task_and_a_streamed_one_does(engines):
    """The lane's reason to exist: no task per non-streamed request (a task, a future per engine answer and
    their coroutines were a fifth of the router's CPU per request). Counted by the loop's task factory, for
    tasks running the router's code; a streamed request, which still runs in a task, shows the count works."""
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop, coro, **kwargs):
        code = getattr(coro, "cr_code", None)
        if code is not None and "distserve/router/" in code.co_filename:
            made.append(code.co_qualname)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with _router_in_process(engines) as router:
        loop.set_task_factory(factory)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
            for _ in range(3):  # warm: the engine connections made (a connect runs in a task of the pool's)
                writer.write(_request({"model": MODEL, "prompt": "hi"}))
                assert (await _read_answer(reader))[0] == 200
            made.clear()
            for _ in range(20):
                writer.write(_request({"model": MODEL, "prompt": "hi", "max_tokens": 4}))
                status, body = await _read_answer(reader)
                assert status == 200, body
            assert made == [], made
            writer.write(_request({"model": MODEL, "prompt": "hi", "stream": True}))
            await reader.readuntil(b"0\r\n\r\n")
            assert made, "a streamed request runs in a task: the count must see it"
            writer.close()
        finally:
            loop.set_task_factory(None)
    assert len(engines["decode"].requests("/v1/completions")) == 24


async def test_thousands_of_pipelined_bad_requests_are_answered_in_order_on_one_connection(engines):
    """Errors found at once are answered without a task: 3,000 pipelined bad requests, each answered from
    within the reading of the one before, must neither recurse (a RecursionError dropped the connection) nor
    lose or reorder an answer; a good request after them is served."""
    proc, url = await asyncio.to_thread(start_router, engines["etcd"].endpoints, "--cluster",
                                        engines["keys"].cluster)
    try:
        host, port = url.removeprefix("http://").split(":")
        bad = b"".join(_request({"model": MODEL, "prompt": "x", "temperature": -i - 1}) for i in range(3000))
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(bad + _request({"model": MODEL, "prompt": "ok"}))
        for i in range(3000):
            status, body = await asyncio.wait_for(_read_answer(reader), 10)
            assert status == 400, (i, body)
            assert json.loads(body)["error"]["param"] == "temperature"
        status, body = await asyncio.wait_for(_read_answer(reader), 10)
        assert status == 200, body
        writer.close()
    finally:
        proc.stop()


async def test_requests_answered_by_callbacks_keep_their_order_when_pipelined(engines):
    """Pipelined good requests: each starts once the one before is answered (the lane answers from an engine's
    callback and then starts the next buffered request), all in order, their ids echoed."""
    proc, url = await asyncio.to_thread(start_router, engines["etcd"].endpoints, "--cluster",
                                        engines["keys"].cluster)
    try:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"".join(
            _request({"model": MODEL, "prompt": "x"}).replace(b"Host: r\r\n", b"Host: r\r\nX-Request-Id: req-%d\r\n" % i)
            for i in range(50)
        ))
        ids = []
        for _ in range(50):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            ids.append(int(head.split(b"X-Request-Id: req-")[1].split(b"\r\n")[0]))
        assert ids == list(range(50))
        assert len(engines["decode"].requests("/v1/completions")) == 50
        writer.close()
    finally:
        proc.stop()


async def test_an_unexpected_error_with_a_call_under_way_answers_500_and_leaves_no_load_behind(engines, monkeypatch):
    """A bug in the lane after the decode's load was counted (here: the pool raising on the decode's call) must
    answer the client 500, free the prefill's blocks and end the decode's load count: a count left behind
    would make every strategy see the engine one request busier for good."""
    from distserve.router.http1 import EnginePool

    real_call = EnginePool.call
    decode_url = engines["decode"].url

    def call(self, url, *args, **kwargs):
        if url == decode_url:
            raise RuntimeError("a bug")
        return real_call(self, url, *args, **kwargs)

    async with _router_in_process(engines) as router:
        monkeypatch.setattr(EnginePool, "call", call)
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(_request({"model": MODEL, "prompt": "hi"}))
        status, body = await asyncio.wait_for(_read_answer(reader), 10)
        assert status == 500, body
        assert json.loads(body)["error"]["code"] == "internal_error", body
        for _ in range(100):
            if engines["prefill"].requests("/distserve/free_cache"):
                break
            await asyncio.sleep(0.05)
        assert engines["prefill"].requests("/distserve/free_cache"), "the prefill's blocks were not freed"
        assert router.view.load.own == {"p0": 0, "d0": 0}
        monkeypatch.setattr(EnginePool, "call", real_call)
        writer.write(_request({"model": MODEL, "prompt": "hi"}))  # the connection still serves
        assert (await asyncio.wait_for(_read_answer(reader), 10))[0] == 200
        writer.close()


async def test_lane_requests_are_in_the_metrics_and_their_records_are_counted_in_without_a_scrape(engines):
    """The lane records its metrics with list appends (metrics.py), counted in when read and once a second by
    the router: /metrics shows every request (count, latency, time to first byte, both phases, both picks), and
    with nothing scraping, the records do not pile up."""
    from distserve.router.app import METRICS_FOLD_INTERVAL
    from distserve.testing.metrics import find

    async with _router_in_process(engines) as router:
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        for _ in range(30):
            writer.write(_request({"model": MODEL, "prompt": "hi"}))
            assert (await asyncio.wait_for(_read_answer(reader), 10))[0] == 200
        m = router.metrics
        pending = [len(v) for v in m.latency._pending.values()] + [len(m.requests._ones), len(m.picks._ones)]
        assert max(pending) > 0, "nothing recorded by append: the test would show nothing"
        await asyncio.sleep(METRICS_FOLD_INTERVAL * 1.5)
        assert all(not v for h in (m.latency, m.ttft, m.phase) for v in h._pending.values())
        assert m.requests._ones == [] and m.picks._ones == []
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: r\r\n\r\n")
        status, text = await asyncio.wait_for(_read_answer(reader), 10)
        text = text.decode()
        route = {"route": "/v1/completions"}
        assert find(text, "distserve_router_requests_total", {**route, "status": "200"}) == 30
        assert find(text, "distserve_router_request_duration_seconds_count", route) == 30
        assert find(text, "distserve_router_ttft_seconds_count", route) == 30
        assert find(text, "distserve_router_request_duration_seconds_bucket", {**route, "le": "+Inf"}) == 30
        for phase in ("prefill", "decode"):
            assert find(text, "distserve_router_phase_seconds_count", {"phase": phase}) == 30
        assert find(text, "distserve_router_picks_total", {"phase": "prefill", "engine": "p0"}) == 30
        assert find(text, "distserve_router_picks_total", {"phase": "decode", "engine": "d0"}) == 30
        writer.close()
