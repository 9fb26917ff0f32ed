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
from aiohttp import web

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


@contextlib.asynccontextmanager
async def _published(etcd, decode: WireStub) -> AsyncIterator[dict]:
    """A prefill stub and `decode` started and published in etcd with a link between them; stopped on exit."""
    prefill = WireStub()
    prefill.prefill_answer = dict(ANSWER)
    for stub in (prefill, decode):
        await stub.start()
    keys = Keys(f"u{uuid.uuid4().hex[:6]}")
    client = EtcdClient(EtcdConfig(endpoints=etcd.endpoints))
    await client.connect()
    try:
        p = engine_record("p0", prefill.url, "prefill")
        d = engine_record("d0", decode.url, "decode")
        await publish_engine(client, keys, p)
        await publish_engine(client, keys, d)
        await publish_link(client, keys, link_record(p, d))
        yield {"etcd": etcd, "keys": keys, "client": client, "prefill": prefill, "decode": decode}
    finally:
        await client.close()
        for stub in (prefill, decode):
            await stub.stop()


@pytest.fixture
async def engines(etcd):
    async with _published(etcd, WireStub()) as found:
        yield found


@contextlib.asynccontextmanager
async def _router_in_process(engines: dict, **settings) -> AsyncIterator:
    """A router in this process (its tasks countable, its parts patchable) with `settings`, once it has a route
    to MODEL; stopped on exit."""
    from distserve.router.app import Router
    from distserve.router.settings import RouterSettings

    router = Router(RouterSettings(cluster=engines["keys"].cluster, port=0, host="127.0.0.1", **settings),
                    engines["client"])
    await router.start()
    try:
        for _ in range(100):
            if router.view.table().entries.get(MODEL):
                break
            await asyncio.sleep(0.05)
        yield router
    finally:
        await router.stop()


async def test_a_pd_request_streamed_or_not_runs_no_router_task(engines):
    """The lane's reason to exist: no task per request (a task, a future per engine answer or piece and their
    coroutines were a fifth of the router's CPU per non-streamed request, a third per streamed one). Counted by
    the loop's task factory, for tasks running the router's code; a request for a model no engine serves, which
    the coroutine path answers in a task, shows the count works."""
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
            for _ in range(20):
                writer.write(_request({"model": MODEL, "prompt": "hi", "stream": True}))
                stream = await reader.readuntil(b"0\r\n\r\n")
                assert stream.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in stream, stream
            assert made == [], made
            writer.write(_request({"model": "no-such-model", "prompt": "hi"}))
            assert (await _read_answer(reader))[0] == 404
            assert made, "a request the coroutine path serves runs in a task: the count must see it"
            writer.close()
        finally:
            loop.set_task_factory(None)
    assert len(engines["decode"].requests("/v1/completions")) == 43


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


# ---------------------------------------------------------------------------------- streamed requests in the lane
class StreamingStub(WireStub):
    """A decode whose stream is shaped by the test: `pieces` pieces of `piece_bytes` each (numbered, so order and
    loss show), `stall_after` seconds of silence after the first; when its last write returned (`finished_at`,
    the loop's clock) and how many pieces it wrote before its client (the router) went away (`written`)."""

    def __init__(self, pieces: int, piece_bytes: int = 64, stall_after: float = 0.0, pace: float = 0.0) -> None:
        super().__init__()
        self.pieces, self.piece_bytes, self.stall_after, self.pace = pieces, piece_bytes, stall_after, pace
        self.finished_at = 0.0
        self.written = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # kept by aiohttp: the stub's own handler reads it again
        body = json.loads(raw) if request.path == "/v1/completions" else {}
        if not body.get("stream") or "preserve_cache" in body:
            return await super().handle(request)
        self.seen.append((request.path, request.headers.copy(), raw))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(self.pieces):
                await resp.write(_event(i, self.piece_bytes))
                self.written += 1
                if i == 0 and self.stall_after:
                    await asyncio.sleep(self.stall_after)
                elif self.pace:
                    await asyncio.sleep(self.pace)
            await resp.write(b"data: [DONE]\n\n")
            self.finished_at = asyncio.get_running_loop().time()
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp


def _event(i: int, size: int) -> bytes:
    text = b"%08d" % i
    return b'data: {"choices": [{"index": 0, "text": "' + text + b"." * max(0, size - 48) + b'"}]}\n\n'


@contextlib.asynccontextmanager
async def _lane_cluster(etcd, decode: WireStub, **settings) -> AsyncIterator[dict]:
    """A prefill stub and `decode` published with a link, and a router in this process with `settings`."""
    async with _published(etcd, decode) as found, _router_in_process(found, **settings) as router:
        yield {"router": router, "prefill": found["prefill"], "decode": decode}


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked answer's body, to its last chunk."""
    out = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(out)
        out.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def _settled(router, prefill: WireStub) -> None:
    """Until the prefill's blocks were freed and no engine counts the request any more (or 5 s)."""
    for _ in range(100):
        if prefill.requests("/distserve/free_cache") and router.view.load.own == {"p0": 0, "d0": 0}:
            return
        await asyncio.sleep(0.05)


async def test_a_client_reading_slowly_holds_the_engine_back_and_is_not_an_idle_engine(etcd):
    """A client that stops reading mid-stream: the router stops reading the engine's stream (it does not buffer
    the whole of it: the engine cannot finish before the client reads again), and the engine's silence while the
    client is behind is not the engine's idle timeout (1 s here; the client pauses 2.5 s). Every piece arrives,
    in order, then [DONE]."""
    pieces = 640  # 40 MiB: more than every socket buffer between the engine and the client
    decode = StreamingStub(pieces, piece_bytes=64 * 1024)
    async with _lane_cluster(etcd, decode, decode_idle_timeout=1.0) as cluster:
        router = cluster["router"]
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port, limit=1 << 16)
        writer.write(_request({"model": MODEL, "prompt": "hi", "stream": True}))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
        await asyncio.sleep(2.5)  # not reading
        resumed = asyncio.get_running_loop().time()
        body = await asyncio.wait_for(_read_chunked(reader), 60)
        assert decode.finished_at > resumed, "the engine finished while the client was not reading: buffered"
        events = body.split(b"\n\n")
        numbers = [int(e[e.index(b'"text": "') + 9:][:8]) for e in events if b'"text": "' in e]
        assert numbers == list(range(pieces)), "pieces lost or out of order"
        assert body.endswith(b"data: [DONE]\n\n") and b"failed mid-stream" not in body
        writer.close()
        assert router.metrics.streams.get(("/v1/completions", "completed")) == 1


async def test_an_engine_silent_mid_stream_ends_it_with_an_error_event_and_frees_the_prefill(etcd):
    decode = StreamingStub(3, stall_after=30.0)
    async with _lane_cluster(etcd, decode, decode_idle_timeout=1.0) as cluster:
        router, prefill = cluster["router"], cluster["prefill"]
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(_request({"model": MODEL, "prompt": "hi", "stream": True}))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        started = asyncio.get_running_loop().time()
        body = await asyncio.wait_for(_read_chunked(reader), 10)
        assert 0.9 < asyncio.get_running_loop().time() - started < 4.0
        assert body.startswith(b'data: {"choices"') and b"decode failed mid-stream" in body, body
        assert b"[DONE]" not in body
        await _settled(router, prefill)
        assert prefill.requests("/distserve/free_cache"), "the prefill's blocks were not freed"
        assert router.view.load.own == {"p0": 0, "d0": 0}
        assert router.metrics.streams.get(("/v1/completions", "upstream_timeout")) == 1
        writer.write(_request({"model": MODEL, "prompt": "hi"}))  # the connection still serves
        assert (await asyncio.wait_for(_read_answer(reader), 10))[0] == 200
        writer.close()


async def test_a_client_leaving_mid_stream_stops_the_decode_and_frees_the_prefill(etcd):
    decode = StreamingStub(1000, pace=0.02)  # 20 s of stream
    async with _lane_cluster(etcd, decode) as cluster:
        router, prefill = cluster["router"], cluster["prefill"]
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(_request({"model": MODEL, "prompt": "hi", "stream": True}))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
        writer.close()
        await _settled(router, prefill)
        written = decode.written
        await asyncio.sleep(0.5)
        assert prefill.requests("/distserve/free_cache"), "the prefill's blocks were not freed"
        assert router.view.load.own == {"p0": 0, "d0": 0}
        assert decode.written <= written + 2, "the decode ran on after the client left"
        assert router.metrics.streams.get(("/v1/completions", "client_gone")) == 1
        assert router.metrics.client_disconnects.get(("/v1/completions",)) == 1


async def test_pipelined_streamed_requests_are_answered_in_order(etcd):
    """Streams the lane serves back to back on one connection: each ends (its last chunk) before the next starts,
    in order, each with its own request id and whole."""
    decode = StreamingStub(5)
    async with _lane_cluster(etcd, decode) as cluster:
        reader, writer = await asyncio.open_connection("127.0.0.1", cluster["router"].port)
        writer.write(b"".join(
            _request({"model": MODEL, "prompt": "x", "stream": True}).replace(
                b"Host: r\r\n", b"Host: r\r\nX-Request-Id: s-%d\r\n" % i)
            for i in range(10)
        ))
        for i in range(10):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"X-Request-Id: s-%d\r\n" % i in head, (i, head)
            body = await asyncio.wait_for(_read_chunked(reader), 10)
            assert body.count(b'"text": "') == 5 and body.endswith(b"data: [DONE]\n\n"), body
        writer.close()
