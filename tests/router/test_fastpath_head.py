"""How the fast path reads a request head (distserve/router/fastpath.py): which requests it serves, which it
hands to aiohttp and why, and the headers its handler sees (compared with aiohttp's own parse)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from distserve.router.fastpath import FastConnection, FastDoor
from distserve.router.validation import COMPLETIONS

BODY = b'{"model": "m", "prompt": "hi"}'


def head(*lines: bytes, request: bytes = b"POST /v1/completions HTTP/1.1") -> bytes:
    return b"\r\n".join((request, *lines)) + b"\r\n\r\n"


async def parsed(raw: bytes):
    door = FastDoor(None, lambda: None, 1000, 1.0, 1.0, lambda _phase: None)
    return FastConnection(door)._parse_head(raw, raw.find(b"\r\n\r\n"))


CL = b"Content-Length: %d" % len(BODY)


@pytest.mark.parametrize("raw, why", [
    (head(CL, request=b"GET /v1/completions HTTP/1.1"), "route"),
    (head(CL, request=b"POST /v1/embeddings HTTP/1.1"), "route"),
    (head(CL, request=b"POST /v1/completions HTTP/1.0"), "framing"),
    (head(CL, request=b"POST  /v1/completions HTTP/1.1"), "framing"),
    (head(b"Host: r"), "framing"),  # no Content-Length: aiohttp answers 411
    (head(b"Content-Length: 5000"), "framing"),  # over the body limit: aiohttp answers 413
    (head(CL, CL), "framing"),  # two lengths: request smuggling territory
    (head(b"Content-Length: 1x"), "framing"),
    (head(CL, b"Transfer-Encoding: chunked"), "framing"),
    (head(CL, b"content-encoding: gzip"), "framing"),
    (head(CL, b"Expect: 100-continue"), "framing"),
    (head(CL, b"Upgrade: websocket"), "framing"),
    (head(CL, b"Connection: Upgrade"), "framing"),
    (head(CL, b"Host : r"), "framing"),  # whitespace before the colon
    (head(CL, b"Host r"), "framing"),  # no colon
    (head(CL, b": r"), "framing"),  # empty name
    (head(CL, b" folded"), "framing"),  # obsolete line folding
])
async def test_requests_the_fast_path_leaves_to_aiohttp(raw, why):
    assert await parsed(raw) == why


async def test_a_hot_request_is_served_here_with_its_headers():
    raw = head(b"Host: r", b"content-LENGTH:  %d " % len(BODY), b"X-Request-Id:  abc \t", b"Authorization: Bearer k",
               b"X-Dup: 1", b"x-dup: 2", b"Connection: keep-alive") + BODY
    kind, path, headers, keep_alive, start, stop = await parsed(raw)
    assert (kind, path, keep_alive, raw[start:stop]) == (COMPLETIONS, "/v1/completions", True, BODY)
    assert headers.get("x-request-id") == "abc" and headers["AUTHORIZATION"] == "Bearer k"
    assert headers.get("traceparent") is None and "traceparent" not in headers and "x-dup" in headers
    assert headers.get("X-Dup") == "1" and headers.getall("x-dup") == ["1", "2"]
    expected = CIMultiDict([("Host", "r"), ("content-LENGTH", str(len(BODY))), ("X-Request-Id", "abc"),
                            ("Authorization", "Bearer k"), ("X-Dup", "1"), ("x-dup", "2"),
                            ("Connection", "keep-alive")])
    assert list(headers.items()) == list(expected.items()) and len(headers) == 7
    with pytest.raises(KeyError):
        headers["missing"]
    assert (await parsed(head(CL, b"Connection: close") + BODY))[3] is False


async def test_head_headers_reads_any_name_once_parsed_too():
    headers = (await parsed(head(CL, b"A: 1", b"B:2", b"X-Request-Id: r") + BODY))[2]
    assert headers.get("b") == "2"  # not one of the watched names: the whole head is parsed now
    assert list(headers) == ["Content-Length", "A", "B", "X-Request-Id"]
    assert headers.get("a") == "1" and headers.get("x-request-id") == "r" and headers.get("c", "none") == "none"
