"""kv_aware end to end: real etcd, reference engines with prefix caching (prefill x2, decode x1, TCP
migration), a router process with `--strategy kv_aware`, the official `openai` client.

A conversation's second turn goes to the prefill that cached its first turn (that engine's hit-token
metric rises, the other prefill sees none of it); two new prefix families admitted back to back through two
router replicas land on different prefills before either prefill ended (pending roots). Records and links are written the way an agent would
(with the `cache_events` capability) so the test needs nothing but the engines' own stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request

import aiohttp
import openai

from distserve.cluster.keys import Keys
from distserve.cluster.prefix_keys import chat_keys, key_hex
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


async def _two_prefills_one_decode(etcd_client, keys: Keys, procs: list) -> tuple[dict, dict]:
    """Reference engines p0, p1 (prefill) and d0 (decode) as processes (appended to `procs`), published with
    their cache streams and linked p0/p1 -> d0: ({name: url}, {name: proc})."""
    urls, procs_by = {}, {}
    for name, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        proc, url = await asyncio.to_thread(spawn_engine, role, None, "--api-keys", TOKEN, "--log-level", "WARNING")
        procs.append(proc)
        urls[name], procs_by[name] = url, proc
    recs = {}
    for name, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        rec = engine_record(name, urls[name], role, geometry=geometry_of(urls[name], AUTH))
        recs[name] = _with_stream(rec, urls[name])
        await publish_engine(etcd_client, keys, recs[name])
    for p in ("p0", "p1"):
        await asyncio.to_thread(handshake, urls[p], urls["d0"], AUTH)
        await publish_link(etcd_client, keys, link_record(recs[p], recs["d0"]))
    return urls, procs_by


async def test_second_turn_goes_to_the_prefill_that_cached_the_first(etcd, etcd_client):
    keys = Keys("kvaware")
    procs = []
    try:
        urls, _procs_by = await _two_prefills_one_decode(etcd_client, keys, procs)
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


class _Events:
    """The test's own follower of an engine's cache-state stream (NDJSON), heartbeats skipped."""

    def __init__(self, resp) -> None:
        self.resp = resp

    async def next(self, timeout: float) -> dict:
        return await self.until(lambda msg: True, timeout)

    async def until(self, check, timeout: float) -> dict:
        """The first message that passes `check` within `timeout` (heartbeats do not extend it)."""
        deadline = time.monotonic() + timeout
        while True:
            line = await asyncio.wait_for(self.resp.content.readline(), max(0.01, deadline - time.monotonic()))
            assert line, "the stream ended"
            msg = json.loads(line)
            if msg["type"] != "heartbeat" and check(msg):
                return msg


def _tie_pick(body: dict, engines: list[str]) -> str:
    """Where kv_aware sends a new prefix when every count it sees is equal (no family, key or load anywhere):
    the ring order it falls back to, the same on every replica."""
    from distserve.cluster.prefix_keys import request_keys
    from distserve.router.load import LoadTracker
    from distserve.router.strategies import PickContext, make_strategy
    from distserve.router.validation import prompt_prefix

    class Blank:  # every engine streams, holds nothing, no family
        def has_stream(self, e): return True  # noqa: E704
        def pending(self, e): return False  # noqa: E704
        def matched_tokens(self, e, keys): return 0  # noqa: E704
        def chunk_bytes(self, e): return 64  # noqa: E704
        def families(self, e): return 0  # noqa: E704
        def key_count(self, e): return 0  # noqa: E704

    ctx = PickContext(load=LoadTracker(), prefix=lambda n: prompt_prefix("chat", body, n), kv=Blank(),
                      keys=lambda chunk: request_keys(body, chunk))
    return make_strategy("kv_aware").pick(sorted(engines), ctx)


async def test_new_families_through_two_replicas_land_on_different_prefills_before_either_prefill_ends(
        etcd, etcd_client):
    """Two router replicas, two prefills: family A goes through router 0; while its prefill is still running
    (the prefill is paused right after admitting it, so nothing of A is cached anywhere and router 1 never saw
    its load), family B goes through router 1. B is chosen so that equal counts send it where A went; it must
    land on the other prefill, because the engine announced A's root as pending when it admitted A and every
    replica counts pending roots as families."""
    keys = Keys("kvpending")
    procs = []
    paused = None
    tasks: list[asyncio.Task] = []
    try:
        urls, procs_by = await _two_prefills_one_decode(etcd_client, keys, procs)
        routers = []
        for _ in range(2):
            proc, router = await asyncio.to_thread(
                start_router, etcd.endpoints, "--cluster", keys.cluster, "--strategy", "kv_aware",
                "--cluster-token", TOKEN)
            procs.append(proc)
            routers.append(router)
        clients = [openai.AsyncOpenAI(base_url=f"{r}/v1", api_key="unused", max_retries=0, timeout=60)
                   for r in routers]

        def family(name: str, n: int = 3000) -> list[dict]:
            # a long system prompt: its prefill takes a while even on an idle core
            return [{"role": "system", "content": (f"family {name}: " + "answer with care. " * 200)[:n]},
                    {"role": "user", "content": f"first question of {name}"}]

        a = family("A")
        root_a = chat_keys(a)[0]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as http:
            streams = {}
            for p in ("p0", "p1"):
                resp = await http.get(f"{urls[p]}/distserve/cache/events", headers=AUTH)
                assert resp.status == 200
                streams[p] = _Events(resp)
                assert (await streams[p].next(10))["type"] == "snapshot"
            task_a = asyncio.create_task(clients[0].chat.completions.create(
                model=MODEL, messages=a, max_tokens=2, temperature=0))
            tasks.append(task_a)

            def announces(root):
                return lambda m: m["type"] == "stored" and key_hex(root) in m.get("pending", ())

            # A admitted somewhere: that prefill announces A's root; pause it so its prefill cannot end
            got = {p: asyncio.create_task(streams[p].until(announces(root_a), 30)) for p in ("p0", "p1")}
            done, _ = await asyncio.wait(got.values(), return_when=asyncio.FIRST_COMPLETED)
            for t in got.values():
                t.cancel()
            x = next(p for p, t in got.items() if t in done)
            assert got[x].exception() is None, "no prefill announced family A's root when it admitted it"
            procs_by[x].pause()
            paused = procs_by[x]
            y = "p1" if x == "p0" else "p0"
            with contextlib.suppress(asyncio.TimeoutError):  # nothing of A was stored before the pause
                msg = await streams[x].next(0.3)
                assert not msg.get("roots") and not msg.get("keys"), msg
            # router 1 reads the announcement off x's stream. x writes it to each follower from that follower's
            # own task, so the pause can land between two of them (seen once in CI): then x runs for a few ms
            # at a time, enough to flush what it owes its followers, far too little to end A's prefill
            for attempt in range(200):
                seen = await asyncio.to_thread(router_metric, routers[1], "distserve_router_kv_index_families",
                                               {"engine": x})
                if seen >= 1:
                    break
                if attempt % 20 == 19:
                    paused.resume()
                    await asyncio.sleep(0.005)
                    paused.pause()
                await asyncio.sleep(0.05)
            assert seen >= 1, "router 1 never counted family A (pending) on the paused prefill"

            # B: a new family that the equal counts alone would send to x too
            i = 0
            while _tie_pick({"messages": family(f"B{i}")}, ["p0", "p1"]) != x:
                i += 1
            b = family(f"B{i}")
            task_b = asyncio.create_task(clients[1].chat.completions.create(
                model=MODEL, messages=b, max_tokens=2, temperature=0))
            tasks.append(task_b)
            try:  # B admitted on y, with x still paused
                await streams[y].until(announces(chat_keys(b)[0]), 15)
            except asyncio.TimeoutError:
                raise AssertionError(f"family B did not reach {y}: it followed family A to {x}") from None
            rb = await asyncio.wait_for(task_b, 60)
            assert rb.choices[0].message.content is not None
            assert not task_a.done()  # A's prefill never ended meanwhile
            paused.resume()
            paused = None
            ra = await asyncio.wait_for(task_a, 60)
            assert ra.choices[0].message.content is not None
            for events in streams.values():
                events.resp.close()
        # B was prefilled on y alone, A on x alone
        assert engine_metric(urls[x], PROMPT, AUTH) == ra.usage.prompt_tokens
        assert engine_metric(urls[y], PROMPT, AUTH) == rb.usage.prompt_tokens
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if paused is not None:
            paused.resume()
        for proc in procs:
            proc.kill()
