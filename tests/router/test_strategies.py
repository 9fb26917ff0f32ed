"""Routing strategies as pure functions: the properties users rely on (no processes needed)."""

from __future__ import annotations

from collections import Counter

import pytest

from distserve.cluster.records import LoadRecord
from distserve.router.load import LoadTracker
from distserve.router.strategies import STRATEGIES, PickContext, make_strategy

ENGINES = [f"p{i}" for i in range(6)]


def ctx(load: LoadTracker | None = None, prefix: bytes = b"", **params) -> PickContext:
    return PickContext(load=load or LoadTracker(), params=params, prefix=lambda n: prefix[:n])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_picks_only_candidates(name):
    strategy = make_strategy(name)
    load = LoadTracker()
    for i in range(300):
        pick = strategy.pick(ENGINES[:4], ctx(load, prefix=f"prompt {i}".encode()))
        assert pick in ENGINES[:4]
        load.begin(pick)
    assert strategy.pick(["only"], ctx()) == "only"


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        make_strategy("fastest")


def test_min_expected_latency_follows_lmdeploy_formula():
    """unfinished / speed, the minimum wins: speed is the engine's weight."""
    load = LoadTracker()
    load.on_load("p0", LoadRecord(engine_id="p0", running=4))
    load.on_load("p1", LoadRecord(engine_id="p1", running=3))
    c = PickContext(load=load, weights={"p0": 2.0})  # p0: 4/2 = 2 < p1: 3/1
    assert make_strategy("min_expected_latency").pick(["p0", "p1"], c) == "p0"
    c = PickContext(load=load)  # equal speeds: the less loaded
    assert make_strategy("min_expected_latency").pick(["p0", "p1"], c) == "p1"


def test_min_expected_latency_spreads_ties_at_random():
    picks = Counter(make_strategy("min_expected_latency").pick(ENGINES, ctx()) for _ in range(600))
    assert set(picks) == set(ENGINES)


def test_load_tracker_adds_own_traffic_until_the_next_shared_record():
    """Replicas agree: each starts from the shared record and adds only what it did since."""
    load = LoadTracker()
    load.on_load("p0", LoadRecord(engine_id="p0", running=5, waiting=1))
    assert load.unfinished("p0") == 6
    load.begin("p0")
    load.begin("p0")
    assert load.unfinished("p0") == 8
    load.on_load("p0", LoadRecord(engine_id="p0", running=8))  # the record now counts them
    assert load.unfinished("p0") == 8
    load.end("p0")
    assert load.unfinished("p0") == 7
    load.on_load("p0", LoadRecord(engine_id="p0", running=0))  # stale record: own in-flight is a floor
    assert load.unfinished("p0") == 1


def test_power_of_two_never_picks_the_most_loaded_of_two():
    load = LoadTracker()
    load.on_load("hot", LoadRecord(engine_id="hot", running=50))
    s = make_strategy("power_of_two")
    assert all(s.pick(["hot", "cold"], ctx(load)) == "cold" for _ in range(50))


def test_round_robin_cycles():
    s = make_strategy("round_robin")
    picks = [s.pick(ENGINES, ctx()) for _ in range(len(ENGINES) * 3)]
    assert Counter(picks) == {e: 3 for e in ENGINES}


def test_prefix_affinity_is_the_same_on_every_replica():
    """Two independent strategy objects (two replicas) map each prefix to the same engine."""
    a, b = make_strategy("prefix_affinity"), make_strategy("prefix_affinity")
    for i in range(200):
        prefix = f"system prompt #{i % 17}: you are helpful".encode()
        assert a.pick(ENGINES, ctx(prefix=prefix)) == b.pick(ENGINES, ctx(prefix=prefix))
    spread = Counter(a.pick(ENGINES, ctx(prefix=f"doc {i}".encode())) for i in range(600))
    assert set(spread) == set(ENGINES) and min(spread.values()) > 30


def test_prefix_affinity_consistent_hashing_moves_few_prefixes():
    """Removing one engine only remaps the prefixes it owned."""
    s = make_strategy("prefix_affinity")
    prefixes = [f"user {i}".encode() for i in range(500)]
    before = {p: s.pick(ENGINES, ctx(prefix=p)) for p in prefixes}
    after = {p: s.pick(ENGINES[:-1], ctx(prefix=p)) for p in prefixes}
    moved = [p for p in prefixes if before[p] != after[p]]
    assert all(before[p] == ENGINES[-1] for p in moved)


def test_prefix_affinity_bounded_loads():
    """An owner above load_factor x average is passed over; the shared prefix goes to the next engine."""
    s = make_strategy("prefix_affinity")
    prefix = b"the shared system prompt"
    owner = s.pick(ENGINES, ctx(prefix=prefix))
    load = LoadTracker()
    for _ in range(10):
        load.begin(owner)
    other = s.pick(ENGINES, ctx(load, prefix=prefix, load_factor=1.25))
    assert other != owner
    # and everyone agrees on where it goes next
    assert make_strategy("prefix_affinity").pick(ENGINES, ctx(load, prefix=prefix, load_factor=1.25)) == other
    # bounded: with equal offered load no engine gets more than ceil(1.25 x average) + 1
    load = LoadTracker()
    for _ in range(120):
        load.begin(s.pick(ENGINES, ctx(load, prefix=prefix, load_factor=1.25)))
    assert max(load.own.values()) <= 1.25 * 120 / len(ENGINES) + 1


# ------------------------------------------------------------------------------------------- kv_aware
class FakeIndex:
    """The index's lookup surface (distserve.router.kv_index.KvIndex): engine -> {key: tokens}; engines
    absent have no stream."""

    def __init__(self, maps: dict[str, dict[int, int]]) -> None:
        self.maps = maps

    def has_stream(self, engine_id):
        return engine_id in self.maps

    def chunk_bytes(self, engine_id):
        return 64

    def matched_tokens(self, engine_id, keys):
        from distserve.cluster.prefix_keys import longest_match
        m = self.maps.get(engine_id)
        return None if m is None else longest_match(keys, m)[1]


def kv_ctx(index, body, load=None):
    from distserve.cluster.prefix_keys import request_keys
    calls = []

    def keys(chunk):
        calls.append(chunk)
        return request_keys(body, chunk)

    c = PickContext(load=load or LoadTracker(), prefix=lambda n: str(body)[:n].encode(), kv=index, keys=keys)
    return c, calls


CONVO = {"messages": [{"role": "system", "content": "sys " * 200}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]}


def _chain():
    from distserve.cluster.prefix_keys import request_keys
    return request_keys(CONVO)


def test_kv_aware_prefers_the_engine_holding_the_longest_prefix():
    k = _chain()
    index = FakeIndex({"p0": {k[0]: 800}, "p1": {k[0]: 800, k[2]: 1100}, "p2": {}})
    strategy = make_strategy("kv_aware")
    for _ in range(20):
        c, _calls = kv_ctx(index, CONVO)
        assert strategy.pick(["p0", "p1", "p2"], c) == "p1"


def test_kv_aware_weighs_the_match_against_load():
    """1,024 cached tokens are worth cache_weight queued requests (load_weight each)."""
    k = _chain()
    index = FakeIndex({"p0": {k[2]: 2048}, "p1": {}})
    load = LoadTracker()
    load.on_load("p0", LoadRecord(engine_id="p0", running=3))  # cost 3 - 2 = 1 > p1's 0
    c, _ = kv_ctx(index, CONVO, load)
    assert make_strategy("kv_aware").pick(["p0", "p1"], c) == "p1"
    c, _ = kv_ctx(index, CONVO, load)  # the cache weighs more: 3 - 4 < 0
    assert make_strategy("kv_aware", {"cache_weight": 2.0}).pick(["p0", "p1"], c) == "p0"
    c, _ = kv_ctx(index, CONVO, load)  # a match below min_match_tokens is none
    assert make_strategy("kv_aware", {"cache_weight": 2.0, "min_match_tokens": 4096}).pick(["p0", "p1"], c) == "p1"


def test_kv_aware_computes_the_keys_once_per_request():
    k = _chain()
    index = FakeIndex({f"p{i}": {k[0]: 800} for i in range(4)})
    c, calls = kv_ctx(index, CONVO)
    from distserve.router.orchestrator import _keys_once
    memo = _keys_once(CONVO)
    c.keys = lambda n: (calls.append(n), memo(n))[1]
    strategy = make_strategy("kv_aware")
    strategy.pick(["p0", "p1", "p2", "p3"], c)
    strategy.pick(["p0", "p1", "p2", "p3"], c)  # a retry reuses the same context
    assert len(calls) == 8 and memo(64) is memo(64)  # asked per engine, computed once


def test_kv_aware_sends_a_new_prefix_to_the_same_engine_on_every_replica():
    """No match anywhere and equal loads: prefix_affinity's ring breaks the tie, the same on every replica."""
    index = FakeIndex({f"p{i}": {} for i in range(6)})
    picks = {make_strategy("kv_aware").pick(ENGINES, kv_ctx(index, CONVO)[0]) for _ in range(10)}
    assert len(picks) == 1


def test_kv_aware_sends_a_new_prefix_to_the_engine_caching_the_least():
    """A tie goes to the engine whose index holds the fewest keys (new prefixes spread by the traffic each
    engine already serves), not to wherever the hash piles them; the ring breaks only what is left."""

    class CountingIndex(FakeIndex):
        def describe(self, engine_id):
            return {"keys": len(self.maps[engine_id])}

    other = {i: 64 for i in range(1, 4)}  # another prefix's keys: no match for CONVO
    index = CountingIndex({e: dict(other) for e in ENGINES})
    ring = make_strategy("prefix_affinity").pick(ENGINES, kv_ctx(index, CONVO)[0])
    emptiest = next(e for e in ENGINES if e != ring)
    index.maps[emptiest] = {}
    replicas = {make_strategy("kv_aware").pick(ENGINES, kv_ctx(index, CONVO)[0]) for _ in range(5)}
    assert replicas == {emptiest}
    # equal counts: the ring as before, on every replica
    index.maps[emptiest] = dict(other)
    assert make_strategy("kv_aware").pick(ENGINES, kv_ctx(index, CONVO)[0]) == ring


def test_kv_aware_places_a_new_prefix_by_cached_keys_within_one_queued_request():
    """A prefix no engine holds outlives the queue it is placed by: an engine with one more request queued
    but far fewer cached keys takes it; two more queued requests do not count as a tie."""

    class CountingIndex(FakeIndex):
        def describe(self, engine_id):
            return {"keys": len(self.maps[engine_id])}

    index = CountingIndex({"p0": {i: 64 for i in range(1, 40)}, "p1": {}})
    load = LoadTracker()
    load.on_load("p1", LoadRecord(engine_id="p1", running=1))
    assert make_strategy("kv_aware").pick(["p0", "p1"], kv_ctx(index, CONVO, load)[0]) == "p1"
    load.on_load("p1", LoadRecord(engine_id="p1", running=2))
    assert make_strategy("kv_aware").pick(["p0", "p1"], kv_ctx(index, CONVO, load)[0]) == "p0"
    # a prefix one engine holds is not a tie: the match decides
    k = _chain()
    index.maps["p0"][k[2]] = 1100
    load.on_load("p1", LoadRecord(engine_id="p1", running=0))
    assert make_strategy("kv_aware").pick(["p0", "p1"], kv_ctx(index, CONVO, load)[0]) == "p0"


def test_kv_aware_mixed_fleet_scores_engines_without_a_stream_by_hash():
    k = _chain()
    # p0, p1 stream (nothing cached); p2..p5 have no stream
    index = FakeIndex({"p0": {}, "p1": {}})
    strategy = make_strategy("kv_aware")
    affinity = make_strategy("prefix_affinity")
    c, _ = kv_ctx(index, CONVO)
    blind = ["p2", "p3", "p4", "p5"]
    hashed = affinity.pick(blind, c)
    # the hash owner among the blind ones competes on load like the others; a tie goes to the known cache
    load = LoadTracker()
    for e in ("p0", "p1"):
        load.on_load(e, LoadRecord(engine_id=e, running=2))
    assert strategy.pick(ENGINES, kv_ctx(index, CONVO, load)[0]) == hashed
    # a streaming engine holding the prefix is credited; the hash owner gets the same credit, so load decides
    index.maps["p0"] = {k[2]: 1100}
    load.on_load("p0", LoadRecord(engine_id="p0", running=0))
    assert strategy.pick(ENGINES, kv_ctx(index, CONVO, load)[0]) == "p0"
    # nobody streams: exactly prefix_affinity
    none = FakeIndex({})
    assert strategy.pick(ENGINES, kv_ctx(none, CONVO)[0]) == affinity.pick(ENGINES, kv_ctx(none, CONVO)[0])


def test_kv_aware_params_are_typed_and_bounded():
    from distserve.cluster.records import RoutingConfig
    RoutingConfig(strategy="kv_aware", params={"cache_weight": 2.5, "min_match_tokens": 64, "vnodes": 8})
    for bad in ({"cache_weight": -1.0}, {"load_weight": 1e9}, {"min_match_tokens": "64"},
                {"cache_weight": float("nan")}, {"bogus": 1}):
        with pytest.raises(ValueError):
            RoutingConfig(strategy="kv_aware", params=bad)
