"""The api_server fixes, driven through the ASGI interface lmdeploy's FastAPI app runs them on.

The inner app below stands in for lmdeploy's routes (fastapi/lmdeploy are not installed where CI runs;
tools/gpu_smoke.sh runs the same middleware inside real lmdeploy api_servers): it creates a session the
way lmdeploy's endpoints do (through `record_created_session`, what the patched create_session calls)
and answers like lmdeploy.
"""

import json

import pytest

from distserve.lmdeploy_ext.server_patches import (
    DistserveApiMiddleware,
    PeerBook,
    check_migration_request,
    record_created_session,
)

P = "http://10.0.0.1:23333"


async def lmdeploy_like_app(scope, receive, send):
    """Answers as lmdeploy 0.18 does for the routes the middleware touches."""
    msg = await receive()
    body = json.loads(msg["body"] or b"{}") if scope["method"] == "POST" else {}
    if scope["path"] == "/distserve/engine_info":
        out = json.dumps(json.dumps({"tp_size": 1, "block_size": 64, "num_gpu_blocks": 100}))
        ctype = b"application/json"
    elif scope["path"] == "/distserve/p2p_initialize" and any(
        "pp_size" not in body.get(k, {}) for k in ("local_engine_config", "remote_engine_config")
    ):
        data = b'{"message":"local_engine_config.pp_size: Field required"}'  # lmdeploy: required, nullable
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data, "more_body": False})
        return
    elif scope["path"].startswith("/distserve/"):
        out, ctype = json.dumps({"status": 1}), b"application/json"
    elif body.get("stream"):
        record_created_session(8)
        out, ctype = "data: {}\n\ndata: [DONE]\n\n", b"text/event-stream"
    else:
        record_created_session(41)
        ans = {"id": "chatcmpl-x" if "chat" in scope["path"] else "-1", "choices": [{"text": "a"}]}
        if body.get("with_cache"):
            ans.update(cache_block_ids=[3, 4], remote_token_ids=[7])
        out, ctype = json.dumps(ans), b"application/json"
    data = out.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def call(app, method, path, body=None):
    sent = []
    raw = json.dumps(body).encode() if body is not None else b""
    chunks = [raw[:5], raw[5:]] if len(raw) > 5 else [raw]  # a body in two parts, as servers deliver it

    async def receive():
        if chunks:
            part = chunks.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = dict(start["headers"])
    if b"content-length" in headers:
        assert int(headers[b"content-length"]) == len(data)
    return start["status"], data


@pytest.fixture
def app():
    return DistserveApiMiddleware(lmdeploy_like_app, peers=PeerBook())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_prefill_answer_carries_the_internal_session_id(app, path):
    status, data = await call(
        app,
        "POST",
        path,
        {"model": "m", "prompt": "x", "with_cache": True, "preserve_cache": True, "max_tokens": 1},
    )
    ans = json.loads(data)
    assert status == 200 and ans["remote_session_id"] == 41 and ans["cache_block_ids"] == [3, 4]


async def test_plain_requests_and_streams_pass_untouched(app):
    _, data = await call(app, "POST", "/v1/completions", {"model": "m", "prompt": "x"})
    assert "remote_session_id" not in json.loads(data)
    status, data = await call(
        app, "POST", "/v1/completions", {"model": "m", "prompt": "x", "stream": True, "with_cache": True}
    )
    assert status == 200 and data.startswith(b"data: ")


async def test_engine_info_keeps_lmdeploy_double_encoding_and_adds_agent_fields(app):
    status, data = await call(app, "GET", "/distserve/engine_info")
    outer = json.loads(data)
    assert status == 200 and isinstance(outer, str)
    inner = json.loads(outer)
    assert inner["block_size"] == 64 and inner["engine_kind"] == "lmdeploy"
    assert inner["instance_id"].startswith("lmd-") and inner["migration_protocol"] in (
        "tcp",
        "rdma",
        "nvlink",
    )


def migration(**over):
    return {
        "protocol": 1,
        "remote_engine_id": P,
        "remote_session_id": 3,
        "remote_token_id": 9,
        "remote_block_ids": [1, 2],
        "is_dummy_prefill": False,
        **over,
    }


async def test_decode_rejects_migration_requests_for_unknown_links_then_accepts_after_handshake(app):
    body = {"model": "m", "prompt": "x", "migration_request": migration()}
    status, data = await call(app, "POST", "/v1/completions", body)
    err = json.loads(data)["error"]
    assert status == 400 and "no link" in err["message"] and err["type"] == "invalid_request_error"

    # Configs without pp_size (a client dumping with exclude_none): lmdeploy alone would answer 400.
    status, _ = await call(
        app,
        "POST",
        "/distserve/p2p_initialize",
        {
            "remote_engine_id": P,
            "local_engine_config": {"num_gpu_blocks": 60},
            "remote_engine_config": {"num_gpu_blocks": 50},
        },
    )
    assert status == 200
    await call(app, "POST", "/distserve/p2p_connect", {"remote_engine_id": P})
    assert app.peers.handshakes == 1 and P in app.peers.connected
    status, _ = await call(app, "POST", "/v1/completions", body)
    assert status == 200
    status, data = await call(
        app, "POST", "/v1/completions", {**body, "migration_request": migration(remote_block_ids=[49, 50])}
    )
    assert status == 400 and b"[0, 50)" in data


@pytest.mark.parametrize(
    "bad, why",
    [
        ("nope", "must be an object"),
        (migration(remote_session_id="chatcmpl-1"), "remote_session_id"),
        (migration(remote_token_id=-1), "remote_token_id"),
        (migration(protocol=7), "protocol"),
        (migration(remote_block_ids=[1, "2"]), "list of integers"),
        (migration(remote_block_ids=[]), "empty"),
        (migration(extra=1), "unknown fields"),
        (migration(remote_engine_id=5), "remote_engine_id"),
    ],
)
def test_check_migration_request(bad, why):
    peers = PeerBook()
    peers.connected.add(P)
    assert why in check_migration_request(bad, peers)


def test_dummy_prefill_needs_no_link():
    assert check_migration_request(migration(is_dummy_prefill=True, remote_block_ids=[]), PeerBook()) is None


async def test_drop_of_a_never_initialized_peer_is_a_success_not_a_500(app):
    status, data = await call(
        app, "POST", "/distserve/p2p_drop_connect", {"engine_id": "x", "remote_engine_id": P}
    )
    assert status == 200 and json.loads(data) == {"success": True}


async def test_drop_forgets_the_link_for_migration_requests(app):
    cfg = {"num_gpu_blocks": 50, "pp_size": None}
    await call(
        app,
        "POST",
        "/distserve/p2p_initialize",
        {"remote_engine_id": P, "local_engine_config": cfg, "remote_engine_config": cfg},
    )
    await call(app, "POST", "/distserve/p2p_connect", {"remote_engine_id": P})
    status, _ = await call(
        app, "POST", "/distserve/p2p_drop_connect", {"engine_id": "x", "remote_engine_id": P}
    )
    assert status == 200 and P not in app.peers.connected
    status, _ = await call(
        app, "POST", "/v1/completions", {"model": "m", "prompt": "x", "migration_request": migration()}
    )
    assert status == 400
