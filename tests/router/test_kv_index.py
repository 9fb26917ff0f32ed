"""The router's cache index (distserve.router.kv_index) against engines' cache-event streams.

The engines here are small aiohttp servers on loopback that follow the stream protocol of issue 18 exactly
(snapshot, ordered stored/removed/cleared events with seq, a ring buffer, heartbeats, incarnations); their
records live in a real etcd, read through the router's own ClusterCache.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import orjson
import pytest
from aiohttp import web

from distserve.cluster.cache import ClusterCache
from distserve.cluster.keys import ENGINES, Keys
from distserve.cluster.prefix_keys import chat_keys, key_hex
from distserve.cluster.records import EngineGeometry, EngineRecord
from distserve.router.kv_index import KvIndex, StreamError
from tests.router.cluster import DetachedCache
from distserve.router.metrics import RouterMetrics
from distserve.testing.metrics import find

TOKEN = "s3cret-token"
PATH = "/distserve/cache/events"


class StreamEngine:
    """An engine's cache-event stream, per the protocol (docs/architecture.md "Cache state")."""

    def __init__(self, ring: int = 4096, heartbeat: float = 0.2) -> None:
        self.incarnation = uuid.uuid4().hex
        self.seq = 0
        self.keys: dict[str, int] = {}
        self.roots: set[str] = set()  # keys marked as a prefix family's root
        self.pending: set[str] = set()  # roots announced for admitted requests, nothing cached yet
        self.ring: list[dict] = []  # the last `ring_size` events
        self.ring_size = ring
        self.heartbeat = heartbeat
        self.changed = asyncio.Condition()
        self.requests: list[dict] = []  # query of each connection
        self.responses: set[web.StreamResponse] = set()
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.refuse = False

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(PATH, self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.drop_connections()
        await self.runner.cleanup()

    async def drop_connections(self) -> None:
        for resp in list(self.responses):
            with contextlib.suppress(Exception):
                resp.force_close()
                if resp._req is not None and resp._req.transport is not None:
                    resp._req.transport.close()

    # -------------------------------------------------------------- the engine's side of the cache
    async def event(self, kind: str, **fields) -> None:
        self.seq += 1
        ev = {"type": kind, "seq": self.seq, "incarnation": self.incarnation, **fields}
        if kind == "stored":
            self.keys.update({k: t for k, t in fields["keys"]})
            self.roots.update(fields.get("roots", ()))
            self.pending.difference_update(fields.get("roots", ()))
            self.pending.update(fields.get("pending", ()))
        elif kind == "removed":
            for k in fields["keys"]:
                self.keys.pop(k, None)
                self.roots.discard(k)
            self.pending.difference_update(fields.get("pending", ()))
        elif kind == "cleared":
            self.keys.clear()
            self.roots.clear()
            self.pending.clear()
        self.ring.append(ev)
        del self.ring[: -self.ring_size]
        async with self.changed:
            self.changed.notify_all()

    async def store(self, pairs: list[tuple[int, int]], roots: tuple[int, ...] = ()) -> None:
        extra = {"roots": [key_hex(k) for k in roots]} if roots else {}
        await self.event("stored", keys=[[key_hex(k), t] for k, t in pairs], **extra)

    async def remove(self, keys: list[int]) -> None:
        await self.event("removed", keys=[key_hex(k) for k in keys])

    async def admit(self, root: int) -> None:
        """A request of the family `root` admitted (the engine announces its root as pending)."""
        await self.event("stored", keys=[], pending=[key_hex(root)])

    async def withdraw(self, root: int) -> None:
        """The family's requests ended with nothing cached."""
        await self.event("removed", keys=[], pending=[key_hex(root)])

    def restart(self) -> None:
        """A new engine process: new incarnation, empty cache, seq from 0."""
        self.incarnation = uuid.uuid4().hex
        self.seq = 0
        self.keys = {}
        self.roots = set()
        self.pending = set()
        self.ring = []

    def snapshot(self) -> dict:
        snap = {"type": "snapshot", "incarnation": self.incarnation, "seq": self.seq, "block_size": 16,
                "chunk_bytes": 64, "keys": [[k, t] for k, t in self.keys.items()], "roots": sorted(self.roots)}
        if self.pending:
            snap["pending"] = sorted(self.pending)
        return snap

    # -------------------------------------------------------------- the route
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.refuse:
            return web.json_response({"error": "unavailable"}, status=503)
        self.requests.append(dict(request.query))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        self.responses.add(resp)
        try:
            since = request.query.get("since")
            oldest = self.ring[0]["seq"] if self.ring else self.seq + 1
            if (since is None or request.query.get("incarnation") != self.incarnation
                    or int(since) < oldest - 1 or int(since) > self.seq):
                sent = self.seq
                await resp.write(orjson.dumps(self.snapshot()) + b"\n")
            else:
                sent = int(since)
            incarnation = self.incarnation
            while incarnation == self.incarnation:
                for ev in self.ring:
                    if ev["seq"] > sent:
                        await resp.write(orjson.dumps(ev) + b"\n")
                        sent = ev["seq"]
                async with self.changed:
                    try:
                        await asyncio.wait_for(self.changed.wait(), self.heartbeat)
                    except asyncio.TimeoutError:
                        await resp.write(orjson.dumps({"type": "heartbeat", "seq": sent,
                                                       "incarnation": self.incarnation}) + b"\n")
        finally:
            self.responses.discard(resp)
        return resp


def record(engine_id: str, url: str, instance: str, stream: bool = True) -> EngineRecord:
    extra = {"cache_events": {"path": PATH, "version": 1, "chunk_bytes": 64, "block_size": 16}} if stream else {}
    return EngineRecord(id=engine_id, incarnation=uuid.uuid4().hex, instance=instance, role="prefill", url=url,
                        models=["m"], engine_info=EngineGeometry(block_size=16, num_gpu_blocks=64), state="ready",
                        **extra)


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if check():
            return
        if asyncio.get_running_loop().time() > deadline:
            assert check()
        await asyncio.sleep(0.02)


@pytest.fixture
async def setup(etcd_client):
    keys = Keys("kvtest")
    engines: list[StreamEngine] = []
    cache = ClusterCache(etcd_client, keys, (ENGINES,), name="test")
    metrics = RouterMetrics()
    index = KvIndex(cache, TOKEN, metrics, max_keys=1000, sync_timeout=5.0, idle_timeout=1.0,
                    backoff=(0.02, 0.1))

    async def engine(engine_id: str, stream: bool = True, **kw) -> StreamEngine:
        eng = StreamEngine(**kw)
        await eng.start()
        engines.append(eng)
        await etcd_client.put(keys.engine(engine_id), record(engine_id, eng.url, eng.incarnation, stream).encode())
        return eng

    class S:
        pass

    s = S()
    s.client, s.keys, s.cache, s.index, s.metrics, s.engine = etcd_client, keys, cache, index, metrics, engine
    yield s
    await index.close()
    await cache.close()
    for eng in engines:
        await eng.stop()


CHAIN = chat_keys([{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}])


async def test_snapshot_then_events_then_ready(setup):
    s = setup
    p1 = await s.engine("P1")
    await p1.store([(CHAIN[0], 16)])
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    assert s.index.ready
    assert s.index.matched_tokens("P1", CHAIN) == 16
    await p1.store([(CHAIN[1], 32), (CHAIN[2], 48)])
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 48)
    await p1.remove([CHAIN[2]])
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 32)
    await p1.event("cleared")
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 0)
    # the stream is authenticated with the cluster token; one connection did it all
    assert len(p1.requests) == 1 and "since" not in p1.requests[0]
    assert s.metrics.kv_index_synced.get() == 1
    assert find(s.metrics.render().decode(), "distserve_router_kv_index_keys", {"engine": "P1"}) == 0


async def test_not_ready_until_every_snapshot_then_bounded_by_sync_timeout(setup):
    s = setup
    await s.engine("P1")
    p2 = await s.engine("P2")
    p2.refuse = True  # P2 answers 503 to its stream: no snapshot
    s.index.sync_timeout = 0.6
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    await eventually(lambda: s.index.has_stream("P1"))
    assert not s.index.ready  # P2's snapshot is missing
    assert s.index.matched_tokens("P2", CHAIN) is None  # scored by hash meanwhile
    await asyncio.sleep(0.7)
    assert s.index.ready  # sync_timeout passed: a dead stream cannot keep the replica out of service
    p2.refuse = False
    await eventually(lambda: s.index.has_stream("P2"))


async def test_reconnect_resumes_with_since(setup):
    s = setup
    p1 = await s.engine("P1")
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    await p1.store([(CHAIN[0], 16)])
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 16)
    p1.refuse = True
    await p1.drop_connections()
    await p1.store([(CHAIN[1], 32)])  # while the router is away
    p1.refuse = False
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 32)
    resumed = p1.requests[-1]
    assert resumed["incarnation"] == p1.incarnation and resumed["since"] == "1"
    assert s.index.engines["P1"].snapshots == 1  # events, not a new snapshot


async def test_gap_beyond_the_ring_gets_a_fresh_snapshot(setup):
    s = setup
    p1 = await s.engine("P1", ring=2)
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    await p1.store([(CHAIN[0], 16)])
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 16)
    p1.refuse = True
    await p1.drop_connections()
    await p1.remove([CHAIN[0]])
    for i in range(5):  # the ring (2 events) no longer holds seq 2
        await p1.store([(1000 + i, 8)])
    await p1.store([(CHAIN[1], 32)])
    p1.refuse = False
    await eventually(lambda: s.index.engines["P1"].snapshots == 2)
    assert s.index.matched_tokens("P1", CHAIN) == 32
    assert CHAIN[0] not in s.index.engines["P1"].keys  # removed while away: gone with the fresh snapshot
    assert s.metrics.kv_index_resyncs.get(("snapshot",)) == 1


async def test_event_gap_on_the_wire_reconnects_with_since(setup):
    """A stream that skips a seq is not trusted: the router reconnects and resumes from what it holds."""
    s = setup
    p1 = await s.engine("P1")
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    state = s.index.engines["P1"]
    with pytest.raises(StreamError, match="seq 5 after 0"):
        s.index.apply(state, orjson.dumps({"type": "stored", "seq": 5, "incarnation": p1.incarnation,
                                           "keys": []}))
    with pytest.raises(StreamError, match="heartbeat at seq 3"):
        s.index.apply(state, orjson.dumps({"type": "heartbeat", "seq": 3}))
    for bad in (b"not json", b"[1]", b'{"type":"stored","seq":1,"keys":[["zz",1]]}',
                b'{"type":"stored","seq":1,"keys":[["ab",-1]]}', b'{"type":"what","seq":1}'):
        with pytest.raises(StreamError):
            s.index.apply(state, bad)
    with pytest.raises(StreamError, match="bad token count '0'"):  # a key covers at least one block
        s.index._pairs([["00000000000000ab", 0]])
    assert s.metrics.kv_index_resyncs.get(("gap",)) == 2


async def test_new_incarnation_drops_the_old_state(setup):
    s = setup
    p1 = await s.engine("P1")
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    await p1.store([(CHAIN[2], 48)])
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 48)
    old = p1.incarnation
    p1.restart()  # same URL, same record: the stream alone says the process is new
    async with p1.changed:
        p1.changed.notify_all()
    await p1.store([(CHAIN[0], 16)])
    await eventually(lambda: s.index.engines["P1"].incarnation == p1.incarnation)
    assert s.index.engines["P1"].incarnation != old
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 16)
    assert CHAIN[2] not in s.index.engines["P1"].keys


async def test_new_engine_process_in_the_record_drops_state_at_once(setup):
    s = setup
    p1 = await s.engine("P1")
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    await p1.store([(CHAIN[2], 48)])
    await eventually(lambda: s.index.matched_tokens("P1", CHAIN) == 48)
    await s.client.put(s.keys.engine("P1"), record("P1", p1.url, "another-process").encode())
    await eventually(lambda: s.index.engines.get("P1") is not None
                     and s.index.engines["P1"].instance == "another-process")
    assert s.index.matched_tokens("P1", CHAIN) in (None, 48)  # re-listed from the engine, never the old map


async def test_engine_leaving_the_view_drops_its_state_and_task(setup):
    s = setup
    p1 = await s.engine("P1")
    await s.engine("P2", stream=False)
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    assert set(s.index.engines) == {"P1"}  # P2 has no stream: nothing to follow
    await p1.store([(CHAIN[0], 16)])
    task = s.index.engines["P1"].task
    await s.client.delete(s.keys.engine("P1"))
    await eventually(lambda: "P1" not in s.index.engines)
    await eventually(lambda: task.done())
    assert s.index.matched_tokens("P1", CHAIN) is None


async def test_key_map_is_bounded_and_counted(setup):
    s = setup
    p1 = await s.engine("P1")
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    await p1.store([(CHAIN[0], 16)])
    await p1.store([(i, 8) for i in range(1, 1500)])  # 1500 keys, bound 1000
    await eventually(lambda: s.index.engines["P1"].seq == 2)
    assert len(s.index.engines["P1"].keys) == 1000
    assert s.metrics.kv_index_dropped.get(("P1",)) == 500
    assert CHAIN[0] not in s.index.engines["P1"].keys  # least recently stored went first


async def test_inactive_index_follows_nothing(setup):
    s = setup
    p1 = await s.engine("P1")
    await s.cache.start()
    s.index.start()
    assert await s.cache.wait_synced(5)
    await asyncio.sleep(0.2)
    assert s.index.engines == {} and p1.requests == [] and s.index.ready
    s.index.set_active(True)  # kv_aware switched on at run time
    assert await s.index.wait_synced(5)
    s.index.set_active(False)
    assert s.index.engines == {}


# ------------------------------------------------------------------------------------------ prefix families
async def test_families_follow_the_roots_the_engine_marks(setup):
    """The router counts an engine's prefix families from the `roots` the stream marks, in the snapshot and in
    events, and forgets a root when its key is removed, cleared or dropped by the bound."""
    s = setup
    p1 = await s.engine("P1")
    await p1.store([(CHAIN[0], 16), (CHAIN[1], 32)], roots=(CHAIN[0],))
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    assert s.index.families("P1") == 1 and s.index.key_count("P1") == 2  # from the snapshot
    await p1.store([(CHAIN[2], 48)])  # a longer conversation of the same family: no new root
    await p1.store([(777, 16), (778, 32)], roots=(777,))  # another family
    await eventually(lambda: s.index.key_count("P1") == 5)
    assert s.index.families("P1") == 2 and s.index.describe("P1")["families"] == 2
    await p1.remove([777])
    await eventually(lambda: s.index.families("P1") == 1)
    await p1.event("cleared")
    await eventually(lambda: s.index.key_count("P1") == 0)
    assert s.index.families("P1") == 0
    await p1.store([(5000, 16)], roots=(5000,))
    await p1.store([(i, 8) for i in range(1, 1200)])  # the bound (1000) drops the oldest, the root with it
    await eventually(lambda: s.index.engines["P1"].seq == 5)
    assert s.index.families("P1") == 0
    state = s.index.engines["P1"]
    with pytest.raises(StreamError, match="roots"):
        s.index.apply(state, orjson.dumps({"type": "stored", "seq": 6, "incarnation": p1.incarnation,
                                           "keys": [], "roots": ["zz"]}))


async def test_a_refused_stream_does_not_hold_readiness(setup):
    """An engine in the view whose process is down (connection refused, e.g. killed with its lease not yet
    expired) must not keep a restarted router out of service until sync_timeout: nothing can be routed to it
    either. Its snapshot is applied when it answers."""
    s = setup
    await s.engine("P1")
    await s.client.put(s.keys.engine("P2"), record("P2", "http://127.0.0.1:1", "dead").encode())
    s.index.sync_timeout = 30.0
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(3)  # not 30 s
    assert s.index.ready and s.index.has_stream("P1") and not s.index.has_stream("P2")


def _pick(index, body, loads=None, engines=("P0", "P1", "P2", "P3")):
    from distserve.cluster.prefix_keys import request_keys
    from distserve.cluster.records import LoadRecord
    from distserve.router.load import LoadTracker
    from distserve.router.strategies import PickContext, make_strategy

    load = LoadTracker()
    for e, n in (loads or {}).items():
        load.on_load(e, LoadRecord(engine_id=e, running=n))
    ctx = PickContext(load=load, prefix=lambda n: str(body)[:n].encode(), kv=index,
                      keys=lambda chunk: request_keys(body, chunk))
    return make_strategy("kv_aware").pick(sorted(engines), ctx)


def _family(f: int) -> dict:
    return {"messages": [{"role": "system", "content": f"family {f} " + "x" * 900},
                         {"role": "user", "content": f"first question of family {f}"}]}


async def test_kv_aware_spreads_new_prefixes_by_families_not_by_keys(setup):
    """Issue 18's load goal: 8 system prompts on 4 prefills. A family whose conversations grew long holds many
    keys but brings no more traffic than one with short conversations; placing new prefixes by key count
    piled 3 families onto one prefill (1.48 max/mean); by family count they go 2 + 2 + 2 + 2, on every
    replica alike (both decide from the same streams)."""
    s = setup
    engines = {e: await s.engine(e) for e in ("P0", "P1", "P2", "P3")}
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    history = [30, 2, 20, 20, 2, 2, 9, 9]  # keys each family's conversations leave behind
    placed: dict[str, list[int]] = {e: [] for e in engines}
    for f in range(8):
        body = _family(f)
        chosen = _pick(s.index, body)
        assert _pick(s.index, body) == chosen  # another replica with the same streams: the same engine
        placed[chosen].append(f)
        keys = chat_keys(body["messages"])
        eng = engines[chosen]
        seq = eng.seq + 2
        await eng.store([(keys[0], 1008)], roots=(keys[0],))
        await eng.store([(10_000 * (f + 1) + i, 1024 + i) for i in range(history[f])])
        await eventually(lambda e=chosen, q=seq: s.index.engines[e].seq == q)
    assert sorted(len(v) for v in placed.values()) == [2, 2, 2, 2], placed
    # the family, once placed, keeps its conversations: a new one of family 0 goes where family 0 is cached
    home = next(e for e, fs in placed.items() if 0 in fs)
    assert _pick(s.index, _family(0)) == home


async def test_kv_aware_scores_an_engine_awaiting_its_snapshot_as_empty(setup):
    """A prefill that has just restarted (a new process: its stream is followed, no snapshot yet) holds
    nothing: it must not be credited, as an engine without any stream is, with the match another engine
    holds, and so take a conversation away from the prefill that has it cached."""
    s = setup
    p0 = await s.engine("P0")
    p1 = await s.engine("P1")
    p1.refuse = True  # answers 503: followed, no snapshot
    body = _family(1)
    keys = chat_keys(body["messages"])
    await p0.store([(keys[0], 1008), (keys[1], 1040)], roots=(keys[0],))
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    await eventually(lambda: s.index.has_stream("P0"))
    # P0 holds the conversation and is one request busier; P1 is idle with an unknown (empty) cache
    assert _pick(s.index, body, loads={"P0": 1}, engines=("P0", "P1")) == "P0"
    assert s.index.pending("P1") and not s.index.ready


async def test_kv_aware_does_not_stack_a_new_family_onto_one_still_in_flight(setup):
    """A family just placed on P0 is still in its prefill there (load 1): its root is not streamed yet, so the
    family counts are equal; the next new family must not follow it there because P0 holds the fewest keys."""
    s = setup
    await s.engine("P0")
    p1 = await s.engine("P1")
    await p1.store([(4242, 1024)])  # leftovers of an ended conversation, no root
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    assert s.index.families("P0") == s.index.families("P1") == 0
    assert _pick(s.index, _family(2), engines=("P0", "P1")) == "P0"  # idle both: the fewest keys
    assert _pick(s.index, _family(2), loads={"P0": 1}, engines=("P0", "P1")) == "P1"


# ------------------------------------------------------------------------------------------ pending roots
async def test_pending_roots_count_as_families_from_admission(setup):
    """An engine announces a family's root as `pending` when it admits a request of it; the router counts it
    as a family from then (snapshot and events) until it is stored as a root (counted once) or withdrawn, and
    forgets it on a clear or a new incarnation."""
    s = setup
    p1 = await s.engine("P1")
    await p1.admit(900)
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    assert s.index.families("P1") == 1 and s.index.key_count("P1") == 0  # from the snapshot
    assert s.index.describe("P1")["pending_roots"] == 1
    await p1.admit(901)
    await eventually(lambda: s.index.families("P1") == 2)
    await p1.store([(901, 1008), (902, 1040)], roots=(901,))  # 901's prefill ended: a root, not two families
    await eventually(lambda: s.index.key_count("P1") == 2)
    assert s.index.families("P1") == 2 and s.index.describe("P1")["pending_roots"] == 1
    await p1.withdraw(900)  # 900's request failed before anything was cached
    await eventually(lambda: s.index.families("P1") == 1)
    await p1.admit(903)
    await eventually(lambda: s.index.families("P1") == 2)
    await p1.event("cleared")
    await eventually(lambda: s.index.families("P1") == 0)
    await p1.admit(904)
    await eventually(lambda: s.index.families("P1") == 1)
    p1.restart()  # a new process: nothing of the old one is pending
    await p1.drop_connections()
    await eventually(lambda: s.index.engines["P1"].incarnation == p1.incarnation)
    assert s.index.families("P1") == 0
    state = s.index.engines["P1"]
    with pytest.raises(StreamError, match="pending"):
        s.index.apply(state, orjson.dumps({"type": "stored", "seq": state.seq + 1, "incarnation": p1.incarnation,
                                           "keys": [], "pending": "904"}))


class _RootsOnly:
    """An index as a router that ignores `pending` sees it (stored roots only)."""

    def __init__(self, index: KvIndex) -> None:
        self._index = index

    def __getattr__(self, name):
        return getattr(self._index, name)

    def families(self, engine_id: str) -> int:
        state = self._index.engines.get(engine_id)
        return len(state.roots) if state is not None else 0

    def least_cached(self, engine_ids: list[str], loads) -> list[str]:
        sizes = {e: (self.families(e), loads.get(e, 0.0), self._index.key_count(e)) for e in engine_ids}
        fewest = min(sizes.values())
        return [e for e in engine_ids if sizes[e] == fewest]


async def test_kv_aware_replicas_spread_new_families_admitted_back_to_back(setup):
    """Issue 18's load goal at 80 % of saturation: new families reach alternate router replicas a fraction of
    a second apart, while the first family's prefill is still running (its root not stored anywhere, and the
    other replica does not see that request's load). Each engine announces the root at admission, so the
    second replica sees the first family where it was placed and puts the next one elsewhere; without it both
    replicas saw the same equal counts and the tie rule sent both families to the same prefill."""
    s = setup
    engines = {e: await s.engine(e) for e in ("P0", "P1", "P2", "P3")}
    other_cache = ClusterCache(s.client, s.keys, (ENGINES,), name="replica-2")
    other = KvIndex(other_cache, TOKEN, None, sync_timeout=5.0, idle_timeout=1.0, backoff=(0.02, 0.1))
    try:
        for cache, index in ((s.cache, s.index), (other_cache, other)):
            index.set_active(True)
            await cache.start()
            index.start()
            assert await index.wait_synced(5)
        replicas = [s.index, other]
        placed: list[str] = []
        f = 0
        for n in range(3):  # three new families through replicas 0, 1, 0; no prefill ends in between
            index = replicas[n % 2]
            # a family that the counts without pending roots (all 0, no load seen) send where the last one went
            while placed and _pick(_RootsOnly(index), _family(f)) != placed[-1]:
                f += 1
            chosen = _pick(index, _family(f))
            assert chosen not in placed, (n, chosen, placed)
            placed.append(chosen)
            seq = engines[chosen].seq + 1
            await engines[chosen].admit(chat_keys(_family(f)["messages"])[0])  # admitted: its prefill starts
            for r in replicas:  # the announcement reaches every replica through the engine's stream
                await eventually(lambda r=r, e=chosen, q=seq: r.engines[e].seq == q)
            f += 1
        assert len(set(placed)) == 3, placed
        assert all(not eng.keys for eng in engines.values())  # nothing stored: every prefill still running
    finally:
        await other.close()
        await other_cache.close()


# ------------------------------------------------------------ the inverted index (issue 22: kv_aware at scale)
def _rec(engine_id: str, instance: str = "a", chunk: int = 64):
    from types import SimpleNamespace
    return SimpleNamespace(url=f"http://127.0.0.1:1/{engine_id}", instance=instance,
                           cache_events={"path": PATH, "version": 1, "chunk_bytes": chunk})


def _brute_holders(index: KvIndex) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for engine_id, state in index.engines.items():
        for key, tokens in state.keys.items():
            out.setdefault(key, {})[engine_id] = tokens
    return out


async def test_inverted_index_equals_a_recomputation_after_random_events():
    """After every message of random streams (snapshots, stored with evictions past max_keys, removed,
    cleared, new incarnations, engines dropped and followed again) the key -> holders index is the per-engine
    maps inverted, and matches(keys) is matched_tokens of every engine that matches; chunk_sizes() (kept, read per
    kv_aware pick) is the followed engines' chunk sizes, as engines of two builds come and go; least_cached() (sizes kept
    per message) ranks engines by families, load and key count as asking each engine does."""
    import random

    rng = random.Random(18)
    index = KvIndex(DetachedCache(), max_keys=12)
    names = [f"P{i}" for i in range(6)]
    universe = list(range(1, 40))
    chains = [rng.sample(universe, rng.randint(1, 8)) for _ in range(30)]

    def follow(engine_id: str, instance: str) -> None:
        index._follow(engine_id, _rec(engine_id, instance, rng.choice((64, 64, 128))))
        index.engines[engine_id].task.cancel()  # fed by hand

    def snapshot(state) -> None:
        state.incarnation = None
        pairs = [[key_hex(k), rng.randint(1, 4000)] for k in rng.sample(universe, rng.randint(0, 15))]
        index.apply(state, orjson.dumps({"type": "snapshot", "seq": 0, "incarnation": uuid.uuid4().hex,
                                         "keys": pairs}))

    for e in names:
        follow(e, "a")
        snapshot(index.engines[e])
    for step in range(3000):
        e = rng.choice(names)
        state = index.engines.get(e)
        op = rng.random()
        if state is None:
            follow(e, uuid.uuid4().hex)
            continue
        if not state.synced or op < 0.03:
            snapshot(state)
        elif op < 0.06:
            index._clear(state)  # a new incarnation: what _run does on NewIncarnation
        elif op < 0.08:
            index._drop(e)
        else:
            kind = "stored" if op < 0.6 else "removed" if op < 0.97 else "cleared"
            msg = {"type": kind, "seq": state.seq + 1, "incarnation": state.incarnation}
            if kind == "stored":
                stored = rng.sample(universe, rng.randint(1, 6))
                msg["keys"] = [[key_hex(k), rng.randint(1, 4000)] for k in stored]
                msg["roots"] = [key_hex(k) for k in stored[: rng.randint(0, 2)]]
                msg["pending"] = [key_hex(k) for k in rng.sample(universe, rng.randint(0, 2))]
            elif kind == "removed":
                msg["keys"] = [key_hex(k) for k in rng.sample(universe, rng.randint(1, 6))]
                msg["pending"] = [key_hex(k) for k in rng.sample(universe, rng.randint(0, 2))]
            index.apply(state, orjson.dumps(msg))
        assert index._holders == _brute_holders(index), step
        # kv_aware's tie rule reads both figures of tied engines in one loop: the same as asking each
        loads = {x: float(rng.randint(0, 1)) for x in rng.sample(names, 4)}
        sizes = {x: (index.families(x), loads.get(x, 0.0), index.key_count(x)) for x in names}
        assert index.least_cached(names, loads) == [x for x in names if sizes[x] == min(sizes.values())], step
        keys = rng.choice(chains)
        expect = {x: index.matched_tokens(x, keys) for x in index.engines}
        assert index.matches(keys) == {x: t for x, t in expect.items() if t}, step
        assert all(len(s.keys) <= 12 for s in index.engines.values())
        assert index.chunk_sizes() == sorted({s.chunk_bytes for s in index.engines.values()}), step
    await index.close()
    assert index._holders == {} and index.chunk_sizes() == []


async def test_inverted_index_follows_the_real_streams(setup):
    """The same, over real streams: an engine leaving the view takes its keys out of matches()."""
    s = setup
    p1 = await s.engine("P1")
    p2 = await s.engine("P2")
    await p1.store([(CHAIN[0], 800), (CHAIN[1], 900)], roots=(CHAIN[0],))
    await p2.store([(CHAIN[0], 800)], roots=(CHAIN[0],))
    s.index.set_active(True)
    await s.cache.start()
    s.index.start()
    assert await s.index.wait_synced(5)
    assert s.index.matches(CHAIN) == {"P1": 900, "P2": 800}
    await p2.store([(CHAIN[2], 950)])
    await eventually(lambda: s.index.matches(CHAIN) == {"P1": 900, "P2": 950})
    await s.client.delete(s.keys.engine("P1"))
    await eventually(lambda: s.index.matches(CHAIN) == {"P2": 950})
    assert s.index._holders == _brute_holders(s.index)
