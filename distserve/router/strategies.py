"""Routing strategies: pick one engine among routable candidates.

Pluggable: a strategy is a class with `name` and `pick(candidates, ctx)`, registered in STRATEGIES.
`candidates` is a non-empty list of engine ids, sorted, already filtered to live, routable,
non-drained, non-cordoned engines serving the model whose circuit breakers are closed.

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
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Mapping
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

# The prefix_affinity ring holds at most this many points (~40 ms to build on a busy core): above it every
# engine's share is scaled down alike (each keeps at least one point), so no weight or vnodes value can make
# a router build a huge ring. Rings cached per candidate set hold at most _RING_CACHE_POINTS in all.
MAX_RING_POINTS = 1 << 14
_RING_CACHE_POINTS = 1 << 18
_RING_CACHE_ENTRIES = 256


@dataclass
class PickContext:
    load: LoadTracker
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


class RandomStrategy(Strategy):
    name = "random"

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        if len(candidates) == 1:
            return candidates[0]
        if not ctx.weights:
            return random.choice(candidates)
        return random.choices(candidates, weights=[_weight(ctx, c) for c in candidates])[0]


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

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        if len(candidates) == 1:
            return candidates[0]
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
        self._rings: dict[tuple, tuple[list[int], list[str]]] = {}
        self._cached_points = 0

    def _ring(self, candidates: list[str], ctx: PickContext) -> tuple[list[int], list[str]]:
        key = (
            tuple(candidates),
            tuple(sorted((c, ctx.weights[c]) for c in candidates if c in ctx.weights)),
        )
        ring = self._rings.get(key)
        if ring is None:
            counts = {c: max(1, round(self._vnodes * _weight(ctx, c))) for c in candidates}
            total = sum(counts.values())
            if total > MAX_RING_POINTS:  # the same scaling on every replica: they still agree
                scale = MAX_RING_POINTS / total
                counts = {c: max(1, int(n * scale)) for c, n in counts.items()}
            points: list[tuple[int, str]] = []
            for c in candidates:
                for i in range(counts[c]):
                    points.append((_hash64(f"{c}#{i}".encode()), c))
            points.sort()
            ring = ([p[0] for p in points], [p[1] for p in points])
            # candidate sets change with the topology; keep the cache small in entries and in memory
            if len(self._rings) >= _RING_CACHE_ENTRIES or self._cached_points + len(points) > _RING_CACHE_POINTS:
                self._rings.clear()
                self._cached_points = 0
            self._rings[key] = ring
            self._cached_points += len(points)
        return ring

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        if len(candidates) == 1:
            return candidates[0]
        prefix_chars = self._prefix_chars
        load_factor = self._load_factor
        prefix = ctx.prefix(prefix_chars) if ctx.prefix else b""
        hashes, owners = self._ring(candidates, ctx)
        unfinished = ctx.load.unfinished
        loads = {c: unfinished(c) for c in candidates}
        cap = math.ceil(load_factor * (sum(loads.values()) + 1) / len(candidates))
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
    min_match_tokens). Ties go to the tied engine caching the fewest prefix keys, then to prefix_affinity's
    ring order, so every replica sends a new prefix to the same engine; for a prefix no engine holds, loads
    within one queued request of the lowest count as tied (its placement outlives the queue).
    Engines without a synced cache stream (lmdeploy today) are placed by prefix_affinity's hash among
    themselves; the one it picks is credited with the longest match any streaming engine holds (the prefix
    is where the hash sent it before), and a streaming engine wins a tie with it (its cache is known, not
    assumed).
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
        self._affinity = PrefixAffinityStrategy(
            PrefixAffinityParams(prefix_chars=typed.prefix_chars, load_factor=typed.load_factor,
                                 vnodes=typed.vnodes)
        )
        self.on_pick: Callable[[str, str, int], None] | None = None  # (phase, basis, matched): metrics

    def pick(self, candidates: list[str], ctx: PickContext) -> str:
        index = ctx.kv
        keys_of = ctx.keys
        if index is None or keys_of is None:  # no index (should not happen): the hash alone
            return self._done(self._affinity.pick(candidates, ctx), "hash", 0)
        unfinished = ctx.load.unfinished
        weighted = bool(ctx.weights)
        costs: dict[str, float] = {}
        matches: dict[str, int] = {}
        blind: list[str] = []
        best_match = 0
        for c in candidates:
            if not index.has_stream(c):
                blind.append(c)
                continue
            matched = index.matched_tokens(c, keys_of(index.chunk_bytes(c))) or 0
            if matched < self._min_match:
                matched = 0
            matches[c] = matched
            if matched > best_match:
                best_match = matched
            load = unfinished(c) / (_weight(ctx, c) if weighted else 1.0)
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
        # A prefix no engine holds is placed for as long as its conversations last, not for the instant's
        # queue: loads within one queued request of the lowest count as a tie for it (docs/benchmarks.md,
        # "Cache-aware routing": 8 prompts placed by momentary queues of 0-2 gave 1.48 max/mean).
        slack = self._load_weight if best_match == 0 else 1e-9
        tied = [c for c, cost in costs.items() if cost <= low + slack]
        if len(tied) > 1:
            tied = _least_cached(tied, index)
        chosen = tied[0] if len(tied) == 1 else self._affinity.pick(tied, ctx)
        matched = matches[chosen]
        return self._done(chosen, "cache" if matched else "load", matched)

    def _done(self, engine_id: str, basis: str, matched: int) -> str:
        if self.on_pick is not None:
            self.on_pick(self.phase, basis, matched)
        return engine_id


def _least_cached(tied: list[str], index: Any) -> list[str]:
    """kv_aware's ties (a new prefix, equal loads) go first to the engines caching the fewest prefix keys: new
    prefixes spread over the engines by the traffic each already serves (every replica follows the same
    streams, so they agree), where the hash alone piled 8 system prompts 2.6x the mean onto one of 4 prefills
    (docs/benchmarks.md, "Cache-aware routing"). The ring still breaks what is left."""
    describe = getattr(index, "describe", None)
    if describe is None:
        return tied
    sizes = {c: (describe(c) or {}).get("keys", 0) for c in tied}
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
