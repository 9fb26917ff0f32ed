"""Reading client requests: header and body read timeouts, bounded body decoding.

This is aiohttp's path: connections the fast path (fastpath.py) hands over, and so every route but the two
hot ones (fastpath.py applies the same header and body timeouts to what it reads itself). aiohttp has no
read timeout of its own: a client sending part of its headers, or fewer body bytes than its Content-Length,
would hold a connection (and a handler) for as long as it likes. Hence:

- `GuardedSite` listens like aiohttp's TCPSite (each connection starts on the fast path, `FastConnection`),
  and puts a `ReadGuard` in front of each handed-over connection's
  aiohttp protocol. The guard arms a timer when the first byte of a request arrives on an idle connection
  and disarms it when the request's handler starts (`ReadGuards.wrap` marks handlers): a request whose
  headers are not complete within `header_timeout` gets a 408 and its connection is closed. An idle
  keep-alive connection (no byte of a new request) is not timed here.
- `read_body` reads the body within `body_timeout` (408 and close otherwise) and decodes a
  `Content-Encoding` of gzip or deflate incrementally, never holding more than `limit` decoded bytes (a
  decompression bomb gets the same 413 as a large plain body). Other codings get 415, corrupt data 400.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from distserve.router.errors import ApiError
from distserve.router.fastpath import FastConnection, FastDoor

log = logging.getLogger("distserve.router")

ACCEPTED_ENCODINGS = "gzip, deflate"
_GZIP = ("gzip", "x-gzip")

# a connection is IDLE (no byte of a new request), in HEADERS (timed), ACTIVE (a handler runs), or DRAINING
# (the handler ended without reading the whole body: what arrives is the rest of it, discarded by aiohttp)
_IDLE, _HEADERS, _ACTIVE, _DRAINING = range(4)


# ---------------------------------------------------------------------------------------- header phase
class ReadGuards:
    """The read guards of one server's connections (keyed by transport) and their shared settings."""

    def __init__(self, header_timeout: float, on_timeout: Callable[[str], None]) -> None:
        self.header_timeout = header_timeout
        self.on_timeout = on_timeout  # called with the phase ("headers"); the body phase is read_body's
        self.by_transport: dict[asyncio.BaseTransport, ReadGuard] = {}

    def wrap(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """`handler`, telling its connection's guard when a request is in progress."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            guard = self.by_transport.get(request.transport)  # None: not behind a GuardedSite
            if guard is None:
                return await handler(request)
            guard.begin(request)
            try:
                return await handler(request)
            finally:
                guard.end()

        return guarded


class ReadGuard(asyncio.Protocol):
    """In front of one connection's aiohttp protocol: forwards everything, times the header phase."""

    __slots__ = ("inner", "guards", "transport", "_state", "_timer", "_payload", "_next_pending", "_loop")

    def __init__(self, inner: asyncio.Protocol, guards: ReadGuards) -> None:
        self.inner = inner
        self.guards = guards
        self.transport: asyncio.Transport | None = None
        self._state = _IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._payload = None  # the body stream of the request in progress
        self._next_pending = False  # bytes of a following request arrived during the current one
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------- asyncio.Protocol, forwarded
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.guards.by_transport[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _IDLE:
            self._state = _HEADERS
            self._arm()
        elif state == _ACTIVE and not self._next_pending:
            payload = self._payload
            if payload is None or payload.is_eof():  # the request's body is complete: a new request
                self._next_pending = True
        elif state == _DRAINING:
            if self._payload.is_eof():  # the body ended before these bytes: a new request
                self._payload = None
                self._state = _HEADERS
                self._arm()
            else:
                self.inner.data_received(data)
                if self._payload.is_eof():
                    self._payload = None
                    self._state = _IDLE
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guards.by_transport.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # ------------------------------------------------------------- request boundaries (from handlers)
    def begin(self, request: web.Request) -> None:
        self._disarm()
        self._state = _ACTIVE
        self._payload = request.content
        self._next_pending = False

    def end(self) -> None:
        payload, self._payload = self._payload, None
        if self._next_pending:  # a pipelined request started: its headers are timed from now
            self._state = _HEADERS
            self._arm()
        elif payload is not None and not payload.is_eof():
            # an answer sent before the whole body came (413, 401): aiohttp reads the rest for a while
            self._state = _DRAINING
            self._payload = payload
        else:
            self._state = _IDLE

    # ------------------------------------------------------------- timer
    def _arm(self) -> None:
        self._disarm()
        self._timer = self._loop.call_later(self.guards.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if self._state != _HEADERS or transport is None or transport.is_closing():
            return
        timeout = self.guards.header_timeout
        self.guards.on_timeout("headers")
        peer = transport.get_extra_info("peername")
        log.info("client %s: no complete request headers within %gs, connection closed (408)", peer, timeout)
        # no response is in progress on this connection: an answer can still be sent
        err = ApiError(
            408, f"the request headers did not arrive within {timeout:g}s", "request_timeout"
        ).body()
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(err), err)
        )
        transport.close()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with a ReadGuard in front of every connection."""

    def __init__(
        self,
        runner: web.BaseRunner,
        guards: ReadGuards,
        host: str,
        port: int,
        backlog: int = 128,
        reuse_port: bool = False,
        fast: Callable[[Callable[[], asyncio.Protocol]], FastDoor] | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._guards = guards
        self._fast = fast  # makes the fast path's door (fastpath.py), given how to make an aiohttp side
        self._door: FastDoor | None = None
        self._host = host
        self._port = port
        self._reuse_port = reuse_port  # `router --workers N`: N processes listen on one port (SO_REUSEPORT)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        guards = self._guards

        def aiohttp_side() -> asyncio.Protocol:
            return ReadGuard(server(), guards)

        factory = aiohttp_side
        if self._fast is not None:
            door = self._door = self._fast(aiohttp_side)
            door.start()
            factory = lambda: FastConnection(door)  # noqa: E731
        self._server = await asyncio.get_running_loop().create_server(
            factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )

    async def stop(self) -> None:
        if self._door is not None:  # aiohttp's shutdown closes its own connections, not these
            self._door.close()
            self._door = None
        await super().stop()


# ---------------------------------------------------------------------------------------- body phase
def _too_large(limit: int, what: str = "request body") -> ApiError:
    return ApiError(413, f"{what} exceeds the limit of {limit} bytes", "request_too_large")


def _corrupt(coding: str, detail: str) -> ApiError:
    return ApiError(
        400, f"the request body is not valid {coding} data ({detail})", "invalid_content_encoding"
    )


def content_coding(request: web.Request) -> str | None:
    """The body's content coding: None (identity), "gzip" or "deflate"; 415 for anything else."""
    header = request.headers.get("Content-Encoding")
    if not header:
        return None
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in (*_GZIP, "deflate"):
        return "gzip" if codings[0] in _GZIP else "deflate"
    raise ApiError(
        415,
        f"unsupported Content-Encoding {header[:100]!r} (supported: {ACCEPTED_ENCODINGS}, or none)",
        "unsupported_content_encoding",
        headers={"Accept-Encoding": ACCEPTED_ENCODINGS},
    )


class Inflater:
    """Incremental gzip/deflate decoding that never produces more than `limit` bytes in all."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []
        self._d = None

    def _new(self, first: int) -> None:
        if self.coding == "gzip":
            wbits = 31
        else:
            # RFC 9110 deflate is the zlib format; some clients send raw deflate: tell them apart as curl does
            wbits = 15 if first & 0x0F == 8 else -15
        self._d = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> None:
        try:
            while data:
                d = self._d
                if d is None or d.eof:
                    if d is not None and self.coding != "gzip":
                        raise _corrupt(self.coding, "data after the end of the stream")
                    self._new(data[0])  # gzip: concatenated members are one body (RFC 1952)
                    d = self._d
                out = d.decompress(data, self.limit - self.size + 1)  # one byte more tells "too large"
                self.size += len(out)
                if self.size > self.limit:
                    raise _too_large(self.limit, "the decompressed request body")
                if out:
                    self.parts.append(out)
                data = d.unused_data if d.eof else d.unconsumed_tail
        except zlib.error as exc:
            raise _corrupt(self.coding, str(exc)) from None

    def finish(self) -> bytes:
        if self._d is not None and not self._d.eof:
            raise _corrupt(self.coding, "truncated")
        return b"".join(self.parts)


async def read_body(
    request: web.Request, limit: int, timeout: float, on_timeout: Callable[[str], None]
) -> bytes:
    """The request's (decoded) body: 413 above `limit` bytes (before and after decoding), 415 for an
    unknown content coding, 400 for corrupt data, 408 (`close` set) when it takes longer than `timeout`."""
    coding = content_coding(request)
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(
            413, f"request body of {length} bytes exceeds the limit of {limit} bytes", "request_too_large"
        )
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            if coding is None:
                try:
                    return await request.read()  # aiohttp enforces client_max_size (= limit)
                except web.HTTPRequestEntityTooLarge:
                    raise _too_large(limit) from None
            inflater = Inflater(coding, limit)
            received = 0
            stream = request.content
            while True:
                chunk = await stream.readany()
                if not chunk:
                    return inflater.finish()
                received += len(chunk)
                if received > limit:
                    raise _too_large(limit)
                inflater.feed(chunk)
    except TimeoutError:
        on_timeout("body")
        log.info(
            "client %s: request body incomplete after %.1fs, connection closed (408)",
            request.remote,
            time.monotonic() - started,
        )
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g}s",
            "request_timeout",
            headers={"Connection": "close"},
            close=True,
        ) from None
    except (HttpProcessingError, RequestPayloadError) as exc:  # malformed framing (chunked encoding)
        raise _malformed(exc) from None


def _malformed(exc: Exception) -> ApiError:
    detail = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return ApiError(
        400, f"malformed request body ({detail[-1].strip() if detail else 'bad framing'})", "invalid_request"
    )


async def answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send `response`, then close the connection at once (aiohttp would linger, reading what is left of
    a body that is not coming)."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass
    transport = request.transport
    if transport is not None:
        transport.close()
