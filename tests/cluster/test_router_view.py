"""The router's routing table over the cluster cache (distserve.router.view) and the in-flight decode rule
(distserve.cluster.topology.inflight_decodes), over a real etcd."""

from __future__ import annotations

import asyncio
import json

from distserve.cluster import keys as K
from distserve.cluster.records import EngineGeometry, EngineRecord, LinkRecord, LoadRecord, OperatorFlags, RoutingConfig
from distserve.cluster.topology import inflight_decodes
from distserve.router.breaker import CircuitBreakers
from distserve.router.load import LoadTracker
from distserve.router.metrics import RouterMetrics
from distserve.router.view import ClusterView

keys = K.Keys("view")


def engine(engine_id: str, role: str, state: str = "ready", incarnation: str = "i1") -> EngineRecord:
    return EngineRecord(id=engine_id, incarnation=incarnation, instance=f"proc-{engine_id}", role=role,
                        url="http://127.0.0.1:1", models=["m"], state=state,
                        engine_info=EngineGeometry(block_size=16, num_gpu_blocks=8))


def link(p: str, d: str) -> LinkRecord:
    return LinkRecord(prefill_id=p, decode_id=d, prefill_incarnation="i1", decode_incarnation="i1",
                      prefill_instance=f"proc-{p}", decode_instance=f"proc-{d}", state="established")


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_view_routes_from_the_cache_and_refuses_a_load_record_of_another_engine(etcd_client):
    for record in (engine("P1", "prefill"), engine("D1", "decode")):
        await etcd_client.put(keys.engine(record.id), record.encode())
    await etcd_client.put(keys.link("P1", "D1"), link("P1", "D1").encode())
    configs: list[tuple] = []
    tracker = LoadTracker()
    view = ClusterView(etcd_client, keys, CircuitBreakers(lambda: None, b""), tracker, RouterMetrics(),
                       lambda config, error=None, revision=0: configs.append((config, error, revision)))
    await view.start()
    try:
        assert await view.wait_synced(10) and view.synced.is_set()
        table = view.table()
        assert table.entries == {"m": ["P1"]} and table.decodes == {("P1", "m"): ["D1"]}
        assert view.revision > 0

        # load/D1 holding D2's record: the router used to feed it to D1's load estimate
        await etcd_client.put(keys.load("D1"), LoadRecord(engine_id="D2", running=40).encode())
        await until(lambda: view.malformed == 1)
        assert tracker.unfinished("D1") == 0 and "D1" not in view.loads
        await etcd_client.put(keys.load("D1"), LoadRecord(engine_id="D1", running=5).encode())
        await until(lambda: "D1" in view.loads)
        assert tracker.unfinished("D1") == 5

        # the config: a good one, then a bad one (reported with its error and revision), then deleted
        await etcd_client.put(keys.config(), RoutingConfig(strategy="round_robin").encode())
        good_rev = (await etcd_client.get(keys.config())).mod_revision
        await until(lambda: len(configs) == 1)
        assert configs[0][0].strategy == "round_robin" and configs[0][1:] == (None, good_rev)
        await etcd_client.put(keys.config(), json.dumps({"strategy": "nope"}).encode())
        bad_rev = (await etcd_client.get(keys.config())).mod_revision
        await until(lambda: len(configs) == 2)
        assert configs[1][0] is None and "strategy" in configs[1][1] and configs[1][2] == bad_rev
        assert not configs[1][1].startswith("RoutingConfig:")
        assert view.routing_config is not None and view.routing_config.strategy == "round_robin"  # last good
        await etcd_client.delete(keys.config())
        await until(lambda: len(configs) == 3)
        assert configs[2] == (None, None, 0) and view.routing_config is None

        # a cordoned prefill takes no new requests, but its in-flight requests still finish on D1
        await etcd_client.put(keys.state("P1"), OperatorFlags(cordon=True).encode())
        await until(lambda: not view.table().entries.get("m"))
        assert view.decodes_for_inflight(view.engines["P1"], "m") == ["D1"]
    finally:
        await view.stop()
    assert view.cache.tasks == []


def test_inflight_decodes_rule():
    p1, d1, d2 = engine("P1", "prefill", state="draining"), engine("D1", "decode"), engine("D2", "decode")
    engines = {"P1": p1, "D1": d1, "D2": d2}
    links = {("P1", "D1"): link("P1", "D1"), ("P1", "D2"): link("P1", "D2")}
    assert inflight_decodes(p1, "m", engines, links, {}) == ["D1", "D2"]
    assert inflight_decodes(p1, "m", engines, links, {}, excluded={"D1"}) == ["D2"]
    assert inflight_decodes(p1, "m", engines, links, {"D2": OperatorFlags(drain=True)}) == ["D1"]
    assert inflight_decodes(p1, "other-model", engines, links, {}) == []
    # a new lease of the same process keeps the KV; another process does not
    relet = p1.model_copy(update={"incarnation": "i2"})
    assert inflight_decodes(p1, "m", {**engines, "P1": relet}, links, {}) == ["D1", "D2"]
    restarted = p1.model_copy(update={"incarnation": "i3", "instance": "proc-new"})
    assert inflight_decodes(p1, "m", {**engines, "P1": restarted}, links, {}) == []
    assert inflight_decodes(p1, "m", {"D1": d1, "D2": d2}, links, {}) == []  # its record is gone
