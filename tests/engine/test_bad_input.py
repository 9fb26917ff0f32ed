"""Bad input gets a 4xx OpenAI-style error, and the engine keeps serving (real engines, real handshakes)."""

from __future__ import annotations

import json

import aiohttp
import pytest

from distserve.testing import pd

MODEL = "distserve-reference"


async def _post(http, url, path, body, raw: bool = False):
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if raw else {"json": body}
    async with http.post(f"{url}{path}", **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


def _assert_error(status, body, want_status, code=None):
    assert status == want_status, body
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body


async def _valid_pd(http, p_url, d_url):
    body = {"model": MODEL, "prompt": "still serving " * 5, "max_tokens": 8, "temperature": 0}
    want = await pd.generate(http, p_url, "completions", body)  # a prefill engine can answer whole requests too
    got = await pd.pd_generate(http, p_url, d_url, "completions", body)
    assert got == want


async def test_bad_migration_requests_get_4xx(pd_engines):
    p_url, d_url = pd_engines["prefill"], pd_engines["decode"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await pd.handshake(http, p_url, d_url)
        prompt = "hostile " * 10  # 81 tokens: 6 blocks of 16
        base = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        pre = await pd.prefill(http, p_url, "completions", base)
        good = pd.migration_request(p_url, pre)
        info = await pd.engine_info(http, p_url)
        n = info["num_gpu_blocks"]
        cases = [
            ({k: v for k, v in good.items() if k != "remote_block_ids"}, "invalid_migration_request"),
            ({**good, "evil": 1}, "invalid_migration_request"),
            ({**good, "remote_block_ids": "0,1"}, "invalid_migration_request"),
            ({**good, "remote_session_id": "abc"}, "invalid_migration_request"),
            ({**good, "remote_engine_id": "http://10.255.255.1:1"}, "unknown_peer"),
            ({**good, "remote_block_ids": good["remote_block_ids"][:-1] + [n]}, "invalid_block_ids"),
            ({**good, "remote_block_ids": good["remote_block_ids"][:-1] + [-1]}, "invalid_block_ids"),
            ({**good, "remote_block_ids": good["remote_block_ids"][:-1] + [1 << 40]}, "invalid_block_ids"),
            ({**good, "remote_block_ids": [good["remote_block_ids"][0]] * len(good["remote_block_ids"])},
             "invalid_block_ids"),
            ({**good, "remote_block_ids": good["remote_block_ids"][:-1]}, "invalid_block_ids"),
            ({**good, "remote_block_ids": list(range(100000))}, "invalid_block_ids"),
            ({**good, "remote_token_id": 10 ** 6}, "invalid_migration_request"),
            ({**good, "protocol": 2}, "invalid_migration_request"),
            ({**good, "protocol": 7}, "invalid_migration_request"),
            ({**good, "is_dummy_prefill": True}, "invalid_migration_request"),
            ("not an object", "invalid_migration_request"),
        ]
        for mig, code in cases:
            status, body = await _post(http, d_url, "/v1/completions", {**base, "migration_request": mig})
            _assert_error(status, body, 400, code)
        # A prefill engine rejects migration requests; a decode engine rejects preserve_cache.
        status, body = await _post(http, p_url, "/v1/completions", {**base, "migration_request": good})
        _assert_error(status, body, 400, "invalid_migration_request")
        # Nothing leaked on the decode engine; the untouched prefill session is still readable.
        m_d = await pd.metrics(http, d_url)
        assert m_d["distserve_engine_kv_blocks_used"] == 0 and m_d["distserve_engine_migrations_total"] >= 0
        text, finish, _ = await pd.generate(http, d_url, "completions", {**base, "migration_request": good})
        assert text
        await _valid_pd(http, p_url, d_url)


async def test_bad_handshakes_get_4xx(pd_engines):
    p_url, d_url = pd_engines["prefill"], pd_engines["decode"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        p_info, d_info = await pd.engine_info(http, p_url), await pd.engine_info(http, d_url)
        fake = "http://127.0.0.1:9"
        init = {"local_engine_id": d_url, "local_engine_config": d_info, "remote_engine_id": fake,
                "remote_engine_config": p_info, "protocol": 1}
        # block_size mismatch and a protocol this engine does not run
        status, body = await _post(http, d_url, "/distserve/p2p_initialize",
                                   {**init, "remote_engine_config": {**p_info, "block_size": 64}})
        _assert_error(status, body, 400, "handshake_rejected")
        assert body["status"] == 2
        status, body = await _post(http, d_url, "/distserve/p2p_initialize", {**init, "protocol": 2})
        _assert_error(status, body, 400, "handshake_rejected")
        status, body = await _post(http, d_url, "/distserve/p2p_initialize", {"local_engine_id": 3})
        _assert_error(status, body, 400)
        # connect before initialize
        status, resp = await _post(http, p_url, "/distserve/p2p_initialize",
                                   {**init, "local_engine_id": p_url, "local_engine_config": p_info,
                                    "remote_engine_id": fake + "0", "remote_engine_config": d_info})
        assert status == 200, resp
        kv = resp["kvtransfer_endpoint_info"][0]
        connect = {"protocol": 1, "remote_engine_id": fake, "remote_engine_endpoint_info": {"zmq_address": ""},
                   "remote_kvtransfer_endpoint_info": [kv]}
        status, body = await _post(http, d_url, "/distserve/p2p_connect", connect)
        _assert_error(status, body, 409, "peer_not_initialized")
        status, _ = await _post(http, d_url, "/distserve/p2p_initialize", init)
        assert status == 200
        # geometry mismatch: the peer's pool has other block shapes
        pool = dict(kv["cache_pools"][0])
        bad_pool = {**pool, "shape": pool["shape"][:2] + [2, 16, 8, 32]}
        status, body = await _post(http, d_url, "/distserve/p2p_connect",
                                   {**connect, "remote_kvtransfer_endpoint_info": [{**kv, "cache_pools": [bad_pool]}]})
        _assert_error(status, body, 400, "geometry_mismatch")
        status, body = await _post(http, d_url, "/distserve/p2p_connect",
                                   {**connect, "remote_kvtransfer_endpoint_info": [{**kv, "cache_pools": None}]})
        _assert_error(status, body, 400, "geometry_mismatch")
        # a memory region smaller than the advertised pool, and a wildcard transfer address
        ep = json.loads(kv["endpoint_info"])
        small = {**ep, "mr_info": {"kv": {**ep["mr_info"]["kv"], "length": 4096}}}
        for bad_ep in (small, {**ep, "host": "0.0.0.0"}, {"host": "127.0.0.1"}):
            status, body = await _post(http, d_url, "/distserve/p2p_connect",
                                       {**connect, "remote_kvtransfer_endpoint_info":
                                        [{**kv, "endpoint_info": json.dumps(bad_ep)}]})
            assert 400 <= status < 500, body
        # the half-made peer is unusable: a migration naming it is an unknown peer
        await pd.handshake(http, p_url, d_url)
        pre = await pd.prefill(http, p_url, "completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        mig = {**pd.migration_request(p_url, pre), "remote_engine_id": fake}
        status, body = await _post(http, d_url, "/v1/completions",
                                   {"model": MODEL, "prompt": "x", "max_tokens": 2, "migration_request": mig})
        _assert_error(status, body, 400, "unknown_peer")
        async with http.post(f"{p_url}/distserve/free_cache",
                             json={"remote_engine_id": d_url, "remote_session_id": pre["remote_session_id"]}) as r:
            assert r.status == 200 and (await r.json()) == {"status": "SUCCESS"}
        for local, remote in ((p_url, fake + "0"), (d_url, fake)):
            async with http.post(f"{local}/distserve/p2p_drop_connect",
                                 json={"engine_id": local, "remote_engine_id": remote}) as r:
                assert r.status == 200 and (await r.json()) == {"success": True}
        await _valid_pd(http, p_url, d_url)


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
async def test_bad_openai_requests_get_4xx(pd_engines, route):
    h_url = pd_engines["hybrid"]
    base = {"model": MODEL, "max_tokens": 4}
    base.update({"prompt": "hi"} if route == "completions" else {"messages": [{"role": "user", "content": "hi"}]})
    cases = [
        ({**base, "model": "no-such-model"}, 404, "model_not_found"),
        ({**base, "temperature": 3}, 400, None),
        ({**base, "temperature": -1}, 400, None),
        ({**base, "top_p": 0}, 400, None),
        ({**base, "top_p": 1.5}, 400, None),
        ({**base, "max_tokens": 0}, 400, None),
        ({**base, "max_tokens": -5}, 400, None),
        ({**base, "n": 2}, 400, None),
        ({**base, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
        ({**base, "stop": [""]}, 400, None),
        ({**base, "seed": "x"}, 400, None),
        ({**base, "max_tokens": 10 ** 6}, 400, "context_length_exceeded"),
        ({**base, "stream_options": {"include_usage": True}}, 400, "invalid_value"),  # OpenAI: needs stream
        ({**base, "stream": False, "stream_options": {}}, 400, "invalid_value"),
        ({k: v for k, v in base.items() if k != "model"}, 400, None),
    ]
    if route == "completions":
        cases += [({**base, "prompt": "x" * 5000}, 400, "context_length_exceeded"),
                  ({**base, "prompt": [1, 2, 999]}, 400, "invalid_prompt"),
                  ({**base, "prompt": []}, 400, "invalid_prompt")]
    else:
        cases += [({**base, "messages": []}, 400, None),
                  ({**base, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
                  ({**base, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for body, want, code in cases:
            status, out = await _post(http, h_url, f"/v1/{route}", body)
            _assert_error(status, out, want, code)
        for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            status, out = await _post(http, h_url, f"/v1/{route}", raw, raw=True)
            _assert_error(status, out, 400)
        async with http.get(f"{h_url}/v1/nothing-here") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        text, finish, usage = await pd.generate(http, h_url, route, {**base, "temperature": 0})
        assert text and finish in ("length", "stop") and usage["completion_tokens"] >= 1


async def test_prefill_leg_checks_the_decode_budget_before_computing(pd_engines):
    """A router's prefill leg runs with max_tokens=1; `decode_max_tokens` (the client's budget) is checked
    against the context before the request is accepted, so an over-long request costs no forward pass."""
    p_url = pd_engines["prefill"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        info = await pd.engine_info(http, p_url)
        context = info["max_model_len"]  # published for agents (EngineRecord.max_model_len)
        assert context == 4096
        prompt = "y" * 3999  # 4000 tokens with BOS
        leg = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": False, "with_cache": True,
               "preserve_cache": True}
        before = await pd.metrics(http, p_url)
        for route, body in (("completions", leg),
                            ("chat/completions", {**{k: v for k, v in leg.items() if k != "prompt"},
                                                  "messages": [{"role": "user", "content": prompt}],
                                                  "max_completion_tokens": 1})):
            status, out = await _post(http, p_url, f"/v1/{route}", {**body, "decode_max_tokens": 97})
            _assert_error(status, out, 400, "context_length_exceeded")
            assert "max_tokens (97)" in out["error"]["message"]
            assert out["error"]["param"] == ("prompt" if route == "completions" else "messages")
        after = await pd.metrics(http, p_url)
        assert after["distserve_engine_requests_total"] == before["distserve_engine_requests_total"]
        assert after["distserve_engine_preserved_blocks"] == before["distserve_engine_preserved_blocks"]
        # the same prompt with a budget that fits is prefilled as before
        status, out = await _post(http, p_url, "/v1/completions", {**leg, "decode_max_tokens": 96})
        assert status == 200 and out["cache_block_ids"], out
        async with http.post(f"{p_url}/distserve/free_cache",
                             json={"remote_engine_id": "x", "remote_session_id": out["remote_session_id"]}) as r:
            assert r.status == 200
        status, out = await _post(http, p_url, "/v1/completions", {**leg, "decode_max_tokens": 0})
        _assert_error(status, out, 400)
