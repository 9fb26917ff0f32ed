"""Preserved prefill KV: freed by the TTL when no decode claims it; a hung migration ends at its deadline."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from distserve.testing import pd
from tests.engine.conftest import start_engines

MODEL = "distserve-reference"


@pytest.fixture(scope="module")
def short_engines():
    engines = start_engines({
        "prefill": ("prefill", "--preserve-ttl", "3", "--num-blocks", "128"),
        "decode": ("decode", "--migration-deadline", "1.5", "--num-blocks", "128"),
    })
    yield engines
    for proc in engines.procs.values():
        proc.signal(signal.SIGCONT)
        proc.stop()


async def _wait_metric(http, url, name, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = (await pd.metrics(http, url))[name]
        if pred(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def test_unclaimed_prefill_is_freed_after_ttl(short_engines):
    p_url = short_engines["prefill"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        body = {"model": MODEL, "prompt": "never decoded " * 8, "max_tokens": 4, "temperature": 0}
        pre = await pd.prefill(http, p_url, "completions", body)
        assert len(pre["cache_block_ids"]) == 8 and isinstance(pre["remote_session_id"], int)
        m = await pd.metrics(http, p_url)
        assert m["distserve_engine_preserved_blocks"] == 8 and m["distserve_engine_kv_blocks_used"] == 8
        left = await _wait_metric(http, p_url, "distserve_engine_preserved_blocks", lambda v: v == 0, timeout=8)
        assert left == 0
        m = await pd.metrics(http, p_url)
        assert m["distserve_engine_preserved_expired_total"] >= 1 and m["distserve_engine_kv_blocks_used"] == 0


async def test_preserved_blocks_are_not_evicted_under_pressure(short_engines):
    """With the pool nearly full of a preserved prefill, other requests wait; the kept KV stays intact."""
    p_url, d_url = short_engines["prefill"], short_engines["decode"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await pd.handshake(http, p_url, d_url)
        body = {"model": MODEL, "prompt": "k" * 1200, "max_tokens": 6, "temperature": 0}  # 76 of 128 blocks
        want = await pd.generate(http, d_url, "completions", body)
        pre = await pd.prefill(http, p_url, "completions", body)
        # Other traffic on P needs more blocks than are free: it waits (back-pressure), then completes.
        others = [pd.generate(http, p_url, "completions", {**body, "prompt": "z" * 900, "max_tokens": 2})
                  for _ in range(2)]
        task = asyncio.gather(*others)
        await asyncio.sleep(0.3)
        m = await pd.metrics(http, p_url)
        assert m["distserve_engine_preserved_blocks"] == 76
        assert m["distserve_engine_requests_waiting"] >= 1  # back-pressure, not eviction
        got = await pd.generate(http, d_url, "completions",
                                {**body, "migration_request": pd.migration_request(p_url, pre)})
        assert got == want
        assert all(text for text, _, _ in await task)


async def test_hung_migration_fails_at_deadline_and_quarantines(short_engines):
    p_url, d_url = short_engines["prefill"], short_engines["decode"]
    p_proc = short_engines.procs["prefill"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await pd.handshake(http, p_url, d_url)
        body = {"model": MODEL, "prompt": "frozen prefill " * 6, "max_tokens": 4, "temperature": 0}
        pre = await pd.prefill(http, p_url, "completions", body)
        p_proc.signal(signal.SIGSTOP)  # the prefill's transfer server stops answering
        try:
            started = time.monotonic()
            async with http.post(f"{d_url}/v1/completions",
                                 json={**body, "migration_request": pd.migration_request(p_url, pre)}) as resp:
                status, out = resp.status, await resp.json()
            elapsed = time.monotonic() - started
            assert status == 504 and out["error"]["code"] == "migration_timeout", out
            assert 1.0 < elapsed < 10
            m = await pd.metrics(http, d_url)  # the decode engine keeps serving meanwhile
            assert m["distserve_engine_migration_failures_total"] >= 1
            assert m["distserve_engine_migration_quarantined_blocks"] == len(pre["cache_block_ids"])
        finally:
            p_proc.signal(signal.SIGCONT)
        # The late read lands, then the quarantined blocks go back to the pool.
        assert await _wait_metric(http, d_url, "distserve_engine_migration_quarantined_blocks", lambda v: v == 0) == 0
        assert (await pd.metrics(http, d_url))["distserve_engine_kv_blocks_used"] == 0
        async with http.post(f"{p_url}/distserve/free_cache",
                             json={"remote_engine_id": d_url, "remote_session_id": pre["remote_session_id"]}) as r:
            assert r.status == 200
        want = await pd.generate(http, p_url, "completions", body)
        assert await pd.pd_generate(http, p_url, d_url, "completions", body) == want
