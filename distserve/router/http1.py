"""A small HTTP/1.1 client for the router's engine calls: keep-alive connections pooled per engine.

Why not aiohttp's client: on the hot path it costs about 160 µs of CPU per call on this kind of machine,
this one about 20 µs (one pre-built request written in one syscall, a minimal response parser). Engines
are trusted peers speaking plain HTTP/1.1 (lmdeploy's uvicorn, the reference engine's aiohttp); the
parser still checks everything it relies on and fails the call (never the process) on anything else.

- `EnginePool.request(base_url, method, path, body, headers)` -> `Response` once the status line and
  headers arrived; then `read()` the whole body or `readany(idle_timeout)` it piece by piece (chunked
  transfer coding decoded). A finished response returns its connection to the pool by itself.
- `EnginePool.call(base_url, method, path, body, headers, deadline, sink)`: the same call by callbacks, for
  the lane (distserve/router/unary.py): the whole answer goes to `sink.answered(status, body)`, or its
  failure (what `request` would raise) to `sink.failed(exc)`; no task, future or coroutine on the usual path.
  With `stream=True` (a StreamCall) a 200 answer's body goes to `sink.piece(data)` piece by piece as it
  arrives, and its end to `sink.ended(failure or None)`.
- Failures raise `UpstreamError` with kind "connect" (refused, unreachable, connect timeout) or
  "disconnect" (the connection dropped before the answer ended). A pooled connection the engine closed
  while idle is replaced transparently (the request never reached the engine).
- At most `connects_per_host` connection set-ups are in progress per engine: a cold replica facing a
  burst must not overflow an engine's listen backlog (dropped SYNs come back only after a second).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from distserve.router import heads
from distserve.router.heads import answer_head, chunk_size_py, whole_chunks
from distserve.router.upstream import UpstreamError

MAX_HEAD = 64 * 1024
PAUSE_ABOVE = 1 << 20  # buffered body bytes above which reading from the engine pauses

# the answer's framing states: the five a head leads to are the head parsers' own (heads.py), the rest are
# inside a chunked body
_HEAD, _LENGTH, _CHUNK_SIZE = heads.HEAD, heads.LENGTH, heads.CHUNK_SIZE
_UNTIL_CLOSE, _DONE = heads.UNTIL_CLOSE, heads.DONE
_CHUNK_DATA, _CHUNK_END, _TRAILERS = 3, 4, 5


class _Lost(Exception):
    """The connection dropped; `before_response` when not one byte of the answer had arrived."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class Response:
    __slots__ = (
        "status",
        "_raw_head",
        "_headers",
        "_conn",
        "_chunks",
        "_size",
        "_waiter",
        "_head",
        "_done",
        "_error",
        "_loop",
        "_paused",
        "_slot",
        "_deadlines",
        "_whole",
        "_idle_timer",
        "_idle",
        "_wait_since",
        "_on_end",
        "_relay",
    )

    def __init__(self, conn: "_Connection", loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self._raw_head = b""
        self._headers: dict[str, str] | None = None
        self._conn: _Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future | None = None
        self._head: asyncio.Future = loop.create_future()
        self._done = False
        self._error: BaseException | None = None
        self._loop = loop
        self._paused = False
        self._deadlines: _Deadlines | None = None  # the call's deadline, when it has one: its slot there
        self._slot = 0
        self._whole = False  # read() wants all of it: no back-pressure pauses
        # readany's idle timeout: one timer per idle period, not one per piece (a stream has hundreds)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle = 0.0
        self._wait_since = 0.0
        self._on_end: Callable[[Response], None] | None = None  # a Call reading its answer through it
        self._relay: StreamCall | None = None  # a streamed Call taking each piece as it comes, not buffered

    @property
    def headers(self) -> dict[str, str]:
        """The answer's headers, names lower-cased (parsed on first use: the hot path reads none)."""
        if self._headers is None:
            self._headers = _parse_headers(self._raw_head)
        return self._headers

    # ------------------------------------------------------------- fed by the connection
    def _feed(self, data: bytes) -> None:
        relay = self._relay
        if relay is not None:
            relay._piece(self, data)
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > PAUSE_ABOVE and self._conn is not None and not self._paused and not self._whole:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._stop_timers()
        self._wake()
        if self._on_end is not None:
            self._on_end(self)

    def _complete(self, body: bytes) -> None:
        """The whole body at once (the usual unary answer): no pause check or size to keep."""
        self._chunks.append(body)
        self._finish()

    def _fail(self, exc: BaseException) -> None:
        if self._done or self._error is not None:  # the first failure is the one reported
            return
        self._error = exc
        self._conn = None
        self._stop_timers()
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved: nobody may be waiting any more
        self._wake()
        if self._on_end is not None:
            self._on_end(self)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------------- for the caller
    async def readany(self, idle_timeout: float | None = None) -> bytes:
        """The next piece of the body (whatever arrived), b"" at its end."""
        while not self._chunks:
            if self._done:
                return b""
            if idle_timeout is not None:
                self._idle = idle_timeout
                self._wait_since = now = self._loop.time()
                if self._idle_timer is None:
                    self._idle_timer = self._loop.call_at(now + idle_timeout, self._idle_check)
            await self._more()
        data = self._take()
        if self._paused and self._conn is not None:
            self._resume()
        return data

    async def read(self) -> bytes:
        """The whole body. It stays in the response until complete: a caller cancelled midway can hand the
        response on (EnginePool.request's `on_cancel`) and whoever reads it next loses nothing."""
        if not self._head.done():  # handed over before its head arrived
            await self._head
        self._whole = True
        if self._paused and self._conn is not None:
            self._resume()
        while not self._done:
            await self._more()
        return self._take()

    def take_whole(self) -> bytes:
        """The whole body of a complete answer (`complete`), at once."""
        return self._take()

    async def _more(self) -> None:
        """Until the connection feeds more, finishes or fails (then raised, as an UpstreamError)."""
        if self._error is not None:
            raise _as_upstream(self._error)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        return data

    def _resume(self) -> None:
        self._paused = False
        self._conn.resume_reading()

    @property
    def complete(self) -> bool:
        return self._done

    def close(self) -> None:
        """Abandon the answer: an unfinished one takes its connection down with it."""
        self._stop_timers()
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()

    def _idle_check(self) -> None:
        """The idle timer: fails the current wait if it has lasted the idle timeout, else waits on until it
        would (a wait that began later than this timer did moves it on instead of re-arming per piece)."""
        self._idle_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait arms a timer again
        due = self._wait_since + self._idle
        if self._loop.time() >= due:
            waiter.set_exception(asyncio.TimeoutError("the engine stayed silent for too long"))
        else:
            self._idle_timer = self._loop.call_at(due, self._idle_check)

    def _stop_timers(self) -> None:
        """The call's deadline and the idle timer: neither applies to an ended or abandoned answer."""
        if self._deadlines is not None:  # clear_deadline, inline: this runs twice per engine call
            self._deadlines.remove(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def clear_deadline(self) -> None:
        """The call's deadline no longer applies (a stream past its first byte: idle timeouts take over)."""
        if self._deadlines is not None:
            self._deadlines.remove(self)

    def _expire(self) -> None:
        """The call's deadline passed: fail it (whoever awaits the head or the body gets TimeoutError)
        and drop the connection, which still owes the rest of an answer."""
        conn = self._conn
        if conn is not None and conn._resp is self:
            conn._resp = None
        self._fail(asyncio.TimeoutError("the engine call ran out of time"))
        if conn is not None:
            conn.abort()




class Call:
    """One engine call answered by callbacks (EnginePool.call): `sink.answered(status, body)` once the whole
    answer is in, or `sink.failed(exc)` with what EnginePool.request would have raised (UpstreamError,
    TimeoutError at the deadline); exactly one of them, unless the caller `cancel()`s first. The sink may be
    swapped while the call runs (a request whose client left hands its prefill answer to a cleaner).

    Why: a task per request, a future per answer and the coroutines between them were a fifth of the router's
    CPU per non-streamed request (docs/benchmarks.md, "Seventeenth pass")."""

    __slots__ = ("pool", "key", "request", "sink", "conn", "reused", "retried", "done", "deadline",
                 "_deadlines", "_slot")

    def __init__(self, pool: "EnginePool", key: tuple[str, int], request: bytes, sink, deadline: float) -> None:
        self.pool = pool
        self.key = key
        self.request = request
        self.sink = sink
        self.conn: _Connection | None = None
        self.reused = False  # on a pooled connection: the engine may have closed it meanwhile
        self.retried = False
        self.done = False
        self.deadline = deadline
        self._deadlines: _Deadlines | None = None
        self._slot = 0

    def _start(self, conn: "_Connection") -> None:
        self.conn = conn
        conn._call = self
        conn._state = _HEAD
        conn._buf.clear()
        conn._got_bytes = False
        conn.transport.write(self.request)

    def _answered(self, status: int, body: bytes) -> None:
        self.conn = None
        self._end()
        self.sink.answered(status, body)

    def _fail(self, exc: BaseException) -> None:
        if self.done:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn._call = None
            conn.abort()
        self._end()
        self.sink.failed(exc)

    def _lost(self, exc: _Lost) -> None:
        """The connection dropped before the answer ended: a pooled connection the engine had closed (the
        request never reached it) is replaced once, as EnginePool.request does; otherwise the call fails."""
        self.conn = None
        if self.reused and exc.before_response and not self.retried and not self.done:
            self.retried, self.reused = True, False
            self.pool._connect_for(self)
            return
        self._fail(UpstreamError("disconnect", str(exc)))

    def _ended(self, resp: Response) -> None:
        """The end of an answer that did not come in one piece (read by a Response on the connection)."""
        if resp._error is not None:
            err = resp._error
            if isinstance(err, _Lost):
                self._lost(err)
            else:
                self._fail(_as_upstream(err))
            return
        self._answered(resp.status, resp._take())

    def _expire(self) -> None:
        """The deadline passed (_Deadlines): the connection, which still owes the answer, is dropped."""
        self._deadlines = None
        self._fail(asyncio.TimeoutError("the engine call ran out of time"))

    def _read_by(self, resp: Response) -> None:
        """The answer did not come whole in its first piece: `resp` reads it and tells the call when it ends."""
        resp._whole = True
        resp._on_end = self._ended

    def _end(self) -> None:
        self.done = True
        if self._deadlines is not None:
            self._deadlines.remove(self)

    def cancel(self) -> None:
        """Give the call up: no callback follows; an unfinished answer takes its connection down."""
        if self.done:
            return
        self._end()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn._call = None
            conn.abort()


class StreamCall(Call):
    """A streamed engine call answered by callbacks (EnginePool.call with stream=True): each piece of a 200
    answer's body goes to `sink.piece(data)` as it arrives, not buffered (the first one ends the call's
    deadline: its first byte came in time; idle timeouts between pieces are the sink's), and the end of such a
    stream to `sink.ended(None)`, or `sink.ended(UpstreamError)` when it broke off. Before the first piece,
    what a Call would say: `sink.answered(status, body)` for an answer that is not a 200 stream (a non-200's
    whole body) or `sink.failed(exc)`. `pause()` / `resume()` reading from the engine: back-pressure from a
    client reading slower than the engine writes.

    Why: the streamed request's decode served with no task, future or coroutine per piece (docs/benchmarks.md,
    "Twenty-first pass")."""

    __slots__ = ("pieces", "held")

    def __init__(self, pool: "EnginePool", key: tuple[str, int], request: bytes, sink, deadline: float) -> None:
        super().__init__(pool, key, request, sink, deadline)
        self.pieces = 0  # pieces relayed to the sink
        self.held: list[bytes] = []  # a non-200 answer's body, kept whole for sink.answered

    def _read_by(self, resp: Response) -> None:
        resp._on_end = self._ended
        resp._relay = self

    def _piece(self, resp: Response, data: bytes) -> None:
        if self.done or not data:  # given up (cancel): nothing more for the sink
            return
        if resp.status != 200:
            self.held.append(data)
            return
        if not self.pieces and self._deadlines is not None:
            self._deadlines.remove(self)
        self.pieces += 1
        self.sink.piece(data)

    def _ended(self, resp: Response) -> None:
        if self.pieces:
            if not self.done:
                self.conn = None
                self._end()
                self.sink.ended(None if resp._error is None else _as_upstream(resp._error))
            return
        if resp._error is not None:  # a failure before the first piece: a Call's (its retry included)
            Call._ended(self, resp)
            return
        self._answered(resp.status, b"".join(self.held) if self.held else resp._take() if resp._chunks else b"")

    def _answered(self, status: int, body: bytes) -> None:
        if status != 200:
            Call._answered(self, status, body)
            return
        self.conn = None  # back in the pool already
        if not body:
            self._fail(UpstreamError("disconnect", "the engine closed the stream before its first byte"))
            return
        self.pieces = 1  # a 200 stream whose whole body came at once: one piece, then its end
        self.sink.piece(body)
        if not self.done:
            self._end()
            self.sink.ended(None)

    def pause(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()


class _Deadlines:
    """The engine calls' deadlines, grouped in slots: one loop timer per slot in use rather than one per call.
    A loop timer per call (made, then cancelled when the answer is in: nearly always) was ~9 % of the
    router's samples (py-spy --gil over tools/bench_hot_path.py: creating and cancelling); joining a slot is a
    set insertion. A deadline fires after it, never before: within 25 ms for a call with under 25 s to go,
    200 ms under 200 s, 1 s beyond (the prefill's and the request's timeouts are minutes: a timer per 25 ms
    for those kept thousands pending).

    The last two slots joined are kept at hand with the deadlines they cover: calls made close together with the
    same timeout (the prefills' calls, the decodes') join them without the loop's clock or a lookup (a third of
    add's work). Such a call gets the grain its slot was made with, coarser than its own only where the slot was
    made long before for a far deadline (then it fires up to that grain after its deadline)."""

    __slots__ = ("loop", "slots", "timers", "_lo", "_hi", "_set", "_key", "_lo2", "_hi2", "_set2", "_key2")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, set[Response]] = {}
        self.timers: dict[int, asyncio.TimerHandle] = {}
        # the last slot joined the long way (_set, _key) and the deadlines [_lo, _hi) it covers, and the one
        # before it (...2): an empty range once the slot is due
        self._lo = self._hi = self._lo2 = self._hi2 = 0.0
        self._set: set[Response] = set()
        self._set2: set[Response] = self._set
        self._key = self._key2 = 0

    def add(self, resp: Response, deadline: float) -> None:
        if self._lo <= deadline < self._hi:
            self._set.add(resp)
            resp._deadlines, resp._slot = self, self._key
            return
        if self._lo2 <= deadline < self._hi2:
            self._set2.add(resp)
            resp._deadlines, resp._slot = self, self._key2
            return
        ahead = deadline - self.loop.time()
        per_s = 40 if ahead < 25.0 else 5 if ahead < 200.0 else 1  # slots per second
        slot = int(deadline * per_s) + 1  # the first slot boundary after the deadline
        key = slot * 64 + per_s  # one key space for the three grains
        members = self.slots.get(key)
        if members is None:
            members = self.slots[key] = set()
            self.timers[key] = self.loop.call_at(slot / per_s, self._due, key)
        # kept at hand, with the deadlines it serves: those whose first boundary after them is the slot's
        self._lo2, self._hi2, self._set2, self._key2 = self._lo, self._hi, self._set, self._key
        self._lo, self._hi, self._set, self._key = (slot - 1) / per_s, slot / per_s, members, key
        members.add(resp)
        resp._deadlines, resp._slot = self, key

    def remove(self, resp: Response) -> None:
        members = self.slots.get(resp._slot)
        if members is not None:
            members.discard(resp)
        resp._deadlines = None

    def _due(self, slot: int) -> None:
        if slot == self._key:
            self._lo = self._hi = 0.0
        if slot == self._key2:
            self._lo2 = self._hi2 = 0.0
        self.timers.pop(slot, None)
        for resp in self.slots.pop(slot, ()):
            resp._deadlines = None
            resp._expire()

    def close(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        self.slots.clear()
        self._lo = self._hi = self._lo2 = self._hi2 = 0.0


def _as_upstream(exc: BaseException) -> BaseException:
    if isinstance(exc, _Lost):
        return UpstreamError("disconnect", str(exc))
    return exc


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "EnginePool", key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.alive = True
        self.idle_since = 0.0
        self._loop = pool.loop
        self._buf = bytearray()
        self._resp: Response | None = None
        self._state = _DONE
        self._remaining = 0
        self._keep_alive = True
        self._got_bytes = False
        self._call: Call | None = None  # a callback call (EnginePool.call) waiting for its answer's head
        self.reading_paused = False  # back-pressure from the answer's reader: undone before the connection is reused

    # ------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self._resp
        if resp is None:
            if self._call is not None:
                self._call_data(data)
                return
            self.abort()  # nothing asked: a broken peer
            return
        self._got_bytes = True
        try:
            if self._state == _HEAD and not self._buf:
                # The usual answer: its head and whole Content-Length body in this one piece. Taken as is,
                # without the buffer's copies and the general loop (8 calls per answer less).
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    head, data = data[:end], data[end + 4 :]
                    if self._head(resp, head) and self._state == _LENGTH and len(data) == self._remaining:
                        self._state = _DONE
                        self._release()
                        resp._complete(data)
                        return
                    if not data and self._state != _DONE:
                        return  # the rest comes later
            self._parse(resp, data)
        except ValueError as exc:
            resp._fail(UpstreamError("disconnect", f"bad HTTP answer from the engine: {exc}"))
            self.abort()

    def _call_data(self, data: bytes) -> None:
        """An answer for a callback call: whole in this piece (the usual case), handed over at once; else read
        by a Response like any other, which tells the call when it ends."""
        call = self._call
        self._got_bytes = True
        if not self._buf:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                try:
                    status, state, remaining, keep_alive = answer_head(data[:end])
                except ValueError as exc:
                    call._fail(UpstreamError("disconnect", f"bad HTTP answer from the engine: {exc}"))
                    return
                if state == _LENGTH and len(data) - end - 4 == remaining:
                    self._call = None
                    self._keep_alive = keep_alive
                    self._state = _DONE
                    self._release()
                    call._answered(status, data[end + 4 :])
                    return
                if state != _HEAD:  # the head is read (a stream's, usually): the body from here, not parsed twice
                    resp = self._read_for(call)
                    self._state, self._remaining, self._keep_alive = state, remaining, keep_alive
                    resp.status = status
                    resp._raw_head = data[:end]
                    rest = data[end + 4 :]
                    try:
                        if rest or state == _DONE:
                            self._parse(resp, rest)
                    except ValueError as exc:
                        resp._fail(UpstreamError("disconnect", f"bad HTTP answer from the engine: {exc}"))
                        self.abort()
                    return
        self._read_for(call)
        self.data_received(data)

    def _read_for(self, call: Call) -> Response:
        """The call's answer is read by a Response from here on (it tells the call when it ends)."""
        resp = Response(self, self._loop)
        call._read_by(resp)
        self._resp = resp
        self._call = None
        return resp

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        resp, self._resp = self._resp, None
        if resp is None:
            call, self._call = self._call, None
            if call is not None:
                call._lost(_Lost(f"connection to {self.key[0]}:{self.key[1]} lost" + (f": {exc}" if exc else ""),
                                 before_response=not self._got_bytes))
            return
        if self._state == _UNTIL_CLOSE:
            resp._finish()
            return
        resp._fail(
            _Lost(
                f"connection to {self.key[0]}:{self.key[1]} lost" + (f": {exc}" if exc else ""),
                before_response=not self._got_bytes,
            )
        )

    # ------------------------------------------------------------- requests
    def start(self, request: bytes) -> Response:
        resp = Response(self, self._loop)
        self._resp = resp
        self._state = _HEAD
        self._buf.clear()
        self._got_bytes = False
        self.transport.write(request)
        return resp

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    def _release(self) -> None:
        self._resp = None
        if self.reading_paused:  # its answer ended in the piece that paused it: the next call must be read
            self.resume_reading()
        if self._keep_alive and self.alive and not self._buf:
            self.pool._put_idle(self)
        else:
            self.abort()

    # ------------------------------------------------------------- parsing
    def _parse(self, resp: Response, data: bytes) -> None:
        state = self._state
        if state == _LENGTH and not self._buf:  # the common fast path: body bytes of a known length
            n = len(data)
            if n < self._remaining:
                self._remaining -= n
                resp._feed(data)
                return
            if n == self._remaining:
                resp._feed(data)
                self._end(resp)
                return
        elif state == _CHUNK_SIZE and not self._buf:  # a stream's pieces: whole chunks read in place
            data = self._whole_chunks(resp, data)
            if data == b"0\r\n\r\n":  # the last chunk, no trailers: the usual end of a stream
                self._end(resp)
                return
            if not data:
                return
        self._buf += data
        buf = self._buf
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ValueError("header section too large")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                if not self._head(resp, head):
                    continue  # a 1xx answer: the real one follows
            elif state == _LENGTH or state == _CHUNK_DATA:  # body bytes: all of a Content-Length, or a chunk's
                if not buf:
                    return
                take = min(self._remaining, len(buf))
                resp._feed(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DONE if state == _LENGTH else _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ValueError("chunk size line too long")
                    return
                size = chunk_size_py(bytes(buf[:end]))
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise ValueError("missing CRLF after a chunk")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:  # the empty line ending the (usually empty) trailer section
                    self._state = _DONE
            elif state == _UNTIL_CLOSE:
                if buf:
                    resp._feed(bytes(buf))
                    buf.clear()
                return
            if self._state == _DONE:
                if buf:
                    raise ValueError("bytes after the end of the answer")
                self._end(resp)
                return

    def _end(self, resp: Response) -> None:
        """The answer is complete: the connection goes back to the pool, the response finishes."""
        self._state = _DONE
        self._release()
        resp._finish()

    def _whole_chunks(self, resp: Response, data: bytes) -> bytes:
        """Feed the whole chunks at the start of `data` (at a chunk boundary, nothing buffered) as one piece,
        cut out in place (heads.whole_chunks: in C where built): the general loop below copies into the buffer
        and deletes from it per chunk. Returns the rest (a partial chunk, the last chunk and trailers) for that
        loop."""
        payload, pos = whole_chunks(data)
        if payload:
            resp._feed(payload)
        return data[pos:] if pos else data

    def _head(self, resp: Response, head: bytes) -> bool:
        # Only what framing needs (heads.answer_head: in C where built): the other headers are parsed if somebody
        # reads them (Response.headers).
        status, state, remaining, keep_alive = answer_head(head)
        if state == _HEAD:
            return False  # a 1xx answer: the real one follows
        self._state = state
        self._remaining = remaining
        self._keep_alive = keep_alive
        resp.status = status
        resp._raw_head = head
        if not resp._head.done():
            resp._head.set_result(None)
        return True


def _parse_headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


# How long an idle engine connection may be reused. The engine decides when one ends (uvicorn, lmdeploy's server:
# 5 s idle; aiohttp, the reference engine: 75 s): its close is seen here (connection_lost) and that connection is
# never taken again, and a close racing a request is retried once. So this only bounds a connection the engine
# dropped silently. At 30 s it threw away the reference engines' live connections after every quiet half-minute,
# and the next burst paid two connects per request: the concurrency-64 p99 of tools/bench_router.py's
# non-streamed cells (each a minute or more after the last) rose 1.5-2.5x over the streamed ones (warm: measured
# right after). docs/benchmarks.md, "Fourth pass".
IDLE_TTL = 120.0


class EnginePool:
    def __init__(
        self,
        connect_timeout: float = 2.0,
        connects_per_host: int = 32,
        idle_ttl: float = IDLE_TTL,
        max_idle_per_host: int = 1024,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.idle_ttl = idle_ttl
        self.max_idle_per_host = max_idle_per_host
        self._connects_per_host = connects_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._gates: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._targets: dict[str, tuple[tuple[str, int], bytes]] = {}
        self._closed = False
        self._deadlines = _Deadlines(self.loop)
        self._connecting: set[asyncio.Task] = set()  # connects for callback calls (owned: cancelled by close)

    def _target(self, base_url: str) -> tuple[tuple[str, int], bytes]:
        target = self._targets.get(base_url)
        if target is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError("connect", f"unsupported engine URL {base_url!r} (plain http only)")
            port = parts.port or 80
            target = self._targets[base_url] = ((parts.hostname, port), parts.netloc.encode())
        return target

    def _put_idle(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self.max_idle_per_host:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: warm, and old ones age out
            if conn.alive and now - conn.idle_since < self.idle_ttl:
                return conn
            conn.abort()
        return None

    async def _connect(self, key: tuple[str, int], timeout: float) -> _Connection:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = asyncio.Semaphore(self._connects_per_host)
        async with gate:
            try:
                _, conn = await asyncio.wait_for(
                    self.loop.create_connection(lambda: _Connection(self, key), key[0], key[1]),
                    timeout,
                )
            except asyncio.TimeoutError:
                raise UpstreamError("connect", f"connect to {key[0]}:{key[1]} timed out") from None
            except OSError as exc:
                raise UpstreamError(
                    "connect", f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}"
                ) from None
        return conn

    async def request(
        self, base_url: str, method: bytes, path: bytes, body: bytes = b"", headers: bytes = b"",
        deadline: float | None = None, on_cancel: Callable[[Response], None] | None = None,
    ) -> Response:
        """`headers`: complete header lines (each ending in CRLF), Host and Content-Length excluded.

        `deadline` (the loop's clock): the whole call, connecting, the head and the body, must end by then,
        or it fails with TimeoutError and its connection is dropped, soon after it (a slot of _Deadlines: on
        the hot path a set insertion, where a timer per call cost several times more and `asyncio.timeout`
        ten times that).
        `on_cancel(response)`: the caller is cancelled after the request went out; the response (and its
        connection, and its deadline) is handed over instead of being dropped."""
        key, host = self._target(base_url)
        request = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method, path, host, headers, len(body), body)
        for attempt in range(2):
            conn = self._take_idle(key)
            reused = conn is not None
            if conn is None:
                timeout = self.connect_timeout
                if deadline is not None:
                    timeout = min(timeout, deadline - self.loop.time())
                    if timeout <= 0:
                        raise asyncio.TimeoutError("the engine call ran out of time")
                conn = await self._connect(key, timeout)
            resp = conn.start(request)
            if deadline is not None:
                self._deadlines.add(resp, deadline)
            try:
                await resp._head
                return resp
            except _Lost as exc:
                if reused and exc.before_response and attempt == 0:
                    continue  # the engine closed this idle connection: the request never reached it
                raise UpstreamError("disconnect", str(exc)) from None
            except asyncio.CancelledError:
                if on_cancel is None:
                    conn.abort()  # the engine sees the connection go
                else:
                    on_cancel(resp)
                raise
            except BaseException:
                conn.abort()  # timed out: the engine sees the connection go
                raise
        raise AssertionError("unreachable")

    def call(
        self, base_url: str, method: bytes, path: bytes, body: bytes, headers: bytes, deadline: float, sink,
        stream: bool = False,
    ) -> Call:
        """`request`, answered by callbacks (see Call; `stream`: a StreamCall): on a pooled connection when one is
        idle (the usual case: nothing awaited at all), else after connecting in a task of the pool's own.
        UpstreamError at once for an engine URL the pool cannot use."""
        key, host = self._target(base_url)
        call = (StreamCall if stream else Call)(
            self, key, b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
                method, path, host, headers, len(body), body), sink, deadline)
        self._deadlines.add(call, deadline)
        conn = self._take_idle(key)
        if conn is None:
            self._connect_for(call)
        else:
            call.reused = True
            call._start(conn)
        return call

    def _connect_for(self, call: Call) -> None:
        task = self.loop.create_task(self._connect_call(call))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect_call(self, call: Call) -> None:
        try:
            timeout = min(self.connect_timeout, call.deadline - self.loop.time())
            if timeout <= 0:
                raise asyncio.TimeoutError("the engine call ran out of time")
            conn = await self._connect(call.key, timeout)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the call's failure, classified by its sink
            call._fail(exc)
            return
        if call.done:  # expired or given up meanwhile: the new connection serves the next call
            self._put_idle(conn)
            return
        call._start(conn)

    def close(self) -> None:
        self._closed = True
        for task in self._connecting:
            task.cancel()
        self._deadlines.close()
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
