"""kv_aware end to end: real etcd, reference engines with prefix caching (prefill x2, decode x1, TCP
migration), a router process with `--strategy kv_aware`, the official `openai` client.

A conversation's second turn goes to the prefill that cached its first turn (that engine's hit-token
metric rises, the other prefill sees none of it). Records and links are written the way an agent would
(with the `cache_events` capability) so the test needs nothing but the engines' own stream."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import openai

from distserve.cluster.keys import Keys
from distserve.cluster.prefix_keys import chat_keys
from tests.router.cluster import (MODEL, engine_metric, engine_record, geometry_of, handshake, http_json,
                                  link_record, publish_engine, publish_link, router_metric, start_router)
from tests.util import spawn_engine

TOKEN = "kv-aware-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HIT = "distserve_engine_prefix_cache_hit_tokens_total"
PROMPT = "distserve_engine_prompt_tokens_total"


def _snapshot(url):
    """The first line of the engine's cache-state stream."""
    req = urllib.request.Request(f"{url}/distserve/cache/events", headers=AUTH)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.readline())


def _with_stream(rec, url):
    info = http_json(f"{url}/distserve/engine_info", headers=AUTH)
    info = json.loads(info) if isinstance(info, str) else info
    data = rec.model_dump()
    data["instance"] = info.get("instance_id")
    data["cache_events"] = {"path": "/distserve/cache/events", "version": 1, "chunk_bytes": 64,
                            "block_size": rec.engine_info.block_size}
    return type(rec).model_validate(data)


async def test_second_turn_goes_to_the_prefill_that_cached_the_first(etcd, etcd_client):
    keys = Keys("kvaware")
    procs = []
    try:
        urls = {}
        for name, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
            proc, url = await asyncio.to_thread(spawn_engine, role, None, "--api-keys", TOKEN,
                                                "--log-level", "WARNING")
            procs.append(proc)
            urls[name] = url
        recs = {}
        for name, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
            rec = engine_record(name, urls[name], role, geometry=geometry_of(urls[name], AUTH))
            recs[name] = _with_stream(rec, urls[name])
            await publish_engine(etcd_client, keys, recs[name])
        for p in ("p0", "p1"):
            await asyncio.to_thread(handshake, urls[p], urls["d0"], AUTH)
            await publish_link(etcd_client, keys, link_record(recs[p], recs["d0"]))
        proc, router = await asyncio.to_thread(
            start_router, etcd.endpoints, "--cluster", keys.cluster, "--strategy", "kv_aware",
            "--cluster-token", TOKEN)
        procs.append(proc)
        ready = http_json(f"{router}/health/ready")
        assert ready["strategy"] == "kv_aware"
        client = openai.AsyncOpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0)

        def metric(name):
            return {p: engine_metric(urls[p], name, AUTH) for p in ("p0", "p1")}

        for conv in range(4):
            system = {"role": "system", "content": f"conversation {conv}: " + "you answer briefly. " * 30}
            turn1 = [system, {"role": "user", "content": f"first question {conv}"}]
            before = metric(PROMPT)
            r1 = await client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=4, temperature=0)
            grew = {p for p, v in metric(PROMPT).items() if v > before[p]}
            assert len(grew) == 1
            first = grew.pop()
            # the first turn's keys reach the router through the engine's stream
            deadline = time.monotonic() + 10
            while router_metric(router, "distserve_router_kv_index_keys", {"engine": first}) == 0:
                assert time.monotonic() < deadline, "the router never saw the engine's cached keys"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # every key of this turn (stored events are ordered, not batched per turn)
            hits_before, prompt_before = metric(HIT), metric(PROMPT)
            turn2 = [*turn1, {"role": "assistant", "content": r1.choices[0].message.content or ""},
                     {"role": "user", "content": f"second question {conv}"}]
            await client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4, temperature=0)
            hits, prompts = metric(HIT), metric(PROMPT)
            other = "p1" if first == "p0" else "p0"
            assert prompts[first] > prompt_before[first] and prompts[other] == prompt_before[other]
            assert hits[first] > hits_before[first]  # served from the cache of the first turn
        assert router_metric(router, "distserve_router_kv_picks_total", {"phase": "prefill", "basis": "cache"}) >= 4
        # each engine marks its prefix families' roots: the system prompt of every conversation it served (2
        # turns each, one family), which is what kv_aware spreads new prefixes by
        systems = {chat_keys([{"role": "system", "content": f"conversation {conv}: " + "you answer briefly. " * 30}
                              ])[0] for conv in range(4)}
        roots = set()
        for p in ("p0", "p1"):
            snap = await asyncio.to_thread(_snapshot, urls[p])
            keys = {int(k, 16) for k, _ in snap["keys"]}
            mine = {int(k, 16) for k in snap.get("roots", [])}
            assert mine <= keys and mine <= systems
            roots |= mine
        assert roots == systems
        assert router_metric(router, "distserve_router_kv_index_synced") == 1
    finally:
        for proc in procs:
            proc.kill()
