"""A steady load of PD requests through the routers, every request recorded.

Workers send completions and chat requests, streamed and not, in a fixed rotation; each worker starts on
its own router so clients spread over every replica. A client retries on another router only when its
request was never delivered (connection refused): a request the router had accepted is not idempotent, so
its failure is recorded, never hidden by a retry. Long streams (ignore_eos, hundreds of tokens) are there
to be cut by a fault mid-stream.

Outcomes:
- ok: HTTP 200 with a complete answer (a stream: chunks then `[DONE]`, no error event);
- error_event: a stream that started (200) and ended with an OpenAI-style error event, then closed;
- truncated: a stream that ended with neither `[DONE]` nor an error event (a defect);
- http_error: a non-200 status (the status and the error body are kept);
- disconnected: the router cut the connection after the request was delivered (a router crash);
- unreachable: no router accepted the connection;
- timeout: no answer within the client's timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]

# (route kind, streamed)
MIX = (("completions", False), ("completions", True), ("chat", False), ("chat", True))


@dataclass
class RequestRecord:
    rid: str
    worker: int
    kind: str  # completions | chat
    stream: bool
    long: bool
    start: float  # epoch seconds (comparable with fault times and router logs)
    router: str | None = None  # the router that accepted the request
    routers_tried: list[str] = field(default_factory=list)
    end: float | None = None
    first_byte: float | None = None
    status: int | None = None
    outcome: str = "pending"
    error: str | None = None
    error_code: str | None = None
    chunks: int = 0
    engines: str | None = None  # "p0>d1" from the router's request log (filled in afterwards)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def in_flight_at(self, t: float) -> bool:
        return self.start <= t and (self.end is None or self.end >= t)

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("start", "end", "first_byte"):
            if out[key] is not None:
                out[key] = round(out[key], 4)
        return out


class LoadGenerator:
    def __init__(self, routers: Callable[[], list[tuple[str, str]]], model: str, *, workers: int = 4,
                 long_workers: int = 0, interval: float = 0.05, max_tokens: int = 24, long_tokens: int = 400,
                 timeout: float = 60.0, retry: bool = True) -> None:
        """routers: a callable giving the current (name, url) pairs, so replicas can come and go."""
        self._routers = routers
        self.model = model
        self.workers = workers
        self.long_workers = long_workers
        self.interval = interval
        self.max_tokens = max_tokens
        self.long_tokens = long_tokens
        self.timeout = timeout
        self.retry = retry
        self.records: list[RequestRecord] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random(1234)

    async def start(self) -> None:
        # one connection per request: a router crash must not poison a pooled connection for the next one
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self._session = aiohttp.ClientSession(connector=connector)
        for w in range(self.workers):
            self._tasks.append(asyncio.create_task(self._worker(w, long=False), name=f"load-{w}"))
        for w in range(self.long_workers):
            self._tasks.append(asyncio.create_task(self._worker(self.workers + w, long=True),
                                                   name=f"load-long-{w}"))

    async def stop(self, drain: float = 60.0) -> None:
        """Stop sending; wait up to `drain` seconds for requests in flight, then cancel the rest."""
        self._stop.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=drain)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        for rec in self.records:
            if rec.outcome == "pending":
                rec.outcome, rec.error = "timeout", "still running when the load stopped"

    def in_flight(self) -> list[RequestRecord]:
        return [r for r in self.records if r.end is None]

    # ------------------------------------------------------------------ workers
    async def _worker(self, w: int, long: bool) -> None:
        mix = itertools.cycle(MIX[w % len(MIX):] + MIX[:w % len(MIX)])
        seq = 0
        while not self._stop.is_set():
            kind, stream = ("completions" if w % 2 else "chat", True) if long else next(mix)
            await self._one(w, seq, kind, stream, long)
            seq += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval * (0.5 + self._rng.random()))
            except TimeoutError:
                pass

    def _body(self, kind: str, stream: bool, long: bool) -> dict:
        prompt = " ".join(self._rng.choice(WORDS) for _ in range(self._rng.randint(4, 24)))
        body: dict = {"model": self.model, "temperature": 0, "stream": stream,
                      "max_tokens": self.long_tokens if long else self.max_tokens}
        if long:
            body["ignore_eos"] = True
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    async def _one(self, w: int, seq: int, kind: str, stream: bool, long: bool) -> None:
        rid = f"w{w}-{seq}-{uuid.uuid4().hex[:6]}"
        rec = RequestRecord(rid=rid, worker=w, kind=kind, stream=stream, long=long, start=time.time())
        self.records.append(rec)
        path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        data = json.dumps(self._body(kind, stream, long)).encode()
        headers = {"Content-Type": "application/json", "X-Request-Id": rid}
        routers = list(self._routers())
        if not routers:
            rec.end, rec.outcome, rec.error = time.time(), "unreachable", "no router"
            return
        first = (w + seq) % len(routers)  # spread over every replica
        order = routers[first:] + routers[:first]
        if not self.retry:
            order = order[:1]
        try:
            async with asyncio.timeout(self.timeout):
                for attempt, (name, url) in enumerate(order):
                    rec.routers_tried.append(name)
                    try:
                        await self._send(rec, url + path, data, headers, stream)
                        rec.router = name
                        return
                    except aiohttp.ClientConnectorError as exc:  # never delivered: safe to retry elsewhere
                        rec.error = f"connect: {exc}"
                        if attempt + 1 < len(order):
                            await asyncio.sleep(self._rng.uniform(0.005, 0.02))  # jittered, bounded by the list
                rec.end, rec.outcome = time.time(), "unreachable"
        except TimeoutError:
            rec.end, rec.outcome, rec.error = time.time(), "timeout", f"no answer within {self.timeout}s"
        except asyncio.CancelledError:
            rec.end, rec.outcome, rec.error = time.time(), "timeout", "cancelled when the load stopped"
            raise

    async def _send(self, rec: RequestRecord, url: str, data: bytes, headers: dict, stream: bool) -> None:
        assert self._session is not None
        try:
            async with self._session.post(url, data=data, headers=headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    body = await resp.read()
                    rec.end, rec.outcome = time.time(), "http_error"
                    rec.error, rec.error_code = _error_of(body)
                    return
                if not stream:
                    body = await resp.read()
                    rec.end = rec.first_byte = time.time()
                    try:
                        answer = json.loads(body)
                        ok = bool(answer["choices"]) and "error" not in answer
                    except (ValueError, KeyError, TypeError):
                        ok = False
                    rec.outcome = "ok" if ok else "bad_answer"
                    if not ok:
                        rec.error = body[:300].decode(errors="replace")
                    return
                await self._read_stream(rec, resp)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ClientError, ConnectionError) as exc:
            rec.end = time.time()
            rec.outcome = "disconnected"
            rec.error = f"{type(exc).__name__}: {exc}"

    async def _read_stream(self, rec: RequestRecord, resp: aiohttp.ClientResponse) -> None:
        done = False
        error = None
        buffer = b""
        async for chunk in resp.content.iter_any():
            if rec.first_byte is None:
                rec.first_byte = time.time()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    try:
                        obj = json.loads(payload)
                    except ValueError:
                        continue
                    if isinstance(obj, dict) and "error" in obj:
                        error = obj["error"]
                    else:
                        rec.chunks += 1
        rec.end = time.time()
        if error is not None:
            rec.outcome = "error_event"
            rec.error = str(error.get("message") if isinstance(error, dict) else error)[:300]
            rec.error_code = error.get("code") if isinstance(error, dict) else None
        elif done:
            rec.outcome = "ok"
        else:
            rec.outcome = "truncated"
            rec.error = "the stream ended with neither [DONE] nor an error event"


def _error_of(body: bytes) -> tuple[str, str | None]:
    try:
        err = json.loads(body)["error"]
        return str(err.get("message"))[:300], err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:300].decode(errors="replace"), None
