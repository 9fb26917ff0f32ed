"""GET /distserve/cache/events against a real engine process: snapshot then ordered events, keys matching
distserve.cluster.prefix_keys, resume with since, eviction removes keys, heartbeats, a restarted engine
(new incarnation) gives a fresh snapshot; engine_info's `cache_events` and its copy into the engine record."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from distserve.agent.record import cache_events_info
from distserve.cluster import prefix_keys as PK
from distserve.cluster.records import CacheEventsInfo, EngineRecord
from distserve.testing import pd
from distserve.testing.cluster import spawn_engine
from tests.util import free_port

MODEL = "distserve-reference"
KEY = "sekrit"


class Stream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 5.0) -> dict:
        line = await asyncio.wait_for(self.resp.content.readline(), timeout)
        assert line.endswith(b"\n"), line
        return json.loads(line)

    async def next_event(self, timeout: float = 5.0) -> dict:
        """The next line that is not a heartbeat."""
        while True:
            msg = await self.next(timeout)
            if msg["type"] != "heartbeat":
                return msg


async def open_stream(http, url: str, **params) -> Stream:
    resp = await http.get(f"{url}/distserve/cache/events", params={k: str(v) for k, v in params.items()},
                          headers=pd.auth(KEY))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    return Stream(resp)


def chat_body(system: str, question: str) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": 3,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


async def test_cache_event_stream():
    port = free_port()
    # 24 blocks of 16 tokens: a few long prompts evict the first ones
    args = ("--num-blocks", "24", "--api-keys", KEY)
    proc, url = spawn_engine("hybrid", port, *args, name="engine-events")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, sock_read=None)) as http:
            info = await pd.engine_info(http, url, KEY)
            assert info["cache_events"] == {"path": "/distserve/cache/events", "version": 1,
                                            "chunk_bytes": PK.CHUNK_BYTES, "block_size": 16}
            inc = info["instance_id"]
            # auth like the other /distserve routes; bad `since` is a 400, not a 5xx
            async with http.get(f"{url}/distserve/cache/events") as resp:
                assert resp.status == 401
            async with http.get(f"{url}/distserve/cache/events", params={"since": "-3"},
                                headers=pd.auth(KEY)) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "since"

            stream = await open_stream(http, url)
            snap = await stream.next()
            assert snap == {"type": "snapshot", "incarnation": inc, "seq": 0, "block_size": 16,
                            "chunk_bytes": PK.CHUNK_BYTES, "keys": []}

            body = chat_body("you are a terse assistant " * 3, "what is a kv cache?")
            await pd.generate(http, url, "chat/completions", body, KEY)
            keys = PK.chat_keys(body["messages"])
            # admitted: its family's root (the system prompt's key) is announced before anything is cached
            pending = await stream.next_event()
            assert pending == {"type": "stored", "seq": 1, "incarnation": inc, "keys": [],
                               "pending": [PK.key_hex(keys[0])]}
            stored = await stream.next_event()
            assert stored["type"] == "stored" and stored["seq"] == 2 and stored["incarnation"] == inc
            got = dict(stored["keys"])
            # the system message alone: "<BOS><|system|>\n" + 78 chars + "\n" = 91 tokens -> 80 in full blocks
            assert got == {PK.key_hex(keys[0]): 80, PK.key_hex(keys[1]): (91 + 9 + 19 + 1) // 16 * 16}
            assert stored["roots"] == [PK.key_hex(keys[0])] and "pending" not in stored  # stored: not pending

            # a second turn sharing the system prompt: its root is held (nothing pending), a new key for its prefix
            body2 = chat_body("you are a terse assistant " * 3, "and a block?")
            await pd.generate(http, url, "chat/completions", body2, KEY)
            ev2 = await stream.next_event()
            assert ev2["seq"] == 3 and dict(ev2["keys"]) == {PK.key_hex(PK.chat_keys(body2["messages"])[1]): 112}
            assert "pending" not in ev2

            # a completions prompt: keys over 64-byte chunks, the first one its root
            text = "z" * 130
            await pd.generate(http, url, "completions", {"model": MODEL, "prompt": text, "max_tokens": 2}, KEY)
            ev3p = await stream.next_event()
            assert ev3p["pending"] == [PK.key_hex(PK.text_keys(text)[0])] and ev3p["keys"] == []
            ev3 = await stream.next_event()
            assert dict(ev3["keys"]) == {PK.key_hex(k): t for k, t in zip(PK.text_keys(text), [64, 128])}

            # resume from seq 2 on a second connection: events 3.. without a snapshot
            resumed = await open_stream(http, url, since=2, incarnation=inc)
            assert (await resumed.next_event()) == ev2
            assert (await resumed.next_event()) == ev3p
            assert (await resumed.next_event()) == ev3
            resumed.resp.close()
            # another incarnation or a seq this engine never had: a fresh snapshot, nothing pending
            for params in ({"since": 1, "incarnation": "old"}, {"since": 999, "incarnation": inc}):
                again = await open_stream(http, url, **params)
                snap = await again.next()
                assert snap["type"] == "snapshot" and snap["seq"] == 5 and len(snap["keys"]) == 5
                assert len(snap["roots"]) == 2 and "pending" not in snap
                again.resp.close()

            # a request admitted that fails before anything is cached (its prompt needs more blocks than the
            # pool has: a 400 after admission) withdraws its pending root: no family is left behind
            big = chat_body("a new family " * 40, "too long for 24 blocks")
            async with http.post(f"{url}/v1/chat/completions", json=big, headers=pd.auth(KEY)) as resp:
                assert resp.status == 400, await resp.text()
            root = PK.key_hex(PK.chat_keys(big["messages"])[0])
            announced = await stream.next_event()
            assert announced["type"] == "stored" and announced["pending"] == [root] and announced["keys"] == []
            withdrawn = await stream.next_event()
            assert withdrawn == {"type": "removed", "seq": announced["seq"] + 1, "incarnation": inc, "keys": [],
                                 "pending": [root]}
            snap = await (await open_stream(http, url)).next()
            assert "pending" not in snap and root not in snap["roots"]

            # eviction pressure: long unrelated prompts push the first conversation out, its keys go
            removed: set[str] = set()
            for i in range(3):
                await pd.generate(http, url, "completions",
                                  {"model": MODEL, "prompt": chr(97 + i) * 300, "max_tokens": 2}, KEY)
            while PK.key_hex(keys[1]) not in removed:
                msg = await stream.next_event()
                if msg["type"] == "removed":
                    removed.update(msg["keys"])
            m = await pd.metrics(http, url, KEY)
            assert m["distserve_engine_prefix_cache_evictions_total"] > 0
            snap = await (await open_stream(http, url)).next()
            assert PK.key_hex(keys[1]) not in dict(snap["keys"])
            assert len(snap["keys"]) == m["distserve_engine_prefix_cache_keys"]

            # the live stream reaches the snapshot's seq, then idles: a heartbeat at least every 2 s
            seen = msg["seq"]
            while seen < snap["seq"]:
                seen = (await stream.next_event())["seq"]
            assert seen == snap["seq"]
            beat = await stream.next(timeout=4)
            assert beat["type"] == "heartbeat" and beat["seq"] == snap["seq"]
            last_seq = snap["seq"]
            stream.resp.close()

        # a restarted engine: a new incarnation, its old state is gone
        proc.stop()
        proc, url = spawn_engine("hybrid", port, *args, name="engine-events-2")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, sock_read=None)) as http:
            info2 = await pd.engine_info(http, url, KEY)
            assert info2["instance_id"] != inc
            stream = await open_stream(http, url, since=last_seq, incarnation=inc)
            snap = await stream.next()
            assert snap["type"] == "snapshot" and snap["incarnation"] == info2["instance_id"]
            assert snap["keys"] == [] and snap["seq"] == 0
            stream.resp.close()
    finally:
        proc.stop()


async def test_no_stream_with_caching_off():
    proc, url = spawn_engine("hybrid", None, "--prefix-caching", "off", name="engine-nocache")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            info = await pd.engine_info(http, url)
            assert "cache_events" not in info
            async with http.get(f"{url}/distserve/cache/events") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    finally:
        proc.stop()


def test_record_capability():
    raw = {"path": "/distserve/cache/events", "version": 1, "chunk_bytes": 64, "block_size": 16}
    assert cache_events_info(raw) == CacheEventsInfo(**raw)
    for bad in (None, "x", {"path": "no-slash", "version": 1, "chunk_bytes": 64, "block_size": 16},
                {**raw, "version": 0}, {**raw, "chunk_bytes": "64x"}):
        assert cache_events_info(bad) is None
    base = {"id": "e1", "incarnation": "i1", "role": "prefill", "url": "http://127.0.0.1:1", "models": ["m"],
            "engine_info": {"block_size": 16, "num_gpu_blocks": 8}}
    old = EngineRecord.model_validate(base)  # a record written before the field: no stream
    assert old.cache_events is None
    new = EngineRecord.model_validate({**base, "cache_events": raw})
    assert EngineRecord.model_validate_json(new.model_dump_json()).cache_events.chunk_bytes == 64
