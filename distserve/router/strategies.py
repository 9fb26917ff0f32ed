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

from distserve.cluster.records import STRATEGY_PARAMS, NoParams, PrefixAffinityParams, StrategyParams
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


class Strategy:
    name = ""

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


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RandomStrategy,
        RoundRobinStrategy,
        MinExpectedLatencyStrategy,
        PowerOfTwoStrategy,
        PrefixAffinityStrategy,
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
