"""What the router puts on the wire to engines, checked at the receiving end.

The receiving end here is a wire stub that answers like an lmdeploy 0.17/0.18 engine does (including
its defects: no `remote_session_id`, a non-integer `id`), which cannot run on this machine (lmdeploy's
PyTorch engine needs CUDA). It records every request it gets: headers and raw bodies. The router is a
real process reading a real etcd.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
from aiohttp import web

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.cluster.keys import Keys
from distserve.cluster.records import EngineRecord
from tests.router.cluster import (
    MODEL,
    engine_record,
    link_record,
    publish_engine,
    publish_link,
    router_metric,
    set_flags,
    start_router,
)
from tests.util import free_port

TOKEN = "wire-token"


class WireStub:
    """An lmdeploy-like engine answering from canned bodies; `prefill_answer` is what a prefill returns."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object, bytes]] = []
        self.prefill_answer: dict = {}
        self.prefill_status = 200
        self.decode_status = 200
        self.linger_after_done = 0.0  # seconds a stream stays open after [DONE] (an engine ending late)
        self.before_prefill_answer = None  # async hook run after a prefill is computed, before answering
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append((request.path, request.headers.copy(), raw))
        if request.path == "/health":
            return web.json_response({})
        if request.path == "/distserve/free_cache":
            return web.json_response({"status": "SUCCESS"})
        body = json.loads(raw)
        if "preserve_cache" in body:
            if self.before_prefill_answer is not None:
                await self.before_prefill_answer()
            return web.json_response(self.prefill_answer, status=self.prefill_status)
        if self.decode_status != 200:
            return web.json_response(
                {"error": {"message": "decode broke", "type": "x", "code": "y"}}, status=self.decode_status
            )
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in ("a", "b"):
                await resp.write(b'data: {"choices": [{"index": 0, "text": "' + piece.encode() + b'"}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            await asyncio.sleep(self.linger_after_done)
            return resp
        return web.json_response(
            {
                "id": "x",
                "object": "text_completion",
                "choices": [{"index": 0, "text": "decoded", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3},
            }
        )

    def requests(self, path: str) -> list[tuple[dict, bytes]]:
        return [(h, b) for p, h, b in self.seen if p == path]


@pytest.fixture
async def wire(etcd):
    prefill, decode, hybrid = WireStub(), WireStub(), WireStub()
    for stub in (prefill, decode, hybrid):
        await stub.start()
    keys = Keys(f"w{uuid.uuid4().hex[:6]}")
    client = EtcdClient(EtcdConfig(endpoints=etcd.endpoints))
    await client.connect()
    p = engine_record("p0", prefill.url, "prefill")
    d = engine_record("d0", decode.url, "decode")
    await publish_engine(client, keys, p)
    await publish_engine(client, keys, d)
    link = link_record(p, d)
    link.protocol = "rdma"
    await publish_link(client, keys, link)
    await publish_engine(client, keys, engine_record("h0", hybrid.url, "hybrid", models=("hybrid-model",)))
    proc, url = await asyncio.to_thread(
        start_router, etcd.endpoints, "--cluster", keys.cluster, "--cluster-token", TOKEN
    )
    try:
        yield {
            "router": url,
            "prefill": prefill,
            "decode": decode,
            "hybrid": hybrid,
            "proc": proc,
            "client": client,
            "keys": keys,
        }
    finally:
        proc.stop()
        await client.close()
        for stub in (prefill, decode, hybrid):
            await stub.stop()


async def test_pd_prefill_and_decode_bodies_follow_the_protocol(wire):
    wire["prefill"].prefill_answer = {
        "id": "chatcmpl-abc",
        "remote_session_id": 41,
        "remote_token_ids": [7, 8],
        "cache_block_ids": [3, 4, 5],
        "choices": [],
    }
    client_raw = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, '
        b'"stream": true, "stream_options": {"include_usage": true}, "temperature": 0}' % MODEL.encode()
    )
    async with httpx.AsyncClient(base_url=wire["router"], timeout=10) as http:
        r = await http.post("/v1/chat/completions", content=client_raw, headers={"X-Request-Id": "rid-1"})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and '"text": "a"' in r.text
    [(ph, pb)] = wire["prefill"].requests("/v1/chat/completions")
    pre = json.loads(pb)
    assert pre["max_tokens"] == 1 and pre["max_completion_tokens"] == 1 and pre["stream"] is False
    assert pre["with_cache"] is True and pre["preserve_cache"] is True and "stream_options" not in pre
    assert pre["messages"] == [{"role": "user", "content": "hi"}] and pre["temperature"] == 0
    [(dh, db)] = wire["decode"].requests("/v1/chat/completions")
    assert db.startswith(client_raw[:-1]), "the client's bytes go to the decode unchanged"
    dec = json.loads(db)
    assert dec["migration_request"] == {
        "protocol": 2,
        "remote_engine_id": wire["prefill"].url,
        "remote_session_id": 41,
        "remote_token_id": 7,
        "remote_block_ids": [3, 4, 5],
        "is_dummy_prefill": False,
    }
    assert dec["max_tokens"] == 9 and dec["stream"] is True
    for headers in (ph, dh):
        assert headers["Authorization"] == f"Bearer {TOKEN}" and headers["X-Request-Id"] == "rid-1"
    assert r.headers["X-Request-Id"] == "rid-1"
    assert wire["prefill"].requests("/distserve/free_cache") == []  # the decode frees on success


@pytest.mark.parametrize(
    "staging,passed",
    [
        ({"offset": 4096, "length": 8192}, True),
        ({"offset": "4096", "length": 8192}, False),
        ({"offset": 4096, "length": 8192, "evil": 1}, False),
        ([4096, 8192], False),
    ],
)
async def test_a_packed_prefill_slot_reaches_the_decode_only_when_well_formed(wire, staging, passed):
    """remote_kv_staging (a distserve prefill's packed copy of the blocks) goes into the migration_request;
    anything malformed is dropped (the decode then reads the blocks), never passed on."""
    wire["prefill"].prefill_answer = {
        "remote_session_id": 9,
        "remote_token_ids": [7],
        "cache_block_ids": [6, 2],
        "remote_kv_staging": staging,
        "choices": [],
    }
    async with httpx.AsyncClient(base_url=wire["router"], timeout=10) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    [(_, db)] = wire["decode"].requests("/v1/completions")
    mig = json.loads(db)["migration_request"]
    assert mig["remote_block_ids"] == [6, 2]
    if passed:
        assert mig["remote_kv_staging"] == staging
    else:
        assert "remote_kv_staging" not in mig


@pytest.mark.parametrize("change", ["cordon", "unhealthy"])
async def test_prefill_leaving_service_mid_request_still_decodes(wire, change):
    """p0 is cordoned or marked unhealthy after computing the prefill: the request finishes on
    d0 (p0 still holds the KV), and the router has seen the change (p0 takes no NEW requests)."""
    router, client, keys = wire["router"], wire["client"], wire["keys"]
    wire["prefill"].prefill_answer = {
        "remote_session_id": 5,
        "remote_token_ids": [7],
        "cache_block_ids": [1],
        "choices": [],
    }
    p0 = EngineRecord.decode((await client.get(keys.engine("p0"))).value)

    async def leave_service() -> None:
        if change == "unhealthy":
            p0.state = "unhealthy"
            await publish_engine(client, keys, p0)
        else:
            await set_flags(client, keys, "p0", **{change: True})
        async with httpx.AsyncClient(base_url=router, timeout=5) as http:
            for _ in range(200):
                if (await http.get("/health/ready")).json().get("prefill") == 0:
                    return
                await asyncio.sleep(0.02)
        raise AssertionError("the router never saw p0 leave service")

    wire["prefill"].before_prefill_answer = leave_service
    async with httpx.AsyncClient(base_url=router, timeout=10) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "decoded", r.text
        wire["prefill"].before_prefill_answer = None
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_route"  # no NEW request on p0
    assert len(wire["decode"].requests("/v1/completions")) == 1
    assert wire["prefill"].requests("/distserve/free_cache") == []  # the decode frees on success


async def test_client_closing_right_after_done_is_a_completed_request(wire):
    """A client (the openai SDK does) may close its connection as soon as it has read [DONE], before the
    router ends the chunked stream: that is a completed request (200, the decode frees P's KV), not a
    client disconnect (499) followed by a redundant free_cache."""
    wire["prefill"].prefill_answer = {"remote_session_id": 6, "remote_token_ids": [7], "cache_block_ids": [1]}
    wire["decode"].linger_after_done = 0.3
    host, port = wire["router"].removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: closes-after-done\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    got = b""
    while b"data: [DONE]" not in got:
        piece = await asyncio.wait_for(reader.read(65536), 10)
        assert piece, got
        got += piece
    writer.close()
    assert got.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.6)  # the decode ends its stream; the router finishes the request
    router = wire["router"]
    assert router_metric(router, "distserve_router_client_disconnects_total") == 0, wire["proc"].output()[-3000:]
    assert router_metric(router, "distserve_router_requests_total", {"status": "200"}) == 1
    assert wire["prefill"].requests("/distserve/free_cache") == []
    assert "closes-after-done /v1/completions -> 200" in wire["proc"].output()


async def test_integer_id_is_the_fallback_and_no_session_id_fails_closed(wire):
    # lmdeploy answers without remote_session_id: an integer `id` is trusted as the session id
    wire["prefill"].prefill_answer = {"id": 12, "remote_token_ids": [5], "cache_block_ids": [1]}
    async with httpx.AsyncClient(base_url=wire["router"], timeout=10) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 200
        [(_, db)] = wire["decode"].requests("/v1/completions")
        assert json.loads(db)["migration_request"]["remote_session_id"] == 12
        # "-1" (the user's session id) or "chatcmpl-..." is never taken for P's session: 502, nothing freed
        for bad in ("-1", "chatcmpl-9"):
            wire["prefill"].prefill_answer = {"id": bad, "remote_token_ids": [5], "cache_block_ids": [1]}
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
            assert r.status_code == 502 and "remote_session_id" in r.json()["error"]["message"]
    assert len(wire["decode"].requests("/v1/completions")) == 1
    assert wire["prefill"].requests("/distserve/free_cache") == []
    assert router_metric(wire["router"], "distserve_router_prefill_session_id_missing_total") == 2


async def test_decode_failure_frees_the_prefill_session(wire):
    wire["prefill"].prefill_answer = {
        "id": "x",
        "remote_session_id": 77,
        "remote_token_ids": [5],
        "cache_block_ids": [1, 2],
    }
    wire["decode"].decode_status = 500
    async with httpx.AsyncClient(base_url=wire["router"], timeout=10) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    assert r.status_code == 502 and r.json()["error"]["code"] == "decode_failed"
    for _ in range(50):
        if wire["prefill"].requests("/distserve/free_cache"):
            break
        await asyncio.sleep(0.05)
    [(headers, body)] = wire["prefill"].requests("/distserve/free_cache")
    assert json.loads(body) == {"remote_engine_id": wire["prefill"].url, "remote_session_id": 77}
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    # a decode retry needs another decode linked to the same prefill: there is none here
    assert len(wire["decode"].requests("/v1/completions")) == 1


async def test_hybrid_gets_the_client_bytes_untouched(wire):
    raw = b'{"model":"hybrid-model","prompt":"p","x_vendor":{"k":[1,2]},"max_tokens":3}'
    async with httpx.AsyncClient(base_url=wire["router"], timeout=10) as http:
        r = await http.post("/v1/completions", content=raw)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "decoded"
    [(headers, body)] = wire["hybrid"].requests("/v1/completions")
    assert body == raw and headers["Authorization"] == f"Bearer {TOKEN}"
    assert len(headers["X-Request-Id"]) == 32


async def test_prefill_failing_before_output_is_retried_on_another_prefill(etcd):
    broken, healthy, decode = WireStub(), WireStub(), WireStub()
    for stub in (broken, healthy, decode):
        await stub.start()
    answer = {"id": "x", "remote_session_id": 5, "remote_token_ids": [1], "cache_block_ids": [0]}
    broken.prefill_answer, broken.prefill_status = {"error": {"message": "engine crashed"}}, 500
    healthy.prefill_answer = answer
    keys = Keys(f"w{uuid.uuid4().hex[:6]}")
    client = EtcdClient(EtcdConfig(endpoints=etcd.endpoints))
    await client.connect()
    d = engine_record("d0", decode.url, "decode")
    await publish_engine(client, keys, d)
    for name, stub in (("p-broken", broken), ("p-healthy", healthy)):
        p = engine_record(name, stub.url, "prefill")
        await publish_engine(client, keys, p)
        await publish_link(client, keys, link_record(p, d))
    proc, url = await asyncio.to_thread(
        start_router, etcd.endpoints, "--cluster", keys.cluster, "--strategy", "round_robin"
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(4):
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "decoded"
        failed = len(broken.requests("/v1/completions"))
        assert failed >= 1  # round robin sends it first tries
        assert len(healthy.requests("/v1/completions")) == 4
        assert router_metric(url, "distserve_router_retries_total", {"phase": "prefill"}) == failed
        assert (
            router_metric(
                url, "distserve_router_upstream_errors_total", {"phase": "prefill", "kind": "status"}
            )
            == failed
        )
        # a 5xx is not a refused connection: no breaker (the engine may answer the next one)
        assert router_metric(url, "distserve_router_breaker_open") == 0
    finally:
        proc.stop()
        await client.close()
        for stub in (broken, healthy, decode):
            await stub.stop()


async def test_client_gone_while_the_prefill_runs_frees_its_sessions_once_it_answers(wire):
    """The prefill engine preserves KV for a request whose client has gone: the router reads the late
    answer in the background and frees that session (not stranded until the TTL); no decode is called."""
    prefill = wire["prefill"]
    prefill.prefill_answer = {"id": "x", "remote_session_id": 91, "remote_token_ids": [5], "cache_block_ids": [1]}

    async def slow() -> None:
        await asyncio.sleep(0.6)

    prefill.before_prefill_answer = slow
    async with httpx.AsyncClient(base_url=wire["router"], timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert not prefill.requests("/distserve/free_cache"), "freed before the prefill even answered"
    for _ in range(60):
        if prefill.requests("/distserve/free_cache"):
            break
        await asyncio.sleep(0.05)
    [(_headers, body)] = prefill.requests("/distserve/free_cache")
    assert json.loads(body) == {"remote_engine_id": prefill.url, "remote_session_id": 91}
    assert not wire["decode"].requests("/v1/completions")
