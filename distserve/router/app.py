"""The router replica: aiohttp server, client-facing handlers, lifecycle.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /health/ready,
GET /metrics. Anything else (engine control routes such as /distserve/* included) is a JSON 404 (405 for
a known path with the wrong method). No middleware: auth, request id and accounting are inline, the hot
path stays a handful of function calls.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web

from distserve import __version__, tracing
from distserve.cluster.keys import Keys, sanitize_id
from distserve.cluster.records import RoutingConfig
from distserve.router.breaker import CircuitBreakers
from distserve.router.errors import ApiError
from distserve.router.fastpath import FastConnection, FastDoor
from distserve.router.http1 import EnginePool
from distserve.router.inbound import GuardedSite, ReadGuards, answer_and_close, read_body
from distserve.router.kv_index import KvIndex
from distserve.router.load import LoadTracker
from distserve.router.metrics import RouterMetrics
from distserve.router.orchestrator import Orchestrator, Routing
from distserve.router.request import PDRequest, Unary
from distserve.router.registration import Registration
from distserve.router.settings import RouterSettings
from distserve.router.strategies import make_strategy
from distserve.router.unary import UnaryExchange
from distserve.router.validation import CHAT, COMPLETIONS, parse_json_object, validate_request
from distserve.router.view import ClusterView, ConfigStatus

log = logging.getLogger("distserve.router")

# how often the hot path's metric records are counted in (metrics.py): at 10,000 requests/s, ~70,000 list items
METRICS_FOLD_INTERVAL = 1.0

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class _RequestIds:
    """Ids for requests that bring none: a random per-process prefix and a counter (32 hex digits, as
    before). Unique across routers and restarts without a getrandom syscall per request."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)  # a forked child must not repeat its parent's ids

    def renew(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def new(self) -> str:
        return "%s%016x" % (self.prefix, next(self.counter))


_new_request_id = _RequestIds().new
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,4096}$")
ROUTES = {
    "/v1/completions": "POST",
    "/v1/chat/completions": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/health/ready": "GET",
    "/metrics": "GET",
}


class Router:
    def __init__(self, settings: RouterSettings, etcd_client, *, reuse_port: bool = False) -> None:
        self.settings = s = settings
        self.reuse_port = reuse_port  # a worker of `router --workers N`: the port is shared (SO_REUSEPORT)
        self.etcd = etcd_client
        self.keys = Keys(s.cluster)
        self.metrics = RouterMetrics()
        self.router_id = sanitize_id(s.router_id or f"{socket.gethostname()}-{s.port}")
        self._api_keys = [k.encode() for k in s.api_keys if k]
        auth = b""
        if s.cluster_token:
            if not _HEADER_SAFE.match(s.cluster_token):
                raise ValueError("the cluster token must be printable ASCII without spaces")
            auth = b"Authorization: Bearer " + s.cluster_token.encode() + b"\r\n"
        self._engine_headers = b"Content-Type: application/json\r\n" + auth
        self._pool: EnginePool | None = None
        self.load = LoadTracker()
        self.breakers = CircuitBreakers(
            self._get_pool,
            auth,
            s.breaker_probe_interval,
            s.breaker_probe_max_interval,
            on_change=lambda: self.view.invalidate(),
        )
        self.view = ClusterView(
            etcd_client, self.keys, self.breakers, self.load, self.metrics, self._on_config
        )
        # where engines' KV lives (kv_aware only: followed while that strategy is in force)
        self.kv = KvIndex(self.view.cache, s.cluster_token, self.metrics, sync_timeout=s.sync_timeout)
        self._routing = self._make_routing(None)
        self.kv.set_active(self._routing.kv is not None)
        self.config_status = ConfigStatus()
        self.orchestrator = Orchestrator(
            s,
            self.view,
            self.metrics,
            self._get_pool,
            lambda: self._routing,
            self.spawn,
            self._engine_headers,
        )
        self._tasks: set[asyncio.Task] = set()
        self.in_flight = 0
        self.requests_total = 0
        self._runner: web.AppRunner | None = None
        self._registration = None
        self.url = s.advertise_url
        self._closing = False  # new requests get 503 (after the drain delay)
        self._draining = False  # stopping: not ready, still serving
        # every handler tells its connection's read guard (inbound.py) when a request is in progress
        self._guards = ReadGuards(s.header_read_timeout, self._read_timed_out)
        self.metrics.in_flight.callback = lambda: {(): self.in_flight}
        self.metrics.view_revision.callback = lambda: {(): self.view.revision}

    # ------------------------------------------------------------------ routing config (hot reload)
    def _make_routing(self, config: RoutingConfig | None) -> Routing:
        name = config.strategy if config else self.settings.strategy
        entry = make_strategy(name, config.strategy_params() if config else None)
        kv = None
        if entry.needs_kv:  # kv_aware: the decode too is picked by what it holds, with the same params
            decode = make_strategy(name, config.strategy_params() if config else None)
            decode.phase = "decode"
            for strategy in (entry, decode):
                strategy.on_pick = self._kv_picked
            kv = self.kv
        else:
            # the prefix cache lives on the prefill: decodes are balanced by expected latency under prefix
            # affinity
            decode = make_strategy("min_expected_latency" if name == "prefix_affinity" else name)  # no params
        weights = dict(config.weights) if config else {}
        params = dict(config.params) if config else {}
        self.metrics.strategy.values = {(name,): 1}
        return Routing(entry, decode, weights, params, kv)

    def _kv_picked(self, phase: str, basis: str, matched: int) -> None:
        self.metrics.kv_picks.inc((phase, basis))
        if matched:
            self.metrics.kv_matched_tokens.inc((phase,), matched)

    def _on_config(self, config: RoutingConfig | None, error: str | None = None, revision: int = 0) -> None:
        """A new config/routing value (None: deleted, the defaults). One that fails the schema (`error`) or
        whose strategy cannot be built keeps the routing in force; the router says so once per revision in
        its log, in distserve_router_routing_config_invalid and in /health/ready's body, and keeps routing."""
        if error is None:
            try:
                routing = self._make_routing(config)
            except Exception as exc:  # noqa: BLE001 - defence in depth: never lose the routing in force
                name = config.strategy if config else self.settings.strategy
                error = f"strategy {name} could not be built: {exc}"
        if error is not None:
            status = self.config_status
            if revision != status.revision or status.valid:
                log.error("routing config at revision %d is invalid, keeping the %s: %s", revision,
                          f"config of revision {status.applied_revision}" if status.applied_revision
                          else "defaults", error[:500])
            self.config_status = ConfigStatus(False, error[:500], revision, status.applied_revision)
            self.metrics.routing_config_invalid.set(1)
            return
        self._routing = routing
        self.kv.set_active(routing.kv is not None)
        self.config_status = ConfigStatus(True, None, revision, revision)
        self.metrics.routing_config_invalid.set(0)
        self.metrics.config_reloads.inc()
        log.info(
            "routing: strategy %s, %d weights, params %s",
            routing.entry.name,
            len(routing.weights),
            routing.params,
        )

    @property
    def strategy_name(self) -> str:
        return self._routing.entry.name

    # ------------------------------------------------------------------ owned background tasks
    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _get_pool(self) -> EnginePool:
        if self._pool is None:  # needs the running loop
            self._pool = EnginePool(self.settings.connect_timeout, self.settings.connects_per_engine)
        return self._pool

    # ------------------------------------------------------------------ lifecycle
    def _read_timed_out(self, phase: str) -> None:
        self.metrics.client_read_timeouts.inc((phase,))

    async def start(self) -> None:
        """Serve: the app's cleanup contexts start tracing, the engine pool and the view (see create_app);
        then the listener, then the router's record in etcd (it needs the bound port)."""
        s = self.settings
        # auto_decompress off: read_body decodes gzip/deflate itself, bounded, with OpenAI-style errors
        self._runner = web.AppRunner(
            create_app(self), handler_cancellation=True, access_log=None, auto_decompress=False
        )
        await self._runner.setup()
        site = GuardedSite(
            self._runner, self._guards, s.host, s.port, backlog=2048, reuse_port=self.reuse_port,
            fast=lambda make_inner: FastDoor(
                self.serve_fast, make_inner, s.max_body_bytes, s.header_read_timeout, s.body_read_timeout,
                self._read_timed_out, lambda reason: self.metrics.handed_over.inc((reason,)),
                serve_now=self.serve_now,
            ),
        )
        await site.start()
        port = s.port
        for addr in self._runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                port = addr[1]
                break
        self.port = port
        if not self.url:
            host = s.host if s.host not in ("0.0.0.0", "::", "") else socket.gethostname()
            self.url = f"http://{host}:{port}"
        self._registration = Registration(
            self.etcd,
            self.keys,
            self.router_id,
            self.url,
            __version__,
            s.lease_ttl,
            s.record_refresh_interval,
            self._counters,
        )
        try:
            await self._registration.start()
        except Exception as exc:  # noqa: BLE001 - visibility only; serving does not depend on it
            log.warning("could not register under routers/: %s", exc)

    async def stop(self) -> None:
        """Graceful stop: not ready, the record under routers/ removed, new requests still served for
        drain_delay, then refused (503), requests in flight given up to shutdown_grace; then the runner's cleanup closes the listener and
        runs the cleanup contexts in reverse (owned tasks, breakers, view, pool, tracing)."""
        self._draining = True  # not ready: load balancers polling /health/ready stop sending here
        await self._deregister()
        if self.settings.drain_delay:  # still serving meanwhile: a client sent here before it noticed succeeds
            await asyncio.sleep(self.settings.drain_delay)
        self._closing = True
        deadline = time.monotonic() + self.settings.shutdown_grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _deregister(self) -> None:
        registration, self._registration = self._registration, None
        if registration is not None:
            await registration.close()

    # ------------------------------------------------------------------ cleanup contexts (create_app)
    async def _tracing_ctx(self, app: web.Application):
        tracing.init("distserve-router", {"service.instance.id": self.router_id})
        yield
        await tracing.shutdown()  # flushes the spans still queued

    async def _pool_ctx(self, app: web.Application):
        pool = self._get_pool()
        yield
        pool.close()

    async def _view_ctx(self, app: web.Application):
        s = self.settings
        await self.view.start()
        try:
            if not await self.view.wait_synced(s.sync_timeout):
                log.warning(
                    "view not synced with etcd after %.1fs: serving, not ready until it is", s.sync_timeout
                )
                self.spawn(self._wait_sync_forever())
        except BaseException:
            await self.view.stop()
            raise
        yield
        await self.view.stop()

    async def _kv_ctx(self, app: web.Application):
        """The cache index (kv_aware): its streams start once the view has its engines; a replica is not ready
        until every streaming engine sent its snapshot or sync_timeout passed (KvIndex.ready)."""
        self.kv.start()  # not awaited: serving starts at once, /health/ready says when the index is in
        yield
        await self.kv.close()

    async def _breakers_ctx(self, app: web.Application):
        yield
        await self.breakers.close()

    async def _tasks_ctx(self, app: web.Application):
        yield
        # let pending free_cache calls finish (they are bounded by free_cache_timeout)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.free_cache_timeout)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _metrics_ctx(self, app: web.Application):
        """Counts in what the hot path recorded (metrics.py: list appends) once a second, so its lists stay short
        whether or not anything scrapes /metrics."""

        async def fold_every_second() -> None:
            while True:
                await asyncio.sleep(METRICS_FOLD_INTERVAL)
                self.metrics.fold()

        task = asyncio.get_running_loop().create_task(fold_every_second())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _registration_ctx(self, app: web.Application):
        yield
        await self._deregister()  # stop() did already, unless the app is cleaned up without it

    async def _wait_sync_forever(self) -> None:
        while not await self.view.wait_synced(30):
            log.warning("view still not synced with etcd")

    def _counters(self) -> tuple[str, int, int, int]:
        return self.strategy_name, self.view.revision, self.requests_total, self.in_flight

    # ------------------------------------------------------------------ helpers
    def _authorized(self, headers) -> bool:
        if not self._api_keys:
            return True
        scheme, _, given = headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 7235)
            return False
        given = given.strip().encode()
        ok = False
        for key in self._api_keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    def _auth_error(self) -> ApiError:
        return ApiError(
            401,
            "missing or invalid API key (send Authorization: Bearer <key>)",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @staticmethod
    def _request_id(headers) -> str:
        rid = headers.get("X-Request-Id")
        if rid and _REQUEST_ID.match(rid):
            return rid
        return _new_request_id()

    async def _read_body(self, request: web.Request) -> bytes:
        s = self.settings
        return await read_body(request, s.max_body_bytes, s.body_read_timeout, self._read_timed_out)

    # ------------------------------------------------------------------ handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS, "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT, "/v1/chat/completions")

    async def _generate(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        """The aiohttp route of both generation endpoints (requests the fast path handed over)."""
        pd = PDRequest(request, kind, path, self._request_id(request.headers), time.perf_counter())
        resp, close = await self.serve_generate(pd, None)
        if type(resp) is Unary:
            resp = resp.to_aiohttp()
        if close:  # a body that is not coming: answer and close, do not wait for the rest
            await answer_and_close(request, resp)
        return resp

    def serve_fast(self, conn: FastConnection, kind: str, path: str, headers,
                   body: bytes | None) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        """The fast path's handler (fastpath.py): the same request handling (serve_generate's coroutine, to
        await; the connection writes a whole answer itself)."""
        pd = PDRequest(conn, kind, path, self._request_id(headers), time.perf_counter())
        pd.new_stream = conn.new_stream
        return self.serve_generate(pd, body, conn.read_body)

    def serve_now(self, conn: FastConnection, kind: str, path: str, headers, raw: bytes) -> bool:
        """The fast path's handler of a whole request (FastDoor.serve_now), without a task: a PD request (one
        choice, streamed or not) through the lane (distserve/router/unary.py), an error answered at once,
        anything else handed to serve_generate's coroutine in the connection's task. False (tracing on):
        serve_fast's."""
        if tracing.ENABLED:  # spans follow the request's task context: the coroutine path
            return False
        pd = PDRequest(conn, kind, path, self._request_id(headers), time.perf_counter())
        pd.new_stream = conn.new_stream
        try:
            self._admit(headers, False)
            self._parse(pd, raw)
            candidates = self.orchestrator.lane_entries(pd)
        except ApiError as exc:
            self.in_flight += 1
            self.requests_total += 1
            self._answer_now(pd, exc, True)
            return True
        if candidates is None:
            conn.run(self.serve_generate(pd, raw, admitted=True))
            return True
        self.in_flight += 1
        self.requests_total += 1
        exchange = UnaryExchange(self.orchestrator, pd, self._lane_done, self._lane_resume, self._lane_gone)
        conn.task = exchange  # the client leaving cancels it, as it would the request's task
        exchange.start(candidates)
        return True

    def _answer_now(self, pd: PDRequest, exc: ApiError, within_next: bool) -> None:
        if exc.status >= 500:
            log.warning("request %s %s -> %d %s", pd.rid, pd.path, exc.status, exc.message)
        self._account(pd, exc.status)
        pd.request.answered_now(exc.response(pd.rid), exc.close, within_next)

    def _lane_done(self, exchange: UnaryExchange, answer, status: int, close: bool) -> None:
        pd = exchange.pd
        if answer is None:  # a stream, written already (its first byte counted when it went out)
            self._account(pd, status)
            pd.request.stream_ended(close)
            return
        self._account(pd, status, status == 200)  # a non-streamed answer: its first byte comes with all of it
        pd.request.answered_now(answer, close, False)

    def _lane_resume(self, exchange: UnaryExchange, rest: Callable[[], Coroutine]) -> asyncio.Task:
        conn = exchange.pd.request
        return conn.loop.create_task(conn._serve(self._resumed(exchange, rest)))

    async def _resumed(self, exchange: UnaryExchange, rest: Callable[[], Coroutine]) -> tuple:
        exchange.started()
        exchange.pd.request.task = asyncio.current_task()
        return await self.serve_generate(exchange.pd, exchange.pd.raw, resume=rest)

    def _lane_gone(self, exchange: UnaryExchange) -> None:
        pd = exchange.pd
        pd.request.task = None
        self.metrics.client_disconnects.inc((pd.path,))
        log.debug("request %s: client went away", pd.rid)
        self._account(pd, 499)

    def _admit(self, headers, counted: bool) -> None:
        """Who may send a request now: the API key, the router not stopping, the in-flight limit (`counted`:
        this request is among those in flight already)."""
        if not self._authorized(headers):
            raise self._auth_error()
        if self._closing:
            raise ApiError(503, "the router is shutting down", "shutting_down")
        limit = self.settings.max_in_flight
        if limit and self.in_flight + (0 if counted else 1) > limit:
            raise ApiError(
                429,
                f"too many requests in flight on this router (limit {limit})",
                "rate_limited",
                headers={"Retry-After": "1"},
            )

    @staticmethod
    def _parse(pd: PDRequest, raw: bytes) -> None:
        pd.raw = raw
        pd.body = body = parse_json_object(raw)
        pd.model = validate_request(pd.kind, body)

    async def serve_generate(
        self, pd: PDRequest, raw: bytes | None, read: Callable[[], Awaitable[bytes]] | None = None,
        admitted: bool = False, resume: Callable[[], Coroutine] | None = None,
    ) -> tuple[web.StreamResponse, bool]:
        """One generation request, whichever server path read it: (the answer, whether the connection must
        close after it). `raw`: the body when already read, else `read()` it (by default from the aiohttp
        request, `pd.request`). `admitted`: admitted and parsed already (serve_now). `resume`: the rest of a
        request the unary lane started (counted and admitted there), its coroutine made by `resume()`."""
        rid, path, started, headers = pd.rid, pd.path, pd.started, pd.request.headers
        if resume is None:
            self.in_flight += 1
            self.requests_total += 1
        status = 500
        prepared = False
        span = token = None
        if tracing.ENABLED:  # off: nothing else of tracing on this path (the pass-through is in generate)
            span = tracing.start_server_span(
                "POST " + path,
                headers,
                {"http.request.method": "POST", "url.path": path, "distserve.request_id": rid},
            )
            token = tracing.activate(span)
            pd.span = span
        try:
            if resume is not None:
                work = resume()
            else:
                if not admitted:
                    self._admit(headers, True)
                    if raw is None:
                        raw = await (read() if read is not None else self._read_body(pd.request))
                    self._parse(pd, raw)
                work = self.orchestrator.generate(pd)
            resp = await work
            status = resp.status
            prepared = resp.prepared
            if not prepared:  # a non-streamed answer: its first byte comes with all of it
                self.metrics.ttft.observe(time.perf_counter() - started, (path,))
            return resp, False
        except ApiError as exc:
            status = exc.status
            if exc.status >= 500:
                log.warning("request %s %s -> %d %s", rid, path, exc.status, exc.message)
            return exc.response(rid), exc.close
        except (asyncio.CancelledError, ConnectionResetError):
            if pd.answered:  # closed after reading [DONE]: the request completed
                status = 200
                raise
            status = 499  # the client went away (nginx's convention); upstream work was cancelled
            self.metrics.client_disconnects.inc((path,))
            log.debug("request %s: client went away", rid, exc_info=True)
            raise
        except Exception:
            log.exception("request %s %s: unexpected error", rid, path)
            status = 500
            if prepared or pd.outcome:  # a stream's 200 is out: nothing else can be answered
                raise
            return ApiError(500, "internal router error", "internal_error").response(rid), False
        finally:
            if span is not None:
                tracing.deactivate(token)
                span.set_attribute("distserve.engines", pd.engines or "-")
                if pd.model is not None:
                    span.set_attribute("gen_ai.request.model", pd.model)
                tracing.end(span, status)
            self._account(pd, status)

    def _account(self, pd: PDRequest, status: int, first_byte_now: bool = False) -> None:
        """A request's end, whichever path served it: in flight no more, its metrics and access-log line
        (`first_byte_now`: its answer's first byte goes out now, its time to first byte is its latency)."""
        self.in_flight -= 1
        path = pd.path
        elapsed = time.perf_counter() - pd.started
        metrics = self.metrics
        metrics.requests.add((path, status))
        observe_latency, observe_ttft = metrics.by_route.get(path) or metrics.route_observers(path)
        observe_latency(elapsed)
        if first_byte_now:
            observe_ttft(elapsed)
        # a streamed answer's 200 goes out with its first byte: say how the stream really ended
        stream = pd.outcome
        if stream is not None:
            if stream == "started":  # ended by an exception (the orchestrator records the rest)
                stream = "completed" if status == 200 else "client_gone" if status == 499 else "router_error"
            self.metrics.streams.inc((path, stream))
        if log.isEnabledFor(logging.INFO):
            log.info(
                "request %s %s -> %s%s in %.1f ms via %s",
                pd.rid,
                path,
                status,
                f" stream={stream}" if stream is not None else "",
                elapsed * 1000,
                pd.engines or "-",
            )

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request.headers):
            return self._auth_error().response()
        created = int(time.time())
        data = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": "distserve",
                "root": m,
                "parent": None,
                "permission": [],
            }
            for m in self.view.table().topology.models()
        ]
        self.metrics.requests.inc(("/v1/models", 200))
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: OpenAI's model object, or an OpenAI-style 404 for a model no engine serves."""
        if not self._authorized(request.headers):
            return self._auth_error().response()
        model_id = request.match_info["model_id"]
        if model_id not in self.view.table().topology.models():
            self.metrics.requests.inc(("/v1/models/{id}", 404))
            return ApiError(404, f"The model `{model_id}` does not exist", "model_not_found", "model").response()
        self.metrics.requests.inc(("/v1/models/{id}", 200))
        return web.Response(
            body=orjson.dumps({"id": model_id, "object": "model", "created": int(time.time()),
                               "owned_by": "distserve", "root": model_id, "parent": None, "permission": []}),
            content_type="application/json",
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def ready(self, request: web.Request) -> web.Response:
        if self._draining:  # taken out of load balancers first, while requests in flight finish
            return ApiError(503, "the router is shutting down", "shutting_down").response()
        if not self.view.synced.is_set():
            return ApiError(503, "not ready: the view is not synced with etcd yet", "not_synced").response()
        if not self.kv.ready:
            return ApiError(
                503, "not ready: the engines' cache snapshots are not all in yet (kv_aware)", "kv_not_synced"
            ).response()
        table = self.view.table()
        if not table.has_path:
            return ApiError(
                503, "not ready: no routable prefill->decode path or hybrid engine", "no_route"
            ).response()
        topo = table.topology
        return web.Response(
            body=orjson.dumps(
                {
                    "status": "ready",
                    "prefill": len(topo.routable_prefills),
                    "decode": len(topo.routable_decodes),
                    "hybrid": len(topo.routable_hybrids),
                    "models": sorted(table.entries),
                    "revision": self.view.revision,
                    "strategy": self.strategy_name,
                    # ready still (it routes): an invalid stored config shows here, not as a 503
                    "routing_config": self.config_status.as_dict(),
                }
            ),
            content_type="application/json",
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        if not self._authorized(request.headers):
            return self._auth_error().response()
        self.view.table()  # refresh the topology gauges
        return web.Response(
            body=self.metrics.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Prometheus-Format": "0.0.4"},
        )

    async def not_found(self, request: web.Request) -> web.Response:
        allowed = ROUTES.get(request.path)
        if allowed:
            return ApiError(
                405,
                f"{request.method} is not allowed on {request.path} (use {allowed})",
                "method_not_allowed",
                headers={"Allow": allowed},
            ).response()
        return ApiError(404, f"no route {request.method} {request.path}", "not_found").response()


ROUTER_KEY = web.AppKey("router", Router)


def create_app(router: Router) -> web.Application:
    """The router's aiohttp app: its routes, and its resources as cleanup contexts (started in this order
    by the runner's setup, stopped in reverse by its cleanup)."""
    g = router._guards.wrap
    app = web.Application(client_max_size=router.settings.max_body_bytes)
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/completions", g(router.completions))
    app.router.add_post("/v1/chat/completions", g(router.chat_completions))
    app.router.add_get("/v1/models", g(router.models))
    app.router.add_get("/v1/models/{model_id:.+}", g(router.model))
    app.router.add_get("/health", g(router.health))
    app.router.add_get("/health/ready", g(router.ready))
    app.router.add_get("/metrics", g(router.prometheus))
    app.router.add_route("*", "/{tail:.*}", g(router.not_found))
    app.cleanup_ctx.extend(
        (
            router._tracing_ctx,
            router._pool_ctx,
            router._view_ctx,
            router._kv_ctx,
            router._breakers_ctx,
            router._tasks_ctx,
            router._metrics_ctx,
            router._registration_ctx,
        )
    )
    return app
