"""The router's engine-facing HTTP/1.1 client against a real TCP server that writes scripted answers.

The server side is raw bytes on purpose: every framing an engine may use (content-length, chunked with
extensions and trailers, close-delimited, 1xx first), split at every byte boundary, and broken peers.
"""

from __future__ import annotations

import asyncio

import pytest

from distserve.router.http1 import IDLE_TTL, EnginePool
from distserve.router.upstream import UpstreamError


class ScriptedServer:
    """Answers each request on a connection with the next scripted answer, written in `pieces`-byte slices."""

    def __init__(
        self, answers: list[bytes], pieces: int = 0, close_after: int | None = None, hold_open: bool = False
    ) -> None:
        self.answers = list(answers)
        self.hold_open = hold_open
        self.pieces = pieces
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> "ScriptedServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if self.pieces:
                    for i in range(0, len(answer), self.pieces):
                        writer.write(answer[i : i + self.pieces])
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(answer)
                await writer.drain()
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    break
            if self.hold_open:
                await reader.read()  # silent until the client gives up
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


CL = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": "b"}\n'
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    b"7;ext=1\r\ndata: 1\r\n"
    b"10\r\n\ndata: [DONE]\n\n\n\r\n"
    b"0\r\nX-Trailer: t\r\n\r\n"
)


@pytest.mark.parametrize("pieces", [0, 1, 3])
async def test_framings_split_anywhere(pieces):
    close_delimited = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    server = await ScriptedServer([b"HTTP/1.1 100 Continue\r\n\r\n" + CL, CHUNKED], pieces=pieces).start()
    other = await ScriptedServer([close_delimited], pieces=pieces, close_after=1).start()
    pool = EnginePool(connect_timeout=2)
    try:
        r = await pool.request(server.url, b"POST", b"/v1/x", b'{"q": 1}', b"X-Request-Id: r1\r\n")
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        assert await r.read() == b'{"a": "b"}\n'
        r = await pool.request(server.url, b"POST", b"/v1/y", b"{}")
        assert "chunked" in r.headers["transfer-encoding"]
        assert await r.read() == b"data: 1\ndata: [DONE]\n\n\n"
        assert server.connections == 1, "keep-alive: both requests on one connection"
        assert server.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"X-Request-Id: r1\r\n" in server.requests[0] and server.requests[0].endswith(b'{"q": 1}')
        r = await pool.request(other.url, b"GET", b"/health")
        assert await r.read() == b"until the end"
    finally:
        pool.close()
        await server.stop()
        await other.stop()


async def test_idle_connection_closed_by_the_engine_is_replaced():
    server = await ScriptedServer([CL, CL], close_after=1).start()
    pool = EnginePool(connect_timeout=2)
    try:
        assert await (await pool.request(server.url, b"POST", b"/", b"")).read()
        await asyncio.sleep(0.05)  # the server closed the pooled connection meanwhile
        assert await (await pool.request(server.url, b"POST", b"/", b"")).read() == b'{"a": "b"}\n'
        assert server.connections == 2
    finally:
        pool.close()
        await server.stop()


async def test_a_connection_the_engine_keeps_is_reused_after_a_quiet_minute():
    """The engine decides when an idle connection ends (aiohttp's server, the reference engine: 75 s): one it
    still keeps is reused after a quiet minute, not dropped and reconnected (every burst after a quiet spell
    paid two connects per request); one idle past the pool's bound is replaced."""
    server = await ScriptedServer([CL] * 3).start()
    pool = EnginePool(connect_timeout=2)

    def age_idle(seconds: float) -> None:
        for conn in (c for conns in pool._idle.values() for c in conns):
            conn.idle_since -= seconds

    try:
        connections = []
        for idle in (0.0, 70.0, IDLE_TTL):  # 70 s: within the reference engine's keep-alive
            age_idle(idle)
            answer = await pool.request(server.url, b"POST", b"/", b"")
            assert await answer.read() == b'{"a": "b"}\n'
            connections.append(server.connections)
        assert connections == [1, 1, 2]
    finally:
        pool.close()
        await server.stop()


async def test_failures_are_classified():
    pool = EnginePool(connect_timeout=2)
    # nothing listens: connect
    server = await ScriptedServer([]).start()
    url = server.url
    await server.stop()
    with pytest.raises(UpstreamError) as info:
        await pool.request(url, b"POST", b"/", b"")
    assert info.value.kind == "connect"
    # the engine dies in the middle of an answer: disconnect
    server = await ScriptedServer([CHUNKED[:-20]], close_after=1).start()
    r = await pool.request(server.url, b"POST", b"/", b"")
    with pytest.raises(UpstreamError) as info:
        await r.read()
    assert info.value.kind == "disconnect"
    await server.stop()
    # garbage instead of HTTP: disconnect, and the process goes on
    server = await ScriptedServer([b"SSH-2.0-OpenSSH\r\n\r\n"]).start()
    with pytest.raises(UpstreamError) as info:
        await pool.request(server.url, b"POST", b"/", b"")
    assert info.value.kind == "disconnect" and "bad" in info.value.message
    await server.stop()
    # a header line without a colon, or a Content-Length that is not a number: disconnect, never a guess
    for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nbroken line\r\n\r\n{}",
                   b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\n{}"):
        server = await ScriptedServer([answer]).start()
        with pytest.raises(UpstreamError) as info:
            await pool.request(server.url, b"POST", b"/", b"")
        assert info.value.kind == "disconnect" and "bad" in info.value.message
        await server.stop()
    pool.close()


async def test_only_the_framing_headers_frame_the_answer():
    """Look-alike names (X-Content-Length, a Connection value that merely contains "close") do not frame or
    end the answer; the headers are all there when read, names lower-cased."""
    answer = (b"HTTP/1.1 200 OK\r\nX-Content-Length: 99\r\ncontent-LENGTH:  3 \r\n"
              b"Connection: keep-alive, x-close\r\nX-Engine: e1\r\n\r\nabc")
    server = await ScriptedServer([answer, CL]).start()
    pool = EnginePool(connect_timeout=2)
    try:
        r = await pool.request(server.url, b"POST", b"/", b"")
        assert await r.read() == b"abc"
        assert r.headers["x-engine"] == "e1" and r.headers["x-content-length"] == "99"
        assert await (await pool.request(server.url, b"POST", b"/", b"")).read() == b'{"a": "b"}\n'
        assert server.connections == 1, "kept alive"
    finally:
        pool.close()
        await server.stop()


async def test_idle_timeout_inside_a_stream():
    server = await ScriptedServer(
        [CHUNKED[:98]], hold_open=True
    ).start()  # headers and the first chunk, then silence
    pool = EnginePool(connect_timeout=2)
    try:
        r = await pool.request(server.url, b"POST", b"/", b"")
        assert await r.readany(0.5) == b"data: 1"
        with pytest.raises(asyncio.TimeoutError):
            await r.readany(0.2)
        r.close()
    finally:
        pool.close()
        await server.stop()


async def test_deadline_bounds_the_whole_call_and_drops_its_connection():
    """A call with a deadline fails with TimeoutError by then, whether the engine is silent before its head
    or in the middle of its body; the connection owing the rest is dropped, never reused; a call that ends in
    time is untouched by its (cancelled) timer."""
    silent = await ScriptedServer([b""], hold_open=True).start()  # reads the request, never answers
    halfway = await ScriptedServer([CL[:-4]], hold_open=True).start()  # head and part of the body, then silence
    fine = await ScriptedServer([CL, CL]).start()
    pool = EnginePool(connect_timeout=2)
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await pool.request(silent.url, b"POST", b"/", b"", deadline=loop.time() + 0.2)
        assert 0.15 < loop.time() - t0 < 1.0
        r = await pool.request(halfway.url, b"POST", b"/", b"", deadline=loop.time() + 0.2)
        assert r.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await r.read()
        assert 0.15 < loop.time() - t0 < 1.5
        assert not pool._idle.get(pool._targets[halfway.url][0]), "a timed-out connection is not pooled"
        r = await pool.request(fine.url, b"POST", b"/", b"", deadline=loop.time() + 0.2)
        assert await r.read() == b'{"a": "b"}\n'
        await asyncio.sleep(0.3)  # past that deadline: the finished call's timer must not touch its connection
        r = await pool.request(fine.url, b"POST", b"/", b"")
        assert await r.read() == b'{"a": "b"}\n'
        assert fine.connections == 1
        with pytest.raises(asyncio.TimeoutError):  # a deadline already gone: no call at all
            await pool.request(silent.url, b"POST", b"/", b"", deadline=loop.time() - 1)
    finally:
        pool.close()
        for server in (silent, halfway, fine):
            await server.stop()


async def test_idle_timeout_counts_each_wait_not_the_whole_stream():
    """A stream whose pieces come more often than the idle timeout never times out however long it runs, a
    reader that pauses between pieces is not blamed for its own pause, and a real silence fails within the
    idle timeout of the wait it started (one timer per idle period serves all the waits)."""
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 8 pieces, 0.1 s apart: 0.8 s in all, against an idle timeout of 0.3 s
            await asyncio.sleep(0.1)
            writer.write(b"2\r\nok\r\n")
            await writer.drain()
        await asyncio.sleep(0.5)  # then the reader pauses 0.4 s while a piece waits for it
        writer.write(b"4\r\nlate\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # then silence
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = EnginePool(connect_timeout=2)
    loop = asyncio.get_running_loop()
    try:
        r = await pool.request(url, b"POST", b"/", b"")
        got = b""
        while len(got) < 16:
            got += await r.readany(0.3)
        assert got == b"ok" * 8
        await asyncio.sleep(0.4)  # the reader's own pause, longer than the idle timeout
        assert await r.readany(0.3) == b"late"
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await r.readany(0.3)
        assert 0.25 < loop.time() - started < 1.0
        r.close()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_malformed_heads_fail_the_call():
    """What an engine's answer head must look like: any other status line or header line fails the call as a
    disconnect (never a misframed answer), and the pool goes on."""
    bad = (b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1  200 OK", b"HTTP/1.1 200 OK\r\n: x",
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nno colon", b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 2")
    pool = EnginePool(connect_timeout=2)
    try:
        for head in bad:
            server = await ScriptedServer([head + b"\r\n\r\n{}"]).start()
            with pytest.raises(UpstreamError) as info:
                await pool.request(server.url, b"POST", b"/", b"")
            assert info.value.kind == "disconnect" and "bad" in info.value.message, head
            await server.stop()
        server = await ScriptedServer([b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n{}"]).start()  # no reason: fine
        assert await (await pool.request(server.url, b"POST", b"/", b"")).read() == b"{}"
        await server.stop()
    finally:
        pool.close()


async def test_deadline_slots_fire_after_the_deadline_and_close_to_it():
    """Every deadline's slot timer is due at or after the deadline, within 25 ms / 200 ms / 1 s for calls
    with under 25 s / 200 s / more to go; calls due in the same slot share one timer, a finished call leaves
    its slot, and closing the pool cancels the timers."""
    from distserve.router.http1 import Response, _Deadlines

    loop = asyncio.get_running_loop()
    deadlines = _Deadlines(loop)
    now = loop.time()
    for ahead in (0.0003, 0.2, 24.9, 30.0, 120.0, 199.95, 600.0):
        for jitter in (0.0, 0.0101, 0.0199, 0.1234):
            grain = 0.025 if ahead + jitter < 25 else 0.2 if ahead + jitter < 200 else 1.0
            resp = Response(None, loop)
            deadline = now + ahead + jitter
            deadlines.add(resp, deadline)
            due = deadlines.timers[resp._slot].when()
            assert deadline <= due <= deadline + grain + 1e-6, (ahead, jitter, due - deadline)
    a, b = Response(None, loop), Response(None, loop)
    deadlines.add(a, now + 100.0)
    deadlines.add(b, now + 100.0)
    assert a._slot == b._slot and deadlines.slots[a._slot] == {a, b}
    deadlines.remove(a)
    assert deadlines.slots[b._slot] == {b}
    timers = list(deadlines.timers.values())
    deadlines.close()
    assert all(t.cancelled() for t in timers) and not deadlines.slots


async def test_deadlines_joining_the_last_two_slots_keep_the_bounds_and_a_due_slot_is_never_joined_again():
    """Calls made close together join the last two slots without the clock (_Deadlines' shortcut): every deadline,
    in any order, is still in the slot whose timer is due at or after it and within its grain, and each call is
    a member of the slot it names; once a slot has fired, a deadline it covered gets a new slot and timer."""
    import random

    from distserve.router.http1 import _Deadlines

    class Member:  # what _Deadlines needs of a call
        _deadlines = None
        _slot = 0
        expired = 0

        def _expire(self) -> None:
            self.expired += 1

    loop = asyncio.get_running_loop()
    deadlines = _Deadlines(loop)
    rng = random.Random(4)
    now = loop.time()
    for base in (30.0, 300.0, 5.0):  # the three grains
        grain = 0.025 if base < 25 else 0.2 if base < 200 else 1.0
        for _ in range(400):
            member, deadline = Member(), now + base + rng.uniform(-1.5, 1.5) * grain
            deadlines.add(member, deadline)
            due = deadlines.timers[member._slot].when()
            assert deadline <= due <= deadline + grain + 1e-6, (base, deadline - now, due - deadline)
            assert member in deadlines.slots[member._slot] and member._deadlines is deadlines
    for kept_second in (False, True):  # the fired slot the last one kept, or the one before it
        first, second = Member(), Member()
        deadlines.add(first, loop.time() + 0.01)
        if kept_second:
            deadlines.add(Member(), loop.time() + 5.0)  # another slot: the first one is now kept second
        await asyncio.sleep(0.08)
        assert first.expired == 1 and first._slot not in deadlines.slots
        slot, per_s = divmod(first._slot, 64)
        late = (slot - 0.5) / per_s  # a deadline (now past) within the fired slot's range
        deadlines.add(second, late)
        assert second._slot in deadlines.slots and deadlines.timers[second._slot].when() >= late, kept_second
        await asyncio.sleep(0.08)
        assert second.expired == 1
    deadlines.close()


async def test_chunked_stream_split_in_two_anywhere():
    """Whole chunks at the start of a piece are read in place; a chunk cut anywhere (its size line, its data,
    its CRLF, the last chunk, the trailers) is finished by the general loop: the same bytes either way."""
    body = [b"data: %d\n\n" % i * (i + 1) for i in range(6)]
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x%s\r\n%s\r\n" % (len(c), b";e=1" if i == 2 else b"", c) for i, c in enumerate(body))
              + b"0\r\nX-T: 1\r\n\r\n")
    start = answer.index(b"\r\n\r\n") + 4
    pool = EnginePool(connect_timeout=2)
    try:
        for cut in range(start, len(answer)):
            server = await SplitServer(answer, cut).start()
            r = await pool.request(server.url, b"POST", b"/", b"")
            assert await r.read() == b"".join(body), cut
            await server.stop()
    finally:
        pool.close()


async def test_broken_chunks_fail_the_call():
    """A chunk without its CRLF, a negative or non-hex size: a disconnect, never a misframed stream."""
    pool = EnginePool(connect_timeout=2)
    try:
        for chunks in (b"3\r\nabcXY0\r\n\r\n", b"-3\r\nabc\r\n0\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n",
                       b"3\r\nabc\r\n2\r\nxyz0\r\n\r\n"):
            server = await ScriptedServer([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks]).start()
            r = await pool.request(server.url, b"POST", b"/", b"")
            with pytest.raises(UpstreamError) as info:
                await r.read()
            assert info.value.kind == "disconnect", chunks
            await server.stop()
    finally:
        pool.close()


class SplitServer(ScriptedServer):
    """Answers once, in two writes cut at `cut`, the second after the first has been read."""

    def __init__(self, answer: bytes, cut: int) -> None:
        super().__init__([answer])
        self.cut = cut

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        answer = self.answers.pop(0)
        writer.write(answer[: self.cut])
        await writer.drain()
        await asyncio.sleep(0.002)
        writer.write(answer[self.cut :])
        await writer.drain()
        await reader.read()
        writer.close()


# ------------------------------------------------------------------------------ streamed calls by callbacks
class _Sink:
    """What EnginePool.call(stream=True) tells its sink, in order; `ended_event` set once anything ends it.
    `on_piece(data)`: run on each piece (as the lane writes it to its client)."""

    def __init__(self, on_piece=None) -> None:
        self.events: list[tuple] = []
        self.ended_event = asyncio.Event()
        self.on_piece = on_piece

    def piece(self, data: bytes) -> None:
        self.events.append(("piece", data))
        if self.on_piece is not None:
            self.on_piece(data)

    def ended(self, failure) -> None:
        self.events.append(("ended", failure))
        self.ended_event.set()

    def answered(self, status: int, body: bytes) -> None:
        self.events.append(("answered", status, body))
        self.ended_event.set()

    def failed(self, exc: BaseException) -> None:
        self.events.append(("failed", exc))
        self.ended_event.set()


async def _stream_call(server: ScriptedServer, pool: EnginePool, sink: _Sink, deadline_s: float = 5.0):
    call = pool.call(server.url, b"POST", b"/v1/completions", b"{}", b"", pool.loop.time() + deadline_s, sink,
                     stream=True)
    await asyncio.wait_for(sink.ended_event.wait(), 10)
    return call


@pytest.mark.parametrize("pieces", [0, 1, 5, CHUNKED.index(b"\r\n\r\n") + 4])  # the last: its head alone first
async def test_a_stream_call_relays_each_piece_then_its_end(pieces):
    server = await ScriptedServer([CHUNKED, CL], pieces=pieces).start()
    pool = EnginePool()
    try:
        sink = _Sink()
        await _stream_call(server, pool, sink)
        relayed = b"".join(e[1] for e in sink.events if e[0] == "piece")
        assert relayed == b"data: 1\ndata: [DONE]\n\n\n" and sink.events[-1] == ("ended", None), sink.events
        if 0 < pieces < 10:
            assert len([e for e in sink.events if e[0] == "piece"]) > 1, "pieces held back, not relayed as they came"
        sink = _Sink()  # the connection went back to the pool; a Content-Length 200 is relayed the same way
        await _stream_call(server, pool, sink)
        assert b"".join(e[1] for e in sink.events[:-1]) == b'{"a": "b"}\n' and sink.events[-1] == ("ended", None)
        assert server.connections == 1
    finally:
        pool.close()
        await server.stop()


async def test_a_stream_call_gets_a_non_200_whole_and_an_empty_200_as_a_failure():
    error = b'{"error": {"message": "no"}}'
    not_ok = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(error), error)
    empty = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    server = await ScriptedServer([not_ok, empty], pieces=4).start()
    pool = EnginePool()
    try:
        sink = _Sink()
        await _stream_call(server, pool, sink)
        assert sink.events == [("answered", 503, error)]
        sink = _Sink()
        await _stream_call(server, pool, sink)
        assert [e[0] for e in sink.events] == ["failed"] and "before its first byte" in str(sink.events[0][1])
    finally:
        pool.close()
        await server.stop()


async def test_a_stream_calls_deadline_is_its_first_bytes():
    """Before the first piece the deadline fails the call; after it, the stream may run past it."""
    silent = await ScriptedServer([], hold_open=True).start()
    slow = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(b"2\r\nab\r\n" for _ in range(40))
    late = await ScriptedServer([slow + b"0\r\n\r\n"], pieces=7).start()
    pool = EnginePool()
    try:
        sink = _Sink()
        await _stream_call(silent, pool, sink, deadline_s=0.2)
        assert [e[0] for e in sink.events] == ["failed"] and isinstance(sink.events[0][1], asyncio.TimeoutError)
        sink = _Sink()
        started = pool.loop.time()
        await _stream_call(late, pool, sink, deadline_s=0.1)  # 40 pieces of 7 bytes, a loop turn each
        assert sink.events[-1] == ("ended", None), sink.events
        assert b"".join(e[1] for e in sink.events if e[0] == "piece") == b"ab" * 40
        assert pool.loop.time() - started < 5
    finally:
        pool.close()
        await silent.stop()
        await late.stop()


async def test_a_connection_paused_by_its_stream_reader_reads_the_next_call():
    """A reader that pauses the stream (a client behind) in the piece that also ends it: the connection goes back
    to the pool, and the next call on it must still be read (paused, it waited for ever)."""
    server = await ScriptedServer([CHUNKED, CL]).start()
    pool = EnginePool()
    try:
        holder: dict = {}
        sink = _Sink(on_piece=lambda _data: holder["call"].pause())
        holder["call"] = pool.call(server.url, b"POST", b"/", b"{}", b"", pool.loop.time() + 5, sink, stream=True)
        await asyncio.wait_for(sink.ended_event.wait(), 10)
        assert sink.events[-1] == ("ended", None), sink.events
        sink = _Sink()
        await _stream_call(server, pool, sink)
        assert sink.events == [("piece", b'{"a": "b"}\n'), ("ended", None)]
        assert server.connections == 1
    finally:
        pool.close()
        await server.stop()
