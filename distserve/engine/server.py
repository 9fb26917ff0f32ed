"""The engine's aiohttp application: OpenAI routes, DistServe routes, /metrics, /health (no torch).

Every error is OpenAI JSON with the right status; bad input never reaches the executor.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import aclosing
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from distserve import tracing
from distserve.engine import metrics, tokenizer
from distserve.engine.core import Engine
from distserve.engine.prefix_cache import key_plan
from distserve.engine.openai_api import (
    CAPABILITIES,
    NULL_CAPABILITIES,
    ApiError,
    logprobs_body,
    token_bytes,
    chunk_body,
    completion_body,
    new_id,
    parse_request,
    usage,
    validation_message,
)
from distserve.migration.errors import MigrationError
from distserve.protocol import (
    CacheFreeRequest,
    ConnectionStatus,
    ConnectRequest,
    DropConnectRequest,
    InitRequest,
)

log = logging.getLogger("distserve.engine.server")

ENGINE_KEY = web.AppKey("engine", Engine)
HEARTBEAT_S = 2.0  # cache-state stream: a line at least this often, so a client can tell a dead stream


def error_response(status: int, message: str, code: str, extra: dict | None = None,
                   param: str | None = None) -> web.Response:
    err = ApiError(status, message, code, param=param)
    return web.json_response({**(extra or {}), **err.body()}, status=status)


class TextAssembler:
    """Detokenizes incrementally and applies stop strings (text before the stop is kept)."""

    def __init__(self, stops: list[str], decoder=None) -> None:
        self.decoder = decoder if decoder is not None else tokenizer.IncrementalDecoder()  # the model's
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> None:
        if self.stopped:
            return
        piece = self.decoder.push(token)
        if not piece:
            return
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        if final and not self.stopped:
            self.text += self.decoder.flush()
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted: end]
        self.emitted = end
        return out


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ApiError(400, "request body is not valid JSON", "invalid_json") from None


def _parse(model: type, body: Any):
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None


def _request_id(request: web.Request) -> str:
    """The caller's X-Request-Id for logs, bounded and quoted (it is client input), or '-'."""
    rid = request.headers.get("X-Request-Id")
    return ascii(rid[:128]) if rid else "-"


@web.middleware
async def _errors(request: web.Request, handler):
    engine: Engine = request.app[ENGINE_KEY]
    try:
        return await handler(request)
    except ApiError as exc:
        engine.request_errors_total += 1
        extra = {"status": int(ConnectionStatus.FAIL)} if request.path.startswith("/distserve/p2p_") else None
        return error_response(exc.status, exc.message, exc.code, extra, exc.param)
    except MigrationError as exc:
        engine.request_errors_total += 1
        extra = {"status": int(ConnectionStatus.FAIL)} if request.path.startswith("/distserve/p2p_") else None
        return error_response(exc.status, exc.message, exc.code, extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason or "error", "not_found" if exc.status == 404 else "http_error")
    except Exception:  # noqa: BLE001 - the engine keeps serving whatever happens in one request
        engine.request_errors_total += 1
        log.exception("internal error on %s %s x_request_id=%s", request.method, request.path,
                      _request_id(request))
        return error_response(500, "internal engine error", "internal_error")


@web.middleware
async def _trace(request: web.Request, handler):
    """Tracing on: a SERVER span per POST (generation, free_cache, handshakes), child of the caller's
    traceparent; probes and GETs (health, metrics, engine_info polls) are not traced."""
    if request.method != "POST":
        return await handler(request)
    engine: Engine = request.app[ENGINE_KEY]
    s = engine.settings
    span = tracing.start_server_span("POST " + request.path, request.headers, {
        "http.request.method": "POST", "url.path": request.path, "distserve.engine.role": s.role.name.lower(),
        "distserve.instance_id": s.instance_id, "distserve.request_id": request.headers.get("X-Request-Id", "")[:128]})
    token = tracing.activate(span)
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except asyncio.CancelledError:
        status = 499  # the caller went away (nginx's convention): not an engine failure
        raise
    finally:
        tracing.deactivate(token)
        tracing.end(span, status)


def _auth(api_keys: list[str]):
    keys = [k.encode() for k in api_keys]

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path != "/health":
            header = request.headers.get("Authorization", "")
            token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
            if not token or not any(hmac.compare_digest(token, k) for k in keys):
                return error_response(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                      "invalid_api_key")
        return await handler(request)

    return middleware


class Routes:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.exporter = metrics.EngineMetrics(engine.stats, self._metric_labels)

    def _metric_labels(self) -> dict[str, str]:
        s = self.engine.settings
        return {"role": s.role.name.lower(), "engine_kind": "null" if s.null else "reference",
                "instance_id": s.instance_id, "model": s.model_name}

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.healthy:
            return web.json_response({"status": "unavailable"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        name = self.engine.settings.model_name
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": int(self.engine.started_at), "owned_by": "distserve",
             "root": name, "max_model_len": self.engine.model.max_model_len}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.exporter.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def engine_info(self, request: web.Request) -> web.Response:
        # lmdeploy answers a JSON *string* holding the object (double-encoded).
        info = self.engine.engine_info()
        # what this engine honours: agents copy it into the record, routers reject what no path honours
        info["capabilities"] = sorted(NULL_CAPABILITIES if self.engine.settings.null else CAPABILITIES)
        return web.json_response(json.dumps(info))

    async def p2p_initialize(self, request: web.Request) -> web.Response:
        req = _parse(InitRequest, await _read_json(request))
        resp = await self.engine.migration.initialize(req)
        return web.json_response(resp.model_dump(mode="json"))

    async def p2p_connect(self, request: web.Request) -> web.Response:
        req = _parse(ConnectRequest, await _read_json(request))
        resp = await self.engine.migration.connect(req)
        return web.json_response(resp.model_dump(mode="json"))

    async def p2p_drop_connect(self, request: web.Request) -> web.Response:
        req = _parse(DropConnectRequest, await _read_json(request))
        await self.engine.migration.drop(req)
        return web.json_response({"success": True})

    async def free_cache(self, request: web.Request) -> web.Response:
        req = _parse(CacheFreeRequest, await _read_json(request))
        self.engine.free_cache(req)
        return web.json_response({"status": "SUCCESS"})

    async def cache_events(self, request: web.Request) -> web.StreamResponse:
        """The cache-state stream (NDJSON): a snapshot, or the events after `since` when this incarnation
        still has them, then ordered events; a heartbeat every HEARTBEAT_S when idle."""
        engine = self.engine
        if not engine.settings.prefix_caching:
            raise ApiError(404, "prefix caching is off on this engine: no cache-state stream", "not_found")
        state = engine.cache_events
        raw = request.query.get("since")
        since = None
        if raw is not None:
            if not raw.isdigit() or len(raw) > 19:
                raise ApiError(400, "since must be a non-negative integer", "invalid_request", param="since")
            since = int(raw)
        backlog = None
        if since is not None and request.query.get("incarnation") == state.incarnation:
            backlog = state.after(since)
        wake = state.waiter()
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            if backlog is None:
                snap = state.snapshot()
                last = snap["seq"]
                await resp.write(json.dumps(snap, separators=(",", ":")).encode() + b"\n")
            else:
                last = since
            while engine.healthy:
                wake.clear()
                events = state.after(last)
                if events is None:  # we fell behind the ring: start over with a snapshot
                    snap = state.snapshot()
                    last = snap["seq"]
                    await resp.write(json.dumps(snap, separators=(",", ":")).encode() + b"\n")
                    continue
                if events:
                    last = events[-1]["seq"]
                    await resp.write(b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n"
                                              for e in events))
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    await resp.write(json.dumps({"type": "heartbeat", "seq": last,
                                                 "incarnation": state.incarnation}).encode() + b"\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            state.drop_waiter(wake)
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        engine = self.engine
        if not engine.healthy:
            raise ApiError(503, "engine is shutting down", "unavailable")
        body = await _read_json(request)
        req, sampling = parse_request(kind, body, engine.settings.model_name, engine.model.max_model_len,
                                      engine.tokenizer, NULL_CAPABILITIES if engine.settings.null else CAPABILITIES)
        engine.requests_total += 1
        rid, created, model = new_id(kind), int(time.time()), req.model
        log.debug("%s %s x_request_id=%s prompt_tokens=%d max_tokens=%d stream=%s", kind, rid,
                  _request_id(request), len(sampling.prompt_ids), sampling.max_tokens, bool(req.stream))
        want_cache = req.with_cache or req.preserve_cache
        # echo (completions): the prompt's text before the completion's
        echo = ""
        if kind == "completion" and req.echo:
            echo = b"".join(token_bytes(engine.tokenizer, t) for t in sampling.prompt_ids).decode(errors="replace")
        plan = None
        if engine.settings.prefix_caching:
            try:
                args = (kind, body, sampling.prompt_ids, engine.tokenizer, engine.model.block_size)
                # a checkpoint's template renders once per message prefix: off the event loop
                plan = (await asyncio.to_thread(key_plan, *args) if hasattr(engine.tokenizer, "tok")
                        else key_plan(*args))
            except Exception:  # noqa: BLE001 - keys are an optimisation for routers: never fail a request
                log.exception("computing the prefix keys failed; the request runs without them")
        async with aclosing(engine.generate(sampling, plan)) as steps:
            try:
                first = await steps.__anext__()  # errors before any output become a status code
            except StopAsyncIteration:
                first = None
            if req.stream:
                return await self._stream(request, kind, rid, created, model, sampling, steps, first, want_cache,
                                          req.stream_options or {}, echo)
            text_parts = TextAssembler(sampling.stop, engine.tokenizer.decoder())
            generated: list[int] = []
            entries: list = []
            finish, extra = None, {}
            step = first
            while step is not None:
                finish = self._consume(step, text_parts, generated, entries) or finish
                if step.cache_block_ids is not None and want_cache:
                    extra = self._cache_fields(step, generated)
                if text_parts.stopped or step.finish:
                    break
                step = await anext(steps, None)
            if text_parts.stopped:
                finish = "stop"
            lp = self._logprobs(kind, sampling, entries, len(echo))
            out = completion_body(kind, rid, model, created, echo + text_parts.take(final=True),
                                  finish or "length", len(sampling.prompt_ids), len(generated), lp)
            out.update(extra)
            return web.json_response(out)

    def _logprobs(self, kind: str, sampling, entries: list, offset: int = 0) -> dict | None:
        if sampling.logprobs is None:
            return None
        return logprobs_body(kind, self.engine.tokenizer, entries, sampling.logprobs, offset)

    @staticmethod
    def _consume(step, text_parts: TextAssembler, generated: list[int], entries: list) -> str | None:
        for i, token in enumerate(step.token_ids):
            generated.append(token)
            if step.logprobs is not None and i < len(step.logprobs):
                entries.append((token, step.logprobs[i]))
            text_parts.push(token)
            if text_parts.stopped:
                return "stop"
        return step.finish

    @staticmethod
    def _cache_fields(step, generated: list[int]) -> dict:
        extra = {"cache_block_ids": step.cache_block_ids, "remote_token_ids": generated[:1]}
        if step.session_id is not None:
            extra["remote_session_id"] = step.session_id
        if step.kv_staging is not None:
            extra["remote_kv_staging"] = {"offset": step.kv_staging[0], "length": step.kv_staging[1]}
        if step.logprobs:
            extra["remote_logprobs"] = [step.logprobs[0]]  # per choice: the router passes it to the decode
        if step.choices is not None:  # a shared prefill: one first token and one session per choice
            extra["remote_token_ids"] = [t for t, _, _ in step.choices]
            extra["remote_session_ids"] = [s for _, _, s in step.choices]
            extra["remote_logprobs"] = [e for _, e, _ in step.choices]
        return extra

    async def _stream(self, request, kind, rid, created, model, sampling, steps, first, want_cache,
                      stream_options, echo: str = "") -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj: dict) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        text_parts = TextAssembler(sampling.stop, self.engine.tokenizer.decoder())
        generated: list[int] = []
        finish = None
        first_chunk = True
        step = first
        offset = len(echo)
        try:
            if echo:
                await send(chunk_body(kind, rid, model, created, echo, None, first=True))
            while step is not None:
                entries: list = []
                finish = self._consume(step, text_parts, generated, entries) or finish
                done = text_parts.stopped or step.finish is not None
                piece = text_parts.take(final=done)
                lp = self._logprobs(kind, sampling, entries, offset) if entries else None
                if piece or first_chunk or lp is not None:
                    await send(chunk_body(kind, rid, model, created, piece, None, first=first_chunk, logprobs=lp))
                    first_chunk = False
                offset += len(piece)
                if done:
                    last = chunk_body(kind, rid, model, created, "", "stop" if text_parts.stopped else finish)
                    if want_cache and step.cache_block_ids is not None:
                        last.update(self._cache_fields(step, generated))
                    await send(last)
                    break
                step = await anext(steps, None)
            if stream_options.get("include_usage"):
                await send({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                            "created": created, "model": model, "choices": [],
                            "usage": usage(len(sampling.prompt_ids), len(generated))})
            await resp.write(b"data: [DONE]\n\n")
        except ApiError as exc:  # an error after the stream began: report it in-band
            self.engine.request_errors_total += 1
            await resp.write(b"data: " + json.dumps(exc.body()).encode() + b"\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away; closing `steps` aborts the sequence
        return resp


def create_app(engine: Engine, api_keys: list[str] | None = None) -> web.Application:
    middlewares = [_errors]
    if tracing.ENABLED:  # outermost: the span sees the status _errors answers
        middlewares.insert(0, _trace)
    if api_keys:
        middlewares.append(_auth(api_keys))
    app = web.Application(middlewares=middlewares, client_max_size=64 << 20)
    app[ENGINE_KEY] = engine
    r = Routes(engine)
    app.router.add_get("/health", r.health)
    app.router.add_get("/v1/models", r.models)
    app.router.add_get("/metrics", r.metrics)
    app.router.add_post("/v1/completions", r.completions)
    app.router.add_post("/v1/chat/completions", r.chat)
    app.router.add_get("/distserve/engine_info", r.engine_info)
    app.router.add_post("/distserve/p2p_initialize", r.p2p_initialize)
    app.router.add_post("/distserve/p2p_connect", r.p2p_connect)
    app.router.add_post("/distserve/p2p_drop_connect", r.p2p_drop_connect)
    app.router.add_post("/distserve/free_cache", r.free_cache)
    app.router.add_get("/distserve/cache/events", r.cache_events)
    return app
