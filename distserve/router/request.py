"""One client request's state (`PDRequest`), shared by the orchestrator and the n > 1 fan-out, and what the
router passes on from a prefill's answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from distserve.cluster.records import EngineRecord
from distserve.router.strategies import PickContext

if TYPE_CHECKING:  # annotations only
    from distserve.router.orchestrator import Routing


class PDRequest:
    """One client request's state, from the handler through every engine call.

    Set by the handler: request, kind, path, rid, started; then raw, body, model once the body is valid.
    Set by the orchestrator: stream, headers, routing, ctx, and as the request goes: engines (the access
    log's "via"), outcome (how a started stream ended: "started" until known), answered (the client was
    sent [DONE]), the prefill's answer (prefill, session_id, token_id, block_ids, staging), first_at.
    """

    __slots__ = (
        "request", "kind", "path", "rid", "started", "raw", "body", "model", "stream", "headers",
        "routing", "ctx", "engines", "outcome", "answered", "prefill", "session_id", "token_id",
        "block_ids", "staging", "first_at", "span", "needs", "sink", "first_logprobs", "new_stream", "freed",
    )

    def __init__(self, request: web.Request, kind: str, path: str, rid: str, started: float) -> None:
        self.request = request
        self.kind = kind
        self.path = path
        self.rid = rid
        self.started = started
        self.raw = b""
        self.body: dict = {}
        self.model: str | None = None
        self.stream = False
        self.headers = b""
        self.routing: Routing | None = None
        self.ctx: PickContext | None = None
        self.engines: str | None = None
        self.outcome: str | None = None
        self.answered = False
        self.prefill: EngineRecord | None = None
        self.session_id: int | None = None
        self.token_id = 0
        self.block_ids: list[int] = []
        self.staging: dict | None = None
        self.first_at = 0.0  # perf_counter of the first byte sent to the client (0: not yet)
        self.freed = False  # the prefill's preserved blocks were given back (Orchestrator.free_prefill)
        self.span = None  # the request's server span while tracing is on
        # capabilities every engine on the request's path must have (distserve.router.capabilities)
        self.needs: frozenset[str] = frozenset()
        # a fanned-out choice (distserve.router.fanout): its stream goes into the merged one, not the client
        self.sink = None
        self.first_logprobs = None  # the prefill's logprobs of the first token, passed on to the decode
        # makes the client's stream (headers -> an unprepared StreamResponse-like object); the fast path
        # (fastpath.py) writes its own
        self.new_stream = _aiohttp_stream


def _aiohttp_stream(headers: dict) -> web.StreamResponse:
    return web.StreamResponse(status=200, headers=headers)


class Unary:
    """A whole JSON answer from an engine, passed on as is: what the orchestrator returns for a non-streamed
    request. The fast path writes it in one piece (fastpath.py); the aiohttp path turns it into a
    web.Response. (Building a web.Response per request, headers multidict included, only for the fast path
    to read it back, was ~3 % of the router's function calls per request.)"""

    __slots__ = ("body", "rid")
    status = 200
    prepared = False

    def __init__(self, body: bytes, rid: str) -> None:
        self.body = body
        self.rid = rid

    def to_aiohttp(self) -> web.Response:
        return web.Response(body=self.body, status=200, content_type="application/json",
                            headers={"X-Request-Id": self.rid})


def kv_staging(answer: dict) -> dict | None:
    """A distserve prefill's packed copy of the blocks (`remote_kv_staging`), passed on to the decode only
    when well formed: it is an optimisation, so anything odd is dropped and the decode reads the blocks."""
    staging = answer.get("remote_kv_staging")
    if type(staging) is dict and staging.keys() == {"offset", "length"}:
        if type(staging["offset"]) is int and type(staging["length"]) is int:
            return staging
    return None
