"""distserve.cluster.cache.ClusterCache over a real etcd: list then watch, typed maps, synced, many
handlers, malformed values, close."""

from __future__ import annotations

import asyncio
import json

import pytest

from distserve.cluster import keys as K, records
from distserve.cluster.cache import Change, ClusterCache

keys = K.Keys("cache")


def engine(engine_id: str, state: str = "ready", role: str = "prefill") -> records.EngineRecord:
    return records.EngineRecord(id=engine_id, incarnation="i1", role=role, url="http://127.0.0.1:1", models=["m"],
                        engine_info=records.EngineGeometry(block_size=16, num_gpu_blocks=8), state=state)


def link(p: str, d: str) -> records.LinkRecord:
    return records.LinkRecord(prefill_id=p, decode_id=d, prefill_incarnation="i1", decode_incarnation="i1",
                      state="established")


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_lists_then_watches_into_typed_maps(etcd_client):
    await etcd_client.put(keys.engine("P1"), engine("P1").encode())
    await etcd_client.put(keys.link("P1", "D1"), link("P1", "D1").encode())
    await etcd_client.put(keys.load("P1"), records.LoadRecord(engine_id="P1", running=3).encode())
    await etcd_client.put(keys.state("P1"), records.OperatorFlags(cordon=True).encode())
    await etcd_client.put(keys.router("r1"), records.RouterRecord(id="r1", url="http://127.0.0.1:2").encode())
    await etcd_client.put(keys.config(), records.RoutingConfig(strategy="round_robin").encode())
    await etcd_client.put(K.Keys("other").engine("X"), engine("X").encode())  # another cluster: not seen
    async with ClusterCache(etcd_client, keys) as cache:
        assert await cache.wait_synced(10)
        assert cache.synced.is_set()
        assert set(cache.engines) == {"P1"} and isinstance(cache.engines["P1"], records.EngineRecord)
        assert cache.links[("P1", "D1")].state == "established"
        assert cache.loads["P1"].running == 3
        assert cache.flags["P1"].cordon
        assert cache.routers["r1"].url == "http://127.0.0.1:2"
        assert cache.routing_config is not None and cache.routing_config.strategy == "round_robin"
        assert cache.records(K.ENGINES) is cache.engines
        listed = cache.revision
        assert listed > 0

        # then the watch: puts, updates and deletes arrive
        await etcd_client.put(keys.engine("D1"), engine("D1", role="decode").encode())
        await etcd_client.put(keys.engine("P1"), engine("P1", state="draining").encode())
        await etcd_client.delete(keys.state("P1"))
        await until(lambda: "D1" in cache.engines and cache.engines["P1"].state == "draining"
                    and "P1" not in cache.flags, what="watched changes")
        assert cache.revision > listed
        assert cache.malformed == 0


async def test_many_handlers_per_kind_get_typed_changes(etcd_client):
    await etcd_client.put(keys.engine("P1"), engine("P1").encode())
    cache = ClusterCache(etcd_client, keys, (K.ENGINES, K.LOAD))
    first: list[Change] = []
    second: list[Change] = []
    loads: list[Change] = []
    synced_calls: list[int] = []

    def broken(change: Change) -> None:
        raise RuntimeError("a bad handler")

    cache.on_engines(first.append)
    cache.on_engines(broken)  # must not keep the others from their changes
    unsubscribe = cache.on_engines(second.append)
    cache.on_load(loads.append)
    cache.on_synced(lambda: synced_calls.append(len(first)))
    with pytest.raises(ValueError, match="does not watch"):
        cache.on_links(lambda change: None)
    await cache.start()
    try:
        assert await cache.wait_synced(10)
        await until(lambda: synced_calls, what="on_synced")
        # the initial list arrives as a put, before synced
        assert synced_calls == [1]
        assert [(c.type, c.ids, c.synced) for c in first] == [("put", ("P1",), False)]
        assert isinstance(first[0].new, records.EngineRecord) and first[0].old is None
        late: list[int] = []
        cache.on_synced(lambda: late.append(1))  # already synced: called at once
        assert late == [1]

        await etcd_client.put(keys.engine("P1"), engine("P1", state="draining").encode())
        await etcd_client.put(keys.load("P1"), records.LoadRecord(engine_id="P1", waiting=4).encode())
        await until(lambda: len(first) == 2 and len(loads) == 1, what="handlers")
        change = first[1]
        assert (change.type, change.synced, change.old.state, change.new.state) == ("put", True, "ready", "draining")
        assert change.revision == (await etcd_client.get(keys.engine("P1"))).mod_revision
        assert second == first
        assert loads[0].new.waiting == 4 and loads[0].kind == K.LOAD

        unsubscribe()
        await etcd_client.delete(keys.engine("P1"))
        await until(lambda: len(first) == 3, what="delete")
        assert (first[2].type, first[2].old.state, first[2].new, first[2].gone) == ("delete", "draining", None, True)
        assert len(second) == 2  # unsubscribed
    finally:
        await cache.close()


async def test_a_malformed_value_leaves_the_map_and_reaches_handlers_with_its_error(etcd_client):
    await etcd_client.put(keys.engine("P1"), engine("P1").encode())
    async with ClusterCache(etcd_client, keys, (K.ENGINES, K.LOAD, K.CONFIG)) as cache:
        changes: list[Change] = []
        cache.on_engines(changes.append)
        cache.on_load(changes.append)
        cache.on_config(changes.append)
        assert await cache.wait_synced(10)

        await etcd_client.put(keys.engine("P1"), b'{"id": "P1", "role": "nonsense"}')
        await until(lambda: "P1" not in cache.engines, what="malformed engine dropped")
        bad = changes[-1]
        assert (bad.type, bad.ids, bad.new, bad.gone) == ("malformed", ("P1",), None, True)
        assert bad.old is not None and bad.old.state == "ready" and "EngineRecord" in bad.error
        assert cache.malformed == 1 and keys.engine("P1") in cache.malformed_keys

        # a record naming another id than its key's is malformed too (the router used to accept this one)
        await etcd_client.put(keys.load("P1"), records.LoadRecord(engine_id="P2", running=1).encode())
        await until(lambda: cache.malformed == 2, what="mismatched load counted")
        assert "P1" not in cache.loads and "P2" not in cache.loads
        assert changes[-1].type == "malformed" and "sits under" in changes[-1].error

        # a bad routing config reaches handlers with its error (a router keeps its last good config)
        await etcd_client.put(keys.config(), json.dumps({"strategy": "nope"}).encode())
        await until(lambda: cache.malformed == 3, what="bad config")
        assert cache.routing_config is None and changes[-1].type == "malformed" and changes[-1].kind == K.CONFIG

        # a good value again: back in the map, no longer listed as malformed
        await etcd_client.put(keys.engine("P1"), engine("P1").encode())
        await until(lambda: "P1" in cache.engines, what="engine back")
        assert keys.engine("P1") not in cache.malformed_keys
        assert changes[-1].type == "put" and changes[-1].old is None

        # a key under a kind's prefix that is not a key of the schema: counted, never passed on
        seen = len(changes)
        await etcd_client.put(keys.prefix(K.ENGINES) + "a/b", engine("a").encode())
        await until(lambda: cache.malformed == 4, what="foreign key counted")
        assert len(changes) == seen and set(cache.engines) == {"P1"}


async def test_close_stops_every_owned_task(etcd_client):
    cache = ClusterCache(etcd_client, keys)
    await cache.start()
    assert await cache.wait_synced(10)
    tasks = cache.tasks
    assert len(tasks) == len(K.KINDS)  # one watch per kind (the synced waiter has finished its job)
    await cache.close()
    assert all(t.done() for t in tasks) and cache.tasks == []
    await etcd_client.put(keys.engine("P9"), engine("P9").encode())
    await asyncio.sleep(0.3)
    assert "P9" not in cache.engines  # no watch left
    await cache.close()  # idempotent


async def test_close_before_sync_cancels_the_synced_waiter(etcd_client):
    cache = ClusterCache(etcd_client, keys, (K.ENGINES,))
    await cache.start()
    tasks = cache.tasks
    await cache.close()
    assert all(t.done() for t in tasks)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown key kind"):
        ClusterCache(None, keys, ("bogus",))
