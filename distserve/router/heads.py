"""The router's two HTTP/1.1 head parsers: an engine answer's (http1.py) and a hot client request's (fastpath.py);
and the whole chunks at the start of a piece of a chunked answer (a stream's pieces, http1.py).

The functions here are the specification, and the fallback. Where the C module `distserve.router._heads` was
built at install (a C compiler and Python's headers: `pip install` builds it, quietly skipped where it cannot),
`answer_head`, `request_head` and `whole_chunks` are its versions: the same answers and errors
(tests/router/test_heads.py compares them on generated input), in one pass over the bytes instead of split lists,
lower-cased copies and a call per line: 5-11 % less of the router's CPU per PD request (docs/benchmarks.md,
"Fourteenth pass"; `whole_chunks`: "Twenty-first pass").
`DISTSERVE_PURE_PYTHON=1` in the environment makes the router use the Python versions (distserve/router/settings.py).
"""

from __future__ import annotations

import operator

from distserve.router.compiled import load

# an engine answer's framing: what the connection reads after the head (http1.py's states, same numbers)
HEAD, LENGTH, CHUNK_SIZE, UNTIL_CLOSE, DONE = 0, 1, 2, 6, 7

ROUTES = (b"/v1/completions", b"/v1/chat/completions")  # request_head's `route` indexes this

# requests carrying one of these are aiohttp's: it decodes, streams or refuses them
_AIOHTTP_HEADERS = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"})
# the headers the handler reads on every request: kept from the head's one pass (the rest parsed on demand)
WATCHED = frozenset({b"x-request-id", b"authorization", b"traceparent", b"tracestate"})

_colon_at = operator.methodcaller("find", b":")


def _field(low: bytes, marker: bytes) -> bytes | None:
    """The (stripped) value of the first header line starting with `marker` (b"\\r\\nname:") in a lower-cased
    head, or None."""
    at = low.find(marker)
    if at < 0:
        return None
    at += len(marker)
    end = low.find(b"\r\n", at)
    return low[at:end].strip() if end >= 0 else low[at:].strip()


def answer_head_py(head: bytes) -> tuple[int, int, int, bool]:
    """(status, state, remaining, keep_alive) of an engine answer's head (status line and header lines, without
    the blank line); ValueError for anything the client cannot rely on. state HEAD: a 1xx answer (the real one
    follows); LENGTH: `remaining` body bytes; CHUNK_SIZE: chunked; DONE: no body; UNTIL_CLOSE: the body ends
    with the connection. Only what framing needs is read: the other headers are parsed if somebody asks."""
    if (head[:7] != b"HTTP/1." or head[8:9] != b" " or not head[9:12].isdigit()
            or head[12:13] not in (b" ", b"\r", b"")):
        raise ValueError(f"bad status line {head[:80]!r}")
    status = int(head[9:12])
    if 100 <= status < 200:
        return status, HEAD, 0, False
    low = head.lower()
    lines = low.split(b"\r\n")
    del lines[0]
    # every line has a name and a colon: its first colon past position 0 (a search: `b":" in line` first tries
    # its argument as an int, and a bytes argument costs a TypeError made and cleared per test)
    if lines and min(map(_colon_at, lines)) <= 0:
        raise ValueError(f"bad header line in {head[:200]!r}")
    length = _field(low, b"\r\ncontent-length:")
    chunked = (low.find(b"\r\ntransfer-encoding:") >= 0
               and _field(low, b"\r\ntransfer-encoding:").find(b"chunked") >= 0)
    close = low.find(b"\r\nconnection:") >= 0 and _field(low, b"\r\nconnection:") == b"close"
    keep_alive = head[7] == 49 and not close  # "HTTP/1.1" ([7] is b"1")
    if chunked:
        return status, CHUNK_SIZE, 0, keep_alive
    if length is not None:
        if not length.isdigit():
            raise ValueError(f"bad content-length {length[:20]!r}")
        remaining = int(length)
        return status, LENGTH if remaining else DONE, remaining, keep_alive
    if status in (204, 304):
        return status, DONE, 0, keep_alive
    return status, UNTIL_CLOSE, 0, False


def request_head_py(buf: bytes, end: int, body_limit: int) -> tuple[int, dict[bytes, bytes], bool, int] | str:
    """A client request head `buf[:end]` (without the blank line): (route, watched, keep_alive, body length) of
    a hot request (`ROUTES[route]`; `watched`: the WATCHED headers' first values, names lower-cased), or why
    aiohttp must serve it: "route" (another method or path) or "framing" (HTTP/1.0, a malformed line, no or a
    bad Content-Length, one over `body_limit`, a header aiohttp must handle, a Connection: upgrade)."""
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return "framing"
    if parts[1] not in ROUTES or parts[0] != b"POST":
        return "route"
    if parts[2] != b"HTTP/1.1":
        return "framing"
    length = None
    keep_alive = True
    watched: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # no colon, an empty name, whitespace before the colon, or a folded line: aiohttp answers it
        if not sep or not name or name[-1] in b" \t" or name[0] in b" \t":
            return "framing"
        lname = name.lower()
        if lname == b"content-length":
            value = value.strip(b" \t")
            if length is not None or not value.isdigit():
                return "framing"
            length = int(value)
        elif lname in WATCHED:
            if lname not in watched:
                watched[lname] = value.strip(b" \t")
        elif lname in _AIOHTTP_HEADERS:
            return "framing"
        elif lname == b"connection":
            tokens = value.lower()
            if tokens.find(b"upgrade") >= 0:  # searches: `bytes in bytes` costs a cleared TypeError (above)
                return "framing"
            if tokens.find(b"close") >= 0:
                keep_alive = False
    if length is None or length > body_limit:
        return "framing"  # aiohttp answers 411/413 and the rest
    return ROUTES.index(parts[1]), watched, keep_alive, length


_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def chunk_size_py(line: bytes) -> int:
    """The size on a chunk-size line (its CRLF excluded): 1 to 15 hex digits, then nothing, or spaces or tabs and
    `;` extensions (ignored), as RFC 9112 has it; ValueError for anything else (a sign, a `0x`, `_` or leading
    whitespace, which int(x, 16) would take and no HTTP peer sends)."""
    n = len(line)
    i = 0
    while i < n and line[i] in _HEX_DIGITS:
        i += 1
    j = i
    while j < n and (line[j] == 32 or line[j] == 9):
        j += 1
    if i == 0 or i > 15 or (j < n and line[j] != 59):  # 59: ";"
        raise ValueError(f"bad chunk size {line[:40]!r}")
    return int(line[:i], 16)


def whole_chunks_py(data: bytes) -> tuple[bytes, int]:
    """The whole chunks at the start of `data`, a piece of a chunked body that begins at a chunk: (their data
    joined, where they end). It stops at the last chunk (size 0), at a chunk not whole in `data` and at a size
    line not within its first 1,024 bytes (the caller's general parser goes on from there); ValueError for a bad
    size (chunk_size_py) or a chunk not followed by CRLF."""
    pos, n, parts = 0, len(data), []
    while True:
        end = data.find(b"\r\n", pos, pos + 1024)
        if end < 0:
            break
        size = chunk_size_py(data[pos:end])
        if size == 0:
            break
        stop = end + 2 + size
        if stop + 2 > n:
            break
        if data[stop : stop + 2] != b"\r\n":
            raise ValueError("missing CRLF after a chunk")
        parts.append(data[end + 2 : stop])
        pos = stop + 2
    return (parts[0] if len(parts) == 1 else b"".join(parts)), pos


def _load_c():
    module = load("_heads")
    if module is not None and ((module.HEAD, module.LENGTH, module.CHUNK_SIZE, module.UNTIL_CLOSE, module.DONE) != (
            HEAD, LENGTH, CHUNK_SIZE, UNTIL_CLOSE, DONE) or not hasattr(module, "whole_chunks")):
        return None  # a stale build from another version of this module
    return module


_c = _load_c()
IMPLEMENTATION = "c" if _c is not None else "python"
answer_head = _c.answer_head if _c is not None else answer_head_py
request_head = _c.request_head if _c is not None else request_head_py
whole_chunks = _c.whole_chunks if _c is not None else whole_chunks_py
