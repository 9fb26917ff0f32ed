"""The router's HTTP/1.1 head parsers (distserve/router/heads.py): the C versions give the Python versions'
answer, or raise their error, for every head; and the C module is what the router runs wherever it can be
built (a CI machine has a compiler: a silent fallback would measure and ship the slow path)."""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve.router import heads
from tests.router.fuzzing import needs_gcc, run_sanitized_fuzz
from tests.util import examples

c = heads._c
needs_c = pytest.mark.skipif(c is None, reason="distserve.router._heads is not built here")


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except ValueError as exc:
        return "ValueError", str(exc)


# pieces a head is made of: the ones the parsers treat specially, their case and spacing varied, and noise
_NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Transfer-Encoding", b"Connection",
          b"X-Request-Id", b"authorization", b"Traceparent", b"tracestate", b"Content-Encoding", b"Expect",
          b"Upgrade", b"Host", b"Server", b"Date", b"X-Dup", b"", b" Host", b"Host ", b"Ho\tst", b"a:b"]
_VALUES = [b"", b"0", b"12", b" 34 ", b"007", b"1x", b"-1", b"99999999999999999999", b"chunked",
           b"gzip, chunked", b"CHUNKED", b"close", b"Close", b" close ", b"keep-alive", b"Upgrade", b"keep-alive, close",
           b"abc", b"\tv\t", b"\x0bv\x0c", b"100-continue", b"websocket", b"Bearer k", b"a\rb", b"a\nb"]
_line = st.one_of(
    st.builds(lambda n, sep, v: n + sep + v, st.sampled_from(_NAMES), st.sampled_from([b":", b": ", b" : ", b":\t"]),
              st.sampled_from(_VALUES)),
    st.binary(max_size=12).filter(lambda b: b"\r\n" not in b),
)
_status = st.one_of(
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304",
                     b"HTTP/1.1 100 Continue", b"HTTP/1.1 199 x", b"HTTP/1.1 500 Internal Server Error",
                     b"HTTP/1.1 2", b"HTTP/1.1 20", b"HTTP/1.1 200", b"HTTP/1.1 200\rx", b"HTTP/1.1 2000",
                     b"HTTP/1.x 200 OK", b"HTTP/2.0 200 OK", b"HTTP/1.1  200", b"HTTP/1.1 2a0 OK", b"", b"HTTP/1."]),
    st.binary(max_size=16),
)
_request_line = st.sampled_from([
    b"POST /v1/completions HTTP/1.1", b"POST /v1/chat/completions HTTP/1.1", b"GET /v1/completions HTTP/1.1",
    b"POST /v1/embeddings HTTP/1.1", b"POST /v1/completions HTTP/1.0", b"POST  /v1/completions HTTP/1.1",
    b"POST /v1/completions HTTP/1.1 ", b" /v1/completions HTTP/1.1", b"POST /v1/completions", b"post /v1/completions HTTP/1.1",
    b"POST /v1/completions?x=1 HTTP/1.1", b"",
])


@needs_c
@settings(max_examples=examples(3000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_status, st.lists(_line, max_size=8), st.booleans())
def test_answer_heads_parse_alike(status, lines, trailing_crlf):
    head = b"\r\n".join([status, *lines]) + (b"\r\n" if trailing_crlf else b"")
    assert outcome(c.answer_head, head) == outcome(heads.answer_head_py, head)


@needs_c
@settings(max_examples=examples(3000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_request_line, st.lists(_line, max_size=8), st.sampled_from([0, 5, 1000, 1 << 40]), st.binary(max_size=4))
def test_request_heads_parse_alike(request_line, lines, body_limit, after):
    buf = b"\r\n".join([request_line, *lines]) + b"\r\n\r\n" + after
    end = buf.find(b"\r\n\r\n")
    assert c.request_head(buf, end, body_limit) == heads.request_head_py(buf, end, body_limit)


@pytest.mark.parametrize("fn", [heads.answer_head_py, pytest.param("c", marks=needs_c)])
def test_answer_head_framing(fn):
    fn = c.answer_head if fn == "c" else fn
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    assert fn(ok + b"Content-Length: 12") == (200, heads.LENGTH, 12, True)
    assert fn(ok + b"content-length: 0") == (200, heads.DONE, 0, True)
    assert fn(ok + b"Transfer-Encoding: gzip, Chunked\r\nContent-Length: 5") == (200, heads.CHUNK_SIZE, 0, True)
    assert fn(ok + b"Connection:  close \r\nContent-Length: 3") == (200, heads.LENGTH, 3, False)
    assert fn(b"HTTP/1.0 200 OK\r\nContent-Length: 3") == (200, heads.LENGTH, 3, False)
    assert fn(b"HTTP/1.1 204 No Content") == (204, heads.DONE, 0, True)
    assert fn(ok.rstrip(b"\r\n")) == (200, heads.UNTIL_CLOSE, 0, False)
    assert fn(b"HTTP/1.1 100 Continue") == (100, heads.HEAD, 0, False)
    assert fn(ok + b"Content-Length: 123456789012345678901234") == (200, heads.LENGTH, 123456789012345678901234, True)
    for bad, message in [(b"HTTP/1.1 20x OK", "bad status line b'HTTP/1.1 20x OK'"),
                         (ok + b"no colon", "bad header line in"), (ok + b": empty name", "bad header line in"),
                         (ok + b"Content-Length: 1 2", "bad content-length b'1 2'"),
                         (ok + b"Content-Length: ABC", "bad content-length b'abc'")]:
        with pytest.raises(ValueError, match=message):
            fn(bad)


@pytest.mark.parametrize("fn", [heads.request_head_py, pytest.param("c", marks=needs_c)])
def test_request_head_reads_what_the_handler_needs(fn):
    fn = c.request_head if fn == "c" else fn
    buf = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\ncontent-LENGTH:  7 \r\nX-Request-Id:  abc \t\r\n"
           b"x-request-id: second\r\nAUTHORIZATION: Bearer k\r\nConnection: keep-alive, Close\r\n\r\n{\"a\":1}")
    route, watched, keep_alive, length = fn(buf, buf.find(b"\r\n\r\n"), 1000)
    assert heads.ROUTES[route] == b"/v1/chat/completions" and length == 7 and keep_alive is False
    assert watched == {b"x-request-id": b"abc", b"authorization": b"Bearer k"}
    assert fn(buf, buf.find(b"\r\n\r\n"), 6) == "framing"  # over the body limit


# a chunked body's pieces: well-formed chunks, their sizes and CRLFs varied and broken, cut anywhere
_chunk = st.one_of(
    st.binary(min_size=1, max_size=40).map(lambda d: b"%x\r\n%s\r\n" % (len(d), d)),
    st.tuples(st.binary(max_size=12), st.sampled_from([b"", b";e=1", b" ;x", b"\t", b" ", b"x", b" 1"]))
    .map(lambda t: b"%X%s\r\n%s\r\n" % (len(t[0]), t[1], t[0])),
    st.sampled_from([b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"-3\r\nabc\r\n", b"0x3\r\nabc\r\n",
                     b"+3\r\nabc\r\n", b" 3\r\nabc\r\n", b"1_0\r\n", b"3\r\nabcXY", b"fffffffffffffff\r\n",
                     b"1000000000000000\r\nx\r\n", b"\r\n", b"3\r\nab", b"g\r\n", b"3" * 1100 + b"\r\n"]),
    st.binary(max_size=8),
)


@needs_c
@settings(max_examples=examples(3000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_chunk, max_size=8), st.integers(min_value=0, max_value=400))
def test_whole_chunks_alike(chunks, cut):
    data = b"".join(chunks)
    for piece in (data, data[:cut]):
        assert outcome(c.whole_chunks, piece) == outcome(heads.whole_chunks_py, piece)


@pytest.mark.parametrize("fn", [heads.whole_chunks_py, pytest.param("c", marks=needs_c)])
def test_whole_chunks_reads_the_whole_chunks_and_leaves_the_rest(fn):
    fn = c.whole_chunks if fn == "c" else fn
    assert fn(b"3\r\nabc\r\nA;ext=1\r\n0123456789\r\n0\r\n\r\n") == (b"abc0123456789", 29)
    assert fn(b"3\r\nabc\r\n") == (b"abc", 8)
    assert fn(b"3 \t;x\r\nabc\r\n5\r\nab") == (b"abc", 12)  # the second chunk is not whole: the rest
    assert fn(b"0\r\n\r\n") == (b"", 0) and fn(b"") == (b"", 0) and fn(b"3\r\nabc") == (b"", 0)
    assert fn(b"1" * 2000) == (b"", 0)  # no size line within 1,024 bytes: the caller's parser decides
    for bad, message in [(b"3\r\nabcXY", "missing CRLF after a chunk"), (b"-3\r\nabc\r\n", "bad chunk size b'-3'"),
                         (b"0x3\r\nabc\r\n", "bad chunk size"), (b" 3\r\nabc\r\n", "bad chunk size"),
                         (b"1_0\r\n", "bad chunk size"), (b"3 x\r\nabc\r\n", "bad chunk size"),
                         (b"1000000000000000\r\n", "bad chunk size")]:
        with pytest.raises(ValueError, match=message):
            fn(bad)


@needs_c
@needs_gcc
def test_the_c_parsers_under_address_and_undefined_behaviour_sanitizers():
    assert "20000 heads of each kind, C and Python alike" in run_sanitized_fuzz("fuzz_heads.py")
