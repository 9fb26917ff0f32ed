"""Routing strategies: pick one engine among routable candidates.

Pluggable: a strategy is a class with `name` and `pick(candidates, ctx)`, registered in STRATEGIES.
`candidates` is a non-empty list of engine ids, sorted, already filtered to live, routable,
non-drained, non-cordoned engines serving the model whose circuit breakers are closed, and never mutated once
picked with (the routing table's own list, which the orchestrator's first attempt hands, or a new one).

- random: weighted random (LMDeploy's `random`: weights play the role of its node speeds).
- round_robin: per replica, in order.
- min_expected_latency: LMDeploy's formula, unfinished / speed (speed = the engine's weight), minimum
  wins, ties broken at random; `unfinished` comes from the load records in etcd plus this replica's
  own in-flight requests (see distserve.router.load).
- power_of_two: two random candidates, the less loaded (by the same measure) wins.
- prefix_affinity: consistent hashing with bounded loads on the prompt prefix: every replica maps a
  prefix to the same engine (no shared tree), and an engine above load_factor x the average load is
  passed over for the next one on the ring.
- kv_aware: what each engine really holds (distserve.router.kv_index, from the engines' cache-event
  streams) weighed against its load; engines without a stream are placed by prefix_affinity's hash.

A strategy gets its params (distserve.cluster.records.STRATEGY_PARAMS[name], typed and bounded) when it is made;
constructing one from a valid config never raises, and no value of a valid config can make a pick fail.

Cost per pick (issue 22): none scans the candidates in Python. min_expected_latency (from _INDEX_MIN
candidates), prefix_affinity and weighted random keep per-candidate-set state (_PerSet: a ring, cumulative
weights, the members' loads) that the load tracker's change journal keeps current, so a pick costs the load
changes since the previous one plus a C-level compare of the candidate list, with the same decisions as the
scan (tests/router/test_strategies.py checks them against it). kv_aware scans up to SCAN_LIMIT candidates;
above it it scores a shortlist (the engines the cache index says hold the request's prefix, through its
inverted index, plus SAMPLE engines in ring order): see KvAwareStrategy.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate, islice, repeat
from operator import add, itemgetter, truediv
from dataclasses import dataclass, field
from typing import Any

from distserve.cluster.records import (
    STRATEGY_PARAMS,
    KvAwareParams,
    NoParams,
    PrefixAffinityParams,
    StrategyParams,
)
from distserve.router.load import LoadTracker
from distserve.router.ring_ops import _c as _ring_ops_c
from distserve.router.ring_ops import count_changes, count_changes_py
from distserve.router.ring_ops import ring_walk as _ring_walk
from distserve.router.ring_ops import sample as ring_sample
from distserve.router.ring_ops import sample_py as ring_sample_py
from distserve.router.ring_ops import splice as splice_ring
from distserve.router.ring_ops import splice_py as splice_ring_py
from distserve.router.shortlist import blind_members, blind_members_py
from distserve.router.shortlist import score as score_shortlist
from distserve.router.shortlist import score_py as score_shortlist_py

# The prefix_affinity ring holds at most this many points (~20 ms to hash and sort from scratch on a busy core;
# after a topology change it is derived from the last one, _Rings): above it every engine's share is scaled
# down alike and rounded down or up (each keeps at least one point), so no weight or vnodes value can make
# a router build a huge ring. Rings cached per candidate set hold at most _RING_CACHE_POINTS in all.
MAX_RING_POINTS = 1 << 14
_RING_CACHE_POINTS = 1 << 18
_RING_CACHE_ENTRIES = 256
# A ring differing from the last one built by at most 1/_DERIVE_SHARE of its points is derived from it (each point
# placed by bisection, the lists rebuilt in one pass of slices: ~1 us a point); more, it is merged from the engines'
# kept points (~10-20 ms at the cap). Engines' points kept for at most _KEPT_ENGINES engines; sorted up front for
# at most _SORT_AHEAD engines whose count changed (the others on first use).
_DERIVE_SHARE = 4
_SORT_AHEAD = 16
_KEPT_ENGINES = 8192
# min_expected_latency and weighted random keep a per-candidate-set index from this many candidates up; below
# it a scan costs about as much, and the many small sets (each prefill's decodes) would only churn the cache.
_INDEX_MIN = 32
_INDEX_CACHE_ENTRIES = 64
_INDEX_CACHE_MEMBERS = 1 << 16
# kv_aware (issue 22): up to SCAN_LIMIT candidates every one is scored; above it a shortlist: the candidates
# holding a key of the request that at most HOLDERS_LIMIT engines hold (a distinctive match), plus the first
# SAMPLE engines in ring order from the request's deepest key (a deterministic "power of SAMPLE choices").
SCAN_LIMIT = 32
SAMPLE = 8
HOLDERS_LIMIT = 32


@dataclass
class PickContext:
    load: LoadTracker
    # Never mutated in place once picked with (the router makes a new dict per routing config): the
    # strategies' per-candidate-set caches check it by identity, then by value.
    weights: dict[str, float] = field(default_factory=dict)
    # The config's params as stored (the strategies use the typed copy they were made with).
    params: dict[str, Any] = field(default_factory=dict)
    # The prompt prefix (computed only by strategies that need it).
    prefix: Callable[[int], bytes] | None = None
    # kv_aware only (None otherwise): the cache index, and the request's prefix keys for a chunk size
    # (distserve.cluster.prefix_keys.request_keys, computed at most once per request and chunk size).
    kv: Any = None
    keys: Callable[[int], list[int]] | None = None


class Strategy:
    name = ""
    # True: the orchestrator gives it the cache index and the request's prefix keys (PickContext.kv/keys)
    needs_kv = False

    def __init__(self, params: StrategyParams | None = None) -> None:
        self.params = params if params is not None else NoParams()

    def pick(self, candidates: list[str], ctx: PickContext) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _weight(ctx: PickContext, engine_id: str) -> float:
    w = ctx.weights.get(engine_id, 1.0)
    return w if w > 0 else 1e-9


def _speeds(members: list[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Each member's _weight, in the members' order: C-level maps over the weighted ones (a comprehension
    calling _weight per member was ~0.1 ms of a new 500-member set)."""
    speeds = dict.fromkeys(members, 1.0)
    if weights:
        weighted = weights.keys() & speeds.keys()
        positive = {w: _positive(w) for w in set(weights.values())}  # per distinct weight, not per member
        speeds.update(zip(weighted, map(positive.__getitem__, map(weights.__getitem__, weighted))))
    return speeds


def _positive(w: float) -> float:
    return w if w > 0 else 1e-9


class _PerSet:
    """State that is a function of one candidate set (and the weights): a ring, cumulative weights, a load
    index. Picks come with the routing table's own list (the orchestrator's first attempt, unfiltered) or a
    new one (filtered, or a retry's), so the key is cheap to hash (size, first, middle, last) and the stored
    members are compared with == (a C loop, ~1 us per 500 engines): another set with the same key replaces the
    entry. Bounded in entries and in total size (members
    or ring points), least recently used first out."""

    def __init__(self, build: Callable[[list[str], PickContext], Any], max_entries: int, max_size: int) -> None:
        self._build = build  # (members, ctx) -> state with .members, .weights, .size
        self._max_entries = max_entries
        self._max_size = max_size
        self._states: OrderedDict[tuple, Any] = OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return len(self._states)

    def get(self, candidates: list[str], ctx: PickContext) -> Any:
        n = len(candidates)
        key = (n, candidates[0], candidates[n >> 1], candidates[-1])
        states = self._states
        state = states.get(key)
        if state is not None:
            if state.members == candidates and (state.weights is ctx.weights or state.weights == ctx.weights):
                state.weights = ctx.weights  # the same values: identity from now on
                states.move_to_end(key)
                return state
            del states[key]
            self.size -= state.size
        state = self._build(list(candidates), ctx)
        while states and (len(states) >= self._max_entries or self.size + state.size > self._max_size):
            self.size -= states.popitem(last=False)[1].size
        states[key] = state
        self.size += state.size
        return state


class _Loads:
    """One candidate set's unfinished() per member and their total, kept current from the load tracker's change
    journal (distserve.router.load): a pick applies the changes since the previous one (each O(1), plus what
    the subclass keeps) instead of reading every candidate; too far behind (or another tracker), it re-reads
    them all, which costs what a scan did."""

    def __init__(self, members: list[str], ctx: PickContext) -> None:
        self.members = members
        self.weights = ctx.weights
        self.size = len(members)
        self.load: LoadTracker | None = None
        self.seq = 0
        self.vals: dict[str, int] = {}
        self.total = 0

    def sync(self, load: LoadTracker) -> None:
        lag = load.seq - self.seq
        if load is self.load and lag == 0:
            return
        current = load.current
        if load is not self.load or lag > len(load.changed) or lag > len(self.members):
            self.load, self.seq = load, load.seq
            members = self.members
            self.vals = dict(zip(members, map(current.get, members, repeat(0))))
            self.total = sum(self.vals.values())
            self._rebuilt()
            return
        self.seq = load.seq
        vals = self.vals
        for engine_id in islice(reversed(load.changed), lag):  # repeats are harmless: each reads the current value
            old = vals.get(engine_id)
            if old is not None:
                new = current.get(engine_id, 0)
                if new != old:
                    vals[engine_id] = new
                    self.total += new - old
                    self._moved(engine_id, new)

    def _rebuilt(self) -> None:
        pass

    def _moved(self, engine_id: str, new: int) -> None:
        pass


class _LatencyIndex(_Loads):
    """min_expected_latency over one candidate set: the members bucketed by score (unfinished / weight, the
    very float the scan computes), a heap of the scores that have a bucket. Empty buckets are dropped when
    they reach the top of the heap; a heap grown past 2x the members is rebuilt."""

    def __init__(self, members: list[str], ctx: PickContext) -> None:
        super().__init__(members, ctx)
        weighted = bool(ctx.weights)
        self.speed = {c: _weight(ctx, c) if weighted else 1.0 for c in members}

    def _rebuilt(self) -> None:
        self.score: dict[str, float] = {}
        self.buckets: dict[float, list[str]] = {}
        self.pos: dict[str, int] = {}  # member -> its index in its bucket
        speed = self.speed
        for c, v in self.vals.items():
            s = self.score[c] = v / speed[c]
            bucket = self.buckets.setdefault(s, [])
            self.pos[c] = len(bucket)
            bucket.append(c)
        self.heap = list(self.buckets)
        heapq.heapify(self.heap)

    def _moved(self, engine_id: str, new: int) -> None:
        s = new / self.speed[engine_id]
        old = self.score[engine_id]
        if s == old:
            return
        bucket, i = self.buckets[old], self.pos[engine_id]
        last = bucket.pop()  # swap-remove: the order inside a bucket is irrelevant (ties go at random)
        if last is not engine_id:
            bucket[i] = last
            self.pos[last] = i
        bucket = self.buckets.get(s)
        if bucket is None:
            bucket = self.buckets[s] = []
            heapq.heappush(self.heap, s)
        self.pos[engine_id] = len(bucket)
        bucket.append(engine_id)
        self.score[engine_id] = s

    def best(self) -> list[str]:
        """The members of lowest score."""
        heap, buckets = self.heap, self.buckets
        if len(heap) > 2 * len(self.members) + 16:
            self._rebuilt()
        while not buckets[heap[0]]:
            del buckets[heapq.heappop(heap)]
        return buckets[heap[0]]


class _CumWeights:
    """Weighted random over one candidate set: the cumulative weights random.choices builds per call."""

    def __init__(self, members: list[str], ctx: PickContext) -> None:
        self.members = members
        self.weights = ctx.weights
        self.size = len(members)
        self.cum = list(accumulate(_weight(ctx, c) for c in members))


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, params: StrategyParams | None = None) -> None:
        super().__init__(params)
        self._sets = _PerSet(_CumWeights, _INDEX_CACHE_ENTRIES, _INDEX_CACHE_MEMBERS)

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        if len(candidates) == 1:
            return candidates[0]
        if not ctx.weights:
            return random.choice(candidates)
        if len(candidates) < _INDEX_MIN:
            return random.choices(candidates, weights=[_weight(ctx, c) for c in candidates])[0]
        # the same draw as weights=... (random.choices accumulates them first), without the O(n) per pick
        return random.choices(candidates, cum_weights=self._sets.get(candidates, ctx).cum)[0]


class RoundRobinStrategy(Strategy):
    name = "round_robin"

    def __init__(self, params: StrategyParams | None = None) -> None:
        super().__init__(params)
        self._next = 0

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        self._next += 1
        return candidates[self._next % len(candidates)]


class MinExpectedLatencyStrategy(Strategy):
    name = "min_expected_latency"

    def __init__(self, params: StrategyParams | None = None) -> None:
        super().__init__(params)
        self._sets = _PerSet(_LatencyIndex, _INDEX_CACHE_ENTRIES, _INDEX_CACHE_MEMBERS)

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) >= _INDEX_MIN:  # the index: O(load changes since the last pick), not O(candidates)
            index = self._sets.get(candidates, ctx)
            index.sync(ctx.load)
            best = index.best()
            return best[0] if len(best) == 1 else random.choice(best)
        return self._scan(candidates, ctx)

    @staticmethod
    def _scan(candidates: list[str], ctx: PickContext) -> str:
        """The reference: every candidate's score, the lowest wins, ties at random."""
        unfinished = ctx.load.unfinished
        weights = ctx.weights
        best: list[str] = []
        best_latency = math.inf
        for c in candidates:
            latency = unfinished(c) / (_weight(ctx, c) if weights else 1.0)
            if latency < best_latency:
                best_latency, best = latency, [c]
            elif latency == best_latency:
                best.append(c)
        return best[0] if len(best) == 1 else random.choice(best)


class PowerOfTwoStrategy(Strategy):
    name = "power_of_two"

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        la = ctx.load.unfinished(a) / _weight(ctx, a)
        lb = ctx.load.unfinished(b) / _weight(ctx, b)
        return a if la <= lb else b


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class _KvSet:
    """kv_aware over one candidate set: its members as a set, its ring (prefix_affinity's, the same points),
    each owner's points (ties: the tied engine first clockwise), the members' weights, and which members have
    no cache stream (recomputed when the index's epoch moves or a member's wait for its snapshot runs out).
    Loads are not kept here: a pick reads its shortlist's from the tracker, and the whole set's total only for
    a new prefix."""

    def __init__(self, members: list[str], ctx: PickContext, rings: _Rings) -> None:
        self.members = members
        self.weights = ctx.weights
        self.member_set = frozenset(members)
        self.hashes, self.owners, counts = rings.ring(members, ctx)
        self.size = len(self.hashes)
        # each member's weight (1.0 each without weights: a load divided by it is the scan's float either way)
        self.speed = _speeds(members, ctx.weights)
        self.weighted = bool(ctx.weights)
        # each owner's points, sorted (as on the ring), looked up for ties only: the ring builder keeps them per
        # engine and count (sorted as it builds or derives the ring), this set on first use (filled for all 500
        # members up front, the lookups were ~0.1 ms of a new set)
        self.counts = counts
        self._owned = rings.owned
        self.by_owner: dict[str, list[int]] = {}
        self.index: Any = None
        self.epoch = -1
        self.expires = -math.inf
        self.blind: list[str] = []
        self.blind_set: frozenset[str] = frozenset()
        self.known = 0  # members with a stream or awaiting their snapshot
        self.covers = False  # every engine the index follows is a member (no holder to filter out)

    def total_load(self, current: Mapping[str, int]) -> float:
        """The members' loads (divided by their weights) summed in the members' order, as the scan sums them:
        C-level maps over the tracker's current figures (~5 us per 500 members; a new prefix only)."""
        members = self.members
        if not self.weighted:
            return float(sum(map(current.get, members, repeat(0))))
        return sum(map(truediv, map(current.get, members, repeat(0)), map(self.speed.__getitem__, members)))

    def refresh(self, index: Any) -> None:
        """Which members are blind (no synced stream, not awaiting a snapshot): only when that may have changed
        (the clock is read only while a member awaits its snapshot)."""
        expires = self.expires
        if index is self.index and index.epoch == self.epoch and (
                expires == math.inf or time.monotonic() < expires):
            return
        now = time.monotonic()
        self.index, self.epoch = index, index.epoch
        engines = index.engines
        found = blind_members(self.members, engines, now, index.sync_timeout)  # (shortlist.py: in C where built)
        if found is None:  # an input the C version leaves to the specification
            found = blind_members_py(self.members, engines, now, index.sync_timeout)
        blind, expires = self.blind, self.expires = found
        self.blind_set = frozenset(blind)
        self.known = len(self.members) - len(blind)
        self.covers = self.member_set.issuperset(engines)

    def owner_points(self, engine_id: str) -> list[int]:
        """The member's points on this set's ring, sorted (kept per set once looked up)."""
        points = self.by_owner[engine_id] = self._owned(engine_id, self.counts[engine_id])
        return points

    def first_clockwise(self, tied: list[str], start: int, i: int | None = None) -> str:
        """The tied engine whose ring point comes first clockwise from `start` (`i`: where it falls, when the
        caller has it). In C (ring_ops.py) by walking the ring from there: a few hundred owners for two tied
        engines of 500. In Python from each tied engine's sorted points, kept per set once looked up (walking the
        ring in Python would cost more): the same engine."""
        if _ring_ops_c is not None:
            chosen = _ring_ops_c.first_clockwise(self.owners, bisect_right(self.hashes, start) if i is None else i,
                                                 tied)
            if chosen is not None:
                return chosen
        by_owner = self.by_owner
        best, best_d = tied[0], 1 << 65
        for c in tied:
            points = by_owner.get(c) or self.owner_points(c)
            j = bisect_right(points, start)
            d = (points[j] - start) if j < len(points) else (points[0] + (1 << 64) - start)
            if d < best_d or (d == best_d and c < best):
                best, best_d = c, d
        return best


class _Rings:
    """prefix_affinity's rings (kv_aware's too), built in proportion to what changed. Each engine's points are
    hashed once and kept (point i of engine c is hash("c#i"), whatever the set); a set's ring is derived from the
    last one built when at most a quarter of its points differ (a topology change moves one engine's, and above
    the cap a share of spare points: they are found by bisection, the new lists made of slices of the old), else merged from the kept points. Either way the lists equal a build from
    scratch (sorted by hash, then owner): rebuilding a 500-engine ring from scratch was ~20 ms of CPU paid by the
    first pick after any change of the candidate set (docs/benchmarks.md, "Sixth pass")."""

    def __init__(self, vnodes: int) -> None:
        self._vnodes = vnodes
        self._points: dict[str, list[int]] = {}  # engine -> hashes of its points #0, #1, ... (as many as asked)
        self._owned: dict[str, dict[int, list[int]]] = {}  # engine -> {count: its first count points, sorted}
        self._rank_of: dict[str, int] = {}  # engine -> its place in line for the spare points (see counts)
        self._in_line: list[str] = []  # those engines in that order
        # sort each member's points where the ring is built or derived (kv_aware's ties read them; sorting on
        # first use would land in a pick); prefix_affinity alone never reads them
        self.sort_ahead = False
        self._last: tuple[dict[str, int], array[int], list[str]] | None = None  # counts, hashes, owners

    def counts(self, candidates: list[str], ctx: PickContext) -> dict[str, int]:
        """Each member's points: vnodes x its weight (at least 1). Above MAX_RING_POINTS every share is scaled
        alike and rounded down, and the points left over go one each to the members first by a hash of their
        id: the ring holds exactly the cap, each member within one point of its share, the same on every
        replica. A join or leave then moves about two shares' worth of points (the newcomer's, and the spare
        points passing to or from the engines ranked next), where scaling alike and rounding down moved a
        point of every engine whenever int(16384 / n) stepped (every 4-50 engines above 256 prefills).
        Built per distinct count, not per member (most members have the default weight)."""
        vnodes = self._vnodes
        weights = ctx.weights
        if not weights and vnodes * len(candidates) > MAX_RING_POINTS:  # the usual large fleet: arithmetic
            base = max(1, int(vnodes * (MAX_RING_POINTS / (vnodes * len(candidates)))))
            return self._spread(candidates, base, MAX_RING_POINTS - base * len(candidates))
        base = max(1, round(vnodes * 1.0))
        counts = dict.fromkeys(candidates, base)
        weighted: set[str] = set()
        if weights:  # C-level maps over the weighted members (the members' order is kept: they are keys already)
            weighted = weights.keys() & counts.keys()
            of_weight = {w: max(1, round(vnodes * (w if w > 0 else 1e-9))) for w in set(weights.values())}
            counts.update(zip(weighted, map(of_weight.__getitem__, map(weights.__getitem__, weighted))))
        total = sum(counts.values())
        if total > MAX_RING_POINTS:  # the same scaling on every replica: they still agree
            scale = MAX_RING_POINTS / total
            scaled = {n: max(1, int(n * scale)) for n in set(counts.values())}
            if len(scaled) == 1:
                base = scaled.popitem()[1]
                return self._spread(candidates, base, MAX_RING_POINTS - base * len(counts))
            if base in scaled:  # the members at the base count scaled at once (a dict's keys copied), then the others
                rescaled = dict.fromkeys(counts, scaled[base])
                rescaled.update(zip(weighted, map(scaled.__getitem__, map(counts.__getitem__, weighted))))
                counts = rescaled
            else:
                counts = dict(zip(counts, map(scaled.__getitem__, counts.values())))
            line = self._line(counts)
            gaining = list(islice(filter(counts.__contains__, line), max(0, MAX_RING_POINTS - sum(counts.values()))))
            counts.update(zip(gaining, map(add, map(counts.__getitem__, gaining), repeat(1))))
        return counts

    def _spread(self, candidates: list[str], base: int, spare: int) -> dict[str, int]:
        """`base` points each, and one more for the first `spare` members in line (C-level: or one fewer for the
        last ones, when fewer)."""
        if spare <= 0:
            return dict.fromkeys(candidates, base)
        few = 2 * spare <= len(candidates)
        counts = dict.fromkeys(candidates, base if few else base + 1)
        line = self._line(counts)
        if few:
            counts.update(zip(islice(filter(counts.__contains__, line), spare), repeat(base + 1)))
        else:
            counts.update(zip(islice(filter(counts.__contains__, reversed(line)), len(counts) - spare), repeat(base)))
        return counts

    def _line(self, members: Mapping[str, int]) -> list[str]:
        """Every engine seen, in line for the points left over by scaling: by a hash of its id, then its id (kept,
        so a new set is walked at C level instead of sorted)."""
        rank_of = self._rank_of
        if rank_of.keys() >= members.keys():
            return self._in_line
        new = members.keys() - rank_of.keys()
        if len(rank_of) + len(new) > _KEPT_ENGINES:  # engines come and go: bounded, dropped wholesale
            rank_of.clear()
            new = members.keys()
        for c in new:
            rank_of[c] = _hash64(f"{c}#spare".encode())
        self._in_line = [c for c, _ in sorted(rank_of.items(), key=itemgetter(1, 0))]
        return self._in_line

    def points(self, engine_id: str, n: int) -> list[int]:
        """The hashes of the engine's points #0 .. #n-1 (kept: hashed once per engine)."""
        kept = self._points.get(engine_id)
        if kept is None or len(kept) < n:
            if kept is None and len(self._points) >= _KEPT_ENGINES:  # engines come and go: bounded, dropped wholesale
                self._points.clear()
                self._owned.clear()
            # an eighth more than asked: an engine gaining a point as the fleet shrinks (above the cap) or a
            # weight grows finds it hashed already (all 64 up front made the first pick after a router starts
            # ~12 ms longer at 500 prefills)
            have = len(kept) if kept is not None else 0
            more = [_hash64(f"{engine_id}#{i}".encode()) for i in range(have, n + n // 8 + 1)]
            kept = self._points[engine_id] = (kept + more) if kept is not None else more
        return kept[:n] if len(kept) > n else kept

    def owned(self, engine_id: str, n: int) -> list[int]:
        """The engine's first n points, sorted (its points on any ring where it has n)."""
        per_count = self._owned.get(engine_id)
        if per_count is None:
            per_count = self._owned[engine_id] = {}
        kept = per_count.get(n)
        if kept is None:
            if len(per_count) >= 4:  # the fleet's size moved through several point counts: the older ones go
                per_count.clear()
            kept = per_count[n] = sorted(self.points(engine_id, n))
        return kept

    def ring(self, candidates: list[str], ctx: PickContext) -> tuple[array[int], list[str], dict[str, int]]:
        counts = self.counts(candidates, ctx)
        derived = self._derive(counts)
        if derived is None:
            points = [(h, c) for c in candidates for h in self.points(c, counts[c])]
            points.sort()
            derived = array("Q", map(itemgetter(0), points)), [p[1] for p in points]
            if self.sort_ahead:
                for c, n in counts.items():
                    self.owned(c, n)
        self._last = (counts, *derived)
        return (*derived, counts)

    def _derive(self, counts: dict[str, int]) -> tuple[array[int], list[str]] | None:
        last = self._last
        if last is None:
            return None
        old_counts, hashes, owners = last
        # the engines whose point count changed, grouped by (old count, new count): a join or a leave is one
        # engine (and, above the cap, the few that the spare points pass to or from); a weight change of many
        # engines moves them alike, so a group's points are gathered by C-level maps, not per engine
        groups = count_changes(counts, old_counts)  # (ring_ops.py: in C where built)
        if groups is None:  # an input the C version leaves to the specification
            groups = count_changes_py(counts, old_counts)
        if sum(abs(n - old) * len(g) for (old, n), g in groups.items()) > max(256, len(hashes) // _DERIVE_SHARE):
            return None
        kept = self._points
        leave_h: list[int] = []
        leave_o: list[str] = []
        join_h: list[int] = []
        join_o: list[str] = []
        for (old, n), group in groups.items():
            most = max(old, n)
            lists = list(map(kept.get, group))
            if None in lists or min(map(len, lists)) < most:  # not hashed that far (or dropped at the bound)
                lists = [self.points(c, most) for c in group]
            for j in range(min(old, n), max(old, n)):  # point #j of each engine of the group
                if n < old:
                    leave_h += map(itemgetter(j), lists)
                    leave_o += group
                else:
                    join_h += map(itemgetter(j), lists)
                    join_o += group
        if self.sort_ahead and (len(groups) == 1 or sum(map(len, groups.values())) <= _SORT_AHEAD):
            # a join, a leave, a weight: sorted now, not in a pick's tie (a crossing: on first use)
            for (_, n), group in groups.items():
                if n and len(group) <= _SORT_AHEAD:
                    for c in group:
                        self.owned(c, n)
        # New lists, never changed in place: the old ones stay valid for the sets that hold them (ring_ops.py: in C
        # where built). A hash already on the ring, or repeated among the leaving points (never seen with 64-bit
        # hashes: the ring orders equal ones by owner, and an engine may even repeat one) sends the set to the merge
        # from the kept points instead (None). The hashes are an array: its slices are copies of memory, where a
        # list's touched the reference count of every point's int, spread over memory (docs/benchmarks.md "Ninth
        # pass").
        spliced = splice_ring(hashes, owners, leave_h, leave_o, join_h, join_o)
        if spliced is None and _ring_ops_c is not None:  # the C version also declines what the router never makes
            spliced = splice_ring_py(hashes, owners, leave_h, leave_o, join_h, join_o)
        return spliced


class PrefixAffinityStrategy(Strategy):
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) on the prompt prefix.

    params (PrefixAffinityParams): prefix_chars (default 256), load_factor (default 1.25, >= 1), vnodes
    (default 64 per unit weight); the ring is capped at MAX_RING_POINTS.
    """

    name = "prefix_affinity"

    def __init__(self, params: StrategyParams | None = None) -> None:
        typed = params if isinstance(params, PrefixAffinityParams) else PrefixAffinityParams()
        super().__init__(typed)
        self._prefix_chars = typed.prefix_chars
        self._load_factor = max(1.0, typed.load_factor)
        self._vnodes = typed.vnodes
        self._rings = _Rings(typed.vnodes)
        # per candidate set: the ring and the members' loads (candidate sets change with the topology; the
        # cache is small in entries and in memory)
        self._sets = _PerSet(self._ring, _RING_CACHE_ENTRIES, _RING_CACHE_POINTS)

    def _ring(self, candidates: list[str], ctx: PickContext) -> _Loads:
        state = _Loads(candidates, ctx)
        state.hashes, state.owners = self.ring_points(candidates, ctx)
        state.size = len(state.hashes)
        return state

    def ring_points(self, candidates: list[str], ctx: PickContext) -> tuple[array[int], list[str]]:
        """The ring of a candidate set: point hashes (sorted) and their owners."""
        hashes, owners, _ = self._rings.ring(candidates, ctx)
        return hashes, owners

    def ring_order(self, candidates: list[str], ctx: PickContext, k: int, start: int | None = None) -> list[str]:
        """The first k distinct owners on the candidate set's (cached) ring from the request's prefix hash (or
        from `start`, a 64-bit hash): what every replica computes alike."""
        if start is None:
            start = _hash64(ctx.prefix(self._prefix_chars) if ctx.prefix else b"")
        state = self._sets.get(candidates, ctx)
        return _ring_walk(state.hashes, state.owners, start, min(k, len(candidates)))

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        if len(candidates) == 1:
            return candidates[0]
        prefix_chars = self._prefix_chars
        load_factor = self._load_factor
        prefix = ctx.prefix(prefix_chars) if ctx.prefix else b""
        state = self._sets.get(candidates, ctx)
        state.sync(ctx.load)  # loads and their total as of now, without reading every candidate
        hashes, owners, loads = state.hashes, state.owners, state.vals
        cap = math.ceil(load_factor * (state.total + 1) / len(candidates))
        start = bisect_right(hashes, _hash64(prefix))
        seen: set[str] = set()
        n = len(hashes)
        for i in range(n):
            owner = owners[(start + i) % n]
            if owner in seen:
                continue
            if loads[owner] + 1 <= cap:
                return owner
            seen.add(owner)
            if len(seen) == len(candidates):
                break
        return min(candidates, key=lambda c: loads[c])


class KvAwareStrategy(Strategy):
    """The engine that holds the longest cached prefix of the request, weighed against its load.

    cost(c) = load_weight x unfinished(c) / weight(c) - cache_weight x matched(c) / 1024, lowest wins;
    matched(c) = prompt tokens of the longest prefix key of the request cached on c (0 below
    min_match_tokens). Ties go to the tied engine caching the fewest prefix families (root keys, as the
    engines' streams mark them, cached or pending: announced at admission), then the least loaded, then the
    fewest prefix keys, then to the first of them clockwise on prefix_affinity's ring of the whole candidate
    set from the request's prefix hash, so every replica sends a new prefix to the same engine. (Before
    issue 22 a ring was built per tied subset, with its bounded-load pass: the same engine wherever the ring
    is not scaled down, i.e. up to 256 candidates of weight 1, and the tied engines' loads are equal, so that
    pass never skipped one unless weights differ.) For a prefix no engine holds, every engine within one
    queued request of the lowest load, or within load_factor x the mean (bounded loads), counts as tied:
    its placement outlives the queue it is placed by.
    An engine with a cache stream whose snapshot is not in yet (a restarted process) counts as caching
    nothing. Engines without a cache stream (lmdeploy today) are placed by prefix_affinity's hash among
    themselves; the one it picks is credited with the longest match any streaming engine holds (the prefix
    is where the hash sent it before), and a streaming engine wins a tie with it (its cache is known, not
    assumed).

    Above SCAN_LIMIT candidates (with a KvIndex: one that has `levels`) the same rule runs on a shortlist,
    so a pick costs O(request keys + shortlist), not O(candidates): every candidate holding a key of the
    request that at most HOLDERS_LIMIT engines hold (found through the index's inverted index), plus the
    first SAMPLE engines clockwise on the ring from the request's deepest key (a deterministic "power of
    SAMPLE choices": it differs per conversation, so a new prefix, or one cached on many engines, spreads
    over the whole fleet instead of following the prefix hash onto the same few). Ties go to the first tied
    engine clockwise from that same key (no prompt prefix to read and hash). The load-tie bound's mean is the
    whole candidate set's. The blind engines (no stream) are still placed by the hash among all of
    them.
    The same strategy picks the decode among those linked to the prefill (`phase` = "decode").
    """

    name = "kv_aware"
    needs_kv = True

    def __init__(self, params: StrategyParams | None = None) -> None:
        typed = params if isinstance(params, KvAwareParams) else KvAwareParams()
        super().__init__(typed)
        self.phase = "prefill"  # "decode" for the decode's copy (metrics only)
        self._cache_weight = typed.cache_weight / 1024.0
        self._load_weight = typed.load_weight
        self._min_match = typed.min_match_tokens
        self._load_factor = max(1.0, typed.load_factor)
        self._prefix_chars = typed.prefix_chars
        self._affinity = PrefixAffinityStrategy(
            PrefixAffinityParams(prefix_chars=typed.prefix_chars, load_factor=typed.load_factor,
                                 vnodes=typed.vnodes)
        )
        rings = self._affinity._rings
        rings.sort_ahead = True
        self._sets = _PerSet(lambda m, ctx: _KvSet(m, ctx, rings), _RING_CACHE_ENTRIES, _RING_CACHE_POINTS)
        # the last candidate set's state: a pick for the same set (most picks) skips _PerSet's key tuple, its
        # hashing and LRU upkeep. The very list of the last pick (the routing table's, until it changes) is
        # recognised by identity; another is compared by value (members ==, the weights dict by identity): over
        # 500 engines that compare, on memory gone cold between requests, was ~1 us of a pick on the 16-core host
        # (docs/benchmarks.md, "Sixth pass")
        self._last: _KvSet | None = None
        self._last_list: list[str] | None = None
        self.on_pick: Callable[[str, str, int], None] | None = None  # (phase, basis, matched): metrics

    def _prefix_hash(self, ctx: PickContext) -> int:
        return _hash64(ctx.prefix(self._prefix_chars) if ctx.prefix else b"")

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        index = ctx.kv
        keys_of = ctx.keys
        if index is None or keys_of is None:  # no index (should not happen): the hash alone
            return self._done(self._affinity.pick(candidates, ctx), "hash", 0)
        if len(candidates) > SCAN_LIMIT and getattr(index, "levels", None) is not None:
            return self._pick_shortlist(candidates, ctx, index, keys_of)
        unfinished = ctx.load.unfinished
        weighted = bool(ctx.weights)
        costs: dict[str, float] = {}
        loads: dict[str, float] = {}
        matches: dict[str, int] = {}
        blind: list[str] = []
        best_match = 0
        pending = getattr(index, "pending", None)
        for c in candidates:
            if not index.has_stream(c):
                if pending is None or not pending(c):
                    blind.append(c)
                    continue
                matched = 0  # its snapshot is not in yet: a new process, nothing cached to count on
            else:
                matched = index.matched_tokens(c, keys_of(index.chunk_bytes(c))) or 0
                if matched < self._min_match:
                    matched = 0
            matches[c] = matched
            if matched > best_match:
                best_match = matched
            load = loads[c] = unfinished(c) / (_weight(ctx, c) if weighted else 1.0)
            costs[c] = self._load_weight * load - self._cache_weight * matched
        if not costs:  # nobody streams: exactly prefix_affinity
            return self._done(self._affinity.pick(candidates, ctx), "hash", 0)
        hashed = None
        if blind:
            hashed = self._affinity.pick(blind, ctx)
            load = unfinished(hashed) / (_weight(ctx, hashed) if weighted else 1.0)
            hashed_cost = self._load_weight * load - self._cache_weight * best_match
        low = min(costs.values())
        if hashed is not None and hashed_cost < low:
            return self._done(hashed, "hash", 0)
        tied = self._tied(index, costs, loads, best_match, low, (sum(loads.values()), len(loads)))
        return self._decide(tied, matches, lambda: self._sets.get(candidates, ctx), ctx)

    def _tied(self, index: Any, costs: dict[str, float], loads: Mapping[str, float], best_match: int, low: float,
              mean_of: tuple[float, int]) -> list[str]:
        """The engines tied for the pick (`costs`: the scored engines; `loads`: at least theirs), narrowed by
        `_least_cached`."""
        if best_match == 0 and self._load_weight > 0:
            tied = self._new_prefix_tie(costs, loads, mean_of)
        else:
            tied = [c for c, cost in costs.items() if cost <= low + 1e-9]
        if len(tied) > 1:
            tied = _least_cached(tied, index, loads)
        return tied

    def _new_prefix_tie(self, engines: Iterable[str], loads: Mapping[str, float],
                        mean_of: tuple[float, int]) -> list[str]:
        """A prefix no engine holds is placed for as long as its conversations last, not for the instant's
        queue: loads within one queued request of the lowest, or within the bounded-load cap, count as a tie for
        it (docs/benchmarks.md, "Cache-aware routing": 8 prompts placed by momentary queues of 0-2 gave 1.48
        max/mean)."""
        total, n = mean_of
        bound = max(min(loads[c] for c in engines) + 1.0, math.ceil(self._load_factor * (total + 1) / n) - 1.0)
        return [c for c in engines if loads[c] <= bound + 1e-9]

    def _decide(self, tied: list[str], matches: Mapping[str, int], ring: Callable[[], _KvSet],
                ctx: PickContext) -> str:
        if len(tied) == 1:
            chosen = tied[0]
        else:  # the first of them clockwise on the whole set's ring (one ring per candidate set, cached)
            chosen = ring().first_clockwise(tied, self._prefix_hash(ctx))
        matched = matches[chosen]
        return self._done(chosen, "cache" if matched else "load", matched)

    def _pick_shortlist(self, candidates: list[str], ctx: PickContext, index: Any,
                        keys_of: Callable[[int], list[int]]) -> str:
        st = self._last
        if candidates is not self._last_list or st.weights is not ctx.weights:  # else the same list as before
            if st is None or st.weights is not ctx.weights or st.members != candidates:
                st = self._last = self._sets.get(candidates, ctx)
            self._last_list = candidates  # kept: its id cannot be reused while it is held here
        if index is not st.index or index.epoch != st.epoch or st.expires != math.inf:  # refresh's own test
            st.refresh(index)
        if not st.known:  # nobody streams: exactly prefix_affinity
            return self._done(self._affinity.pick(candidates, ctx), "hash", 0)
        # the request's keys per chunk size in use (one in a fleet of one engine build); an engine can only
        # hold keys of its own chunk size (another size's chain has other hashes)
        chunks = index.chunk_sizes()
        if len(chunks) == 1:
            keys = keys_of(chunks[0])
            levels = index.levels(keys) if keys else []
            deepest = keys[-1] if keys else None
        else:
            levels, deepest = [], None
            for chunk in chunks:
                keys = keys_of(chunk)
                if keys:
                    levels += index.levels(keys)
                    if deepest is None:
                        deepest = keys[-1]
        # the sample: the first SAMPLE engines clockwise from the deepest key
        start = deepest if deepest is not None else self._prefix_hash(ctx)
        k = min(SAMPLE, len(candidates))
        sampled = ring_sample(st.hashes, st.owners, start, k)  # (ring_ops.py: in C where built)
        if sampled is None:  # an input the C version leaves to the specification
            sampled = ring_sample_py(st.hashes, st.owners, start, k)
        i, sample = sampled
        # the shortlist (the holders of the request's distinctive levels, then the sample), what each holds and its
        # cost, the lowest and the engines tied with it (shortlist.py: in C where built); the blind ones (no
        # stream, or its snapshot overdue) are placed by the hash below; one awaiting its snapshot holds no key,
        # so it scores as caching nothing
        members = None if st.covers else st.member_set
        blind = st.blind
        loads_now, speed, weighted = ctx.load.current, st.speed, st.weighted
        lw, cw = self._load_weight, self._cache_weight
        args = (levels, members, sample, st.blind_set, self._min_match, loads_now, speed if weighted else None,
                lw, cw, HOLDERS_LIMIT)
        scored = score_shortlist(*args)
        if scored is None:  # an input the C version leaves to the specification
            scored = score_shortlist_py(*args)
        matched_of, best_match, low, near = scored
        if not matched_of:  # the sample held only blind engines: they compete through the hash alone
            return self._done(self._affinity.pick(blind, ctx), "hash", 0)
        current = loads_now.get
        if blind:
            hashed = self._affinity.pick(blind, ctx)
            if lw * (current(hashed, 0) / speed[hashed]) - cw * best_match < low:
                return self._done(hashed, "hash", 0)
        if len(near) == 1 and (best_match or lw == 0):  # the common case: one engine of lowest cost
            chosen = near[0][1]
            if self.on_pick is not None:
                matched = matched_of[chosen]
                self.on_pick(self.phase, "cache" if matched else "load", matched)
            return chosen
        if best_match == 0 and lw > 0:  # a new prefix: the bounded-load mean is the whole candidate set's
            loads = {c: current(c, 0) / speed[c] for c in matched_of}
            tied = self._new_prefix_tie(matched_of, loads, (st.total_load(ctx.load.current), len(candidates)))
        else:
            loads = {n[1]: n[2] for n in near}  # the tied engines' (the tie rule reads them)
            tied = list(loads)
        if len(tied) > 1:
            tied = _least_cached(tied, index, loads)
        if len(tied) == 1:
            chosen = tied[0]
        else:  # the first of them clockwise from where the sample starts (the request's deepest key)
            chosen = st.first_clockwise(tied, start, i)
        matched = matched_of[chosen]
        return self._done(chosen, "cache" if matched else "load", matched)

    def _done(self, engine_id: str, basis: str, matched: int) -> str:
        if self.on_pick is not None:
            self.on_pick(self.phase, basis, matched)
        return engine_id


def _least_cached(tied: list[str], index: Any, loads: Mapping[str, float] | None = None) -> list[str]:
    """kv_aware's ties (a new prefix, equal loads) go first to the engines caching the fewest prefix families
    (root keys: a family is what brings a stream of requests, whatever its conversations' length), then the
    fewest prefix keys: new prefixes spread over the engines by the traffic each already serves. Both come
    from the engines' streams, so every replica agrees; the hash alone piled 8 system prompts 2.6x the mean
    onto one of 4 prefills, the key count alone 1.48x (docs/benchmarks.md, "Cache-aware routing"). A family
    counts from its first request's admission (the engine streams its root as pending), not from the end of
    that prefill: otherwise another replica placing the next new family meanwhile saw one family fewer there
    and followed it. Equal families: the lower load first (what this replica has in flight), then the
    fewest keys; the ring still breaks what is left."""
    loads = loads or {}
    least_cached = getattr(index, "least_cached", None)
    if least_cached is not None:  # KvIndex: both figures of every tied engine, ranked in one loop
        return least_cached(tied, loads)
    families = getattr(index, "families", None)
    key_count = getattr(index, "key_count", None)
    if key_count is None:
        describe = getattr(index, "describe", None)
        if describe is None:
            return tied
        key_count = lambda c: (describe(c) or {}).get("keys", 0)  # noqa: E731
    sizes = {c: (families(c) if families is not None else 0, loads.get(c, 0.0), key_count(c)) for c in tied}
    fewest = min(sizes.values())
    return [c for c in tied if sizes[c] == fewest]


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RandomStrategy,
        RoundRobinStrategy,
        MinExpectedLatencyStrategy,
        PowerOfTwoStrategy,
        PrefixAffinityStrategy,
        KvAwareStrategy,
    )
}


def make_strategy(name: str, params: Mapping[str, Any] | StrategyParams | None = None) -> Strategy:
    """A strategy with its typed params; ValueError (pydantic's ValidationError is one) for an unknown name or
    params that fail STRATEGY_PARAMS[name]."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    model = STRATEGY_PARAMS[name]
    typed = params if isinstance(params, model) else model.model_validate(dict(params or {}))
    return cls(typed)
