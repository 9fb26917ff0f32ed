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
