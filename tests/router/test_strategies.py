"""Routing strategies as pure functions: the properties users rely on (no processes needed)."""

from __future__ import annotations

from array import array
from collections import Counter

import pytest

from distserve.cluster.records import LoadRecord
from distserve.router.load import LoadTracker
from distserve.router.strategies import STRATEGIES, PickContext, make_strategy
from tests.router.cluster import DetachedCache
from tests.util import SLOW

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


def test_load_tracker_keeps_every_engines_current_figure_as_its_rule_computes_it():
    """`current` (what the strategies read in bulk) equals the rule (the shared record plus own starts minus
    own ends since it, never below own in flight) after any sequence of starts, ends, records and forgets, and
    holds no entry for an engine forgotten with nothing in flight."""
    import random as _random

    rng = _random.Random(7)
    load = LoadTracker()
    engines = ["p0", "p1", "p2"]
    own = {e: 0 for e in engines}
    shared: dict = {e: None for e in engines}
    delta = {e: 0 for e in engines}
    for _ in range(3000):
        e, op = rng.choice(engines), rng.random()
        if op < 0.35:
            load.begin(e)
            own[e] += 1
            delta[e] += 1
        elif op < 0.7 and own[e] > 0:
            load.end(e)
            own[e] -= 1
            delta[e] -= 1
        elif op < 0.9:
            record = None if rng.random() < 0.2 else LoadRecord(engine_id=e, running=rng.randint(0, 9),
                                                                 waiting=rng.randint(0, 3))
            load.on_load(e, record)
            shared[e], delta[e] = (None if record is None else record.in_flight), 0
        else:
            load.forget(e)
            shared[e], delta[e] = None, 0
            if own[e] == 0:
                assert e not in load.current
        for x in engines:
            rule = own[x] if shared[x] is None else max(shared[x] + delta[x], own[x])
            assert load.unfinished(x) == rule
            assert load.current.get(x, 0) == rule


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
    but fewer cached prefix families takes it; two more queued requests do not count as a tie."""

    class CountingIndex(FakeIndex):
        def families(self, engine_id):
            return 1 if self.maps[engine_id] else 0

        def key_count(self, engine_id):
            return len(self.maps[engine_id])

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


# ------------------------------------------------- per-candidate-set indexes (issue 22): same picks as a scan
def _ref_min_latency(candidates, ctx):
    """The scan the index replaces: every candidate's unfinished / weight; the lowest ones."""
    from distserve.router.strategies import _weight
    scores = {c: ctx.load.unfinished(c) / (_weight(ctx, c) if ctx.weights else 1.0) for c in candidates}
    low = min(scores.values())
    return {c for c, s in scores.items() if s == low}


_REF_RINGS: dict = {}


def _ref_prefix_affinity(candidates, ctx, vnodes=64, load_factor=1.25, prefix_chars=256):
    """prefix_affinity as it was before the index: the ring built from scratch, every load read."""
    import math
    from bisect import bisect_right

    from distserve.router.strategies import _hash64
    ring_key = (tuple(candidates), tuple(sorted(ctx.weights.items())), vnodes)
    if ring_key not in _REF_RINGS:  # the ring is a pure function of these (memoised: building one is slow)
        counts = _ring_counts(candidates, ctx, vnodes)
        points = sorted((_hash64(f"{c}#{i}".encode()), c) for c in candidates for i in range(counts[c]))
        _REF_RINGS[ring_key] = [p[0] for p in points], [p[1] for p in points]
    hashes, owners = _REF_RINGS[ring_key]
    loads = {c: ctx.load.unfinished(c) for c in candidates}
    cap = math.ceil(load_factor * (sum(loads.values()) + 1) / len(candidates))
    start = bisect_right(hashes, _hash64(ctx.prefix(prefix_chars)))
    seen = set()
    for i in range(len(hashes)):
        owner = owners[(start + i) % len(hashes)]
        if owner in seen:
            continue
        if loads[owner] + 1 <= cap:
            return owner
        seen.add(owner)
    return min(candidates, key=lambda c: loads[c])


POOL = [f"e{i:03d}" for i in range(240)]


def _churn(rng, load, engines, n):
    """n load changes of every kind the router makes: its own starts and ends, agents' records, deletions."""
    for _ in range(n):
        e = rng.choice(engines)
        kind = rng.random()
        if kind < 0.4:
            load.begin(e)
        elif kind < 0.7:
            if load.own.get(e, 0) > 0:
                load.end(e)
        elif kind < 0.95:
            load.on_load(e, LoadRecord(engine_id=e, running=rng.randint(0, 12), waiting=rng.randint(0, 3)))
        else:
            load.on_load(e, None) if rng.random() < 0.5 else load.forget(e)


def _random_weights(rng, engines):
    roll = rng.random()
    if roll < 0.3:
        return {}
    if roll < 0.6:  # a few weighted, the rest at the default 1
        return {e: rng.choice([0.5, 2.0, 3.0]) for e in rng.sample(engines, 10)}
    return {e: rng.choice([0.5, 1.0, 1.5, 2.0, 4.0]) for e in engines}


def _scenario(seed, picks=400):
    """Random candidate sets (below and above the index threshold, subsets as after a failed attempt), loads
    changing between picks (sometimes more than the load journal holds), weights replaced as by a config."""
    import random as _random

    from distserve.router import load as load_module
    rng = _random.Random(seed)
    load = LoadTracker()
    _churn(rng, load, POOL, 2000)
    sets = [sorted(rng.sample(POOL, rng.choice([2, 5, 31, 32, 33, 80, 200]))) for _ in range(6)]
    weights = _random_weights(rng, POOL)
    for i in range(picks):
        candidates = list(rng.choice(sets))
        if rng.random() < 0.1:  # a retry: one candidate tried already
            candidates.pop(rng.randrange(len(candidates)))
        if rng.random() < 0.02:
            weights = _random_weights(rng, POOL)  # a new routing config
        elif rng.random() < 0.05:
            weights = dict(weights)  # the same values in a new dict
        if rng.random() < 0.01:
            _churn(rng, load, POOL, load_module.JOURNAL + 10)  # past what the journal holds
        else:
            _churn(rng, load, candidates if rng.random() < 0.5 else POOL, rng.choice([0, 1, 3, 20, 300]))
        yield i, candidates, PickContext(load=load, weights=weights, prefix=lambda n, i=i: f"prompt {i % 23}".encode()[:n])


@pytest.mark.parametrize("seed", range(4))
def test_min_expected_latency_index_picks_what_a_scan_picks(seed):
    s = make_strategy("min_expected_latency")
    for _, candidates, c in _scenario(seed):
        assert s.pick(candidates, c) in _ref_min_latency(candidates, c)


@pytest.mark.parametrize("seed", range(4))
def test_prefix_affinity_index_picks_what_a_scan_picks(seed):
    s = make_strategy("prefix_affinity", {"vnodes": 16})  # fewer points than the default: rings build faster
    for _, candidates, c in _scenario(seed):
        assert s.pick(candidates, c) == _ref_prefix_affinity(candidates, c, vnodes=16)


def test_prefix_affinity_index_follows_params():
    params = {"vnodes": 5, "load_factor": 1.0, "prefix_chars": 3}
    s = make_strategy("prefix_affinity", params)
    for _, candidates, c in _scenario(11, picks=200):
        assert s.pick(candidates, c) == _ref_prefix_affinity(candidates, c, **params)


@pytest.mark.parametrize("seed", range(2))
def test_weighted_random_draws_what_random_choices_draws(seed):
    """The same random state gives the same engine as random.choices over the weights (the scan)."""
    import random as _random

    from distserve.router.strategies import _weight
    s = make_strategy("random")
    for i, candidates, c in _scenario(seed, picks=300):
        _random.seed(i)
        expected = (_random.choices(candidates, weights=[_weight(c, e) for e in candidates])[0] if c.weights
                    else _random.choice(candidates))
        _random.seed(i)
        assert s.pick(candidates, c) == expected


def test_min_expected_latency_index_spreads_ties_over_all_of_them():
    """Ties still go at random among every engine of the lowest score (not the first found)."""
    load = LoadTracker()
    for e in POOL[:100]:
        load.on_load(e, LoadRecord(engine_id=e, running=3))
    tied = POOL[10:15]
    for e in tied:
        load.on_load(e, LoadRecord(engine_id=e, running=1))
    s = make_strategy("min_expected_latency")
    picks = Counter(s.pick(POOL[:100], ctx(load)) for _ in range(500))
    assert set(picks) == set(tied) and min(picks.values()) > 50
    load.begin(tied[0])  # no longer among the lowest
    assert tied[0] not in {s.pick(POOL[:100], ctx(load)) for _ in range(200)}


class CountingLoad(LoadTracker):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def unfinished(self, engine_id):
        self.reads += 1
        return super().unfinished(engine_id)


@pytest.mark.parametrize("name", ["min_expected_latency", "prefix_affinity"])
def test_a_pick_reads_only_the_loads_that_changed(name):
    """The cost of a pick follows the load changes since the previous one, not the candidate count: over 200
    candidates, a pick after one request started reads one engine's load (a scan read all 200)."""
    load = CountingLoad()
    for e in POOL[:200]:
        load.on_load(e, LoadRecord(engine_id=e, running=int(e[1:]) % 7))
    s = make_strategy(name)
    c = ctx(load, prefix=b"a prompt")
    s.pick(POOL[:200], c)  # builds the index
    for _ in range(50):
        load.reads = 0
        load.begin(s.pick(list(POOL[:200]), c))
        assert load.reads <= 1


def test_per_set_caches_are_bounded(monkeypatch):
    """Candidate sets come and go with the topology: the caches keep a bounded number of sets and points
    (small bounds here, so that few sets overflow them)."""
    import random as _random

    from distserve.router import strategies as S
    for name, value in (("_INDEX_CACHE_ENTRIES", 8), ("_INDEX_CACHE_MEMBERS", 1000), ("_RING_CACHE_ENTRIES", 8),
                        ("_RING_CACHE_POINTS", 4000)):
        monkeypatch.setattr(S, name, value)
    rng = _random.Random(5)
    mel, rnd = make_strategy("min_expected_latency"), make_strategy("random")
    affinity = make_strategy("prefix_affinity", {"vnodes": 8})
    weights = {e: 2.0 for e in POOL[::3]}
    for _ in range(60):
        candidates = sorted(rng.sample(POOL, rng.randint(40, 240)))
        c = PickContext(load=LoadTracker(), weights=weights, prefix=lambda n: b"x")
        for s in (mel, affinity, rnd):
            assert s.pick(candidates, c) in candidates
    for s in (mel, rnd):
        assert len(s._sets) <= S._INDEX_CACHE_ENTRIES and s._sets.size <= S._INDEX_CACHE_MEMBERS
    assert len(affinity._sets) <= S._RING_CACHE_ENTRIES and affinity._sets.size <= S._RING_CACHE_POINTS
    assert len(affinity._sets) < 60  # evicted, not kept


def test_min_expected_latency_index_over_a_long_run():
    """Thousands of picks on one set with uneven weights (scores that are never the same twice): the index
    still picks what a scan picks, and its heap of scores stays bounded."""
    import random as _random
    rng = _random.Random(3)
    candidates = POOL[:40]
    weights = {e: rng.uniform(0.5, 3.0) for e in candidates}
    load = LoadTracker()
    s = make_strategy("min_expected_latency")
    inflight = []
    for _ in range(3000):
        c = PickContext(load=load, weights=weights)
        pick = s.pick(candidates, c)
        assert pick in _ref_min_latency(candidates, c)
        load.begin(pick)
        inflight.append(pick)
        if len(inflight) > 200 and rng.random() < 0.9:
            load.end(inflight.pop(rng.randrange(len(inflight))))
        if rng.random() < 0.3:  # an agent's record: any value, so old scores are left behind empty
            e = rng.choice(candidates)
            load.on_load(e, LoadRecord(engine_id=e, running=rng.randint(0, 100)))
    index = next(iter(s._sets._states.values()))
    assert len(index.heap) <= 2 * len(candidates) + 17


# ------------------------------------------- kv_aware at scale (issue 22): a shortlist above SCAN_LIMIT
def _stream_record(engine_id, chunk=64):
    from types import SimpleNamespace
    return SimpleNamespace(url=f"http://127.0.0.1:1/{engine_id}", instance=f"i-{engine_id}",
                           cache_events={"path": "/distserve/cache/events", "version": 1, "chunk_bytes": chunk})


def _msg(**fields) -> bytes:
    import orjson
    return orjson.dumps(fields)


def fed_index(maps, roots=None, order=None, chunks=None, pending=(), sync_timeout=10.0):
    """A real KvIndex holding `maps` (engine -> {key: tokens}) as the engines' snapshots put them, and `roots`
    (engine -> root keys); engines followed in `order` (the holders' dicts then differ in order), with chunk
    size `chunks[e]` (default 64); the `pending` engines followed with no snapshot yet."""
    import asyncio

    from distserve.cluster.prefix_keys import key_hex
    from distserve.router.kv_index import KvIndex

    index = KvIndex(DetachedCache(), sync_timeout=sync_timeout)

    async def follow():
        for e in [*(order or maps), *pending]:
            index._follow(e, _stream_record(e, (chunks or {}).get(e, 64)))
            index.engines[e].task.cancel()  # nothing to connect to: fed below

    asyncio.run(follow())
    for e in order or maps:
        index.apply(index.engines[e], _msg(type="snapshot", seq=0, incarnation=f"i-{e}",
                                           keys=[[key_hex(k), t] for k, t in maps[e].items()],
                                           roots=[key_hex(k) for k in (roots or {}).get(e, ())]))
    return index


def _ref_kv_pick(params, candidates, ctx, tie="subset_ring", shortlist=None):
    """kv_aware as it was before issue 22's shortlist (every candidate scanned; ties by a ring built on the tied
    subset), or with ties by the first tied engine clockwise on the whole set's ring (tie="set_ring") from the
    prompt prefix's hash; with a `shortlist`, only those engines are scored, while the blind engines, the
    bounded-load mean and the ring are still the whole set's, and ties go to the first clockwise from where the
    sample starts, the request's deepest key (kv_aware above SCAN_LIMIT)."""

    from distserve.router.strategies import _KvSet, _hash64, _weight
    s = make_strategy("kv_aware", params)
    index, keys_of = ctx.kv, ctx.keys
    costs, loads, matches, blind, best = {}, {}, {}, [], 0
    for c in candidates:
        if not index.has_stream(c):
            if not index.pending(c):
                blind.append(c)
                continue
            matched = 0
        else:
            matched = index.matched_tokens(c, keys_of(index.chunk_bytes(c))) or 0
            if matched < s._min_match:
                matched = 0
        if shortlist is not None and c not in shortlist:
            continue
        matches[c] = matched
        best = max(best, matched)
        load = loads[c] = ctx.load.unfinished(c) / (_weight(ctx, c) if ctx.weights else 1.0)
        costs[c] = s._load_weight * load - s._cache_weight * matched
    if not costs:
        return s._affinity.pick(candidates if shortlist is None else blind, ctx)
    low = min(costs.values())
    if blind:
        hashed = s._affinity.pick(blind, ctx)
        load = ctx.load.unfinished(hashed) / (_weight(ctx, hashed) if ctx.weights else 1.0)
        if s._load_weight * load - s._cache_weight * best < low:
            return hashed
    # the tie set is computed as it always was (shared code): what changed is the shortlist and the tie-break
    mean_of = (sum(loads.values()), len(loads)) if shortlist is None else (
        sum(ctx.load.unfinished(c) / (_weight(ctx, c) if ctx.weights else 1.0) for c in candidates), len(candidates))
    tied = s._tied(index, costs, loads, best, low, mean_of)
    if len(tied) == 1:
        return tied[0]
    if tie == "subset_ring":
        return s._affinity.pick(tied, ctx)
    ring = _KvSet(list(candidates), ctx, s._affinity._rings)
    start = _hash64(ctx.prefix(s._prefix_chars) if ctx.prefix else b"") if shortlist is None else _sample_start(s, ctx)
    return ring.first_clockwise(tied, start)


def _ring_counts(candidates, ctx, vnodes):
    """Each engine's points: vnodes x its weight; above the cap every share scaled alike and rounded down, and
    the points left go one each to the members first by the hash of "<id>#spare" (then by id)."""
    from distserve.router.strategies import MAX_RING_POINTS, _hash64, _weight
    counts = {c: max(1, round(vnodes * _weight(ctx, c))) for c in candidates}
    total = sum(counts.values())
    if total > MAX_RING_POINTS:
        counts = {c: max(1, int(n * MAX_RING_POINTS / total)) for c, n in counts.items()}
        spare = MAX_RING_POINTS - sum(counts.values())
        for c in sorted(candidates, key=lambda c: (_hash64(f"{c}#spare".encode()), c))[:max(0, spare)]:
            counts[c] += 1
    return counts


def _ring_from_scratch(candidates, ctx, vnodes):
    """prefix_affinity's ring as it was built before it was derived: every point hashed, all sorted."""
    from distserve.router.strategies import _hash64
    counts = _ring_counts(candidates, ctx, vnodes)
    points = sorted((_hash64(f"{c}#{i}".encode()), c) for c in candidates for i in range(counts[c]))
    return array("Q", [p[0] for p in points]), [p[1] for p in points]  # the hashes as the ring keeps them


def test_rings_derived_from_the_last_one_equal_rings_built_from_scratch():
    """A candidate set's ring is derived from the last ring built when few points differ (an engine joins or
    leaves, a weight changes), else merged from the kept points: either way the very lists a build from scratch
    gives, above and below the point cap, and kv_aware's per-owner points are each owner's points on it."""
    import random as _random

    from distserve.router.strategies import _KvSet
    rng = _random.Random(22)
    for vnodes, size in ((64, 300), (8, 40)):  # 300 x 64 points are scaled down to the cap; 40 x 8 are not
        s = make_strategy("prefix_affinity", {"vnodes": vnodes})
        pool = [f"p{i:04d}" for i in range(size + 40)]
        members = sorted(rng.sample(pool, size))
        weights: dict = {}
        for step in range(100 if SLOW else 40):  # the long form (DISTSERVE_SLOW=1) walks 100 steps
            op = rng.random()
            if op < 0.2 and len(members) > 2:
                members.remove(rng.choice(members))
            elif op < 0.4 and len(members) < len(pool):  # one leaves, another joins: one derivation does both
                members.remove(rng.choice(members))
                members = sorted(set(members) | {rng.choice([p for p in pool if p not in members])})
            elif op < 0.6:
                members = sorted(set(members) | {rng.choice(pool)})
            elif op < 0.8:
                weights = {**weights, rng.choice(members): rng.choice((0.5, 1.0, 2.0, 3.0))}
            else:
                members = sorted(rng.sample(pool, rng.randint(2, len(pool))))  # a wholly different set
            ctx = PickContext(load=LoadTracker(), weights=dict(weights))
            assert s.ring_points(members, ctx) == _ring_from_scratch(members, ctx, vnodes), step
            kv = _KvSet(list(members), ctx, s._rings)
            for c in members:
                assert kv.owner_points(c) == [h for h, o in zip(kv.hashes, kv.owners) if o == c], (step, c)


def test_rings_above_the_cap_move_about_two_shares_per_join_or_leave(monkeypatch):
    """Above the 16,384-point cap each engine has its scaled share rounded down or up (the cap exactly): a fleet
    growing and shrinking one engine at a time through 303 / 304 and 309 / 310 members (where int(16384 / n)
    steps, and rounding every share down moved a point of every engine) moves about two shares' worth of points
    per change (the newcomer's or the leaver's, and the spare points passing along the line), each ring derived
    from the last and equal to a build from scratch, with kv_aware's per-owner points; with weights too."""
    import math
    import random as _random

    from distserve.router import strategies as strategies_module
    from distserve.router.strategies import MAX_RING_POINTS, _KvSet
    derived = []
    derive = strategies_module._Rings._derive

    def counted(self, counts):
        out = derive(self, counts)
        derived.append(out is not None)
        return out

    monkeypatch.setattr(strategies_module._Rings, "_derive", counted)
    rng = _random.Random(7)
    s = make_strategy("prefix_affinity", {"vnodes": 64})
    pool = [f"p{i:04d}" for i in range(330)]
    members = pool[:300]
    ctx = PickContext(load=LoadTracker())
    ring = s.ring_points(members, ctx)
    sizes = list(range(301, 312)) + list(range(310, 299, -1))
    for step, n in enumerate(sizes):
        if n > len(members):
            members = sorted(members + [rng.choice([p for p in pool if p not in members])])
        else:
            members.remove(rng.choice(members))
        before, ring = ring, s.ring_points(members, ctx)
        assert ring == _ring_from_scratch(members, ctx, 64), step
        assert len(ring[0]) == MAX_RING_POINTS
        assert all(c in (math.floor(MAX_RING_POINTS / n), math.ceil(MAX_RING_POINTS / n))
                   for c in s._rings._last[0].values())
        moved = len(set(zip(*before)) ^ set(zip(*ring)))
        assert moved <= 2 * math.ceil(MAX_RING_POINTS / n) + 2, (step, n, moved)
        kv = _KvSet(list(members), ctx, s._rings)
        for c in rng.sample(members, 10):
            assert kv.owner_points(c) == [h for h, o in zip(kv.hashes, kv.owners) if o == c], (step, c)
    assert all(derived[1:]), derived  # every change after the first build went the derived way
    weights: dict = {}
    for step in range(30):  # weights: still each share rounded down or up, the same as a build from scratch
        if rng.random() < 0.4:
            weights = {**weights, rng.choice(members): rng.choice((0.5, 2.0, 3.0))}
        elif rng.random() < 0.5:
            members = sorted(members + [rng.choice([p for p in pool if p not in members])])
        else:
            members.remove(rng.choice(members))
        wctx = PickContext(load=LoadTracker(), weights=dict(weights))
        assert s.ring_points(members, wctx) == _ring_from_scratch(members, wctx, 64), step
        total = sum(max(1, round(64 * weights.get(c, 1.0))) for c in members)
        for c, count in s._rings._last[0].items():
            share = max(1, round(64 * weights.get(c, 1.0))) * MAX_RING_POINTS / total
            assert math.floor(share) <= count <= math.floor(share) + 1, (step, c, count, share)


def _member_walk(rng, pool: list[str], members: list[str], steps: int, leave: float, join: int):
    """A candidate set changing one step at a time: a member leaves (share `leave`), or `join` engines of the
    pool (members or not) are added."""
    members = list(members)
    for _ in range(steps):
        if rng.random() < leave and len(members) > 2:
            members.remove(rng.choice(members))
        else:
            members = sorted(set(members) | set(rng.sample(pool, join)))
        yield members


def test_rings_derived_past_the_bound_on_kept_engines_equal_rings_built_from_scratch(monkeypatch):
    """The kept points are dropped wholesale past _KEPT_ENGINES engines (here 12), even in the middle of a
    derivation: the ring is still right (the points are hashed again), never a KeyError in a pick; above the cap
    the same, and the line the spare points follow is bounded alike and stays in hash order."""
    import random as _random

    from distserve.router import strategies as strategies_module
    monkeypatch.setattr(strategies_module, "_KEPT_ENGINES", 12)
    s = make_strategy("prefix_affinity", {"vnodes": 8})
    pool = [f"p{i:03d}" for i in range(40)]
    for step, members in enumerate(_member_walk(_random.Random(3), pool, pool[:20], 80, leave=0.4, join=2)):
        ctx = PickContext(load=LoadTracker())
        assert s.ring_points(members, ctx) == _ring_from_scratch(members, ctx, 8), step
    # above the cap (here 100 points), the line the spare points follow is bounded the same way
    monkeypatch.setattr(strategies_module, "MAX_RING_POINTS", 100)
    s = make_strategy("prefix_affinity", {"vnodes": 8})
    for step, members in enumerate(_member_walk(_random.Random(4), pool, pool[:20], 80, leave=0.4, join=2)):
        weights = {members[0]: 2.0} if step % 3 == 0 else {}
        ctx = PickContext(load=LoadTracker(), weights=weights)
        assert s.ring_points(members, ctx) == _ring_from_scratch(members, ctx, 8), step
        if 8 * len(members) > 100:
            assert sum(s._rings._last[0].values()) == 100, step
    rings = strategies_module._Rings(8)  # sets of 10 engines coming and going: the line holds at most 12
    for k in range(10):
        members = dict.fromkeys(f"q{k}-{i}" for i in range(10))
        line = rings._line(members)
        assert set(members) <= set(line) and len(line) <= 12, k
        assert line == sorted(line, key=lambda c: (strategies_module._hash64(f"{c}#spare".encode()), c))


def test_rings_with_equal_point_hashes_equal_rings_built_from_scratch(monkeypatch):
    """Points of different engines with equal hashes (with 64-bit hashes never seen; forced here with 10-bit
    ones) are ordered by owner on the ring, derived or built, joins, leaves and point-count steps alike."""
    import hashlib
    import random as _random

    from distserve.router import strategies as strategies_module
    monkeypatch.setattr(strategies_module, "_hash64",
                        lambda data: hashlib.blake2b(data, digest_size=8).digest()[0] << 2)
    s = make_strategy("prefix_affinity", {"vnodes": 8})
    pool = [f"p{i:03d}" for i in range(60)]
    for step, members in enumerate(_member_walk(_random.Random(5), pool, pool[:40], 60, leave=0.5, join=1)):
        ctx = PickContext(load=LoadTracker())
        hashes, owners = s.ring_points(members, ctx)
        assert len(set(hashes)) < len(hashes), step  # collisions present
        assert (hashes, owners) == _ring_from_scratch(members, ctx, 8), step


def test_a_ring_drops_both_points_of_an_engine_that_repeats_a_hash(monkeypatch):
    """An engine whose two points share a hash no other engine has (forced) leaves, joins back: each derived
    ring equals a build from scratch (one bisection finds both points at one position: derived, one of them
    stayed on the ring)."""
    import hashlib

    from distserve.router import strategies as strategies_module

    def hash64(data: bytes) -> int:
        if data in (b"p007#0", b"p007#1"):
            return 1 << 40
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

    monkeypatch.setattr(strategies_module, "_hash64", hash64)
    s = make_strategy("prefix_affinity", {"vnodes": 8})
    pool = [f"p{i:03d}" for i in range(20)]
    without = [p for p in pool if p != "p007"]
    ctx = PickContext(load=LoadTracker())
    for members in (pool, without, pool, without):
        assert s.ring_points(members, ctx) == _ring_from_scratch(members, ctx, 8)


def _kv_world(rng, n, holders_of_deep=3, hot=None):
    """n engines; 40 conversations (chat bodies), each cached on a few engines to some depth, plus a system
    prompt cached on `hot` engines (None: a random share)."""
    from distserve.cluster.prefix_keys import request_keys
    engines = [f"e{i:04d}" for i in range(n)]
    maps = {e: {} for e in engines}
    roots = {e: set() for e in engines}
    system = {"role": "system", "content": "you are a helpful assistant " * 20}
    bodies = []
    for conv in range(40):
        msgs = [system]
        for turn in range(rng.randint(1, 5)):
            msgs += [{"role": "user", "content": f"conv {conv} q{turn}"},
                     {"role": "assistant", "content": f"a{turn}"}]
        body = {"messages": msgs + [{"role": "user", "content": f"conv {conv} next"}]}
        bodies.append(body)
        keys = request_keys(body)
        for e in rng.sample(engines, rng.randint(0, holders_of_deep)):
            depth = rng.randint(1, len(keys) - 1)
            for d in range(depth):
                maps[e][keys[d]] = 1000 + 40 * d
            roots[e].add(keys[0])
    system_key = request_keys(bodies[0])[0]
    for e in rng.sample(engines, hot if hot is not None else rng.randint(0, n)):
        maps[e][system_key] = 1000
        roots[e].add(system_key)
    bodies.append({"messages": [{"role": "system", "content": "a new prompt " * 30},
                                {"role": "user", "content": "hi"}]})  # held by nobody
    return engines, maps, roots, bodies


def _kctx(index, body, load, weights=None):
    from distserve.cluster.prefix_keys import request_keys
    return PickContext(load=load, weights=weights or {}, prefix=lambda n: str(body)[:n].encode(), kv=index,
                       keys=lambda chunk: request_keys(body, chunk))


def _loads(rng, engines, top=6):
    load = LoadTracker()
    for e in engines:
        load.on_load(e, LoadRecord(engine_id=e, running=rng.randint(0, top)))
    return load


@pytest.mark.parametrize("seed", range(4))
def test_kv_aware_up_to_scan_limit_picks_what_it_picked_before(seed):
    """Up to SCAN_LIMIT candidates every candidate is scored as before; ties now go to the first tied engine
    clockwise on the whole set's ring, which is the engine the per-tied-subset ring chose whenever weights are
    equal (the tied engines' loads are then equal and the subset ring's load cap skips none)."""
    import random as _random

    from distserve.router.strategies import SCAN_LIMIT
    rng = _random.Random(seed)
    engines, maps, roots, bodies = _kv_world(rng, SCAN_LIMIT, holders_of_deep=2)
    index = fed_index(maps, roots)
    for params in ({}, {"cache_weight": 3.0}, {"min_match_tokens": 1100}, {"load_weight": 0.0}):
        s = make_strategy("kv_aware", params)
        for _ in range(60):
            candidates = sorted(rng.sample(engines, rng.randint(2, SCAN_LIMIT)))
            load = _loads(rng, engines, top=rng.choice((0, 1, 6)))
            body = rng.choice(bodies)
            weights = {} if rng.random() < 0.6 else {e: rng.choice((1.0, 2.0)) for e in engines}

            got = s.pick(candidates, _kctx(index, body, load, weights))
            assert got == _ref_kv_pick(params, candidates, _kctx(index, body, load, weights), tie="set_ring")
            if not weights:
                assert got == _ref_kv_pick(params, candidates, _kctx(index, body, load))


def _cost(params, ctx, c, matched):
    return (params.get("load_weight", 1.0) * ctx.load.unfinished(c)
            - params.get("cache_weight", 1.0) * matched / 1024.0)


@pytest.mark.parametrize("seed", range(3))
def test_kv_aware_above_scan_limit_finds_the_engine_holding_the_prefix(seed):
    """500 candidates: the pick is the scan's best whenever an engine holding the request's prefix (a key
    cached on at most HOLDERS_LIMIT engines) has a cost advantage over every engine holding nothing; and it is
    always an engine of the candidate list."""
    import random as _random

    from distserve.cluster.prefix_keys import request_keys
    rng = _random.Random(100 + seed)
    engines, maps, roots, bodies = _kv_world(rng, 500, holders_of_deep=4, hot=rng.choice((0, 10, 400)))
    index = fed_index(maps, roots)
    s = make_strategy("kv_aware")
    advantaged = 0
    sets = [engines] + [sorted(rng.sample(engines, rng.randint(300, 499))) for _ in range(3)]
    for _ in range(200):
        candidates = list(rng.choice(sets))
        load = _loads(rng, engines)
        body = rng.choice(bodies)
        c = _kctx(index, body, load)
        got = s.pick(candidates, c)
        assert got in candidates
        keys = request_keys(body)
        matched = {e: index.matched_tokens(e, keys) for e in candidates}
        # keys held by few engines: those the shortlist takes whole
        distinct = {e for e in candidates
                    if any(e in index._holders.get(k, ()) and len(index._holders[k]) <= 32 for k in keys)}
        if not distinct:
            continue
        best_held = min(_cost({}, c, e, matched[e]) for e in distinct)
        best_empty = min((_cost({}, c, e, 0) for e in candidates if not matched[e]), default=float("inf"))
        if best_held < best_empty and best_held < min(_cost({}, c, e, matched[e]) for e in candidates
                                                      if e not in distinct):
            advantaged += 1
            assert matched[got] > 0 and _cost({}, c, got, matched[got]) == best_held
    assert advantaged > 20


def _admit(index, engine_id, root):
    from distserve.cluster.prefix_keys import key_hex
    state = index.engines[engine_id]
    index.apply(state, _msg(type="stored", seq=state.seq + 1, incarnation=state.incarnation, keys=[],
                            pending=[key_hex(root)]))


def test_kv_aware_above_scan_limit_spreads_new_prefixes():
    """2,000 new families over 500 idle prefills, each admitted where it was placed (its root announced as
    pending, one request in flight): the sample of 8 by the request's own key and the family-count tie rule
    keep the busiest prefill within a small factor of the mean."""
    from distserve.cluster.prefix_keys import request_keys
    engines = [f"e{i:04d}" for i in range(500)]
    index = fed_index({e: {} for e in engines})
    load = LoadTracker()
    s = make_strategy("kv_aware")
    counts = Counter()
    for f in range(2000):
        body = {"messages": [{"role": "system", "content": f"family {f} " * 20}, {"role": "user", "content": "hi"}]}
        keys = request_keys(body)
        got = s.pick(list(engines), PickContext(load=load, prefix=lambda n, b=body: str(b)[:n].encode(), kv=index,
                                                keys=lambda chunk, b=body: request_keys(b, chunk)))
        counts[got] += 1
        load.begin(got)
        _admit(index, got, keys[0])
    mean = 2000 / 500
    assert max(counts.values()) / mean <= 1.5, counts.most_common(3)
    assert len(counts) >= 450


def test_kv_aware_replicas_agree_above_scan_limit():
    """Two strategy instances over two indexes fed the same engine states in another order (their holders'
    dicts iterate differently) pick the same engine for every request: replicas agree without sharing."""
    import random as _random

    rng = _random.Random(7)
    engines, maps, roots, bodies = _kv_world(rng, 300, holders_of_deep=6, hot=60)
    a = fed_index(maps, roots)
    b = fed_index(maps, roots, order=list(reversed(engines)))
    sa, sb = make_strategy("kv_aware"), make_strategy("kv_aware")
    sets = [engines] + [sorted(rng.sample(engines, rng.randint(100, 299))) for _ in range(3)]
    for _ in range(300):
        candidates = list(rng.choice(sets))
        load = _loads(rng, engines, top=rng.choice((0, 2, 6)))
        body = rng.choice(bodies)

        assert sa.pick(candidates, _kctx(a, body, load)) == sb.pick(list(candidates), _kctx(b, body, load))


def test_kv_aware_above_scan_limit_places_blind_engines_by_hash():
    """A mixed fleet of 100: 60 engines without a stream are placed by prefix_affinity's hash among all of
    them, as below the limit; none streaming at all is exactly prefix_affinity."""
    engines = [f"e{i:04d}" for i in range(100)]
    index = fed_index({e: {} for e in engines[:40]})
    load = LoadTracker()
    for e in engines[:40]:
        load.on_load(e, LoadRecord(engine_id=e, running=3))
    affinity = make_strategy("prefix_affinity")
    s = make_strategy("kv_aware")
    for f in range(30):
        body = {"prompt": f"prompt {f} " * 30}
        c = _kctx(index, body, load)
        assert s.pick(engines, c) == affinity.pick(engines[40:], c)
        none = fed_index({})
        c.kv = none
        assert s.pick(engines, c) == affinity.pick(engines, c)


def _shortlist(s, candidates, ctx):
    """kv_aware's shortlist above SCAN_LIMIT from its definition: every candidate holding a key of the request
    that at most HOLDERS_LIMIT engines hold, plus the first SAMPLE engines clockwise on the set's ring from the
    request's deepest key (of the smallest chunk size)."""
    from distserve.router.strategies import HOLDERS_LIMIT, SAMPLE
    index, short = ctx.kv, set()
    for chunk in index.chunk_sizes():
        for k in ctx.keys(chunk):
            holders = index._holders.get(k, {})
            if len(holders) <= HOLDERS_LIMIT:
                short.update(e for e in holders if e in candidates)
    return short | set(s._affinity.ring_order(candidates, ctx, SAMPLE, start=_sample_start(s, ctx)))


def _sample_start(s, ctx):
    """Where kv_aware's sample (and its tie-break) starts above SCAN_LIMIT: the request's deepest key of the
    smallest chunk size that gives keys, else the prompt prefix's hash."""
    from distserve.router.strategies import _hash64
    for chunk in ctx.kv.chunk_sizes():
        keys = ctx.keys(chunk)
        if keys:
            return keys[-1]
    return _hash64(ctx.prefix(s._prefix_chars))


@pytest.mark.parametrize("seed", range(3))
def test_kv_aware_above_scan_limit_is_the_rule_over_its_shortlist(seed):
    """Above SCAN_LIMIT every pick is the scan's rule applied to the shortlist as defined (matched tokens
    recomputed from each engine's own key map, ties to the least cached, then the first clockwise on the whole
    set's ring), whatever the fast path does: weights, min_match_tokens, load_weight 0, engines without a
    stream (placed by hash) or awaiting their snapshot, two chunk sizes, idle fleets full of ties."""
    import random as _random

    from distserve.cluster.prefix_keys import request_keys
    rng = _random.Random(300 + seed)
    engines, maps, roots, bodies = _kv_world(rng, 120, holders_of_deep=rng.choice((3, 40)),
                                             hot=rng.choice((0, 20, 60)))
    streaming, pending = engines[:100], engines[100:105]  # the last 15 have no stream at all
    chunks = {}
    if seed == 2:  # a quarter of the fleet on another engine build: 128-byte chunks, their own keys
        for e in streaming[::4]:
            chunks[e] = 128
            maps[e] = {k: 900 + 50 * d for body in rng.sample(bodies, 6)
                       for d, k in enumerate(request_keys(body, 128)[: rng.randint(1, 4)])}
    index = fed_index({e: maps[e] for e in streaming}, roots, chunks=chunks, pending=pending)
    sets = [engines, sorted(rng.sample(engines, 60))]
    picked = Counter()
    for params in ({}, {"cache_weight": 3.0}, {"min_match_tokens": 1100}, {"load_weight": 0.0}):
        s = make_strategy("kv_aware", params)
        for _ in range(50):
            candidates = list(rng.choice(sets))
            load = _loads(rng, engines, top=rng.choice((0, 1, 6)))
            body = rng.choice(bodies)
            weights = {} if rng.random() < 0.6 else {e: rng.choice((0.5, 1.0, 2.0)) for e in engines}

            got = s.pick(candidates, _kctx(index, body, load, weights))
            c = _kctx(index, body, load, weights)
            assert got == _ref_kv_pick(params, candidates, c, tie="set_ring", shortlist=_shortlist(s, candidates, c))
            picked[got in streaming] += 1
    assert picked[True] > 100 and picked[False] > 0  # both kinds were picked, not only the hash's


def test_kv_aware_above_scan_limit_credits_each_engine_at_its_deepest_level():
    """Above SCAN_LIMIT an engine's match is its longest cached prefix of the request, whether it holds a key few
    engines hold (two holders of one conversation, one cached deeper: the deeper wins) or only keys most
    engines hold (a sampled engine holding two of them is credited with the deeper, and wins over those
    holding the shallower only, which cache fewer keys and would win a tie)."""
    import random as _random

    from distserve.cluster.prefix_keys import request_keys
    rng = _random.Random(5)
    engines = [f"e{i:04d}" for i in range(40)]
    for f in range(5):
        body = {"messages": [{"role": "system", "content": f"family {f} " * 40},
                             *({"role": "user", "content": f"q{t}"} for t in range(5))]}
        keys = request_keys(body)
        assert len(keys) >= 4
        shallow, deep = rng.sample(engines, 2)
        maps = {e: {} for e in engines}
        maps[shallow] = {k: 1000 * (d + 1) for d, k in enumerate(keys[:2])}
        maps[deep] = {k: 1000 * (d + 1) for d, k in enumerate(keys[:4])}
        c = PickContext(load=LoadTracker(), prefix=lambda n, b=body: str(b)[:n].encode(), kv=fed_index(maps),
                        keys=lambda chunk, k=keys: k)
        assert make_strategy("kv_aware").pick(list(engines), c) == deep
        # every engine holds the first key, all but 7 the second: both levels are common ones
        maps = {e: {keys[0]: 1000} for e in engines}
        for e in rng.sample(engines, 33):
            maps[e][keys[1]] = 8000
        c.kv = index = fed_index(maps)
        got = make_strategy("kv_aware").pick(list(engines), c)
        assert index.matched_tokens(got, keys) == 8000


def test_kv_aware_above_scan_limit_follows_the_candidate_set_and_weights():
    """kv_aware keeps the last candidate set's state: another list (an engine gone), other weights or an engine
    followed since are never picked against the old one. The engine holding the request's prefix wins until it
    leaves the candidates, or its weight makes its one request cost more than the cache saves."""
    engines = [f"e{i:04d}" for i in range(60)]
    keys = _chain()
    holder = engines[7]
    index = fed_index({e: ({k: 4096 * (d + 1) for d, k in enumerate(keys)} if e == holder else {})
                       for e in engines})
    load = LoadTracker()
    load.begin(holder)
    s = make_strategy("kv_aware")
    c = PickContext(load=load, prefix=lambda n: b"convo", kv=index, keys=lambda chunk: keys)
    assert s.pick(list(engines), c) == holder
    without = [e for e in engines if e != holder]
    got = s.pick(without, c)
    assert got != holder and got in without
    assert s.pick(list(engines), c) == holder
    slow = PickContext(load=load, weights={holder: 0.0001}, prefix=lambda n: b"convo", kv=index,
                       keys=lambda chunk: keys)
    assert s.pick(list(engines), slow) != holder
    # the index starts following an engine that is no candidate (another model's, say), holding the prefix
    # deeper still and idle: it is never picked, though every engine followed so far was a candidate
    import asyncio

    from distserve.cluster.prefix_keys import key_hex

    async def follow():
        index._follow("x9999", _stream_record("x9999"))
        index.engines["x9999"].task.cancel()

    asyncio.run(follow())
    index.apply(index.engines["x9999"], _msg(type="snapshot", seq=0, incarnation="i-x9999",
                                             keys=[[key_hex(k), 9999 * (d + 1)] for d, k in enumerate(keys)]))
    assert s.pick(list(engines), c) == holder


def test_kv_aware_above_scan_limit_gives_up_on_a_snapshot_that_never_comes():
    """An engine followed without a snapshot scores as caching nothing while sync_timeout runs (a new process),
    then as an engine without a stream (placed by hash, credited with the longest match anyone holds): the pick
    moves to it once the wait is over, though nothing else changed since the previous pick."""
    import time as _time
    engines = [f"e{i:04d}" for i in range(40)]
    keys = _chain()
    holder, waiting = engines[3], engines[39]
    index = fed_index({e: ({k: 1000 * (d + 1) for d, k in enumerate(keys)} if e == holder else {})
                       for e in engines[:39]}, pending=[waiting], sync_timeout=0.2)
    load = _loads(__import__("random").Random(1), engines, top=0)
    for e in engines[:39]:
        load.on_load(e, LoadRecord(engine_id=e, running=2))
    s = make_strategy("kv_aware")
    c = PickContext(load=load, prefix=lambda n: b"convo", kv=index, keys=lambda chunk: keys)
    assert s.pick(list(engines), c) == holder  # 2 - 3.9 beats the waiting engine's 0 - 0
    _time.sleep(0.3)
    assert s.pick(list(engines), c) == waiting  # by hash now: 0 - 3.9


def test_prefix_affinity_ring_order_is_the_ring_walk():
    """ring_order: the first k distinct engines clockwise from the prefix; the first is prefix_affinity's pick
    while nobody is over the load cap, and every replica computes the same order."""
    load = LoadTracker()
    c = ctx(load, prefix=b"some prompt")
    pool = POOL[:300]
    order = make_strategy("prefix_affinity").ring_order(pool, c, 16)
    assert len(order) == len(set(order)) == 16 and set(order) <= set(pool)
    assert order[0] == make_strategy("prefix_affinity").pick(pool, c)
    assert make_strategy("prefix_affinity").ring_order(list(pool), c, 16) == order
    assert make_strategy("prefix_affinity").ring_order(pool[:5], c, 16) == \
        make_strategy("prefix_affinity").ring_order(pool[:5], c, 5)


def test_ring_walk_from_a_known_position_equals_the_walk_from_the_hash():
    """kv_aware hands _ring_walk the position it bisected already: the same first k distinct owners clockwise,
    wrapping past the ring's end, as a walk that bisects itself (and as a plain walk over the ring)."""
    import random as _random
    from bisect import bisect_right

    from distserve.router.strategies import _ring_walk
    rng = _random.Random(9)
    owners_pool = [f"e{i}" for i in range(12)]
    for _ in range(300):
        hashes = sorted(rng.sample(range(1 << 16), rng.randint(1, 60)))
        owners = [rng.choice(owners_pool) for _ in hashes]
        start = rng.randrange(1 << 16)
        k = rng.randint(1, len(set(owners)))
        i = bisect_right(hashes, start)
        expect = list(dict.fromkeys(owners[i:] + owners[:i]))[:k]
        assert _ring_walk(hashes, owners, start, k) == expect
        assert _ring_walk(hashes, owners, start, k, i) == expect
