"""The router's routing table is updated incrementally per change; it must always equal the table rebuilt
from scratch by compute_topology (the rule shared with agents and distserve-ctl).

Records reach the view through its cache's own listeners (what a watch event does: decode, typed map,
handlers), in random sequences of puts and deletes of engines, links and operator flags, with circuit
breakers opening and closing in between.
"""

from __future__ import annotations

import random
import time

import pytest

from distserve.cluster.keys import Keys
from distserve.cluster.records import EngineGeometry, EngineRecord, LinkRecord, OperatorFlags
from distserve.router.breaker import CircuitBreakers
from distserve.router.load import LoadTracker
from distserve.router.metrics import RouterMetrics
from distserve.router.view import ClusterView

IDS = [f"e{i}" for i in range(8)]
GEOMETRY = EngineGeometry(block_size=16, num_gpu_blocks=64)


class Feed:
    def __init__(self) -> None:
        self.keys = Keys("inc")
        self.breakers = CircuitBreakers(lambda: None, b"", 0.5, 5.0)
        self.view = ClusterView(None, self.keys, self.breakers, LoadTracker(), RouterMetrics(), lambda *a: None)
        cache = self.view.cache
        self.listeners = {k: cache._listener(k) for k in ("engines", "links", "state")}
        self.cache = cache

    def put(self, kind: str, key: str, record) -> None:
        self.listeners[kind]("put", key, None, self.cache.codec.decode(key, record.encode()))

    def delete(self, kind: str, key: str) -> None:
        self.listeners[kind]("delete", key, None, None)


def snapshot(table) -> dict:
    topo = table.topology
    return {
        "entries": {m: list(v) for m, v in table.entries.items() if v},
        "decodes": dict(table.decodes),
        "known": set(table.known_models),
        "dop": dict(topo.decodes_of_prefill),
        "prefills": list(topo.routable_prefills),
        "decodes_r": list(topo.routable_decodes),
        "hybrids": list(topo.routable_hybrids),
        "models": topo.models(),
        "has_path": table.has_path,
    }


def random_step(rng: random.Random, f: Feed, incs: dict[str, str]) -> str:
    k = f.keys
    op = rng.random()
    engine_id = rng.choice(IDS)
    if op < 0.35:
        incs[engine_id] = rng.choice(["i1", "i2"]) if rng.random() < 0.3 else incs.get(engine_id, "i1")
        rec = EngineRecord(id=engine_id, incarnation=incs[engine_id], role=rng.choice(["prefill", "decode", "hybrid"]),
                           url="http://127.0.0.1:1", models=rng.sample(["a", "b", "c"], rng.randint(1, 2)),
                           state=rng.choice(["ready", "ready", "ready", "starting", "draining", "unhealthy"]),
                           engine_kind="null", engine_info=GEOMETRY)
        f.put("engines", k.engine(engine_id), rec)
        return f"engine put {engine_id} {rec.role} {rec.state} {rec.models} {rec.incarnation}"
    if op < 0.42:
        f.delete("engines", k.engine(engine_id))
        return f"engine delete {engine_id}"
    if op < 0.75:
        other = rng.choice(IDS)
        link = LinkRecord(prefill_id=engine_id, decode_id=other,
                          prefill_incarnation=incs.get(engine_id, "i1") if rng.random() < 0.9 else "old",
                          decode_incarnation=incs.get(other, "i1"),
                          state=rng.choice(["established", "established", "establishing", "failed"]),
                          protocol="tcp", established_at=time.time())
        f.put("links", k.link(engine_id, other), link)
        return f"link put {engine_id}>{other} {link.state}"
    if op < 0.82:
        other = rng.choice(IDS)
        f.delete("links", k.link(engine_id, other))
        return f"link delete {engine_id}>{other}"
    if op < 0.9:
        flags = OperatorFlags(drain=rng.random() < 0.5, cordon=rng.random() < 0.3, updated_by="test")
        f.put("state", k.state(engine_id), flags)
        return f"flags {engine_id} {flags.drain} {flags.cordon}"
    if op < 0.94:
        f.delete("state", k.state(engine_id))
        return f"flags delete {engine_id}"
    # a breaker opens or closes (what trip/close do to open_ids), then the view is told, as on_change does
    opened = set(f.breakers.open_ids) ^ {engine_id}
    f.breakers.open_ids = frozenset(opened)
    f.view.invalidate()
    return f"breakers {sorted(opened)}"


@pytest.mark.parametrize("seed", range(12))
async def test_incremental_table_equals_a_full_rebuild_after_every_change(seed):
    rng = random.Random(seed)
    f = Feed()
    f.cache.synced.set()
    incs: dict[str, str] = {}
    history = []
    for _ in range(400):
        history.append(random_step(rng, f, incs))
        if rng.random() < 0.5:  # not every change is read before the next one
            continue
        assert snapshot(f.view.table()) == snapshot(f.view.full_table()), "\n".join(history[-12:])
    assert snapshot(f.view.table()) == snapshot(f.view.full_table())


async def test_a_held_table_is_a_consistent_snapshot():
    """A request that holds a table across awaits keeps what it saw; the next table() shows the change."""
    f = Feed()
    f.cache.synced.set()
    k = f.keys
    recs = {}
    for engine_id, role in (("p0", "prefill"), ("d0", "decode")):
        recs[engine_id] = EngineRecord(id=engine_id, incarnation="i", role=role, url="http://127.0.0.1:1",
                                       models=["m"], state="ready", engine_kind="null", engine_info=GEOMETRY)
        f.put("engines", k.engine(engine_id), recs[engine_id])
    f.put("links", k.link("p0", "d0"), LinkRecord(prefill_id="p0", decode_id="d0", prefill_incarnation="i",
                                                   decode_incarnation="i", state="established", protocol="tcp",
                                                   established_at=time.time()))
    held = f.view.table()
    assert held.entries == {"m": ["p0"]} and held.decodes == {("p0", "m"): ["d0"]}
    f.put("state", k.state("d0"), OperatorFlags(drain=True, updated_by="test"))
    assert held.entries == {"m": ["p0"]} and held.decodes == {("p0", "m"): ["d0"]}
    assert held.topology.routable_decodes == ["d0"]
    now = f.view.table()
    assert now is not held and now.entries == {} and now.decodes == {} and not now.has_path
