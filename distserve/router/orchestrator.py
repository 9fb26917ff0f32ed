"""One client request through the cluster: hybrid direct, or prefill -> KV migration -> decode.

PD, following LMDeploy's DistServe protocol (docs/router.md has the whole story):
1. pick a routable prefill P serving the model; POST the request with max_tokens=1 (chat: also
   max_completion_tokens=1), stream=false, with_cache, preserve_cache. Its answer holds
   `cache_block_ids`, `remote_token_ids` and `remote_session_id` (P's internal session id).
2. pick a decode D with an established link to P (P's own state no longer matters: a prefill cordoned,
   drained or unhealthy since step 1 still holds the KV, as long as its incarnation is the same); POST the client's original bytes with
   `migration_request` spliced in (no re-serialization of the client body), and pass D's answer (or
   stream) through byte for byte.
3. P's preserved blocks are freed by D after the transfer; on every other exit path (decode error,
   timeout, client disconnect) the router calls P's free_cache itself.

Retries are bounded: an entry engine (prefill or hybrid) that fails before producing output is replaced
by another one; a decode that fails before its first byte by another decode linked to the same prefill.
A refused connection also opens that engine's circuit breaker. Every one of these retries (and free_cache's)
runs through discovery.backoff.retry.

A request's state lives in one `PDRequest` from the handler to the last byte: the handler's access log and
metrics read from it how the request went (engines used, how its stream ended, whether [DONE] was sent).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web

from discovery.backoff import Backoff, retry
from distserve import tracing
from distserve.protocol import PROTOCOL_BY_NAME
from distserve.cluster.prefix_keys import request_keys
from distserve.cluster.records import EngineRecord
from distserve.cluster.capabilities import effective as effective_capabilities
from distserve.router import capabilities, fanout
from distserve.router.errors import ApiError
from distserve.router.http1 import EnginePool, Response
from distserve.router.metrics import RouterMetrics
from distserve.router.request import PDRequest, Unary, kv_staging
from distserve.router.settings import RouterSettings
from distserve.router.strategies import PickContext, Strategy
from distserve.router.upstream import UpstreamError, classify_exception, classify_status
from distserve.router.validation import (
    CHAT,
    DECODE_MAX_TOKENS,
    check_context,
    prompt_prefix,
    requested_max_tokens,
)

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout as _timeout

log = logging.getLogger("distserve.router")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE_MARK = b"[DONE]"
# Between attempts on another engine: a tiny full jitter (~0-5 ms, doubling) only spreads retry bursts, the
# other engine is the real remedy. free_cache retries its one engine once, after 50-150 ms.
RETRY_JITTER = (0.005, 0.02)
FREE_CACHE_ATTEMPTS = 2
FREE_CACHE_BACKOFF = (0.15, 0.15, 2 / 3)  # base, cap, jitter: a delay in [0.05, 0.15]


class RetryElsewhere(Exception):
    """An attempt failed before any output reached the client: another engine may try."""

    def __init__(self, error: UpstreamError, phase: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.phase = phase


class _NoCandidate(Exception):
    """No engine left to try (every routable one tried, or none routable)."""


class _Vanished(Exception):
    """The picked engine (or its link) left the view between the pick and the call: try another."""


class Routing:
    """The strategies in use; swapped at run time when etcd's config/routing changes."""

    def __init__(
        self, entry: Strategy, decode: Strategy, weights: dict[str, float], params: dict, kv=None
    ) -> None:
        self.entry = entry
        self.decode = decode
        self.weights = weights
        self.params = params
        self.kv = kv  # the cache index (distserve.router.kv_index) when a strategy needs it, else None


def _keys_once(body: dict) -> Callable[[int], list[int]]:
    memo: dict[int, list[int]] = {}

    def keys(chunk_bytes: int) -> list[int]:
        found = memo.get(chunk_bytes)
        if found is None:
            found = memo[chunk_bytes] = request_keys(body, chunk_bytes)
        return found

    return keys


def splice_field(raw: bytes, name: bytes, value: bytes) -> bytes:
    """Append `"name": value` to a JSON object given as bytes (validated: a non-empty object)."""
    end = raw.rstrip()
    return end[:-1] + b',"' + name + b'":' + value + b"}"


class Orchestrator:
    def __init__(
        self,
        settings: RouterSettings,
        view,
        metrics: RouterMetrics,
        pool: Callable[[], EnginePool],
        routing: Callable[[], Routing],
        spawn: Callable,
        engine_headers: bytes,
    ) -> None:
        self.s = settings
        self.view = view
        self.load = view.load
        self.breakers = view.breakers
        self.metrics = metrics
        self._pool = pool
        self._routing = routing
        self._spawn = spawn  # runs a coroutine as an owned background task
        self._engine_headers = engine_headers  # header lines sent on every engine call (auth, content type)
        # (routing table, {model: largest context a routable path offers, None when unknown}): recomputed
        # whenever the view builds a new table
        self._context_limits: tuple[object, dict[str, tuple | None]] = (None, {})

    # ------------------------------------------------------------------ entry
    def generate(self, pd: PDRequest) -> Coroutine[Any, Any, web.StreamResponse]:
        """The request's handling, to await. Not a coroutine of its own: in the usual case (one choice, a
        route at hand) the checks run now and the caller awaits `_generate`'s coroutine directly (every
        coroutine layer costs on each of the request's resumptions)."""
        if fanout.needed(pd.kind, pd.body):  # n > 1, best_of, a batch of prompts
            return fanout.serve(self, pd)
        if self.view.table().entries.get(pd.model):  # nothing to wait for
            self._checks(pd)
            return self._generate(pd)
        return self._checked_generate(pd)

    async def _checked_generate(self, pd: PDRequest) -> web.StreamResponse:
        await self.precheck(pd)
        return await self._generate(pd)

    async def precheck(self, pd: PDRequest) -> None:
        """Everything decided before any engine call: a known model with a route (or 404/503), the context
        length, and a path that honours every field the request uses (400 unsupported_parameter)."""
        if not self.view.table().entries.get(pd.model):
            await self._wait_for_entry(pd.model)
        self._checks(pd)

    async def _wait_for_entry(self, model: str) -> None:
        """No routable engine serves `model` now: 404 for a model nobody serves, else wait a little for one
        (route_wait), else 503."""
        if self._unknown_model(model):
            raise ApiError(404, f"The model `{model}` does not exist", "model_not_found", "model")
        # Nothing routable serves it right now: wait a little for the view to change (engines
        # re-registering after etcd revoked their leases are back within a fraction of a second).
        if not await self._wait_for_route("entry", lambda: self.view.table().entries.get(model)):
            if self._unknown_model(model):
                raise ApiError(404, f"The model `{model}` does not exist", "model_not_found", "model")
            raise ApiError(
                503,
                f"no routable engine serves model `{model}` right now",
                "no_route",
                headers={"Retry-After": "1"},
            )

    def _checks(self, pd: PDRequest) -> None:
        """The context length, and a path that honours every field the request uses."""
        model = pd.model
        paths = self._context_paths(model)
        if paths is not None:
            # before any engine call: a request that cannot fit would cost a whole prefill otherwise
            self._check_context(pd.kind, pd.body, paths)
        needs = capabilities.required(pd.kind, pd.body)
        if needs:
            pd.needs = frozenset(cap for _, cap in needs)
            bad = capabilities.unsupported(needs, self._capability_paths(model))
            if bad is not None:
                raise ApiError(400, f"'{bad}' is not supported by the engines serving model `{model}`",
                               "unsupported_parameter", bad)

    def _capability_paths(self, model: str) -> list[frozenset[str]]:
        """What each routable path for `model` honours: a hybrid's capabilities, a prefill's and its
        decode's in common."""
        table, engines = self.view.table(), self.view.engines
        out: list[frozenset[str]] = []
        for entry_id in table.entries.get(model) or ():
            entry = engines.get(entry_id)
            if entry is None:
                continue
            caps = effective_capabilities(entry)
            if entry.role == "hybrid":
                out.append(caps)
                continue
            for decode_id in table.decodes.get((entry_id, model)) or ():
                decode = engines.get(decode_id)
                if decode is not None:
                    out.append(caps & effective_capabilities(decode))
        return out

    def _honours(self, engine_id: str, needs: frozenset[str], model: str) -> bool:
        """An entry engine can serve a request needing `needs`: a hybrid with them all; a prefill with them
        all and a linked routable decode with them (shared_prefill is the prefill's alone)."""
        engine = self.view.engines.get(engine_id)
        if engine is None:
            return False
        if not needs <= effective_capabilities(engine):
            return False
        if engine.role == "hybrid":
            return capabilities.SHARED_PREFILL not in needs
        rest = needs - {capabilities.SHARED_PREFILL}
        return any(rest <= effective_capabilities(d)
                   for d in (self.view.engines.get(i)
                             for i in self.view.table().decodes.get((engine_id, model)) or ())
                   if d is not None)

    async def _generate(self, pd: PDRequest, pd_attempt: Callable | None = None):
        """`pd_attempt(pd, prefill)`: what a prefill entry runs instead of `_pd` (fanout's shared prefill)."""
        self._prepare(pd)
        return await self._on_engines(*self._entry_plan(pd, pd_attempt))

    def _prepare(self, pd: PDRequest) -> None:
        """What every engine call of the request shares: its headers, the strategies, the pick context."""
        headers = self._engine_headers + b"X-Request-Id: " + pd.rid.encode() + b"\r\n"
        if not tracing.ENABLED:  # on: each engine call names its own span as the parent instead
            headers += tracing.passthrough(pd.request.headers)
        pd.headers = headers
        pd.stream = pd.body.get("stream") is True
        pd.routing = routing = self._routing()
        kind, body = pd.kind, pd.body
        pd.ctx = PickContext(
            load=self.load,
            weights=routing.weights,
            params=routing.params,
            prefix=lambda n: prompt_prefix(kind, body, n),
        )
        if routing.kv is not None:  # kv_aware: the prefix keys, computed once per request when first asked
            pd.ctx.kv = routing.kv
            pd.ctx.keys = _keys_once(body)

    def _entry_plan(self, pd: PDRequest, pd_attempt: Callable | None = None) -> tuple:
        """_on_engines' arguments for the request's entry engine (a prefill or a hybrid)."""
        model = pd.model

        def entries() -> list[str]:
            return self._entries(pd)

        def attempt(engine_id: str) -> Coroutine[Any, Any, web.StreamResponse]:
            # the engine's path, to await (no coroutine layer of its own; _Vanished raised before any)
            engine = self.view.engines.get(engine_id)
            if engine is None:
                raise _Vanished(engine_id)
            if engine.role == "hybrid":
                return self._hybrid(pd, engine)
            return (pd_attempt or self._pd)(pd, engine)

        return (
            pd,
            self.s.max_prefill_attempts,
            entries,
            pd.routing.entry,
            attempt,
            "request %s: %s on %s failed before output (%s), trying another engine",
            lambda: _no_entry(model),
        )

    def _entries(self, pd: PDRequest) -> list[str]:
        """The request's routable entry engines."""
        found = self.view.table().entries.get(pd.model) or ()
        if pd.needs:  # only engines (and paths) that apply every field the request uses
            found = [e for e in found if self._honours(e, pd.needs, pd.model)]
        return found  # the table's own list when unfiltered: read, never changed

    async def _on_engines(
        self,
        pd: PDRequest,
        attempts: int,
        routable: Callable[[], list[str]],
        strategy: Strategy,
        attempt: Callable[[str], object],
        failure_log: str,
        none_left: Callable[[], ApiError],
        wait_first: Callable[[], object] | None = None,
    ):
        """Retry-or-fail over engines, through discovery.backoff.retry: each attempt picks an engine not
        tried yet among `routable()` and runs `attempt(engine_id)`; one that fails before any output
        (RetryElsewhere) is replaced while attempts and untried engines remain. The last failure is the
        client's error; `none_left()` when no engine could be tried at all. `wait_first`: awaited when the
        first attempt finds no engine (it waits for one to appear)."""
        # The first attempt runs here, without the executor: it is the one nearly every request makes, and
        # the executor's back-off state and closures were ~4 % of a request's function calls (docs/benchmarks.md).
        # A failure that may go elsewhere continues through discovery.backoff.retry.
        candidates = routable()
        if not candidates and wait_first is not None and await wait_first():
            candidates = routable()
        if not candidates:
            raise none_left()
        engine_id = strategy.pick(candidates, pd.ctx)
        try:
            return await attempt(engine_id)
        except (RetryElsewhere, _Vanished) as exc:
            first: BaseException = exc
        return await self._retry_after((pd, attempts, routable, strategy, attempt, failure_log, none_left),
                                       engine_id, first)

    async def _on_first(self, plan: tuple, engine_id: str, first: Coroutine):
        """_on_engines from its first attempt on, that attempt (on `engine_id`) already made: `first`."""
        try:
            return await first
        except (RetryElsewhere, _Vanished) as exc:
            failed: BaseException = exc
        return await self._retry_after(plan, engine_id, failed)

    def lane_entries(self, pd: PDRequest) -> list[str] | None:
        """The routable entry engines of a request the lane serves (distserve/router/unary.py: one choice,
        streamed or not, a route at hand; ApiError when there is none to try), its checks passed and its
        engine calls prepared; None: the coroutine path serves it (generate)."""
        if fanout.needed(pd.kind, pd.body):
            return None
        if not self.view.table().entries.get(pd.model):  # it may wait for one: generate's
            return None
        self._checks(pd)
        self._prepare(pd)
        found = self._entries(pd)
        if not found:
            raise _no_entry(pd.model)
        return found

    def _retry_after(self, plan: tuple, engine_id: str, first: BaseException) -> Coroutine:
        """The attempts after a first one on `engine_id` failed with `first` (RetryElsewhere or _Vanished), to
        await."""
        if isinstance(first, RetryElsewhere):
            self._note_retry(plan[0], first, engine_id, plan[5])
        return self._retry_engines(plan, engine_id, first)

    def _note_retry(self, pd: PDRequest, exc: RetryElsewhere, engine_id: str, failure_log: str) -> None:
        if tracing.ENABLED:
            _retry_event(exc, engine_id)
        log.info(failure_log, pd.rid, exc.phase, engine_id, exc.error.message)

    async def _retry_engines(self, plan: tuple, first_engine: str, first: BaseException):
        """After a first attempt on `first_engine` failed with `first`: attempts 2.. through the executor.
        `plan`: _on_engines' arguments but wait_first (pd, attempts, routable, strategy, attempt,
        failure_log, none_left)."""
        pd, attempts, routable, strategy, attempt, failure_log, none_left = plan
        tried: set[str] = {first_engine}
        last: RetryElsewhere | None = first if isinstance(first, RetryElsewhere) else None

        def untried() -> list[str]:
            return [e for e in routable() if e not in tried]

        async def one(n: int):
            nonlocal last
            if n == 1:  # the executor's first call re-raises the attempt made before it
                raise first
            candidates = untried()
            if not candidates:
                raise _NoCandidate
            engine_id = strategy.pick(candidates, pd.ctx)
            tried.add(engine_id)
            try:
                return await attempt(engine_id)
            except RetryElsewhere as exc:
                last = exc
                self._note_retry(pd, exc, engine_id, failure_log)
                raise

        def again(exc: BaseException) -> bool:
            # retried only while an untried engine is left (no retry counted, no wait, otherwise)
            return isinstance(exc, (RetryElsewhere, _Vanished)) and bool(untried())

        def count(_attempt: int, exc: BaseException, _delay: float) -> None:
            if isinstance(exc, RetryElsewhere):
                self.metrics.retries.inc((exc.phase,))

        try:
            return await retry(
                one,
                attempts=max(1, attempts),
                backoff=Backoff(RETRY_JITTER[0], RETRY_JITTER[1], jitter=1.0),
                retry_if=again,
                on_retry=count,
            )
        except (RetryElsewhere, _NoCandidate, _Vanished):
            if last is not None:
                raise last.error.to_api_error(last.phase) from None
            raise none_left() from None

    def _context_limit(self, model: str) -> int | None:
        """The largest context (tokens) any routable path for `model` offers (see _context_paths)."""
        paths = self._context_paths(model)
        return max(limit for limit, _ in paths) if paths else None

    def _context_paths(self, model: str) -> tuple[tuple[int, int | None], ...] | None:
        """What each routable path for `model` can hold, as distinct (context tokens, max_token_bytes) pairs,
        largest context first: a hybrid's own, or for a prefill and its decode the smaller context (the
        prefill checks the decode's budget against its own) and the larger max_token_bytes (the weaker
        bound). None when any engine on a path does not publish its context: then only the engines decide.
        Computed once per routing table."""
        table = self.view.table()
        cached_table, paths_by_model = self._context_limits
        if cached_table is not table:
            paths_by_model = {}
            self._context_limits = (table, paths_by_model)
        if model in paths_by_model:
            return paths_by_model[model]
        engines = self.view.engines
        paths: set[tuple[int | None, int | None]] = set()
        for entry_id in table.entries.get(model) or ():
            entry = engines.get(entry_id)
            if entry is None:
                continue
            if entry.role == "hybrid":
                paths.add((entry.max_model_len, entry.max_token_bytes))
                continue
            for decode_id in table.decodes.get((entry_id, model)) or ():
                decode = engines.get(decode_id)
                if decode is None:
                    continue
                limits = (entry.max_model_len, decode.max_model_len)
                # both engines tokenize nothing of the other's: the prefill's tokenizer bounds the prompt
                paths.add((None if None in limits else min(limits), entry.max_token_bytes))
        if not paths or any(limit is None for limit, _ in paths):
            result = None
        else:
            result = tuple(sorted(paths, key=lambda p: (-p[0], p[1] or 0)))
        paths_by_model[model] = result
        return result

    def _check_context(self, kind: str, body: dict, paths: tuple[tuple[int, int | None], ...]) -> None:
        """400 only when no path can hold the request (the error of the largest context)."""
        first: ApiError | None = None
        for limit, max_token_bytes in paths:
            try:
                check_context(kind, body, limit, max_token_bytes)
                return
            except ApiError as exc:
                first = first or exc
        if first is not None:
            raise first

    def _unknown_model(self, model: str) -> bool:
        """404 only when the view is complete and engines are routable: an empty view (all engines
        re-registering after an etcd blip, or not synced yet) says nothing about which models exist."""
        table = self.view.table()
        return self.view.synced.is_set() and table.has_path and model not in table.known_models

    async def _wait_for_route(self, phase: str, found: Callable[[], object]) -> bool:
        """Wait up to `route_wait` seconds for `found()` to become true, re-checking on every view change."""
        deadline = time.monotonic() + self.s.route_wait
        while not found():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.metrics.route_waits.inc((phase, "timeout"))
                return False
            await self.view.wait_changed(remaining)
        self.metrics.route_waits.inc((phase, "found"))
        return True

    # ------------------------------------------------------------------ failure bookkeeping
    def _failed(self, engine: EngineRecord, phase: str, err: UpstreamError) -> None:
        self.metrics.upstream_errors.inc((phase, err.kind))
        if err.kind == "connect":
            if self.breakers.trip(engine.id, engine.incarnation, engine.url, err.message):
                self.metrics.breaker_trips.inc(("connect",))
                self.view.invalidate()

    # ------------------------------------------------------------------ hybrid
    async def _hybrid(self, pd: PDRequest, engine: EngineRecord) -> web.StreamResponse:
        self.metrics.picks.add(("hybrid", engine.id))
        pd.engines = engine.id
        if pd.stream:
            resp, _ok = await self._stream_through(pd, engine, pd.raw, "hybrid")
            return resp
        return await self._unary_through(pd, engine, pd.raw, "hybrid")

    # ------------------------------------------------------------------ PD
    def _shielded_prefill(self, pd: PDRequest, prefill: EngineRecord) -> Coroutine[Any, Any, dict]:
        """The prefill call (to await), counted as a pick. Shielded: a client gone while the prefill runs must
        not strand its preserved KV until the TTL (the engine may have answered already): once the call went
        out, its answer is read in the background and its sessions are freed (`_call`'s `orphaned`). No
        task of its own per request for that (a shield costs a task and two loop callbacks each time), and
        no coroutine of its own either: it returns `_prefill`'s."""
        self.metrics.picks.add(("prefill", prefill.id))
        pd.engines = prefill.id
        return self._prefill(pd, prefill)

    async def _pd(self, pd: PDRequest, prefill: EngineRecord) -> web.StreamResponse:
        answer = await self._shielded_prefill(pd, prefill)
        self._take_prefill_answer(pd, prefill, answer)
        return await self._decode_freeing(pd, prefill, self._decode(pd, prefill))

    def _take_prefill_answer(self, pd: PDRequest, prefill: EngineRecord, answer: dict) -> None:
        """What the decode needs of the prefill's answer, kept on the request (ApiError when it lacks it)."""
        pd.session_id, pd.token_id, pd.block_ids = self._prefill_outputs(prefill, answer, pd.headers)
        pd.prefill = prefill
        pd.staging = kv_staging(answer)
        lps = answer.get("remote_logprobs")
        if type(lps) is list and lps and type(lps[0]) is list:
            pd.first_logprobs = lps[0]

    async def _decode_freeing(self, pd: PDRequest, prefill: EngineRecord, decoding: Coroutine) -> web.StreamResponse:
        """Await the decode phase (`decoding`: (response, ended well)); the prefill's preserved blocks are freed
        when it fails: an error before output, a timeout, the client gone (CancelledError), or a stream that
        ended badly. Not when the client got the whole answer: the decode has taken them."""
        try:
            resp, ok = await decoding
        except BaseException:
            if not pd.answered:
                self.free_prefill(pd, prefill)
            raise
        if not ok:
            self.free_prefill(pd, prefill)
        return resp

    def free_prefill(self, pd: PDRequest, prefill: EngineRecord) -> None:
        """Give the prefill's preserved blocks back (in the background), once per request."""
        if not pd.freed:
            pd.freed = True
            self._spawn(self._free_cache(prefill, pd.session_id, pd.headers))

    async def _call(
        self, engine: EngineRecord, phase: str, path: str, data: bytes, headers: bytes, timeout: float,
        orphaned: bool = False,
    ) -> tuple[int, bytes]:
        """One whole engine call (status, body) within `timeout`; failures raised as UpstreamError.
        `orphaned`: the answer holds engine state (a prefill's preserved sessions): when the caller is
        cancelled after the request went out, the answer is read (within the same deadline) and its
        sessions freed in the background instead of the connection being dropped."""
        resp: Response | None = None
        span = None
        on_cancel = None
        if orphaned:
            free_headers = headers
            on_cancel = lambda answer: self._spawn(self._free_orphan(answer, engine, free_headers))  # noqa: E731
        if tracing.ENABLED:
            span, headers = _call_span(phase, engine, path, headers)
        try:
            pool = self._pool()
            resp = await pool.request(
                engine.url, b"POST", path.encode(), data, headers,
                deadline=pool.loop.time() + timeout, on_cancel=on_cancel,
            )
            if span is not None and phase == "decode":  # unary: the first token comes with the answer
                span.add_event("first_token")
            # usually the whole answer came with its head: taken as is, no coroutine to await
            return resp.status, (resp.take_whole() if resp.complete else await resp.read())
        except asyncio.CancelledError:
            if on_cancel is not None and resp is not None:
                on_cancel(resp)
                resp = None  # handed over: not closed below
            raise
        except Exception as exc:  # noqa: BLE001 - every transport failure is classified
            raise self.call_failed(engine, phase, exc) from None
        finally:
            if resp is not None:
                resp.close()
            if span is not None:
                _end_call_span(span, engine, resp.status if resp is not None else None)

    def call_failed(self, engine: EngineRecord, phase: str, exc: BaseException) -> UpstreamError:
        """An engine call's failure (a transport error, a timeout) classified and counted."""
        err = classify_exception(exc)
        self._failed(engine, phase, err)
        return err

    def stream_call_failed(self, engine: EngineRecord, phase: str, exc: BaseException) -> UpstreamError:
        """call_failed for a streamed call before its first byte (its deadline is the first byte's)."""
        err = classify_exception(exc)
        if err.kind == "timeout":
            err = UpstreamError("timeout", f"no first byte within {self.s.decode_first_byte_timeout}s")
        self._failed(engine, phase, err)
        return err

    @staticmethod
    def phase_error(err: UpstreamError, phase: str) -> Exception:
        """What a failed call of `phase` raises: RetryElsewhere when another engine may try, else the
        client's error."""
        if err.retryable:
            return RetryElsewhere(err, phase)
        return err.to_api_error(phase)

    async def _prefill(self, pd: PDRequest, prefill: EngineRecord) -> dict:
        t0 = time.perf_counter()
        self.load.begin(prefill.id)
        try:
            status, raw = await self._call(
                prefill, "prefill", pd.path, self.prefill_body(pd), pd.headers, self.s.prefill_timeout,
                orphaned=True,
            )
        except UpstreamError as err:
            raise self.phase_error(err, "prefill") from None
        finally:
            self.load.end(prefill.id)
        self.metrics.phase_observers["prefill"](time.perf_counter() - t0)
        return self.prefill_answer(prefill, status, raw)

    def prefill_body(self, pd: PDRequest) -> bytes:
        """The prefill's request: the client's body for one token, its KV preserved for the decode."""
        kind, body = pd.kind, pd.body
        pre = dict(body)
        pre["max_tokens"] = 1
        if kind == CHAT or "max_completion_tokens" in pre:
            pre["max_completion_tokens"] = 1
        pre["stream"] = False
        pre.pop("stream_options", None)
        pre.pop("min_new_tokens", None)
        pre.pop("min_tokens", None)
        budget = requested_max_tokens(kind, body)
        if budget is not None:
            pre[DECODE_MAX_TOKENS] = budget  # the prefill rejects what its decode could not hold
        pre["with_cache"] = True
        pre["preserve_cache"] = True
        return orjson.dumps(pre)

    def prefill_answer(self, prefill: EngineRecord, status: int, raw: bytes) -> dict:
        """The prefill's answer as a JSON object, or what its failure raises (RetryElsewhere, ApiError)."""
        if status != 200:
            raise self.phase_error(self._status_failed(prefill, "prefill", status, raw), "prefill")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            err = UpstreamError("answer", "prefill answer is not a JSON object")
            self._failed(prefill, "prefill", err)
            raise err.to_api_error("prefill")
        return answer

    def _prefill_outputs(
        self, prefill: EngineRecord, answer: dict, headers: bytes
    ) -> tuple[int, int, list[int]]:
        session_id = answer.get("remote_session_id")
        if type(session_id) is not int:
            # lmdeploy 0.17/0.18 engines do not return it; their `id` is the user's session id (completions)
            # or "chatcmpl-..." (chat), never P's internal session: only a true integer is trusted.
            session_id = answer.get("id") if "remote_session_id" not in answer else None
            if type(session_id) is not int:
                self.metrics.session_id_missing.inc()
                err = UpstreamError(
                    "answer",
                    "the prefill engine did not return its session id "
                    "(remote_session_id); its preserved KV cannot be migrated or freed safely",
                )
                self._failed(prefill, "prefill", err)
                raise err.to_api_error("prefill")
        tokens = answer.get("remote_token_ids")
        blocks = answer.get("cache_block_ids")
        # element types of cache_block_ids are the decode engine's to check (it validates migration_request)
        if type(tokens) is not list or not tokens or type(tokens[0]) is not int or type(blocks) is not list:
            err = UpstreamError("answer", "prefill answer lacks remote_token_ids / cache_block_ids")
            self._failed(prefill, "prefill", err)
            # it did preserve something under that session: give it back
            self._spawn(self._free_cache(prefill, session_id, headers))
            raise err.to_api_error("prefill")
        return session_id, tokens[0], blocks

    async def _decode(self, pd: PDRequest, prefill: EngineRecord) -> tuple[web.StreamResponse, bool]:
        plan, links_back = self.decode_plan(pd, prefill)
        return await self._on_engines(*plan, wait_first=links_back)

    def decode_plan(self, pd: PDRequest, prefill: EngineRecord) -> tuple[tuple, Callable]:
        """_on_engines' arguments for the request's decode after `prefill` answered, and its wait_first."""

        def decodes() -> list[str]:
            return self.decodes(pd, prefill)

        async def links_back() -> bool:
            # The prefill's KV is waiting: give its links a moment to come back (a lease replaced).
            return await self._wait_for_route("decode", decodes)

        async def attempt(decode_id: str) -> tuple[web.StreamResponse, bool]:
            decode, link = self.decode_engine(prefill, decode_id)
            data = self.decode_body(pd, prefill, decode, link)
            if pd.stream:
                return await self._stream_through(pd, decode, data, "decode")
            return await self._unary_through(pd, decode, data, "decode"), True

        return (
            (
                pd,
                self.s.max_decode_attempts,
                decodes,
                pd.routing.decode,
                attempt,
                "request %s: %s on %s failed before its first byte (%s)",
                lambda: ApiError(503, f"no decode engine linked to prefill {prefill.id} is routable", "no_route"),
            ),
            links_back,
        )

    def decodes(self, pd: PDRequest, prefill: EngineRecord) -> list[str]:
        """The decodes the request may finish on after `prefill` answered."""
        found = self.view.decodes_for_inflight(prefill, pd.model)
        if pd.needs:
            rest = pd.needs - {capabilities.SHARED_PREFILL}
            if rest:
                engines = self.view.engines
                found = [d for d in found if d in engines and rest <= effective_capabilities(engines[d])]
        return found

    def decode_engine(self, prefill: EngineRecord, decode_id: str) -> tuple[EngineRecord, object]:
        """The picked decode and its link from `prefill` (_Vanished when either left the view since)."""
        decode = self.view.engines.get(decode_id)
        link = self.view.links.get((prefill.id, decode_id))
        if decode is None or link is None:
            raise _Vanished(decode_id)
        return decode, link

    def decode_body(self, pd: PDRequest, prefill: EngineRecord, decode: EngineRecord, link) -> bytes:
        """The decode's request (counted as its pick): the client's body and where its KV waits."""
        decode_id = decode.id
        self.metrics.picks.add(("decode", decode_id))
        pd.engines = f"{prefill.id}>{decode_id}"
        fields = {
            "protocol": int(PROTOCOL_BY_NAME[link.protocol]),
            "remote_engine_id": prefill.handshake_id,
            "remote_session_id": pd.session_id,
            "remote_token_id": pd.token_id,
            "remote_block_ids": pd.block_ids,
            "is_dummy_prefill": False,
        }
        if pd.staging is not None:
            fields["remote_kv_staging"] = pd.staging
        data = splice_field(pd.raw, b"migration_request", orjson.dumps(fields))
        if pd.first_logprobs is not None:  # the decode emits them with the first token
            data = splice_field(data, b"remote_logprobs", orjson.dumps(pd.first_logprobs))
        return data

    async def _free_orphan(self, resp: Response, prefill: EngineRecord, headers: bytes) -> None:
        """Free the sessions of a prefill answer nobody will decode: its request was cancelled after the call
        went out. The answer is read here, within the call's own deadline."""
        try:
            raw = await resp.read()
        except BaseException:  # noqa: BLE001 - failed, timed out or cancelled: nothing to free that we know of
            return
        finally:
            resp.close()
        for sid in orphan_sessions(resp.status, raw):
            await self._free_cache(prefill, sid, headers)

    def free_orphaned(self, prefill: EngineRecord, headers: bytes, status: int, raw: bytes) -> None:
        """A prefill's whole answer nobody will decode (its client left): its sessions freed in the background."""
        sessions = orphan_sessions(status, raw)
        if sessions:
            self._spawn(self._free_sessions(prefill, headers, sessions))

    async def _free_sessions(self, prefill: EngineRecord, headers: bytes, sessions: list[int]) -> None:
        for sid in sessions:
            await self._free_cache(prefill, sid, headers)

    async def _free_cache(self, prefill: EngineRecord, session_id: int, headers: bytes) -> None:
        body = orjson.dumps({"remote_engine_id": prefill.handshake_id, "remote_session_id": session_id})
        span = None
        if tracing.ENABLED:  # this task copied the request's context: a child of its span
            span, headers = _call_span("free_cache", prefill, "/distserve/free_cache", headers)
            span.set_attribute("distserve.session_id", session_id)
        try:
            await self._free_cache_attempts(prefill, session_id, headers, body, span)
        finally:
            if span is not None:
                _end_call_span(span, prefill, None)

    async def _free_cache_attempts(
        self, prefill: EngineRecord, session_id: int, headers: bytes, body: bytes, span
    ) -> None:
        async def attempt(_n: int) -> None:
            resp: Response | None = None
            try:
                async with _timeout(self.s.free_cache_timeout):
                    resp = await self._pool().request(
                        prefill.url, b"POST", b"/distserve/free_cache", body, headers
                    )
                    await resp.read()
                if resp.status == 200:
                    return
                result = f"http_{resp.status}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every transport failure is classified
                result = classify_exception(exc).kind
            finally:
                if resp is not None:
                    resp.close()
            if span is not None:
                span.add_event("attempt_failed", {"distserve.engine.id": prefill.id, "error.type": result})
            raise _FreeCacheFailed(result)

        base, cap, jitter = FREE_CACHE_BACKOFF
        try:
            await retry(attempt, attempts=FREE_CACHE_ATTEMPTS, backoff=Backoff(base, cap, jitter=jitter),
                        retry_if=lambda exc: isinstance(exc, _FreeCacheFailed))
        except asyncio.CancelledError:
            self.metrics.free_cache.inc(("cancelled",))
            raise
        except _FreeCacheFailed as exc:
            if span is not None:
                tracing.fail(span, f"free_cache failed ({exc.result})", **{"distserve.engine.id": prefill.id})
            self.metrics.free_cache.inc((exc.result,))
            log.warning("free_cache on %s for session %s failed (%s)", prefill.id, session_id, exc.result)
            return
        self.metrics.free_cache.inc(("ok",))

    # ------------------------------------------------------------------ a stream's milestones (both paths)
    def stream_first_byte(self, phase: str, t0: float) -> float:
        """The engine's first byte of a stream came (its call started at `t0`): now, for stream_completed."""
        first_at = time.perf_counter()
        if phase == "decode":
            self.metrics.phase_observers["migration"](first_at - t0)
        return first_at

    def stream_started(self, pd: PDRequest) -> None:
        """The client's stream is out with its first piece: how it ends is recorded later (stream_completed,
        stream_failed) or by the handler on an exception."""
        pd.outcome = "started"
        pd.first_at = now = time.perf_counter()
        metrics = self.metrics
        (metrics.by_route.get(pd.path) or metrics.route_observers(pd.path))[1](now - pd.started)

    def stream_completed(self, pd: PDRequest, phase: str, t0: float, first_at: float) -> None:
        pd.outcome = "completed"
        self.metrics.phase_observers[phase](time.perf_counter() - (first_at if phase == "decode" else t0))

    def stream_failed(self, pd: PDRequest, engine: EngineRecord, phase: str, failure: UpstreamError) -> bytes:
        """The engine's stream broke off after its first byte: counted, and the SSE error event the client gets
        before the stream ends."""
        self._failed(engine, phase, failure)
        pd.outcome = "upstream_timeout" if failure.kind == "timeout" else "upstream_error"
        return ApiError(502, f"{phase} failed mid-stream: {failure.message}", f"{phase}_failed").sse_event()

    @staticmethod
    def stream_unfinished(tail: bytes) -> UpstreamError | None:
        """The failure of an engine stream that ended with `tail` (its last bytes): one without [DONE]."""
        if tail.find(DONE_MARK) < 0:
            return UpstreamError("disconnect", "the engine ended the stream without [DONE]")
        return None

    @staticmethod
    def _answered(pd: PDRequest, tail: bytes) -> bool:
        """Whether the client has been sent the stream's final [DONE] event (`tail`: its last bytes).

        It may close at once (the openai SDK does): the relay finishes without waiting for the engine's
        end of stream, which that close would cancel (a completed request miscounted as a disconnect,
        and a redundant free_cache); `pd.answered` tells the handler and _pd so.
        """
        if tail.rstrip().endswith(b"data: " + DONE_MARK):
            pd.answered = True
            return True
        return False

    async def _drain(self, upstream: Response) -> None:
        try:
            async with _timeout(self.s.decode_idle_timeout):
                while await upstream.readany():
                    pass
        except Exception:  # noqa: BLE001 - best effort: close() below drops the connection
            pass
        finally:
            upstream.close()

    # ------------------------------------------------------------------ pass-through
    async def _unary_through(self, pd: PDRequest, engine: EngineRecord, data: bytes, phase: str) -> Unary:
        remaining = self.s.request_timeout - (time.perf_counter() - pd.started)
        t0 = time.perf_counter()
        self.load.begin(engine.id)
        try:
            status, raw = await self._call(engine, phase, pd.path, data, pd.headers, max(0.001, remaining))
        except UpstreamError as err:
            raise self.phase_error(err, phase) from None
        finally:
            self.load.end(engine.id)
        return self.unary_answer(pd, engine, phase, status, raw, time.perf_counter() - t0)

    def unary_answer(
        self, pd: PDRequest, engine: EngineRecord, phase: str, status: int, raw: bytes, elapsed: float
    ) -> Unary:
        """A whole answer passed on to the client, or what its failure raises (RetryElsewhere, ApiError)."""
        if status != 200:
            raise self.phase_error(self._status_failed(engine, phase, status, raw), phase)
        # non-streamed: the decode phase's first byte is its whole answer (migration + decode)
        self.metrics.phase_observers[phase](elapsed)
        return Unary(raw, pd.rid)

    def _status_failed(self, engine: EngineRecord, phase: str, status: int, raw: bytes) -> UpstreamError:
        err = classify_status(status, raw)
        self._failed(engine, phase, err)
        return err

    async def _stream_through(
        self, pd: PDRequest, engine: EngineRecord, data: bytes, phase: str
    ) -> tuple[web.StreamResponse, bool]:
        """Relay an SSE stream byte for byte. Returns (response, ended_well)."""
        path, headers = pd.path, pd.headers
        t0 = time.perf_counter()
        span = failure = None
        if tracing.ENABLED:
            span, headers = _call_span(phase, engine, path, headers)
        self.load.begin(engine.id)
        upstream: Response | None = None
        try:
            try:
                pool = self._pool()  # the first byte within its timeout: one deadline timer on the call
                upstream = await pool.request(engine.url, b"POST", path.encode(), data, headers,
                                              deadline=pool.loop.time() + self.s.decode_first_byte_timeout)
                if upstream.status != 200:
                    err = classify_status(upstream.status, await upstream.read())
                    self._failed(engine, phase, err)
                    if err.retryable:
                        raise RetryElsewhere(err, phase)
                    raise err.to_api_error(phase)
                first = await upstream.readany()
                upstream.clear_deadline()
                if not first:
                    raise UpstreamError(
                        "disconnect", "the engine closed the stream before its first byte"
                    )
                if span is not None:
                    span.add_event("first_token")
            except (RetryElsewhere, ApiError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001
                err = self.stream_call_failed(engine, phase, exc)
                if err.retryable:
                    raise RetryElsewhere(err, phase) from None
                raise err.to_api_error(phase) from None

            first_at = self.stream_first_byte(phase, t0)
            out = pd.sink or pd.new_stream({**SSE_HEADERS, "X-Request-Id": pd.rid})
            await out.prepare(pd.request)
            self.stream_started(pd)
            await out.write(first)
            tail = first[-16:]
            failure: UpstreamError | None = None
            idle = self.s.decode_idle_timeout
            while not self._answered(pd, tail):
                try:
                    chunk = await upstream.readany(idle)
                except (UpstreamError, asyncio.TimeoutError, OSError) as exc:
                    failure = classify_exception(exc)
                    break
                if not chunk:
                    break
                await out.write(chunk)  # raises when the client went away (handled by the caller)
                tail = chunk[-16:] if len(chunk) >= 16 else (tail + chunk)[-16:]
            if failure is None:
                failure = self.stream_unfinished(tail)
            if failure is not None:
                await out.write(self.stream_failed(pd, engine, phase, failure))
            else:
                self.stream_completed(pd, phase, t0, first_at)
            try:
                await out.write_eof()
            except ConnectionResetError:
                # clients (the openai SDK) may close as soon as they read [DONE], before the chunked
                # stream's end: the request completed, the decode freed P's KV; not a disconnect
                if failure is not None or tail.find(DONE_MARK) < 0:
                    raise
            if failure is None and not upstream.complete:
                # drain the engine's end of stream in the background so its connection is reused
                self._spawn(self._drain(upstream))
                upstream = None
            return out, failure is None
        finally:
            self.load.end(engine.id)
            if span is not None:
                if failure is not None:
                    tracing.fail(span, failure.message, **{"distserve.engine.id": engine.id,
                                                           "error.type": failure.kind})
                _end_call_span(span, engine, upstream.status if upstream is not None else 200)
            if upstream is not None:
                upstream.close()  # no-op when complete; else drops the connection: the engine sees it and stops


def _no_entry(model: str) -> ApiError:
    return ApiError(503, f"no routable engine serves model `{model}` right now", "no_route")


def orphan_sessions(status: int, raw: bytes) -> list[int]:
    """The sessions a prefill's answer preserved (one, or one per choice), read leniently: nothing on an error."""
    if status != 200:
        return []
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(answer, dict):
        return []
    ids = answer.get("remote_session_ids")
    if type(ids) is not list:
        ids = [answer.get("remote_session_id")]
    return [sid for sid in ids if type(sid) is int]


def _call_span(phase: str, engine: EngineRecord, path: str, headers: bytes):
    """Tracing on: a CLIENT span for one engine call, and `headers` naming it as the engine's parent."""
    span = tracing.start_span(
        phase + " call",
        {"distserve.phase": phase, "distserve.engine.id": engine.id, "url.full": engine.url + path},
        kind="client",
    )
    return span, headers + tracing.traceparent(span)


def _end_call_span(span, engine: EngineRecord, status: int | None) -> None:
    """End an engine call's span; the exception in flight (if any) says how the call failed."""
    exc = sys.exc_info()[1]
    error = None
    if exc is not None:
        err = exc.error if isinstance(exc, RetryElsewhere) else exc
        kind = getattr(err, "kind", None) or ("cancelled" if isinstance(exc, asyncio.CancelledError) else
                                              type(exc).__name__)
        error = getattr(err, "message", None) or str(exc) or kind
        tracing.fail(span, error, **{"distserve.engine.id": engine.id, "error.type": kind})
    tracing.end(span, status, error)


class _FreeCacheFailed(Exception):
    def __init__(self, result: str) -> None:
        super().__init__(result)
        self.result = result  # the free_cache metric's label: http_<status> or a transport failure kind


def _retry_event(exc: RetryElsewhere, engine_id: str) -> None:
    span = tracing.current_span()
    if span is not None:
        span.add_event("retry", {"distserve.phase": exc.phase, "distserve.engine.id": engine_id,
                                 "error.type": exc.error.kind, "message": exc.error.message[:500]})
