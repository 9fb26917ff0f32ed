"""The load generator's verdicts, against a real aiohttp server that misbehaves on purpose.

The chaos assertions are only as good as the outcome each request is given: a stream cut without an
error event must not pass for one that ended with it, a dropped connection must not pass for an HTTP
error, and a refused connection must be retried on the next router (never a delivered request).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from distserve.testing.chaos.load import LoadGenerator
from distserve.testing.ports import free_port

MODE = web.AppKey("mode", str)
DONE = b"data: [DONE]\n\n"
CHUNK = b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
ERROR = b'data: {"error": {"message": "decode failed mid-stream", "type": "upstream_error", "code": "decode_failed"}}\n\n'


async def behaviour(request: web.Request) -> web.StreamResponse:
    mode = request.app[MODE]
    body = await request.json()
    if mode == "http_502":
        return web.json_response({"error": {"message": "x", "type": "upstream_error", "code": "prefill_failed"}},
                                 status=502)
    if not body.get("stream"):
        if mode == "drop":
            request.transport.close()
            await asyncio.sleep(1)
        return web.json_response({"choices": [{"index": 0, "text": "ok"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(CHUNK)
    if mode == "ok":
        await resp.write(DONE)
    elif mode == "error_event":
        await resp.write(ERROR)
    elif mode == "drop":
        request.transport.close()
        return resp
    await resp.write_eof()  # "truncated": neither [DONE] nor an error event
    return resp


async def serve(mode: str) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app[MODE] = mode
    app.router.add_post("/v1/completions", behaviour)
    app.router.add_post("/v1/chat/completions", behaviour)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def outcomes(routers) -> set[tuple[bool, str]]:
    load = LoadGenerator(lambda: routers, "m", workers=4, interval=0.01, timeout=5)
    await load.start()
    await asyncio.sleep(0.4)
    await load.stop()
    assert load.records
    return {(r.stream, r.outcome) for r in load.records}


async def test_each_failure_gets_its_own_verdict():
    expected = {
        "ok": {(False, "ok"), (True, "ok")},
        "error_event": {(False, "ok"), (True, "error_event")},
        "truncated": {(False, "ok"), (True, "truncated")},
        "http_502": {(False, "http_error"), (True, "http_error")},
        "drop": {(False, "disconnected"), (True, "disconnected")},
    }
    for mode, want in expected.items():
        runner, url = await serve(mode)
        try:
            assert await outcomes([("r0", url)]) == want, mode
        finally:
            await runner.cleanup()


async def test_a_refused_connection_is_retried_on_the_next_router_and_nothing_else_is():
    runner, url = await serve("ok")
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        load = LoadGenerator(lambda: [("dead", dead), ("live", url)], "m", workers=2, interval=0.01, timeout=5)
        await load.start()
        await asyncio.sleep(0.3)
        await load.stop()
        assert load.records and all(r.ok and r.router == "live" for r in load.records)
        assert any(r.routers_tried == ["dead", "live"] for r in load.records)
        # without retry, a refused connection is a failure ("unreachable")
        load = LoadGenerator(lambda: [("dead", dead)], "m", workers=1, interval=0.01, timeout=5, retry=False)
        await load.start()
        await asyncio.sleep(0.1)
        await load.stop()
        assert load.records and {r.outcome for r in load.records} == {"unreachable"}
    finally:
        await runner.cleanup()
