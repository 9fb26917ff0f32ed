"""The null-mode engine: the wire protocol without a model (what routers and agents test against)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from distserve.testing import pd
from tests.util import Proc, free_port, free_port_range, spawn_engine, wait_http

MODEL = "distserve-reference"


def test_cli_and_null_mode_import_neither_torch_nor_dlslime():
    code = ("import sys, distserve.engine.cli, distserve.engine.server, distserve.engine.core, "
            "distserve.migration.manager; bad = {'torch', 'dlslime'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def null_pd():
    key = "k-" + str(free_port())
    env_extra = ("--api-keys", key, "--peer-token", key)
    p, p_url = spawn_engine("prefill", None, "--null", *env_extra, name="null-prefill")
    d, d_url = spawn_engine("decode", None, "--null", *env_extra, name="null-decode")
    h, h_url = spawn_engine("hybrid", None, "--null", *env_extra, name="null-hybrid")
    yield p_url, d_url, h_url, key
    for proc in (p, d, h):
        proc.stop()


async def test_null_pd_equals_hybrid_and_frees_prefill(null_pd):
    p_url, d_url, h_url, key = null_pd
    async with aiohttp.ClientSession() as http:
        await pd.handshake(http, p_url, d_url, key)
        info = await pd.engine_info(http, p_url, key)
        assert info["engine_kind"] == "null" and info["kv_layout"] and len(info["instance_id"]) >= 8
        for route, body in (("completions", {"model": MODEL, "prompt": "x" * 40, "max_tokens": 12}),
                            ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 30, "stream": True})):
            want = await pd.generate(http, h_url, route, body, key)
            got = await pd.pd_generate(http, p_url, d_url, route, body, key)
            assert got == want and want[0]
        m_p = await pd.metrics(http, p_url, key)
        m_d = await pd.metrics(http, d_url, key)
        assert m_p["distserve_engine_handshakes_total"] == 1 and m_d["distserve_engine_handshakes_total"] == 1
        assert m_d["distserve_engine_migrations_total"] == 2
        for _ in range(50):  # the decode engine frees P's blocks in the background
            m_p = await pd.metrics(http, p_url, key)
            if m_p["distserve_engine_preserved_blocks"] == 0:
                break
            await asyncio.sleep(0.05)
        assert m_p["distserve_engine_preserved_blocks"] == 0 and m_p["distserve_engine_kv_blocks_used"] == 0
        assert m_p["distserve_engine_free_cache_total"] == 2


async def test_null_auth(null_pd):
    p_url, _, _, key = null_pd
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{p_url}/health") as resp:
            assert resp.status == 200
        for path in ("/v1/models", "/metrics", "/distserve/engine_info"):
            async with http.get(f"{p_url}{path}") as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "invalid_api_key"
            async with http.get(f"{p_url}{path}", headers=pd.auth("wrong")) as resp:
                assert resp.status == 401
            async with http.get(f"{p_url}{path}", headers=pd.auth(key)) as resp:
                assert resp.status == 200


def test_many_null_engines_in_one_process():
    base = free_port_range(16)
    proc = Proc.python(["distserve", "engine", "--null", "--role", "decode", "--count", "16", "--port", str(base),
                        "--host", "127.0.0.1"], name="null-many")
    try:
        urls = []
        deadline = time.monotonic() + 60
        while len(urls) < 16 and time.monotonic() < deadline and proc.alive():
            urls = re.findall(r"url=(\S+)", proc.output())
            time.sleep(0.1)
        assert urls == [f"http://127.0.0.1:{base + i}" for i in range(16)], proc.output()[-2000:]
        ids = set()
        for url in urls:
            wait_http(f"{url}/health", timeout=10)
            with urllib.request.urlopen(f"{url}/distserve/engine_info", timeout=5) as resp:
                ids.add(json.loads(json.loads(resp.read()))["instance_id"])
        assert len(ids) == 16  # every engine has its own instance id
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, proc.output()[-2000:]


@pytest.mark.parametrize("args,needle", [
    (["--migration-protocol", "rdma"], "RDMA NIC"),
    (["--migration-protocol", "nvlink"], "NVLink"),
    (["--count", "2"], "--count"),
    (["--num-blocks", "-3"], "bad model configuration"),
    (["--model-config", "/nonexistent.json"], "bad model configuration"),
    (["--transfer-host", "0.0.0.0"], "transfer-host"),
])
def test_cli_errors_are_one_line(args, needle):
    out = subprocess.run([sys.executable, "-m", "distserve", "engine", "--port", "0", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr
