"""Fixes to lmdeploy's api_server for PD through any router (lmdeploy 0.17/0.18 defects).

- The prefill answer does not say which engine session holds the preserved KV: the completions `id` is
  the user's session id ("-1" by default) and the chat `id` is "chatcmpl-...", while freeing needs the
  engine's internal session id (lmdeploy issue 4967: prefill memory leaks until OOM). Here the internal
  id of the session the request created is added to the prefill answer as `remote_session_id`
  (only when the request asked for `with_cache`, i.e. it came from a PD router).
- A malformed `migration_request` kills the decode engine's loop (lmdeploy issue 4965): the api_server
  now rejects one that does not validate, or that names an engine this decode was never connected to,
  or block ids outside the peer's pool, with an OpenAI-style HTTP 400 before it reaches the engine.
- GET /distserve/ext/status tells the engine's live session count, free KV blocks and the staged-TCP
  migration counters (the smoke test checks that the prefill's sessions return to zero).
- GET /distserve/cache/events: the prefix-cache stream of a Hybrid engine with prefix caching
  (cache_events.py), advertised as `cache_events` in /distserve/engine_info.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any
from urllib.parse import parse_qsl

from distserve.lmdeploy_ext import cache_events, settings
from distserve.lmdeploy_ext.settings import INSTANCE_ID, lmdeploy_version

logger = logging.getLogger("distserve.lmdeploy_ext")

# The internal ids of the sessions the current HTTP request created (set per request by the middleware).
_CREATED_SESSIONS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "distserve_created_sessions", default=None
)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")

# The prompt token ids lmdeploy computed for the current HTTP request (prefix-cache stream bookkeeping).
_PROMPT_IDS: contextvars.ContextVar[list | None] = contextvars.ContextVar("distserve_prompt_ids", default=None)
# The prefix-cache stream of this api_server (cache_events.CacheEventsService), when prefix caching is on.
CACHE_EVENTS: dict[str, Any] = {}
MAX_BODY_BYTES = 64 << 20


class PeerBook:
    """What this api_server learnt from the handshakes that passed through it (engine id -> num blocks)."""

    def __init__(self) -> None:
        self.initialized: dict[str, int] = {}
        self.connected: set[str] = set()
        self.handshakes = 0  # p2p_initialize calls served (a router restart must not add any)


def engine_info_extras() -> dict[str, Any]:
    """Fields added to /distserve/engine_info for distserve agents (lmdeploy's own readers ignore them)."""
    try:
        software = f"lmdeploy {lmdeploy_version()} (distserve lmdeploy_ext)"
    except ImportError:
        software = "lmdeploy (distserve lmdeploy_ext)"
    return {
        "engine_kind": "lmdeploy",
        "instance_id": INSTANCE_ID,  # new per api_server process: agents tell an engine restart from a blip
        "software_version": software,
        "migration_protocol": settings.reported_protocol(),
        # Only where the engine's trie really caches: lmdeploy turns it off for Prefill/Decode roles.
        **({"cache_events": CACHE_EVENTS["service"].info()}
           if "service" in CACHE_EVENTS and CACHE_EVENTS["service"].enabled else {}),
    }


def error_body(message: str, code: str = "invalid_migration_request") -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()


def check_migration_request(raw: Any, peers: PeerBook) -> str | None:
    """None when `raw` is a migration_request this engine can act on, else why not."""
    if not isinstance(raw, dict):
        return "migration_request must be an object"
    allowed = {
        "protocol",
        "remote_engine_id",
        "remote_session_id",
        "remote_token_id",
        "remote_block_ids",
        "is_dummy_prefill",
    }
    extra = set(raw) - allowed
    if extra:
        return f"migration_request has unknown fields {sorted(extra)}"
    for name in ("remote_session_id", "remote_token_id", "protocol"):
        v = raw.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"migration_request.{name} must be a non-negative integer"
    if raw["protocol"] not in (1, 2, 3):
        return "migration_request.protocol must be 1 (TCP), 2 (RDMA) or 3 (NVLink)"
    engine = raw.get("remote_engine_id")
    if not isinstance(engine, str) or not engine:
        return "migration_request.remote_engine_id must be a string"
    if not isinstance(raw.get("is_dummy_prefill", False), bool):
        return "migration_request.is_dummy_prefill must be a boolean"
    blocks = raw.get("remote_block_ids")
    if not isinstance(blocks, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) for b in blocks
    ):
        return "migration_request.remote_block_ids must be a list of integers"
    if raw.get("is_dummy_prefill"):
        return None
    if engine not in peers.connected:
        return f"this engine has no link to {engine!r}"
    limit = peers.initialized.get(engine)
    if limit is not None and any(b < 0 or b >= limit for b in blocks):
        return f"migration_request.remote_block_ids must be in [0, {limit})"
    if not blocks:
        return "migration_request.remote_block_ids is empty"
    return None


class DistserveApiMiddleware:
    """Pure ASGI middleware (the endpoint runs in our task, so the contextvar reaches create_session)."""

    def __init__(self, app, peers: PeerBook):
        self.app = app
        self.peers = peers

    async def __call__(self, scope, receive, send):
        service = CACHE_EVENTS.get("service")
        if scope.get("type") == "lifespan" and service is not None:
            return await self.app(scope, _stop_on_shutdown(receive, service), send)
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if service is not None:
            service.start()  # owned tasks need the server's loop: started by the first request
        if scope.get("method") == "GET" and path == "/distserve/engine_info":
            return await self._engine_info(scope, receive, send)
        if scope.get("method") == "GET" and path == "/distserve/cache/events":
            if service is None or service.enabled is False:
                return await _send_json(send, 404, error_body(
                    "prefix caching is off on this engine (lmdeploy turns it off for Prefill and Decode roles)",
                    "not_found"))
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            return await service.serve(query, receive, send)
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if path not in GENERATION_PATHS and path not in (
            "/distserve/p2p_initialize",
            "/distserve/p2p_connect",
            "/distserve/p2p_drop_connect",
        ):
            return await self.app(scope, receive, send)

        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending the body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                return await _send_json(send, 413, error_body("request body too large", "body_too_large"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None  # lmdeploy answers malformed JSON itself
        if not isinstance(payload, dict):
            return await self.app(scope, replay, send)

        if path == "/distserve/p2p_initialize":
            # lmdeploy declares `pp_size: int | None` with no default, so a client that leaves out a null
            # (pydantic exclude_none, as distserve's agent does) gets HTTP 400: send the explicit null.
            patched = False
            for name in ("local_engine_config", "remote_engine_config"):
                cfg = payload.get(name)
                if isinstance(cfg, dict) and "pp_size" not in cfg:
                    cfg["pp_size"] = None
                    patched = True
            if patched:
                body = json.dumps(payload).encode()
            return await self._record_handshake(scope, replay, send, payload, initialize=True)
        if path == "/distserve/p2p_connect":
            return await self._record_handshake(scope, replay, send, payload, initialize=False)
        if path == "/distserve/p2p_drop_connect":
            return await self._drop(scope, replay, send, payload)

        if "migration_request" in payload and payload["migration_request"] is not None:
            problem = check_migration_request(payload["migration_request"], self.peers)
            if problem:
                logger.warning("rejected a migration_request: %s", problem)
                return await _send_json(send, 400, error_body(problem))

        prompt_ids: list = []
        token = _PROMPT_IDS.set(prompt_ids)
        try:
            if payload.get("with_cache") is not True:
                return await self.app(scope, replay, send)
            return await self._with_session_id(scope, replay, send)
        finally:
            _PROMPT_IDS.reset(token)
            if service is not None and len(prompt_ids) == 1:
                service.offer(payload, prompt_ids[0])

    async def _engine_info(self, scope, receive, send):
        """lmdeploy answers a JSON string holding the object (double-encoded): keep that shape."""
        service = CACHE_EVENTS.get("service")
        if service is not None and service.enabled is None:
            try:  # whether to advertise the stream depends on the engine process: ask it once
                await service.poll_once()
            except Exception as e:  # noqa: BLE001 - not advertised this time; the next engine_info asks again
                logger.warning("prefix-cache state of the engine unknown (%s): stream not advertised yet", e)
        start, chunks = None, []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        if start is None:
            return
        body = b"".join(chunks)
        if start["status"] == 200:
            try:
                outer = json.loads(body)
                inner = json.loads(outer) if isinstance(outer, str) else outer
                if isinstance(inner, dict):
                    inner.update(engine_info_extras())
                    body = json.dumps(json.dumps(inner) if isinstance(outer, str) else inner).encode()
            except ValueError:
                logger.warning("engine_info answer is not JSON; left as is")
        await send(_patched_start(start, body))
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _drop(self, scope, receive, send, payload: dict):
        """lmdeploy answers HTTP 500 (KeyError) when asked to drop a peer it never initialized, e.g. after a
        handshake that failed half way: there is nothing to drop, so that is a success."""
        engine = payload.get("remote_engine_id")
        if (
            isinstance(engine, str)
            and engine not in self.peers.initialized
            and engine not in self.peers.connected
        ):
            return await _send_json(send, 200, b'{"success": true}')
        if isinstance(engine, str):
            self.peers.connected.discard(engine)
            self.peers.initialized.pop(engine, None)
        return await self.app(scope, receive, send)

    async def _record_handshake(self, scope, receive, send, payload: dict, initialize: bool):
        status_holder: dict[str, int] = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status_holder.get("status") != 200:
            return
        engine = payload.get("remote_engine_id")
        if not isinstance(engine, str):
            return
        if initialize:
            self.peers.handshakes += 1
            cfg = payload.get("remote_engine_config") or {}
            blocks = cfg.get("num_gpu_blocks") if isinstance(cfg, dict) else None
            if isinstance(blocks, int) and blocks > 0:
                self.peers.initialized[engine] = blocks
        else:
            self.peers.connected.add(engine)

    async def _with_session_id(self, scope, receive, send):
        created: list[int] = []
        token = _CREATED_SESSIONS.set(created)
        start: dict | None = None
        chunks: list[bytes] = []
        passthrough = False

        # Buffer the whole JSON answer, then send it once with the field added.
        async def capture_buffered(message):
            nonlocal start, passthrough
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                ctype = headers.get(b"content-type", b"")
                if message["status"] == 200 and ctype.startswith(b"application/json"):
                    start = message
                else:
                    passthrough = True
                    await send(message)
                return
            if passthrough or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))

        try:
            await self.app(scope, receive, capture_buffered)
        finally:
            _CREATED_SESSIONS.reset(token)
        if passthrough or start is None:
            return
        body = b"".join(chunks)
        if len(created) == 1:
            try:
                obj = json.loads(body)
                if isinstance(obj, dict):
                    obj["remote_session_id"] = created[0]
                    body = json.dumps(obj).encode()
            except ValueError:
                logger.warning("prefill answer is not JSON; remote_session_id not added")
        await send(_patched_start(start, body))
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _patched_start(start: dict, body: bytes) -> dict:
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**start, "headers": headers}


async def _send_json(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def record_created_session(session_id: int) -> None:
    created = _CREATED_SESSIONS.get()
    if created is not None:
        created.append(int(session_id))


def _stop_on_shutdown(receive, service):
    """Cancel the prefix-cache stream's tasks when the server's lifespan shuts down."""

    async def wrapped():
        message = await receive()
        if message.get("type") == "lifespan.shutdown":
            await service.stop()
        return message

    return wrapped


def _install_cache_events(server_context) -> None:
    """Start the prefix-cache stream when the engine runs with prefix caching (api_server process)."""
    async_engine = server_context.async_engine
    config = getattr(async_engine, "backend_config", None)
    rpc = getattr(getattr(async_engine, "engine", None), "_collective_rpc_async", None)
    if not getattr(config, "enable_prefix_caching", False) or rpc is None:
        return
    tokenizer = async_engine.tokenizer
    hf = getattr(getattr(async_engine, "chat_template", None), "tokenizer", None)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_bos=True))

    render = None
    if hasattr(hf, "apply_chat_template"):
        def render(messages: list[dict]) -> list[int]:
            return encode(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    else:
        logger.warning("no HF chat template: chat requests get no prefix keys (completions still do)")
    CACHE_EVENTS["service"] = cache_events.CacheEventsService(
        INSTANCE_ID, rpc, int(getattr(config, "block_size", 64) or 64), render_chat=render, encode=encode)
    try:
        from lmdeploy.serve.processors.multimodal import MultimodalProcessor  # noqa: PLC0415 - optional
    except ImportError:
        logger.warning("lmdeploy has no MultimodalProcessor: prefix-cache keys are never registered")
        return
    if getattr(MultimodalProcessor, "_distserve_patched", False):
        return
    original = MultimodalProcessor.get_prompt_input

    async def get_prompt_input(self, *args, **kwargs):
        out = await original(self, *args, **kwargs)
        holder = _PROMPT_IDS.get()
        if holder is not None and isinstance(out, dict) and isinstance(out.get("input_ids"), list):
            holder.append(out["input_ids"])
        return out

    MultimodalProcessor.get_prompt_input = get_prompt_input
    MultimodalProcessor._distserve_patched = True


def install_api_server_patches() -> bool:
    """Patch lmdeploy.serve.openai.api_server (in the api_server process). False when its shape differs."""
    try:
        from lmdeploy.serve.openai import api_server  # noqa: PLC0415 - optional, loads torch
    except ImportError as e:
        logger.warning("lmdeploy api_server not importable (%s): server fixes not installed", e)
        return False
    ctx_cls = getattr(api_server, "ServerContext", None)
    if (
        ctx_cls is None
        or not hasattr(ctx_cls, "create_session")
        or not hasattr(api_server, "mount_metrics")
        or not hasattr(api_server, "create_openai_router")
    ):
        logger.warning("lmdeploy api_server has an unexpected shape: server fixes not installed")
        return False
    if getattr(api_server, "_distserve_patched", False):
        return True

    original_create_session = ctx_cls.create_session

    def create_session(self, *args, **kwargs):
        session = original_create_session(self, *args, **kwargs)
        record_created_session(session.session_id)
        return session

    ctx_cls.create_session = create_session

    peers = PeerBook()
    original_mount_metrics = api_server.mount_metrics

    def mount_metrics(app, *args, **kwargs):
        result = original_mount_metrics(app, *args, **kwargs)
        # Added before lmdeploy's auth/CORS/sleep middlewares, so it runs inside them (after auth).
        app.add_middleware(DistserveApiMiddleware, peers=peers)
        return result

    api_server.mount_metrics = mount_metrics

    original_create_router = api_server.create_openai_router

    def create_openai_router(server_context, *args, **kwargs):
        router = original_create_router(server_context, *args, **kwargs)

        async def distserve_ext_status():
            out: dict[str, Any] = {
                "api_sessions": len(getattr(server_context.session_manager, "sessions", {}))
            }
            engine = getattr(server_context.async_engine, "engine", None)
            rpc = getattr(engine, "_collective_rpc_async", None)
            if rpc is not None:
                try:
                    out.update(await rpc("distserve_ext_status"))
                except Exception as e:  # noqa: BLE001 - reported, not raised: a status probe
                    out["error"] = f"{type(e).__name__}: {e}"
            if "service" in CACHE_EVENTS:
                out["cache_events"] = CACHE_EVENTS["service"].status()
            out["links"] = sorted(peers.connected)
            out["handshakes"] = peers.handshakes
            return out

        router.add_api_route("/distserve/ext/status", distserve_ext_status, methods=["GET"])
        try:
            _install_cache_events(server_context)
        except Exception:  # noqa: BLE001 - the stream is optional: the engine serves without it
            logger.exception("prefix-cache stream not installed")
        return router

    api_server.create_openai_router = create_openai_router
    api_server._distserve_patched = True
    return True
