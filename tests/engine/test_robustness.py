"""Hostile sampling values and clients that go away never break the engine or leak KV (real engine process)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from distserve.testing import pd

MODEL = "distserve-reference"


async def _settled(http: aiohttp.ClientSession, url: str, timeout: float = 10) -> dict[str, float]:
    """Metrics once nothing runs and no KV block is used (or the last metrics at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await pd.metrics(http, url)
        idle = (m["distserve_engine_requests_running"] == 0 and m["distserve_engine_requests_waiting"] == 0
                and m["distserve_engine_kv_blocks_used"] == 0)
        if idle or time.monotonic() >= deadline:
            return m
        await asyncio.sleep(0.1)


async def test_denormal_temperature_and_top_p_sample_greedily(pd_engines):
    url = pd_engines["hybrid"]
    base = {"model": MODEL, "prompt": "tiny sampling values", "max_tokens": 12, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        greedy = await pd.generate(http, url, "completions", {**base, "temperature": 0})
        errors_before = (await pd.metrics(http, url))["distserve_engine_request_errors_total"]
        hostile = [{"temperature": 5e-324}, {"top_p": 5e-324}, {"temperature": 5e-324, "top_p": 5e-324},
                   {"temperature": 1e-300, "top_p": 1.0}]
        # Sent together so they share prefill/decode batches with an ordinary sampled request.
        results = await asyncio.gather(
            *(pd.generate(http, url, "completions", {**base, **h}) for h in hostile),
            pd.generate(http, url, "completions", {**base, "temperature": 0.8, "seed": 7}),
            pd.generate(http, url, "chat/completions", {"model": MODEL, "max_tokens": 4, "temperature": 5e-324,
                                                        "messages": [{"role": "user", "content": "hi"}]}))
        for got in results[: len(hostile)]:
            assert got == greedy  # effectively greedy, never NaN or a 500
        assert results[len(hostile)][2]["completion_tokens"] == 12
        # The engine still serves ordinary requests, counted no error, and holds no KV.
        assert await pd.generate(http, url, "completions", {**base, "temperature": 0}) == greedy
        m = await _settled(http, url)
        assert m["distserve_engine_kv_blocks_used"] == 0 and m["distserve_engine_requests_running"] == 0, m
        assert m["distserve_engine_request_errors_total"] == errors_before


async def _disconnect_after(url: str, body: dict, seconds: float) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as http:
        try:
            async with http.post(f"{url}/v1/completions", json=body) as resp:
                raise AssertionError(f"a {resp.status} answer before the client went away")
        except asyncio.TimeoutError:
            pass  # leaving the session closes the connection: the client is gone


async def test_non_streamed_request_aborts_when_the_client_goes_away(pd_engines):
    url = pd_engines["hybrid"]
    long = {"model": MODEL, "prompt": "endless non-streamed", "max_tokens": 3000, "temperature": 0,
            "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for body in (long, {**long, "preserve_cache": True}):  # a router's prefill leg preserves its KV
            task = asyncio.create_task(_disconnect_after(url, body, 0.3))
            await asyncio.sleep(0.15)
            assert (await pd.metrics(http, url))["distserve_engine_requests_running"] >= 1
            await task
            m = await _settled(http, url, timeout=5)
            assert m["distserve_engine_requests_running"] == 0, m
            assert m["distserve_engine_kv_blocks_used"] == 0 and m["distserve_engine_preserved_blocks"] == 0, m
        # The engine goes on serving.
        text, finish, _ = await pd.generate(http, url, "completions", {**long, "max_tokens": 4})
        assert finish == "length" and text
