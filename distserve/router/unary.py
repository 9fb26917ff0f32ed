"""A PD request served by callbacks: the lane (first built for non-streamed requests: the unary lane).

The usual request (one choice, a prefill picked, streamed or not) is served here with no task, future or
coroutine: the prefill's call is written from the client's `data_received`, the decode's from the prefill
answer's, the client's answer from the decode's (EnginePool.call). A task per request, a future per engine
answer and the coroutine layers they resume through cost a fifth of the router's CPU per non-streamed
request (docs/benchmarks.md, "Seventeenth pass"). A streamed decode is relayed the same way (a StreamCall):
each piece the engine sends is written to the client from the engine connection's `data_received`; a client
reading slower than the engine writes pauses reading from the engine until it has caught up; the engine
silent for the decode's idle timeout ends the stream with the coroutine path's error event
(docs/benchmarks.md, "Twenty-first pass").

Every decision is the orchestrator's own (its plain methods: the bodies, the answers, the picks' plans,
the failures' classification), so both paths behave alike by construction. Anything off the usual path
continues as a coroutine in the connection's task from where the lane stands: an engine that fails before
output (its retries on other engines), a hybrid entry, an engine gone between pick and call, no decode
linked yet (the wait for one). The client leaving cancels the exchange as it cancels a task: a prefill
still running is left to finish and its sessions are freed; a decode running is dropped and the prefill's
blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from distserve.cluster.records import EngineRecord
from distserve.router.errors import ApiError
from distserve.router.http1 import Call
from distserve.router.orchestrator import Orchestrator, RetryElsewhere, _Vanished
from distserve.router.request import PDRequest
from distserve.router.upstream import UpstreamError, classify_exception

log = logging.getLogger("distserve.router")

# where an exchange stands: an engine call of either phase running, handed to a task that has not started
# yet (the connection's cancel still reaches the exchange), or over; a streamed decode past its first byte
# (relaying), and its stream written to the end but not all read by the client yet (ending)
_PREFILL, _DECODE, _HANDED, _OVER, _STREAMING, _ENDING = 1, 2, 3, 4, 5, 6


class UnaryExchange:
    """One request in the lane, from its prefill's pick to the client's answer. `done(exchange, answer,
    status, close)` answers the client (a Unary or an error response) and accounts for the request;
    `resume(exchange, rest)` continues it in a task (`rest()`: the coroutine returning the client's answer;
    the task calls `started()` first, so a client gone before it ran is still the exchange's to wind down);
    `gone(exchange)` accounts for a client that left. Set as the client connection's `task` while it runs:
    `cancel()` is what the connection does when the client goes away. A streamed request's `done` gets no
    answer (None): its stream is written already."""

    __slots__ = ("orch", "pd", "done", "resume", "gone", "phase", "prefill", "decode", "call", "t0",
                 "engine_id", "task", "decoding", "loaded", "out", "tail", "first_at", "last_piece",
                 "idle_timer", "behind", "draining")

    def __init__(self, orch: Orchestrator, pd: PDRequest, done: Callable, resume: Callable,
                 gone: Callable) -> None:
        self.orch = orch
        self.pd = pd
        self.done = done
        self.resume = resume
        self.gone = gone
        self.phase = 0
        self.prefill: EngineRecord | None = None
        self.decode: EngineRecord | None = None
        self.call: Call | None = None
        self.t0 = 0.0
        self.engine_id = ""
        self.task = None  # the task the rest was handed to, until it starts
        self.decoding = False  # past the prefill: its preserved blocks are the request's to free
        self.loaded = ""  # the engine whose load count this exchange's running call holds (LoadTracker)
        # a streamed decode's relay: the client's stream once its first piece is out, the last bytes sent (for
        # [DONE]), when the engine's first and latest pieces came, the idle timer, the client behind
        self.out = None
        self.tail = b""
        self.first_at = 0.0
        self.last_piece = 0.0
        self.idle_timer = None
        self.behind = False
        self.draining: Call | None = None  # a stream call read on after [DONE] (its end), under the idle timer

    # ------------------------------------------------------------- the entry
    def start(self, candidates: list[str]) -> None:
        """Pick the entry engine among `candidates` (Orchestrator.lane_entries) and call it."""
        try:
            self._start(candidates)
        except Exception:  # noqa: BLE001 - a bug must answer the client (500), not drop its connection
            self._internal_error()

    def _start(self, candidates: list[str]) -> None:
        orch, pd = self.orch, self.pd
        self.engine_id = engine_id = pd.routing.entry.pick(candidates, pd.ctx)
        engine = orch.view.engines.get(engine_id)
        if engine is None:
            self._continue(lambda: orch._retry_after(orch._entry_plan(pd), engine_id, _Vanished(engine_id)))
            return
        if engine.role == "hybrid":
            self._continue(lambda: orch._on_first(orch._entry_plan(pd), engine_id, orch._hybrid(pd, engine)))
            return
        orch.metrics.picks.add(("prefill", engine_id))
        pd.engines = engine_id
        self.prefill = engine
        self.phase = _PREFILL
        self._call(engine, orch.prefill_body(pd), orch.s.prefill_timeout)

    def _call(self, engine: EngineRecord, data: bytes, timeout: float, stream: bool = False) -> None:
        orch = self.orch
        pool = orch._pool()
        self.t0 = time.perf_counter()
        orch.load.begin(engine.id)
        self.loaded = engine.id
        try:
            self.call = pool.call(engine.url, b"POST", self.pd.path.encode(), data, self.pd.headers,
                                  pool.loop.time() + timeout, self, stream)
        except UpstreamError as err:  # an engine URL the pool cannot use
            self.failed(err)

    # ------------------------------------------------------------- the engines' answers (Call's sink)
    def answered(self, status: int, raw: bytes) -> None:
        try:
            if self.phase == _PREFILL:
                self._prefilled(status, raw)
            elif self.phase == _DECODE:
                self._decoded(status, raw)
        except Exception:  # noqa: BLE001 - a bug must answer the client (500), not stall it
            self._internal_error()

    def failed(self, exc: BaseException) -> None:
        try:
            phase = self.phase
            if phase != _PREFILL and phase != _DECODE:
                return
            engine = self.prefill if phase == _PREFILL else self.decode
            self._unload()
            orch = self.orch
            if phase == _PREFILL:
                err = orch.call_failed(engine, "prefill", exc)
            elif self.pd.stream:
                err = orch.stream_call_failed(engine, "decode", exc)
            else:
                err = orch.call_failed(engine, "decode", exc)
            self._phase_failed(orch.phase_error(err, "prefill" if phase == _PREFILL else "decode"))
        except Exception:  # noqa: BLE001
            self._internal_error()

    def _prefilled(self, status: int, raw: bytes) -> None:
        orch, pd, prefill = self.orch, self.pd, self.prefill
        self._unload()
        orch.metrics.phase_observers["prefill"](time.perf_counter() - self.t0)
        try:
            orch._take_prefill_answer(pd, prefill, orch.prefill_answer(prefill, status, raw))
        except (RetryElsewhere, ApiError) as exc:
            self._phase_failed(exc)
            return
        # the decode phase: from here on the prefill's preserved blocks are freed on every failure
        self.phase = _DECODE
        self.decoding = True
        candidates = orch.decodes(pd, prefill)
        if not candidates:  # no decode linked right now: wait for one, as the coroutine path does
            self._continue_decode(lambda: orch._decode(pd, prefill))
            return
        self.engine_id = decode_id = pd.routing.decode.pick(candidates, pd.ctx)
        try:
            decode, link = orch.decode_engine(prefill, decode_id)
        except _Vanished as exc:
            vanished = exc
            self._continue_decode(lambda: orch._retry_after(orch.decode_plan(pd, prefill)[0], decode_id, vanished))
            return
        data = orch.decode_body(pd, prefill, decode, link)
        self.decode = decode
        if pd.stream:  # its first byte within the decode's first-byte timeout, as the coroutine path's
            self._call(decode, data, orch.s.decode_first_byte_timeout, True)
            return
        self._call(decode, data, max(0.001, orch.s.request_timeout - (time.perf_counter() - pd.started)))

    def _decoded(self, status: int, raw: bytes) -> None:
        orch, decode = self.orch, self.decode
        self._unload()
        try:
            answer = orch.unary_answer(self.pd, decode, "decode", status, raw, time.perf_counter() - self.t0)
        except (RetryElsewhere, ApiError) as exc:
            self._phase_failed(exc)
            return
        self.phase = _OVER
        self.done(self, answer, 200, False)

    # ------------------------------------------------------------- a streamed decode (StreamCall's sink)
    def piece(self, data: bytes) -> None:
        """A piece of the decode's stream: the first opens the client's stream (its head written with it)."""
        try:
            if self.phase == _STREAMING:
                behind = self.out.send(data)
                self.tail = data[-16:] if len(data) >= 16 else (self.tail + data)[-16:]  # no copy of a long piece
                self.last_piece = self.pd.request.loop.time()
            elif self.phase == _DECODE:
                behind = self._open(data)
            else:
                return
            if self.orch._answered(self.pd, self.tail):
                self._finish(None)
            elif behind:  # the client reads slower than the engine writes: stop reading until it caught up
                self.behind = True
                self.call.pause()
                self.pd.request.on_drained = self._caught_up
        except ConnectionResetError:  # the client went away as it was written to
            self.cancel()
        except Exception:  # noqa: BLE001
            self._internal_error()

    def ended(self, failure: UpstreamError | None) -> None:
        """The decode's stream ended (None: whole) or broke off, after its first piece."""
        if self.phase != _STREAMING:
            return
        try:
            self.call = None
            self._finish(failure if failure is not None else self.orch.stream_unfinished(self.tail))
        except Exception:  # noqa: BLE001
            self._internal_error()

    def _open(self, first: bytes) -> bool:
        orch, pd = self.orch, self.pd
        self.first_at = orch.stream_first_byte("decode", self.t0)
        self.phase = _STREAMING
        self.out = out = pd.request.sse_stream(pd.rid)
        orch.stream_started(pd)
        self.tail = first[-16:]
        loop = pd.request.loop
        self.last_piece = now = loop.time()
        self.idle_timer = loop.call_at(now + orch.s.decode_idle_timeout, self._idle_check)
        return out.start(first)

    def _caught_up(self) -> None:
        """The client read what it was behind on: the engine's stream is read again."""
        if self.phase == _STREAMING:
            self.behind = False
            self.last_piece = self.pd.request.loop.time()
            self.call.resume()

    def _idle_check(self) -> None:
        """The idle timer: the stream fails once the engine has sent nothing for the decode's idle timeout
        (while the client is behind, the silence is the client's, not the engine's); after [DONE], the engine's
        end of stream is given up (its connection dropped) after as long."""
        self.idle_timer = None
        streaming = self.phase == _STREAMING
        if not streaming and self.draining is None:
            return
        loop, idle = self.pd.request.loop, self.orch.s.decode_idle_timeout
        now = loop.time()
        if streaming and self.behind:
            self.idle_timer = loop.call_at(now + idle, self._idle_check)
            return
        if now < self.last_piece + idle:
            self.idle_timer = loop.call_at(self.last_piece + idle, self._idle_check)
            return
        if not streaming:
            draining, self.draining = self.draining, None
            draining.cancel()
            return
        try:
            self._finish(classify_exception(asyncio.TimeoutError("the engine stayed silent for too long")))
        except Exception:  # noqa: BLE001
            self._internal_error()

    def _finish(self, failure: UpstreamError | None) -> None:
        """The stream's end: [DONE] sent (the engine's own end is read on in the background, so its connection
        is reused), or the engine's stream ended or broke off (then the client gets the error event)."""
        orch, pd = self.orch, self.pd
        self._unload()
        call, self.call = self.call, None
        if failure is None:
            orch.stream_completed(pd, "decode", self.t0, self.first_at)
            last = b""
            if call is not None and not call.done:  # read on to its end (usually in this same piece), the
                self.draining = call  # idle timer giving it up
                call.sink = _Draining(self)
            else:
                self._stop_idle()
        else:
            self._stop_idle()
            last = orch.stream_failed(pd, self.decode, "decode", failure)
            if call is not None:
                call.cancel()  # still running (timed out): its connection goes, and the engine sees it
            orch.free_prefill(pd, self.prefill)
        self.phase = _ENDING
        pd.request.on_drained = None
        try:
            behind = self.out.end(last)
        except ConnectionResetError:  # the client left as its stream ended (the openai SDK closes on [DONE])
            self._left_at_end()
            return
        if behind:  # the next request on the connection waits until the client has read this one
            pd.request.on_drained = self._ended_read
            return
        self.phase = _OVER
        self.done(self, None, 200, False)

    def _ended_read(self) -> None:
        if self.phase == _ENDING:
            self.phase = _OVER
            self.done(self, None, 200, False)

    def _left_at_end(self) -> None:
        self.phase = _OVER
        if self.pd.answered:  # it had the whole answer: a completed request
            self.done(self, None, 200, True)
        else:
            self.gone(self)

    def _stop_idle(self) -> None:
        timer, self.idle_timer = self.idle_timer, None
        if timer is not None:
            timer.cancel()

    def _phase_failed(self, exc: Exception) -> None:
        """The current phase's call failed: another engine tries (RetryElsewhere, through the coroutine path's
        retries), or the client gets the error."""
        orch, pd = self.orch, self.pd
        if isinstance(exc, RetryElsewhere):
            engine_id, prefill = self.engine_id, self.prefill
            if self.phase == _DECODE:
                self._continue_decode(lambda: orch._retry_after(orch.decode_plan(pd, prefill)[0], engine_id, exc))
            else:
                self._continue(lambda: orch._retry_after(orch._entry_plan(pd), engine_id, exc))
            return
        if self.phase == _DECODE and not pd.answered:
            orch.free_prefill(pd, self.prefill)
        self._error(exc)

    def _unload(self) -> None:
        """The running call is over (answered, failed or given up): its engine's load count drops, once."""
        engine_id = self.loaded
        if engine_id:
            self.loaded = ""
            self.orch.load.end(engine_id)

    # ------------------------------------------------------------- endings
    def _continue(self, rest: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """The rest of the request as a coroutine (made by `rest()` once its task runs), in a task."""
        self.phase = _HANDED
        self.call = None
        self.task = self.resume(self, rest)

    def _continue_decode(self, decoding: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        orch, pd, prefill = self.orch, self.pd, self.prefill
        self._continue(lambda: orch._decode_freeing(pd, prefill, decoding()))

    def started(self) -> None:
        """The task the rest was handed to runs: the client's leaving is the task's to handle now."""
        self.phase = _OVER
        self.task = None

    def _error(self, exc: ApiError) -> None:
        self.phase = _OVER
        if exc.status >= 500:
            log.warning("request %s %s -> %d %s", self.pd.rid, self.pd.path, exc.status, exc.message)
        self.done(self, exc.response(self.pd.rid), exc.status, exc.close)

    def _internal_error(self) -> None:
        log.exception("request %s %s: unexpected error", self.pd.rid, self.pd.path)
        self.cancel_calls()
        self._unload()
        self._stop_idle()
        if self.decoding and not self.pd.answered:  # nothing will decode the prefill's blocks now
            self.orch.free_prefill(self.pd, self.prefill)
        if self.phase != _OVER:
            self.phase = _OVER
            if self.out is not None:  # a stream's 200 is out: nothing else can be answered; the connection ends
                self.pd.request.on_drained = None
                self.done(self, None, 500, True)
                return
            self.done(self, ApiError(500, "internal router error", "internal_error").response(self.pd.rid), 500,
                      False)

    def cancel_calls(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            call.cancel()

    def cancel(self) -> None:
        """The client went away (the connection's `task.cancel()`): the engines' work is wound down as a
        cancelled task's would be."""
        phase = self.phase
        if phase == _OVER:
            return
        if phase == _ENDING:  # its stream written to the end, not all read
            self._left_at_end()
            return
        self.phase = _OVER
        orch, pd, call = self.orch, self.pd, self.call
        self._stop_idle()
        pd.request.on_drained = None
        self.call = None
        if phase == _HANDED:  # its task has not run: nothing of the rest has started
            self.task.cancel()
            self.task = None
            if self.decoding and not pd.answered:
                orch.free_prefill(pd, self.prefill)
        elif phase == _PREFILL:
            self._unload()
            if call is not None and not call.done:
                if call.conn is None:  # still connecting: nothing reached the engine
                    call.cancel()
                else:  # the prefill runs on: its answer's sessions are freed when it comes
                    call.sink = _Orphaned(orch, self.prefill, pd.headers)
        else:
            self._unload()
            if call is not None:
                call.cancel()
            if not pd.answered:
                orch.free_prefill(pd, self.prefill)
        self.gone(self)


class _Orphaned:
    """The sink of a prefill call whose client left: its answer's sessions are freed, a failure forgotten."""

    __slots__ = ("orch", "prefill", "headers")

    def __init__(self, orch: Orchestrator, prefill: EngineRecord, headers: bytes) -> None:
        self.orch, self.prefill, self.headers = orch, prefill, headers

    def answered(self, status: int, raw: bytes) -> None:
        self.orch.free_orphaned(self.prefill, self.headers, status, raw)

    def failed(self, exc: BaseException) -> None:
        pass


class _Draining:
    """The sink of a stream call whose client has its [DONE]: the rest of the engine's stream (its end) is read
    and dropped so the connection is reused; given up at the exchange's idle timeout, as the coroutine path's
    drain is."""

    __slots__ = ("exchange",)

    def __init__(self, exchange: UnaryExchange) -> None:
        self.exchange = exchange

    def piece(self, _data: bytes) -> None:
        pass

    def ended(self, _failure) -> None:
        self._over()

    def answered(self, _status: int, _raw: bytes) -> None:
        self._over()

    def failed(self, _exc: BaseException) -> None:
        self._over()

    def _over(self) -> None:
        exchange = self.exchange
        exchange.draining = None
        exchange._stop_idle()
