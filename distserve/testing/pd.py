"""PD helpers for tests and benches: the lmdeploy handshake and a prefill -> migration -> decode request."""

from __future__ import annotations

import json

import aiohttp

from distserve.testing.metrics import unlabelled

PROTO = {"tcp": 1, "rdma": 2, "nvlink": 3}


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def engine_info(http: aiohttp.ClientSession, url: str, key: str | None = None) -> dict:
    async with http.get(f"{url}/distserve/engine_info", headers=auth(key)) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert isinstance(body, str), "engine_info must be a JSON string (lmdeploy double-encodes it)"
    return json.loads(body)


async def handshake(http: aiohttp.ClientSession, p_url: str, d_url: str, key: str | None = None,
                    protocol: str = "tcp") -> None:
    """The lmdeploy connection warmup for one (prefill, decode) pair; engine ids are URLs."""
    p_info, d_info = await engine_info(http, p_url, key), await engine_info(http, d_url, key)
    init = {}
    for local, remote, local_cfg, remote_cfg in ((p_url, d_url, p_info, d_info), (d_url, p_url, d_info, p_info)):
        body = {"local_engine_id": local, "local_engine_config": local_cfg, "remote_engine_id": remote,
                "remote_engine_config": remote_cfg, "protocol": PROTO[protocol], "rank": 0,
                "tcp_config": {}, "rdma_config": {"with_gdr": False, "link_type": 2}, "nvlink_config": {}}
        async with http.post(f"{local}/distserve/p2p_initialize", json=body, headers=auth(key)) as resp:
            assert resp.status == 200, await resp.text()
            init[local] = await resp.json()
            assert init[local]["status"] == 1
    for local, remote in ((p_url, d_url), (d_url, p_url)):
        body = {"protocol": PROTO[protocol], "remote_engine_id": remote,
                "remote_engine_endpoint_info": init[remote]["engine_endpoint_info"],
                "remote_kvtransfer_endpoint_info": init[remote]["kvtransfer_endpoint_info"]}
        async with http.post(f"{local}/distserve/p2p_connect", json=body, headers=auth(key)) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == 1


async def prefill(http: aiohttp.ClientSession, p_url: str, route: str, body: dict, key: str | None = None) -> dict:
    pre = {**body, "max_tokens": 1, "stream": False, "with_cache": True, "preserve_cache": True}
    if route == "chat/completions":
        pre["max_completion_tokens"] = 1
    async with http.post(f"{p_url}/v1/{route}", json=pre, headers=auth(key)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def migration_request(p_url: str, pre: dict, protocol: str = "tcp") -> dict:
    """What a router sends: the prefill's packed copy too, when it made one (remote_kv_staging)."""
    mig = {"protocol": PROTO[protocol], "remote_engine_id": p_url, "remote_session_id": pre["remote_session_id"],
           "remote_token_id": pre["remote_token_ids"][0], "remote_block_ids": pre["cache_block_ids"],
           "is_dummy_prefill": False}
    if pre.get("remote_kv_staging") is not None:
        mig["remote_kv_staging"] = pre["remote_kv_staging"]
    return mig


async def collect(resp: aiohttp.ClientResponse, route: str) -> tuple[str, str | None]:
    """(text, finish_reason) of a streamed answer."""
    text, finish = [], None
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            piece = choice.get("text") if route == "completions" else choice["delta"].get("content")
            text.append(piece or "")
            finish = choice.get("finish_reason") or finish
    return "".join(text), finish


async def generate(http: aiohttp.ClientSession, url: str, route: str, body: dict,
                   key: str | None = None) -> tuple[str, str | None, dict | None]:
    """(text, finish_reason, usage) from one engine, streamed or not as body says."""
    async with http.post(f"{url}/v1/{route}", json=body, headers=auth(key)) as resp:
        assert resp.status == 200, await resp.text()
        if body.get("stream"):
            text, finish = await collect(resp, route)
            return text, finish, None
        out = await resp.json()
    choice = out["choices"][0]
    text = choice["text"] if route == "completions" else choice["message"]["content"]
    return text, choice["finish_reason"], out["usage"]


async def pd_generate(http: aiohttp.ClientSession, p_url: str, d_url: str, route: str, body: dict,
                      key: str | None = None) -> tuple[str, str | None, dict | None]:
    pre = await prefill(http, p_url, route, body, key)
    return await generate(http, d_url, route, {**body, "migration_request": migration_request(p_url, pre)}, key)


async def metrics(http: aiohttp.ClientSession, url: str, key: str | None = None) -> dict[str, float]:
    async with http.get(f"{url}/metrics", headers=auth(key)) as resp:
        assert resp.status == 200
        text = await resp.text()
    return unlabelled(text)
