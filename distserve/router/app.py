"""The router replica: aiohttp server, client-facing handlers, lifecycle.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /health/ready,
GET /metrics. Anything else (engine control routes such as /distserve/* included) is a JSON 404 (405 for
a known path with the wrong method). No middleware: auth, request id and accounting are inline, the hot
path stays a handful of function calls.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import socket
import time

import orjson
from aiohttp import web

from distserve import __version__
from distserve.keys import Keys, sanitize_id
from distserve.records import RoutingConfig
from distserve.router.breaker import CircuitBreakers
from distserve.router.errors import ApiError
from distserve.router.http1 import EnginePool
from distserve.router.load import LoadTracker
from distserve.router.metrics import RouterMetrics
from distserve.router.orchestrator import Orchestrator, Routing
from distserve.router.settings import RouterSettings
from distserve.router.strategies import make_strategy
from distserve.router.validation import CHAT, COMPLETIONS, parse_json_object, validate_request

log = logging.getLogger("distserve.router")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
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
    def __init__(self, settings: RouterSettings, etcd_client) -> None:
        self.settings = s = settings
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
        from distserve.router.view import ClusterView

        self.view = ClusterView(
            etcd_client, self.keys, self.breakers, self.load, self.metrics, self._on_config
        )
        self._routing = self._make_routing(None)
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
        self._closing = False
        self.metrics.in_flight.callback = lambda: {(): self.in_flight}
        self.metrics.view_revision.callback = lambda: {(): self.view.revision}

    # ------------------------------------------------------------------ routing config (hot reload)
    def _make_routing(self, config: RoutingConfig | None) -> Routing:
        name = config.strategy if config else self.settings.strategy
        entry = make_strategy(name)
        # the prefix cache lives on the prefill: decodes are balanced by expected latency under prefix affinity
        decode = make_strategy("min_expected_latency" if name == "prefix_affinity" else name)
        weights = dict(config.weights) if config else {}
        params = dict(config.params) if config else {}
        self.metrics.strategy.values = {(name,): 1}
        return Routing(entry, decode, weights, params)

    def _on_config(self, config: RoutingConfig | None) -> None:
        try:
            routing = self._make_routing(config)
        except ValueError as exc:
            log.error("ignoring routing config from etcd: %s", exc)
            return
        self._routing = routing
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
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/ready", self.ready)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    async def start(self) -> None:
        s = self.settings
        self._get_pool()
        await self.view.start()
        if not await self.view.wait_synced(s.sync_timeout):
            log.warning(
                "view not synced with etcd after %.1fs: serving, not ready until it is", s.sync_timeout
            )
            self.spawn(self._wait_sync_forever())
        self._runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port, backlog=2048)
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
        from distserve.router.registration import Registration

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

    async def _wait_sync_forever(self) -> None:
        while not await self.view.wait_synced(30):
            log.warning("view still not synced with etcd")

    def _counters(self) -> tuple[str, int, int, int]:
        return self.strategy_name, self.view.revision, self.requests_total, self.in_flight

    async def stop(self) -> None:
        self._closing = True
        deadline = time.monotonic() + self.settings.shutdown_grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._registration is not None:
            await self._registration.close()
        # let pending free_cache calls finish (they are bounded by free_cache_timeout)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.free_cache_timeout)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.breakers.close()
        await self.view.stop()
        if self._pool is not None:
            self._pool.close()

    # ------------------------------------------------------------------ helpers
    def _authorized(self, request: web.Request) -> bool:
        if not self._api_keys:
            return True
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        given = header[7:].strip().encode()
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
    def _request_id(request: web.Request) -> str:
        rid = request.headers.get("X-Request-Id")
        if rid and _REQUEST_ID.match(rid):
            return rid
        return os.urandom(16).hex()

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise ApiError(
                413, f"request body of {length} bytes exceeds the limit of {limit} bytes", "request_too_large"
            )
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413, f"request body exceeds the limit of {limit} bytes", "request_too_large"
            ) from None

    # ------------------------------------------------------------------ handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS, "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT, "/v1/chat/completions")

    async def _generate(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        started = time.perf_counter()
        rid = self._request_id(request)
        self.in_flight += 1
        self.requests_total += 1
        status = 500
        prepared = False
        try:
            if not self._authorized(request):
                raise self._auth_error()
            limit = self.settings.max_in_flight
            if self._closing:
                raise ApiError(503, "the router is shutting down", "shutting_down")
            if limit and self.in_flight > limit:
                raise ApiError(
                    429,
                    f"too many requests in flight on this router (limit {limit})",
                    "rate_limited",
                    headers={"Retry-After": "1"},
                )
            raw = await self._read_body(request)
            body = parse_json_object(raw)
            model = validate_request(kind, body)
            resp = await self.orchestrator.generate(request, kind, path, raw, body, model, rid, started)
            status = resp.status
            prepared = resp.prepared
            if not prepared:  # a non-streamed answer: its first byte comes with all of it
                self.metrics.ttft.observe(time.perf_counter() - started, (path,))
            return resp
        except ApiError as exc:
            status = exc.status
            if exc.status >= 500:
                log.warning("request %s %s -> %d %s", rid, path, exc.status, exc.message)
            return exc.response(rid)
        except (asyncio.CancelledError, ConnectionResetError):
            if request.get("answered"):  # closed after reading [DONE]: the request completed
                status = 200
                raise
            status = 499  # the client went away (nginx's convention); upstream work was cancelled
            self.metrics.client_disconnects.inc((path,))
            log.debug("request %s: client went away", rid, exc_info=True)
            raise
        except Exception:
            log.exception("request %s %s: unexpected error", rid, path)
            status = 500
            if prepared:
                raise
            return ApiError(500, "internal router error", "internal_error").response(rid)
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - started
            self.metrics.requests.inc((path, status))
            self.metrics.latency.observe(elapsed, (path,))
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request %s %s -> %s in %.1f ms via %s",
                    rid,
                    path,
                    status,
                    elapsed * 1000,
                    request.get("engines", "-"),
                )

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
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

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def ready(self, request: web.Request) -> web.Response:
        if not self.view.synced.is_set():
            return ApiError(503, "not ready: the view is not synced with etcd yet", "not_synced").response()
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
                }
            ),
            content_type="application/json",
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
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
