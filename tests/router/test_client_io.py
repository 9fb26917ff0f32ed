"""The router's client-facing HTTP layer against a real router process, a real etcd and a real reference
engine (hybrid, its own OS process): compressed request bodies, header/body read timeouts, how a stream
really ended (log line and metric), the Bearer scheme's case.

The tests share one cluster and run in file order: the engine is SIGSTOPped and then SIGKILLed by the
last ones.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import time
import zlib

import aiohttp
import httpx
import openai
import pytest

from tests.router.cluster import MODEL, hybrid_behind_router, router_metric

KEY = "client-io-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
SLACK = 1.5  # scheduling on a loaded CI box


@pytest.fixture(scope="module")
def live():
    with hybrid_behind_router(
        "client-io-engine", "--api-keys", KEY, "--header-read-timeout", str(HEADER_TIMEOUT),
        "--body-read-timeout", str(BODY_TIMEOUT), "--decode-idle-timeout", str(IDLE_TIMEOUT),
    ) as live:
        yield live


def metric(live, name: str, labels: dict | None = None) -> float:
    return router_metric(live["router"], name, labels, headers=AUTH)


def wait_log(live, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = live["proc"].output()
        if text in out:
            return out
        assert time.monotonic() < deadline, f"{text!r} not in the router's log:\n{out[-3000:]}"
        time.sleep(0.05)


def assert_no_traceback(live) -> None:
    out = live["proc"].output()
    assert "Traceback" not in out and " ERROR " not in out, out[-4000:]


def body(prompt: str = "hello there", **extra) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra}).encode()


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


async def post(live, data: bytes, encoding: str | None, path: str = "/v1/completions"):
    headers = {**AUTH, "Content-Type": "application/json"}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    async with aiohttp.ClientSession() as http:
        async with http.post(live["router"] + path, data=data, headers=headers, compress=False) as r:
            return r.status, r.headers, await r.json(content_type=None)


def assert_openai_error(payload: dict, code: str) -> None:
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
    assert payload["error"]["code"] == code, payload


# ------------------------------------------------------------------------------------ Authorization scheme
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(live, scheme):
    """RFC 7235: auth schemes are case-insensitive; the key itself is not."""
    r = httpx.get(f"{live['router']}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=10)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL], r.text
    client = openai.OpenAI(
        base_url=f"{live['router']}/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"Authorization": f"{scheme} {KEY}"},
    )
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
    for bad in (f"{scheme} {KEY.upper()}", f"Basic {KEY}", f"{scheme}{KEY}", scheme):
        r = httpx.get(f"{live['router']}/v1/models", headers={"Authorization": bad}, timeout=10)
        assert r.status_code == 401, (bad, r.text)


# ------------------------------------------------------------------------------------ Content-Encoding
async def test_gzip_and_deflate_bodies_are_decoded(live):
    plain = body("the same prompt")
    status, _, expected = await post(live, plain, None)
    assert status == 200, expected
    for encoding, data in [
        ("gzip", gzip.compress(plain)),
        ("x-gzip", gzip.compress(plain)),
        ("GZIP", gzip.compress(plain)),
        ("deflate", zlib.compress(plain)),  # RFC 9110: the zlib format
        ("deflate", raw_deflate(plain)),  # what some clients send instead
        ("identity", plain),
        ("gzip, identity", gzip.compress(plain)),
        ("gzip", gzip.compress(plain[:20]) + gzip.compress(plain[20:])),  # two members: one body
    ]:
        status, _, got = await post(live, data, encoding)
        assert status == 200, (encoding, got)
        assert got["choices"][0]["text"] == expected["choices"][0]["text"], encoding
    chat = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
    status, _, got = await post(live, gzip.compress(chat), "gzip", "/v1/chat/completions")
    assert status == 200 and got["object"] == "chat.completion", got
    assert_no_traceback(live)


async def test_corrupt_compressed_bodies_get_400_and_no_traceback(live):
    """A body labelled gzip/deflate that is not (curl -H 'Content-Encoding: gzip' -d '{...}') used to answer
    500 and log two ERROR tracebacks per request."""
    plain = body()
    for encoding, data in [
        ("gzip", plain),
        ("deflate", plain),
        ("gzip", gzip.compress(plain)[:-6]),  # truncated: the trailer is missing
        ("deflate", zlib.compress(plain)[:-3]),
        ("gzip", b"\x1f\x8b" + b"\xff" * 40),
        ("deflate", zlib.compress(plain) + b"trailing"),
    ]:
        status, headers, payload = await post(live, data, encoding)
        assert status == 400, (encoding, data[:20], payload)
        assert headers["Content-Type"].startswith("application/json")
        assert_openai_error(payload, "invalid_content_encoding")
    assert_no_traceback(live)


async def test_unknown_content_encodings_get_415(live):
    for encoding in ("br", "zstd", "compress", "gzip, br", "gzip, gzip", "x-unknown"):
        status, headers, payload = await post(live, body(), encoding)
        assert status == 415, (encoding, payload)
        assert headers["Content-Type"].startswith("application/json")
        assert headers["Accept-Encoding"] == "gzip, deflate"
        assert_openai_error(payload, "unsupported_content_encoding")
        assert encoding in payload["error"]["message"]
    assert_no_traceback(live)


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_a_decompression_bomb_gets_413_without_being_inflated(live):
    """256 MiB of zeros in ~250 KiB of gzip: 413 like a plain body over --max-body-bytes (8 MiB), and the
    router's peak memory does not grow by anything near the inflated size."""
    def bomb(wbits: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, wbits)
        zeros = bytes(1 << 20)
        data = b"".join(c.compress(zeros) for _ in range(256)) + c.flush()
        assert len(data) < 1 << 20
        return data

    pid = live["proc"].pid
    before = _peak_rss_kib(pid)
    for encoding, data in [("gzip", bomb(31)), ("deflate", bomb(15))]:
        status, _, payload = await post(live, data, encoding)
        assert status == 413, payload
        assert_openai_error(payload, "request_too_large")
    grown = _peak_rss_kib(pid) - before
    assert grown < 64 * 1024, f"the router's peak RSS grew by {grown} KiB"
    # a compressed body over the limit itself is refused as well (before decoding)
    status, _, payload = await post(live, gzip.compress(bytes(10 << 20), 0), "gzip")
    assert status == 413 and payload["error"]["code"] == "request_too_large", payload
    assert_no_traceback(live)


def test_the_inflater_never_holds_more_than_its_limit():
    """Fed a whole bomb in one piece, decoding stops one byte past the limit (413), whatever the ratio."""
    from distserve.router.errors import ApiError
    from distserve.router.inbound import Inflater

    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush()
    inflater = Inflater("gzip", 1 << 16)
    with pytest.raises(ApiError) as info:
        inflater.feed(bomb)
    assert info.value.status == 413 and sum(map(len, inflater.parts)) <= 1 << 16
    # within the limit, byte by byte: the same bytes as a one-shot decode
    data = json.dumps({"prompt": "x" * 5000}).encode()
    inflater = Inflater("deflate", 1 << 16)
    for i, b in enumerate(zlib.compress(data)):
        inflater.feed(bytes([b]))
        if i == 0:
            with pytest.raises(ApiError):  # an incomplete stream is an error, never a short body
                inflater.finish()
    assert inflater.finish() == data


# ------------------------------------------------------------------------------------ read timeouts
def _address(live) -> tuple[str, int]:
    host, port = live["router"].removeprefix("http://").split(":")
    return host, int(port)


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the router sends until it closes the connection, and when it closed it."""
    started = time.monotonic()
    sock.settimeout(limit)
    got = b""
    while True:
        try:
            piece = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"the connection is still open after {limit}s (got {got!r})") from None
        except ConnectionResetError:
            break
        if not piece:
            break
        got += piece
    return got, time.monotonic() - started


def assert_read_timeout(live, phase: str, timeout: float, got: bytes, elapsed: float, before: float) -> None:
    """The router closed the connection with a JSON 408 after `timeout` and counted it under `phase`."""
    assert timeout * 0.9 <= elapsed <= timeout + SLACK, elapsed
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert_openai_error(json.loads(got.split(b"\r\n\r\n", 1)[1]), "request_timeout")
    assert metric(live, "distserve_router_client_read_timeouts_total", {"phase": phase}) == before + 1


@pytest.mark.parametrize("trickle", [False, True])
def test_partial_headers_are_cut_after_the_header_timeout(live, trickle):
    before = metric(live, "distserve_router_client_read_timeouts_total", {"phase": "headers"})
    with socket.create_connection(_address(live)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        if trickle:  # a byte now and then does not extend the deadline
            for b in b"X-Slow: 1\r\n":
                time.sleep(HEADER_TIMEOUT / 8)
                try:
                    sock.sendall(bytes([b]))
                except OSError:
                    break
        got, _ = _read_until_closed(sock, HEADER_TIMEOUT + SLACK + 5)
        elapsed = time.monotonic() - started
    assert_read_timeout(live, "headers", HEADER_TIMEOUT, got, elapsed, before)


def test_short_body_is_cut_after_the_body_timeout(live):
    before = metric(live, "distserve_router_client_read_timeouts_total", {"phase": "body"})
    with socket.create_connection(_address(live)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nX-Request-Id: short-body\r\nContent-Length: 100\r\n\r\n"
            b'{"model": '
        )
        started = time.monotonic()
        got, _ = _read_until_closed(sock, BODY_TIMEOUT + SLACK + 5)
        elapsed = time.monotonic() - started
    assert_read_timeout(live, "body", BODY_TIMEOUT, got, elapsed, before)
    wait_log(live, "request short-body /v1/completions -> 408")


def test_idle_keep_alive_connections_and_pipelining_are_not_read_timeouts(live):
    """An idle kept-alive connection is not a slow request: it is reusable after the header timeout; a
    request pipelined behind a longer one is not timed while the first one runs."""
    before = metric(live, "distserve_router_client_read_timeouts_total")
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    slow = body(max_tokens=800, stream=True, ignore_eos=True)
    with socket.create_connection(_address(live)) as sock:
        sock.settimeout(10)
        sock.sendall(get)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(HEADER_TIMEOUT + 0.5)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(slow), slow)
        )
        got = sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 "), got
        sock.sendall(get)  # pipelined behind the stream, which outlasts the header timeout
        while not got.endswith(b'{"status":"ok"}'):
            piece = sock.recv(65536)
            assert piece, got[-500:]
            got += piece
    assert b"data: [DONE]" in got and got.count(b"HTTP/1.1 200 ") == 2
    assert metric(live, "distserve_router_client_read_timeouts_total") == before


# ------------------------------------------------------------------------------------ stream outcomes
def stream_request(live, rid: str, max_tokens: int = 3500):
    client = openai.OpenAI(
        base_url=f"{live['router']}/v1", api_key=KEY, max_retries=0, default_headers={"X-Request-Id": rid}
    )
    return client.completions.create(
        model=MODEL,
        prompt="a very long story",
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )


def stream_started(live, rid: str):
    """A streamed completion whose first three chunks arrived (the rest still to read)."""
    chunks = iter(stream_request(live, rid))
    for _ in range(3):
        next(chunks)
    return chunks


def read_to_failure(chunks) -> openai.APIError:
    """Read the rest of a stream, which must fail; its error."""
    with pytest.raises(openai.APIError) as info:
        for _ in chunks:
            pass
    return info.value


def streams(live, outcome: str) -> float:
    return metric(live, "distserve_router_streams_total", {"route": "/v1/completions", "outcome": outcome})


def test_a_completed_stream_is_logged_and_counted_as_completed(live):
    before = streams(live, "completed")
    chunks = list(stream_request(live, "stream-completed", max_tokens=5))
    assert len(chunks) >= 5
    wait_log(live, "request stream-completed /v1/completions -> 200 stream=completed in ")
    assert streams(live, "completed") == before + 1


async def test_a_client_closing_mid_stream_is_client_gone(live):
    before = streams(live, "client_gone")
    async with httpx.AsyncClient(base_url=live["router"], timeout=30, headers=AUTH) as http:
        async with http.stream(
            "POST",
            "/v1/completions",
            content=body(max_tokens=3500, stream=True, ignore_eos=True),
            headers={"X-Request-Id": "stream-client-gone", "Content-Type": "application/json"},
        ) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            for _ in range(3):
                await lines.__anext__()
        # leaving the block closes the connection mid-stream
    await asyncio.to_thread(wait_log, live, "request stream-client-gone /v1/completions -> 499 stream=client_gone")
    assert streams(live, "client_gone") == before + 1
    assert streams(live, "upstream_error") == 0


def test_an_engine_going_silent_mid_stream_is_upstream_timeout(live):
    chunks = stream_started(live, "stream-silent")
    engine = live["engine"]
    engine.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        error = read_to_failure(chunks)
        assert time.monotonic() - started < IDLE_TIMEOUT + SLACK + 3
    finally:
        engine.signal(signal.SIGCONT)
    assert "failed mid-stream" in str(error.message)
    wait_log(live, "request stream-silent /v1/completions -> 200 stream=upstream_timeout in ")
    assert streams(live, "upstream_timeout") == 1


def test_an_engine_killed_mid_stream_is_upstream_error_not_a_success(live):
    """It used to be logged `-> 200 in 1519 ms` and counted as a plain 200."""
    list(stream_request(live, "stream-before-kill", max_tokens=2))  # one completed here (a worker may run only this)
    chunks = stream_started(live, "stream-killed")
    live["engine"].kill()
    assert "failed mid-stream" in str(read_to_failure(chunks).message)
    out = wait_log(live, "request stream-killed /v1/completions -> 200 stream=upstream_error in ")
    assert "request stream-killed /v1/completions -> 200 in " not in out
    assert streams(live, "upstream_error") == 1
    assert streams(live, "completed") >= 1  # the earlier ones kept their own outcome
    assert_no_traceback(live)
