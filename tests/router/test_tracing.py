"""OpenTelemetry tracing end to end: a router and two engines (prefill, decode) as OS processes, exporting
with the real OTLP/HTTP exporter to a receiver here that decodes the official protobuf.

One PD request through the router must be one trace across the three processes, with the parent links
the W3C `traceparent` header carries (router request -> prefill/decode calls -> engine server spans ->
prefill / kv migration / decode / free_cache), and a prefill retried on another engine must show both
attempts.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import defaultdict

import openai
import pytest
from aiohttp import web

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from discovery.client import EtcdClient  # noqa: E402
from discovery.config import EtcdConfig  # noqa: E402
from discovery.embedded import EmbeddedEtcd  # noqa: E402
from distserve.cluster.keys import Keys  # noqa: E402
from tests.router.cluster import (MODEL, engine_record, etcd_client, geometry_of, handshake, http_json,  # noqa: E402
                                  link_record, publish_engine, publish_link, publish_pd, router_metric,
                                  start_router)
from tests.util import Proc, free_port, spawn_engine  # noqa: E402

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver on loopback, on its own thread (the test's calls block)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("OTLP receiver did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        got = []
        for rs in msg.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append({
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "attributes": {a.key: _value(a.value) for a in s.attributes},
                        "events": [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in s.events],
                        "error": s.status.code == 2,  # STATUS_CODE_ERROR
                    })
        with self.lock:
            self.spans.extend(got)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait_for(self, trace_id: str, names: set[tuple[str, str]], timeout: float = 20.0) -> list[dict]:
        """The trace's spans once every (service, span name) in `names` has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.trace(trace_id)
            if names <= {(s["service"], s["name"]) for s in spans}:
                return spans
            if time.monotonic() > deadline:
                have = sorted({(s["service"], s["name"]) for s in spans})
                raise AssertionError(f"missing {sorted(names - set(have))}; the trace has {have}")
            time.sleep(0.05)


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def otel_env(receiver: Receiver, service: str) -> dict:
    return {
        "OTEL_SERVICE_NAME": service,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def start_engine(role: str, env: dict) -> tuple[Proc, str]:
    return spawn_engine(role, None, null=True, log_level="INFO", env=env, name=f"traced-{role}")


@pytest.fixture(scope="module")
def traced():
    receiver = Receiver()
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    procs: list[Proc] = []
    try:
        pp, prefill = start_engine("prefill", otel_env(receiver, "test-prefill"))
        procs.append(pp)
        dp, decode = start_engine("decode", otel_env(receiver, "test-decode"))
        procs.append(dp)
        handshake(prefill, decode)
        cluster = f"tr{uuid.uuid4().hex[:6]}"
        geometry = geometry_of(prefill)

        async def publish() -> dict:
            async with etcd_client(etcd.endpoints) as client:
                farm = {"prefills": [prefill], "decodes": [decode], "geometry": geometry}
                return await publish_pd(client, Keys(cluster), farm)

        recs = asyncio.run(publish())
        p_rec, d_rec = recs["p0"], recs["d0"]
        rp, router = start_router(etcd.endpoints, "--cluster", cluster, env=otel_env(receiver, "test-router"))
        procs.append(rp)
        yield {"receiver": receiver, "etcd": etcd, "cluster": cluster, "router": router, "prefill": prefill,
               "decode": decode, "p_rec": p_rec, "d_rec": d_rec, "geometry": geometry, "procs": procs}
    finally:
        for p in procs:
            p.stop()  # SIGTERM: each process flushes its queued spans on the way out
        etcd.stop()
        receiver.stop()


def _one(spans: list[dict], service: str, name: str) -> dict:
    found = [s for s in spans if s["service"] == service and s["name"] == name]
    assert len(found) == 1, (service, name, [(s["service"], s["name"]) for s in spans])
    return found[0]


def test_one_pd_request_is_one_trace_across_router_prefill_and_decode(traced):
    rx: Receiver = traced["receiver"]
    client = openai.OpenAI(base_url=f"{traced['router']}/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.completions.create(
        model=MODEL, prompt="tracing across three processes", max_tokens=8, stream=True,
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text
    spans = rx.wait_for(CLIENT_TRACE, {
        ("test-router", "POST /v1/completions"), ("test-router", "prefill call"), ("test-router", "decode call"),
        ("test-prefill", "POST /v1/completions"), ("test-prefill", "prefill"),
        ("test-decode", "POST /v1/completions"), ("test-decode", "kv migration"), ("test-decode", "decode"),
        ("test-decode", "free_cache call"), ("test-prefill", "POST /distserve/free_cache"),
    })
    assert {s["service"] for s in spans} == {"test-router", "test-prefill", "test-decode"}
    request = _one(spans, "test-router", "POST /v1/completions")
    assert request["parent"] == CLIENT_SPAN  # the client's traceparent was honoured
    assert request["attributes"]["http.response.status_code"] == 200
    assert request["attributes"]["distserve.engines"] == "p0>d0"
    pre_call = _one(spans, "test-router", "prefill call")
    dec_call = _one(spans, "test-router", "decode call")
    assert pre_call["parent"] == dec_call["parent"] == request["span_id"]
    assert pre_call["attributes"]["distserve.engine.id"] == "p0"
    assert dec_call["attributes"]["distserve.engine.id"] == "d0"
    assert "first_token" in [name for name, _ in dec_call["events"]]
    # each engine's server span is a child of the router's call to it
    pre_server = _one(spans, "test-prefill", "POST /v1/completions")
    dec_server = _one(spans, "test-decode", "POST /v1/completions")
    assert pre_server["parent"] == pre_call["span_id"]
    assert dec_server["parent"] == dec_call["span_id"]
    assert pre_server["attributes"]["distserve.engine.role"] == "prefill"
    assert _one(spans, "test-prefill", "prefill")["parent"] == pre_server["span_id"]
    migration = _one(spans, "test-decode", "kv migration")
    assert migration["parent"] == dec_server["span_id"]
    attrs = migration["attributes"]
    assert attrs["distserve.migration.bytes"] > 0 and attrs["distserve.migration.reads"] >= 1
    assert attrs["distserve.migration.transport"] == "null"
    assert attrs["distserve.migration.remote_engine_id"] == traced["prefill"]
    decode = _one(spans, "test-decode", "decode")
    assert decode["parent"] == dec_server["span_id"] and decode["attributes"]["distserve.completion_tokens"] > 0
    # the decode frees the prefill's blocks: its call and the prefill's handling are in the same trace
    free_call = _one(spans, "test-decode", "free_cache call")
    assert free_call["parent"] == dec_server["span_id"]
    assert _one(spans, "test-prefill", "POST /distserve/free_cache")["parent"] == free_call["span_id"]
    assert not any(s["error"] for s in spans)


def test_a_retried_prefill_shows_both_attempts_with_engine_ids(traced):
    """A second prefill whose port is closed: a request that picks it first is retried on p0."""
    rx: Receiver = traced["receiver"]
    dead = engine_record("p-dead", "http://127.0.0.1:1", "prefill", geometry=traced["geometry"])

    async def publish() -> None:
        client = EtcdClient(EtcdConfig(endpoints=traced["etcd"].endpoints, timeout=5.0))
        await client.connect()
        try:
            keys = Keys(traced["cluster"])
            await publish_engine(client, keys, dead)
            await publish_link(client, keys, link_record(dead, traced["d_rec"]))
        finally:
            await client.close()

    asyncio.run(publish())
    router = traced["router"]
    deadline = time.monotonic() + 10
    while http_json(f"{router}/health/ready").get("prefill") != 2:
        assert time.monotonic() < deadline, "the router never saw the second prefill"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=30)
    retried = None
    for _ in range(40):  # the pick is the strategy's: until one request tried p-dead first
        before = router_metric(router, "distserve_router_retries_total")
        trace_id = os.urandom(16).hex()
        out = client.completions.create(model=MODEL, prompt="retry me", max_tokens=4,
                                        extra_headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
        assert out.choices[0].text
        if router_metric(router, "distserve_router_retries_total") > before:
            retried = trace_id
            break
    assert retried, "no request picked the closed prefill first"
    spans = rx.wait_for(retried, {("test-router", "POST /v1/completions"), ("test-router", "decode call"),
                                  ("test-prefill", "POST /v1/completions")})
    calls = [s for s in spans if s["service"] == "test-router" and s["name"] == "prefill call"]
    by_engine = defaultdict(list)
    for s in calls:
        by_engine[s["attributes"]["distserve.engine.id"]].append(s)
    assert sorted(by_engine) == ["p-dead", "p0"] and len(calls) == 2
    failed, ok = by_engine["p-dead"][0], by_engine["p0"][0]
    assert failed["error"] and not ok["error"]
    assert ("error", "p-dead") in [(n, a.get("distserve.engine.id")) for n, a in failed["events"]]
    request = _one(spans, "test-router", "POST /v1/completions")
    assert failed["parent"] == ok["parent"] == request["span_id"]
    retry = [a for n, a in request["events"] if n == "retry"]
    assert retry and retry[0]["distserve.engine.id"] == "p-dead" and retry[0]["error.type"] == "connect"
    # only the second attempt reached an engine
    assert _one(spans, "test-prefill", "POST /v1/completions")["parent"] == ok["span_id"]
