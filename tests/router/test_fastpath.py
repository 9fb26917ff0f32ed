"""The router's fast server path (distserve/router/fastpath.py) against a real router process, a real etcd
and a real reference engine: raw sockets for what clients put on the wire (pipelining, heads and bodies
split anywhere, Connection: close, chunked bodies), h11 to read the answers strictly, and the hand-over
counter to know which path answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
import socket
import time

import h11
import pytest

from distserve.testing.metrics import scrape, value as metric_value
from tests.router.cluster import MODEL, hybrid_behind_router

KEY = "fast-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live():
    with hybrid_behind_router("fastpath-engine", "--api-keys", KEY, "--header-read-timeout", "2",
                              "--body-read-timeout", "2") as live:
        yield live


def handovers(live) -> tuple[float, float]:
    """(route, framing) hand-overs, from one scrape; the scrape itself (a GET) is one more `route`."""
    text = scrape(live["router"], AUTH)
    name = "distserve_router_connections_handed_over_total"
    return metric_value(text, name, {"reason": "route"}), metric_value(text, name, {"reason": "framing"})


def connect(live) -> socket.socket:
    host, port = live["router"].removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(20)
    return sock


def completion(rid: str, *, stream: bool = False, close: bool = False, auth: bool = True,
               payload: bytes | None = None, prompt: str = "the fast path") -> bytes:
    body = payload if payload is not None else json.dumps(
        {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "stream": stream}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: " + rid.encode() + b"\r\n" + (b"Authorization: Bearer %s\r\n" % KEY.encode() if auth else b"")
            + (b"Connection: close\r\n" if close else b"") + b"Content-Length: %d\r\n\r\n" % len(body))
    return head + body


@contextlib.contextmanager
def client(live) -> Iterator[tuple[socket.socket, "Reader"]]:
    """A raw connection to the router and a strict reader of its answers; closed at the end."""
    sock = connect(live)
    with sock:
        yield sock, Reader(sock)


class Reader:
    """Responses read strictly (h11) off one client connection, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)

    def response(self) -> tuple[h11.Response, bytes]:
        # h11 tracks our side too: tell it a request went out (what we sent raw)
        self.conn.send(h11.Request(method="POST", target="/", headers=[("Host", "router"), ("Content-Length", "0")]))
        self.conn.send(h11.EndOfMessage())
        head, body = None, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return head, body
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the router closed the connection before answering")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True


def header(resp: h11.Response, name: bytes) -> bytes | None:
    return next((v for k, v in resp.headers if k == name.lower()), None)


def text_of(body: bytes) -> str:
    return json.loads(body)["choices"][0]["text"]


def test_pipelined_and_split_requests_on_one_connection_are_answered_in_order_on_the_fast_path(live):
    route, framing = handovers(live)
    with client(live) as (sock, reader):
        # two requests in one write, then one whose head and body come in pieces, the body much later
        sock.sendall(completion("p1") + completion("p2", prompt="another prompt"))
        third = completion("p3")
        split = third.index(b"\r\n\r\n") + 4
        for i in range(0, split, 9):
            sock.sendall(third[i:min(i + 9, split)])
            time.sleep(0.01)
        time.sleep(0.5)  # the handler waits for the body (within the body timeout)
        sock.sendall(third[split:split + 3])
        time.sleep(0.2)
        sock.sendall(third[split + 3:])
        answers = [reader.response() for _ in range(3)]
    assert [header(r, b"x-request-id") for r, _ in answers] == [b"p1", b"p2", b"p3"]
    assert all(r.status_code == 200 and header(r, b"content-type").startswith(b"application/json")
               for r, _ in answers), answers
    assert text_of(answers[0][1]) == text_of(answers[2][1]) != ""  # greedy: same prompt, same text
    assert handovers(live) == (route + 1, framing), "served without aiohttp (the one more is the scrape)"


def test_a_streamed_answer_is_chunked_sse_and_the_connection_is_reused(live):
    with client(live) as (sock, reader):
        sock.sendall(completion("s1", stream=True))
        resp, body = reader.response()
        assert resp.status_code == 200 and header(resp, b"transfer-encoding") == b"chunked"
        assert header(resp, b"content-type") == b"text/event-stream"
        events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        sock.sendall(completion("s2"))  # the same connection after a stream
        resp, body = reader.response()
    assert resp.status_code == 200 and text_of(body) == streamed


def test_other_routes_and_framings_hand_the_connection_to_aiohttp_intact(live):
    route, framing = handovers(live)
    with client(live) as (sock, reader):
        sock.sendall(completion("h1"))
        first, body1 = reader.response()
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: router\r\nAuthorization: Bearer %s\r\n\r\n" % KEY.encode())
        models, body = reader.response()
        assert models.status_code == 200 and json.loads(body)["data"][0]["id"] == MODEL
        sock.sendall(completion("h2"))  # the connection is aiohttp's now, and serves this too
        again, body2 = reader.response()
    assert first.status_code == again.status_code == 200 and text_of(body1) == text_of(body2)
    assert handovers(live) == (route + 2, framing)  # GET /v1/models, and the scrape
    # a chunked body: aiohttp's to read; the answer is the same
    payload = json.dumps({"model": MODEL, "prompt": "the fast path", "max_tokens": 5, "temperature": 0}).encode()
    with client(live) as (sock, reader):
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nAuthorization: Bearer %s\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (KEY.encode(), len(payload), payload))
        chunked, body3 = reader.response()
    assert chunked.status_code == 200 and text_of(body3) == text_of(body1)
    assert handovers(live) == (route + 3, framing + 1)


def test_errors_and_connection_close_on_the_fast_path(live):
    route, framing = handovers(live)
    with client(live) as (sock, reader):
        sock.sendall(completion("e1", auth=False))
        resp, body = reader.response()
        assert resp.status_code == 401 and header(resp, b"www-authenticate") == b"Bearer"
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        sock.sendall(completion("e2", payload=b'{"model": '))
        resp, body = reader.response()
        assert resp.status_code == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
        sock.sendall(completion("e3", payload=json.dumps({"model": "no-such-model", "prompt": "x"}).encode()))
        resp, body = reader.response()
        assert resp.status_code == 404 and json.loads(body)["error"]["code"] == "model_not_found"
        sock.sendall(completion("e4", close=True))
        resp, body = reader.response()
        assert resp.status_code == 200 and header(resp, b"connection") == b"close"
        assert reader.closed(), "Connection: close is honoured"
    assert handovers(live) == (route + 1, framing)


def test_slow_heads_and_bodies_get_408_on_the_fast_path_too(live):
    sock = connect(live)
    with sock:
        whole = completion("slow-body")
        sock.sendall(whole[: whole.index(b"\r\n\r\n") + 6])  # the head and two bytes of the body
        got = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            got += piece
    assert got.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in got
    assert b"the request body did not arrive within 2s" in got
    sock = connect(live)
    with sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: rou")
        got = sock.recv(65536)
    assert got.startswith(b"HTTP/1.1 408 ") and b"the request headers did not arrive within 2s" in got


@pytest.mark.parametrize("keep_alive", [True, False])
def test_the_lanes_sse_head_is_the_orchestrators_headers_written_the_usual_way(keep_alive):
    """FastConnection.sse_stream writes its head from bytes made once; it must be what new_stream writes for the
    orchestrator's SSE headers (a header changed in one place and not the other would differ by path)."""
    from distserve.router.fastpath import FastConnection, FastDoor
    from distserve.router.orchestrator import SSE_HEADERS

    class Written:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

        def is_closing(self) -> bool:
            return False

    async def heads() -> tuple[bytes, bytes]:
        door = FastDoor(None, None, 1 << 20, 1.0, 1.0, lambda _phase: None)
        out = []
        for make in (lambda c: c.new_stream({**SSE_HEADERS, "X-Request-Id": "rid-1"}),
                     lambda c: c.sse_stream("rid-1")):
            conn = FastConnection(door)
            conn.transport = Written()
            conn.keep_alive = keep_alive
            make(conn).start(b"data: x\n\n")
            out.append(conn.transport.data)
        return out[0], out[1]

    usual, lane = (re.sub(rb"Date: [^\r]*\r\n", b"", head) for head in asyncio.run(heads()))  # its second may tick
    assert usual == lane and b"X-Request-Id: rid-1\r\n" in lane
