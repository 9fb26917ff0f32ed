"""The router's own HTTP/1.1 server path for its two hot routes; aiohttp serves everything else.

Why: per PD request aiohttp's server side (a request object and payload stream, a task per request on top
of the connection's task, its response writer) cost about a third of the router's CPU against the null
engines of tools/bench_router.py (docs/benchmarks.md, "Router CPU per request"). This path parses a request
in one pass over bytes that usually arrive in one piece and writes each answer with one `write`.

What it serves: `POST /v1/completions` and `POST /v1/chat/completions` in HTTP/1.1 with a Content-Length
body within the router's body limit, a head of at most MAX_HEAD bytes, and none of Transfer-Encoding,
Content-Encoding, Expect or Upgrade. Anything else (another route or method, HTTP/1.0, a chunked or
compressed body, a malformed header line) is handed to aiohttp with the connection, at a request boundary,
bytes untouched: from then on the connection is aiohttp's (behind its ReadGuard, inbound.py). A connection
whose requests are all hot stays here for its life.

Behaviour is the aiohttp path's: both call `Router.serve_generate` (auth, limits, validation, routing,
metrics, the access log); a head not complete within the header timeout, or a body not complete within the
body timeout, gets a 408 and the connection is closed; a client that goes away cancels its request; streams
are chunked SSE with back-pressure; requests pipelined on one connection are answered in order; an idle
keep-alive connection is closed after KEEPALIVE_TIMEOUT, as aiohttp does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from email.utils import formatdate
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from distserve.router import heads
from distserve.router.errors import ApiError
from distserve.router.heads import request_head
from distserve.router.request import Unary
from distserve.router.validation import CHAT, COMPLETIONS

log = logging.getLogger("distserve.router")

MAX_HEAD = 16 * 1024
KEEPALIVE_TIMEOUT = 75.0  # aiohttp's default for an idle keep-alive connection
SWEEP_INTERVAL = 5.0
# heads.ROUTES, in order: what the handler is told
_ROUTES = ((COMPLETIONS, "/v1/completions"), (CHAT, "/v1/chat/completions"))
_NO_COPY = frozenset({"content-length", "transfer-encoding", "connection", "date"})

# the handler: (connection, kind, path, headers, body or None) -> awaitable (answer, close after it)
Serve = Callable[["FastConnection", str, str, "HeadHeaders", bytes | None], Awaitable[tuple]]

# the headers the handler reads on every request: kept from the head's one pass (the rest parsed on demand)
_WATCHED = frozenset(name.decode() for name in heads.WATCHED)
_WATCHED_KEYS = {spelling: spelling.lower().encode() for spelling in (
    "X-Request-Id", "Authorization", "traceparent", "tracestate", *_WATCHED)}


class HeadHeaders(Mapping):
    """A request's headers, case-insensitive, read-only (what aiohttp's request.headers offers the handler).
    The few the handler reads on every request (X-Request-Id, Authorization, traceparent, tracestate) were
    kept by the head's one pass; anything else (another name, iteration, getall) parses the head's lines
    once into a CIMultiDictProxy. A CIMultiDict of every header per request, names and values decoded, was
    with the loop around it, ~8 % of the router's function calls per request (docs/benchmarks.md)."""

    __slots__ = ("_buf", "_end", "_watched", "_all")

    def __init__(self, buf: bytes, end: int, watched: dict[bytes, bytes]) -> None:
        self._buf, self._end = buf, end  # the checked head is buf[:end]: its lines split if somebody asks
        self._watched = watched  # lower-cased name -> value (stripped), first occurrence
        self._all: CIMultiDictProxy | None = None

    def get(self, name: str, default=None):
        if self._all is None:
            key = _WATCHED_KEYS.get(name)  # the handler's own spellings: no case folding per lookup
            if key is None and name.lower() in _WATCHED:
                key = name.lower().encode()
            if key is not None:
                value = self._watched.get(key)
                return default if value is None else value.decode("latin-1")
        return self._parsed().get(name, default)

    def _parsed(self) -> CIMultiDictProxy:
        if self._all is None:
            pairs = []
            for line in self._buf[: self._end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                pairs.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
            self._all = CIMultiDictProxy(CIMultiDict(pairs))
        return self._all

    def __getitem__(self, name: str) -> str:
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name, _MISSING) is not _MISSING

    def __iter__(self):
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def items(self):
        return self._parsed().items()

    def keys(self):
        return self._parsed().keys()

    def values(self):
        return self._parsed().values()

    def getall(self, name: str, *default):
        return self._parsed().getall(name, *default)

    def getone(self, name: str, *default):
        return self._parsed().getone(name, *default)


_MISSING = object()
# a stream's head up to its request id: orchestrator.SSE_HEADERS, as FastStream writes them
_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Request-Id: "


class _Date:
    """The Date header line, formatted once a second."""

    second = -1
    line = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.line


class FastDoor:
    """What the fast connections of one listener share: the handler, the hand-over, limits, timers."""

    def __init__(
        self,
        serve: Serve,
        make_inner: Callable[[], asyncio.Protocol],
        body_limit: int,
        header_timeout: float,
        body_timeout: float,
        on_timeout: Callable[[str], None],
        on_hand_over: Callable[[str], None] = lambda _reason: None,
        serve_now: Callable[..., bool] | None = None,
    ) -> None:
        self.serve = serve
        # serve_now(conn, kind, path, headers, body) -> bool: a whole request served without a task (the
        # router's unary lane); False: `serve`'s coroutine runs in the connection's task
        self.serve_now = serve_now
        self.on_hand_over = on_hand_over  # counted: which clients miss the fast path, and why
        self.make_inner = make_inner  # the aiohttp side of a handed-over connection
        self.body_limit = body_limit
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.on_timeout = on_timeout
        self.conns: set[FastConnection] = set()
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def close(self) -> None:
        """Stop: every connection still here is closed (its request, if any, is cancelled)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.conns):
            if conn.inner is None and conn.transport is not None:
                conn.transport.close()

    async def _sweep(self) -> None:
        # one periodic pass instead of a keep-alive timer re-armed on every request
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for conn in list(self.conns):
                if conn.idle and now - conn.last > KEEPALIVE_TIMEOUT:
                    conn.transport.close()


class FastConnection(asyncio.Protocol):
    """One client connection: hot requests served here, the connection handed to aiohttp otherwise."""

    __slots__ = (
        "door", "loop", "transport", "inner", "buf", "task", "head", "timer", "timer_phase", "last",
        "keep_alive", "lost", "headers", "_reading_paused", "_writing_paused", "_drain", "_body_need",
        "_body_parts", "_body", "_body_started", "on_drained",
    )

    def __init__(self, door: FastDoor) -> None:
        self.door = door
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.inner: asyncio.Protocol | None = None  # the aiohttp side, once handed over
        self.buf = b""
        self.task: asyncio.Task | None = None  # the request being served
        self.head: tuple | None = None  # the parsed head of a request whose body is still coming
        self.timer: asyncio.TimerHandle | None = None
        self.timer_phase = ""
        self.last = self.loop.time()
        self.keep_alive = True
        self.lost = False
        self.headers: HeadHeaders | None = None  # the current request's (PDRequest.request.headers)
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future | None = None
        # a request whose handler started before its whole body came: bytes still missing, what came, and
        # the body (bytes, an ApiError, or a future its handler awaits)
        self._body_need = 0
        self._body_parts: list[bytes] = []
        self._body: object = None
        self._body_started = 0.0
        # a callback (the lane's stream relay) waiting for the client to read again: called once, then cleared
        self.on_drained: Callable[[], None] | None = None

    @property
    def idle(self) -> bool:
        return self.inner is None and self.task is None and not self.buf

    # ------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.door.conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        if self._body_need:
            self._feed_body(data)
            return
        self.buf = self.buf + data if self.buf else data
        if self.task is None:
            self._next()
        elif len(self.buf) > MAX_HEAD + self.door.body_limit and not self._reading_paused:
            # a pipelining client far ahead of its answers: stop reading until they are out
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        return None  # the transport closes; a request in progress is cancelled (connection_lost)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.door.conns.discard(self)
        self._disarm()
        if self.inner is not None:
            self.inner.connection_lost(exc)
            return
        if self.task is not None:
            self.task.cancel()  # the client went away: so does its request (as aiohttp's handler_cancellation)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
            return
        self._writing_paused = True

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
            return
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        drained = self.on_drained
        if drained is not None:
            self.on_drained = None
            drained()

    # ------------------------------------------------------------- reading requests
    def _next(self) -> None:
        """Start the next buffered request, wait for more of it, or hand the connection over."""
        buf = self.buf
        head = self.head
        if head is None:
            if not buf:
                return
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._hand_over("head_too_large")
                elif self.timer is None:
                    self._arm(self.door.header_timeout, "headers")
                return
            head = self._parse_head(buf, end)
            if type(head) is str:
                self._hand_over(head)
                return
            self.head = head
        kind, path, headers, keep_alive, start, stop = head
        self._disarm()
        self.head = None
        self.keep_alive = keep_alive
        self.headers = headers
        if len(buf) >= stop:  # the usual case: the whole request is here
            self.buf = buf[stop:]
            body = buf[start:stop]
            serve_now = self.door.serve_now
            if serve_now is None or not serve_now(self, kind, path, headers, body):
                self.run(self.door.serve(self, kind, path, headers, body))
            return
        # the handler starts now, as aiohttp's would, and waits for the body within the body timeout
        self.buf = b""
        self._body_parts = [buf[start:]]
        self._body_need = stop - len(buf)
        self._body = None
        self._body_started = self.loop.time()
        self._arm(self.door.body_timeout, "body")
        self.run(self.door.serve(self, kind, path, headers, None))

    def _feed_body(self, data: bytes) -> None:
        need = self._body_need
        if len(data) < need:
            self._body_parts.append(data)
            self._body_need -= len(data)
            return
        self._body_parts.append(data[:need])
        self.buf = data[need:]  # a pipelined request's first bytes
        self._body_need = 0
        self._disarm()
        body = b"".join(self._body_parts)
        self._body_parts = []
        self._resolve_body(body)

    def _resolve_body(self, outcome: object) -> None:
        waiter = self._body
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                if isinstance(outcome, BaseException):
                    waiter.set_exception(outcome)
                else:
                    waiter.set_result(outcome)
        else:
            self._body = outcome

    async def read_body(self) -> bytes:
        """The body of the request being served (its handler started before all of it came)."""
        outcome = self._body
        if outcome is None:
            outcome = self._body = self.loop.create_future()
        if isinstance(outcome, asyncio.Future):
            return await outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value]

    def _parse_head(self, buf: bytes, end: int) -> tuple | str:
        """(kind, path, headers, keep_alive, body start, body end) of a hot request, or why it is aiohttp's.
        One pass over the header lines (heads.request_head: in C where built): the fields that decide who serves
        the request, and the few the handler reads (HeadHeaders); no dict of every header."""
        head = request_head(buf, end, self.door.body_limit)
        if type(head) is str:
            return head
        route, watched, keep_alive, length = head
        kind, path = _ROUTES[route]
        start = end + 4
        return kind, path, HeadHeaders(buf, end, watched), keep_alive, start, start + length

    def _hand_over(self, reason: str) -> None:
        """The connection becomes aiohttp's, from the request boundary it is at (nothing was answered for
        the bytes it gets)."""
        self.door.on_hand_over(reason)
        self._disarm()
        self.head = None
        self.door.conns.discard(self)
        inner = self.inner = self.door.make_inner()
        inner.connection_made(self.transport)
        data, self.buf = self.buf, b""
        if self._writing_paused:
            inner.pause_writing()
        if data:
            inner.data_received(data)

    # ------------------------------------------------------------- read timeouts
    def _arm(self, timeout: float, phase: str) -> None:
        self._disarm()
        self.timer_phase = phase
        self.timer = self.loop.call_later(timeout, self._expired, timeout, phase)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_phase = ""

    def _expired(self, timeout: float, phase: str) -> None:
        self.timer = None
        self.timer_phase = ""
        if self.transport.is_closing():
            return
        self.door.on_timeout(phase)
        peer = self.transport.get_extra_info("peername")
        if phase == "body":  # its handler answers the 408 (and logs it as the request's outcome)
            log.info("client %s: request body incomplete after %.1fs, connection closed (408)", peer,
                     self.loop.time() - self._body_started)
            self._body_need = 0
            self._body_parts = []
            self.keep_alive = False
            self._resolve_body(ApiError(408, f"the request body did not arrive within {timeout:g}s",
                                        "request_timeout", headers={"Connection": "close"}, close=True))
            return
        if self.task is not None:
            return
        log.info("client %s: no complete request headers within %gs, connection closed (408)", peer, timeout)
        self.keep_alive = False
        self.send(ApiError(408, f"the request headers did not arrive within {timeout:g}s",
                           "request_timeout").response())
        self.transport.close()

    # ------------------------------------------------------------- serving
    def run(self, work: Coroutine[Any, Any, tuple]) -> None:
        """Serve the current request in the connection's task: `work` returns (answer, close after it)."""
        self.task = self.loop.create_task(self._serve(work))

    async def _serve(self, work: Coroutine[Any, Any, tuple]) -> None:
        try:
            resp, close = await work
            if not resp.prepared:  # a whole answer (a stream has been written already)
                self.send(resp, close)
        except (asyncio.CancelledError, ConnectionError):
            self.transport.close()  # the client went away (counted by the handler), or the router stops
            return
        except Exception:  # noqa: BLE001 - the handler answers its own errors; this is a cut stream
            log.debug("connection closed after an unexpected error", exc_info=True)
            self.transport.close()
            return
        finally:
            self.task = None
            self.headers = None
            self._body = None
        self._after_answer(False)

    def answered_now(self, resp, close: bool, within_next: bool) -> None:
        """A request served without a task (FastDoor.serve_now) is answered. `within_next`: answered from within
        _next itself (an error found at once): a pipelined request after it starts on the next loop iteration,
        not by recursion."""
        self.task = None
        self.headers = None
        if self.lost:
            return
        try:
            self.send(resp, close)
        except ConnectionError:  # closing: the client went away as it was answered
            self.transport.close()
            return
        self._after_answer(within_next)

    def stream_ended(self, close: bool = False) -> None:
        """A stream served without a task (the lane) has ended, written in full: the connection goes on, or ends
        (`close`: after an error that cut the stream)."""
        self.task = None
        self.headers = None
        if close:
            self.keep_alive = False
        if not self.lost:
            self._after_answer(False)

    def _after_answer(self, later: bool) -> None:
        if not self.keep_alive or self.lost:
            self.transport.close()
            return
        self.last = self.loop.time()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if self.buf:
            if later:
                self.loop.call_soon(self._next_if_idle)
            else:
                self._next()

    def _next_if_idle(self) -> None:
        if self.task is None and self.inner is None and not self.lost:
            self._next()

    def write(self, data: bytes) -> None:
        if self.lost or self.transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._writing_paused and not self.lost:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def send(self, resp: web.Response | Unary, close: bool = False) -> None:
        """A whole answer (a unary result or an error); `close`: the connection ends after it."""
        if close:
            self.keep_alive = False
        if type(resp) is Unary:  # an engine's answer, passed on
            body = resp.body
            self.write(b"".join((
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: ", resp.rid.encode(),
                b"\r\n", _Date.get(), b"" if self.keep_alive else b"Connection: close\r\n",
                b"Content-Length: %d\r\n\r\n" % len(body), body,
            )))
            return
        body = resp.body or b""
        head = [b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason.encode("latin-1"))]
        for name, value in resp.headers.items():
            if name.lower() not in _NO_COPY:
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(_Date.get())
        if not self.keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        head.append(body)
        self.write(b"".join(head))

    def new_stream(self, headers: dict) -> FastStream:
        """The client's stream (what PDRequest.new_stream makes): chunked SSE on this connection."""
        return FastStream(self, headers)

    def sse_stream(self, rid: str) -> FastStream:
        """new_stream with the orchestrator's SSE headers (SSE_HEADERS and the request id), its head written
        from bytes made once."""
        stream = FastStream(self, None)
        stream.rid = rid
        return stream


class FastStream:
    """A streamed answer on a FastConnection, with the part of aiohttp's StreamResponse the orchestrator
    uses: prepare, write (waits while the client is not reading), write_eof, status, prepared."""

    __slots__ = ("conn", "headers", "status", "prepared", "_ended", "rid")

    def __init__(self, conn: FastConnection, headers: dict | None) -> None:
        self.conn = conn
        self.headers = headers  # None: the SSE head (FastConnection.sse_stream)
        self.rid = ""
        self.status = 200
        self.prepared = False
        self._ended = False

    def _head(self) -> bytes:
        conn = self.conn
        if self.headers is None:
            head = [_SSE_HEAD, self.rid.encode("latin-1"), b"\r\n"]
        else:
            head = [b"HTTP/1.1 200 OK\r\n"]
            for name, value in self.headers.items():
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(_Date.get())
        if not conn.keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"Transfer-Encoding: chunked\r\n\r\n")
        return b"".join(head)

    async def prepare(self, _request=None) -> None:
        if self.prepared:
            return
        self.conn.write(self._head())
        self.prepared = True

    async def write(self, data: bytes) -> None:
        if data:
            conn = self.conn
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            if conn._writing_paused:  # the client reads slower than the engine writes: wait for it
                await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._ended:
            return
        self._ended = True
        if data:
            await self.write(data)
        self.conn.write(b"0\r\n\r\n")
        await self.conn.drain()

    # ------------------------------------------------------------- without awaiting (the lane's stream relay)
    def start(self, first: bytes) -> bool:
        """The head and the first piece in one write. Whether the client is behind (resume when
        `conn.on_drained` is called) or gone (ConnectionResetError) is the caller's to check."""
        self.prepared = True
        return self._send(self._head() + b"%x\r\n%b\r\n" % (len(first), first))

    def send(self, data: bytes) -> bool:
        """One piece; True when the client is behind (stop reading from the engine until on_drained)."""
        return self._send(b"%x\r\n%b\r\n" % (len(data), data))

    def end(self, data: bytes = b"") -> bool:
        """The last piece (if any) and the stream's end; True when the client has not read all of it yet."""
        self._ended = True
        return self._send((b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)) if data else b"0\r\n\r\n")

    def _send(self, data: bytes) -> bool:
        conn = self.conn
        conn.write(data)
        return conn._writing_paused
