"""Prefix caching end to end (real engines as processes): greedy output with caching on equals caching off
token for token (hybrid and PD, stream and not, and under eviction pressure), later turns hit the cache, a
PD decode pulls only the blocks it lacks, and no block leaks."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from distserve.testing import pd
from tests.engine.conftest import start_engines

MODEL = "distserve-reference"
TURNS = 3


@pytest.fixture(scope="module")
def engines():
    engines = start_engines({
        "off": ("hybrid", "--prefix-caching", "off"),
        "on": ("hybrid",),
        # 36 blocks of 16 tokens: a few conversations do not fit, so cached blocks are evicted all along
        "tight": ("hybrid", "--num-blocks", "36"),
        "prefill": ("prefill",),
        "decode": ("decode",),
    })
    yield engines
    for proc in engines.procs.values():
        proc.stop()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kv", "block", "cache", "route"])
                    for _ in range(n))


def conversations() -> list[dict]:
    rng = random.Random(18)
    systems = [_words(rng, 25) for _ in range(2)]  # shared system prompts (~150 tokens)
    convs = []
    for i in range(4):
        convs.append({"kind": "chat", "system": systems[i % 2], "questions": [_words(rng, 6) for _ in range(TURNS)]})
    base = _words(rng, 30)  # a shared completions prefix
    for i in range(2):
        convs.append({"kind": "text", "prefix": base, "questions": [_words(rng, 5) for _ in range(TURNS)]})
    convs.append({"kind": "ids", "prefix": [256] + [ord(c) for c in base[:70]],
                  "questions": [[ord(c) for c in _words(rng, 3)] for _ in range(TURNS)]})
    return convs


def body_for(conv: dict, answers: list[str], turn: int, stream: bool) -> tuple[str, dict]:
    body: dict = {"model": MODEL, "temperature": 0, "max_tokens": 12 + turn * 3, "stream": stream}
    if conv["kind"] == "chat":
        msgs = [{"role": "system", "content": conv["system"]}]
        for t in range(turn + 1):
            msgs.append({"role": "user", "content": conv["questions"][t]})
            if t < turn:
                msgs.append({"role": "assistant", "content": answers[t]})
        body["messages"] = msgs
        return "chat/completions", body
    if conv["kind"] == "text":
        body["prompt"] = conv["prefix"] + "".join(conv["questions"][t] + answers[t] for t in range(turn)) + \
            conv["questions"][turn]
        return "completions", body
    ids = list(conv["prefix"])
    for t in range(turn):
        ids += conv["questions"][t] + [b for b in answers[t].encode() if b < 256]
    body["prompt"] = ids + conv["questions"][turn]
    return "completions", body


async def _settle(http, urls) -> dict[str, dict]:
    out = {}
    for name, url in urls.items():
        for _ in range(100):
            m = await pd.metrics(http, url)
            if m["distserve_engine_kv_blocks_used"] == 0 and m["distserve_engine_requests_running"] == 0:
                break
            await asyncio.sleep(0.1)
        out[name] = m
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
async def test_cached_output_equals_uncached(engines, stream):
    convs = conversations()
    urls = {n: engines[n] for n in ("off", "on", "tight", "prefill", "decode")}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await pd.handshake(http, engines["prefill"], engines["decode"])
        before = {n: await pd.metrics(http, u) for n, u in urls.items()}
        answers: list[list[str]] = [[] for _ in convs]
        for turn in range(TURNS):
            items = [body_for(c, answers[i], turn, stream) for i, c in enumerate(convs)]
            want = await asyncio.gather(*(pd.generate(http, engines["off"], r, b) for r, b in items))
            got_on, got_tight, got_pd = await asyncio.gather(
                asyncio.gather(*(pd.generate(http, engines["on"], r, b) for r, b in items)),
                asyncio.gather(*(pd.generate(http, engines["tight"], r, b) for r, b in items)),
                asyncio.gather(*(pd.pd_generate(http, engines["prefill"], engines["decode"], r, b)
                                 for r, b in items)))
            for (route, body), w, a, b, c in zip(items, want, got_on, got_tight, got_pd):
                assert a[:2] == w[:2], (turn, route, body)
                assert b[:2] == w[:2], (turn, route, body, "tight")
                assert c[:2] == w[:2], (turn, route, body, "pd")
            for i, (text, _, _) in enumerate(want):
                answers[i].append(text)
        after = await _settle(http, urls)
    hits = {n: after[n]["distserve_engine_prefix_cache_hit_tokens_total"]
            - before[n]["distserve_engine_prefix_cache_hit_tokens_total"] for n in urls}
    prompts = {n: after[n]["distserve_engine_prompt_tokens_total"]
               - before[n]["distserve_engine_prompt_tokens_total"] for n in urls}
    assert hits["off"] == 0 and after["off"]["distserve_engine_prefix_cache_blocks"] == 0
    # later turns and shared system prompts are served from cache
    assert hits["on"] > 0.3 * prompts["on"], (hits, prompts)
    assert hits["prefill"] > 0.3 * prompts["prefill"], (hits, prompts)
    # the decode already held earlier turns: it pulled only the blocks it lacked
    assert hits["decode"] > 0 and after["decode"]["distserve_engine_migration_blocks_reused_total"] > 0
    assert after["tight"]["distserve_engine_prefix_cache_evictions_total"] > 0
    for name, m in after.items():  # nothing leaks: every block is free or only cached
        assert m["distserve_engine_kv_blocks_used"] == 0, (name, m)
        assert m["distserve_engine_preserved_blocks"] == 0, (name, m)
        assert m["distserve_engine_kv_blocks_free"] == m["distserve_engine_kv_blocks_total"], (name, m)


async def test_decode_pulls_only_missing_blocks(engines):
    p_url, d_url = engines["prefill"], engines["decode"]
    rng = random.Random(7)
    first = _words(rng, 40)  # ~240 tokens
    body = {"model": MODEL, "temperature": 0, "max_tokens": 4, "prompt": first}
    later = {**body, "prompt": first + " " + _words(rng, 6)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await pd.handshake(http, p_url, d_url)
        m0 = await pd.metrics(http, d_url)
        await pd.pd_generate(http, p_url, d_url, "completions", body)
        m1 = await pd.metrics(http, d_url)
        pre = await pd.prefill(http, p_url, "completions", later)
        await pd.generate(http, d_url, "completions",
                          {**later, "migration_request": pd.migration_request(p_url, pre)})
        m2 = await pd.metrics(http, d_url)
    info = await _info(d_url)
    n_first = len(first.encode()) + 1  # BOS
    n_later = len(later["prompt"].encode()) + 1
    bs = info["block_size"]
    full_first = m1["distserve_engine_migration_bytes_total"] - m0["distserve_engine_migration_bytes_total"]
    per_block = full_first / -(-n_first // bs)
    reused = m2["distserve_engine_migration_blocks_reused_total"] - m1["distserve_engine_migration_blocks_reused_total"]
    assert reused == (n_first // bs)  # every full block of the first prompt
    moved = m2["distserve_engine_migration_bytes_total"] - m1["distserve_engine_migration_bytes_total"]
    assert moved == per_block * (-(-n_later // bs) - reused)  # the new blocks only


async def _info(url: str) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        return await pd.engine_info(http, url)
