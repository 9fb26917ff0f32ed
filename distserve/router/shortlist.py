"""kv_aware's shortlist, scored (distserve/router/strategies.py, KvAwareStrategy._pick_shortlist): which engines a
pick above SCAN_LIMIT candidates weighs, what each holds of the request, and which cost least; and its tie rule
(`least_cached`; ring_ops.first_clockwise breaks what is left).

The `*_py` functions are the specification, and the fallback. Where the C module `distserve.router._shortlist`
was built at install (as `distserve.router._heads`: optional, skipped where no compiler is), `score`,
`least_cached` and `blind_members` are its versions: the same results for every input they accept
(tests/router/test_shortlist.py compares them on generated inputs); for the rest (a common level deeper than a
distinctive one, a load that is not a number, a member without a speed) they return
None and the caller runs the `*_py` version. In Python these loops were ~9 of a pick's ~11 us on the 16-core host
(docs/benchmarks.md, "Fifteenth pass"). `DISTSERVE_PURE_PYTHON=1` selects the Python version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from distserve.router.compiled import load

Near = list[tuple[float, str, Any]]  # (cost, engine, load): the engines within 1e-9 of the lowest cost


def score_py(levels: list[dict[str, int]], members: frozenset[str] | None, sample: list[str],
             blind: frozenset[str] | None, min_match: int, current: Mapping[str, Any],
             speed: Mapping[str, float] | None, load_weight: float, cache_weight: float,
             holders_limit: int) -> tuple[dict[str, int], int, float, Near]:
    """(matched_of, best_match, low, near) for one pick.

    `levels`: the holders ({engine: matched tokens}) of each of the request's keys cached somewhere, longest key
    first (KvIndex.levels). The shortlist: every holder of a level with at most `holders_limit` holders (a
    distinctive level), credited at the first (longest) level holding it, only `members` (None: every engine
    held is a candidate); then the `sample` engines not credited yet, looked up in the common levels (more
    holders), deepest first, else 0. Then the `blind` engines (no cache stream: placed by the hash) leave it; a
    match below `min_match` counts as 0. `matched_of` is empty when only blind engines were left.

    Each engine's load is `current`'s figure (0 if none), divided by its `speed` (None: unweighted, the figure
    itself); its cost load_weight x load - cache_weight x matched; `low` the lowest cost and `near` the engines
    within 1e-9 of it, in the shortlist's order (cost, engine, load)."""
    matched_of: dict[str, int] = {}
    common: list[dict[str, int]] = []
    # Shallowest first: while every distinctive level is deeper than every common one (holders grow towards the
    # root), an engine's first level is its first distinctive one, so C-level updates, the longest last;
    # otherwise (rare: several chunk sizes) _credit, one by one.
    for holders in reversed(levels):
        if len(holders) <= holders_limit:
            matched_of.update(holders)
        elif matched_of:
            matched_of, common = _credit(levels, members, holders_limit)
            break
        else:
            common.append(holders)
    else:
        common.reverse()
        if members is not None and not members.issuperset(matched_of):
            for c in matched_of.keys() - members:
                del matched_of[c]
    for c in sample:  # a holder of a distinctive level is credited already
        if c not in matched_of:
            for holders in common:
                tokens = holders.get(c)
                if tokens is not None:
                    matched_of[c] = tokens
                    break
            else:
                matched_of[c] = 0
    if blind:
        for c in blind.intersection(matched_of):
            del matched_of[c]
        if not matched_of:
            return matched_of, 0, math.inf, []
    if min_match:
        matched_of = {c: m if m >= min_match else 0 for c, m in matched_of.items()}
    best_match = max(matched_of.values())
    get = current.get
    low = thr = math.inf
    near: Near = []
    for c, m in matched_of.items():
        load = get(c, 0)
        if speed is not None:  # without weights the figure itself: load_weight x it is a scan's x (it / 1.0)
            load /= speed[c]
        cost = load_weight * load - cache_weight * m
        if cost <= thr:
            if cost < low:
                low, thr = cost, cost + 1e-9
                if near:
                    near = [n for n in near if n[0] <= thr]
            near.append((cost, c, load))
    return matched_of, best_match, low, near


def _credit(levels: list[dict[str, int]], members: frozenset[str] | None,
            holders_limit: int) -> tuple[dict[str, int], list[dict[str, int]]]:
    """The shortlist by the cache when a common level is deeper than a distinctive one: {member: matched tokens}
    for every holder of a distinctive level, credited at the first (longest) level holding it, and the common
    levels, deepest first. Exact: an engine's first level is a common one before its distinctive one, or that
    one."""
    matched_of: dict[str, int] = {}
    common: list[dict[str, int]] = []
    for holders in levels:
        if len(holders) > holders_limit:
            common.append(holders)
            continue
        for c, tokens in holders.items():
            if c not in matched_of and (members is None or c in members):
                matched_of[c] = _deepest_common(common, c, tokens)
    return matched_of, common


def _deepest_common(common: list[dict[str, int]], engine_id: str, default: int) -> int:
    """Tokens of the deepest common level (held by too many engines to list, deepest first) the engine holds,
    else `default`."""
    for holders in common:
        tokens = holders.get(engine_id)
        if tokens is not None:
            return tokens
    return default


def least_cached_py(engine_ids: list[str], loads: Mapping[str, Any], engines: Mapping[str, Any]) -> list[str]:
    """kv_aware's tie rule, first part (KvIndex.least_cached says why): the engines of the fewest prefix families,
    then the lowest `loads` (0.0 when absent), then the fewest keys; `engines` maps an engine to its stream's
    state, whose `sizes` is (families, keys); an engine without one counts (0, 0). One loop, no intermediate
    lists (comprehensions over the sizes first cost a tie of two ~4 us of a pick in place, this 1.3:
    docs/benchmarks.md, "Eighth pass")."""
    get = engines.get
    best: tuple | None = None
    fewest: list[str] = []
    for engine_id in engine_ids:
        state = get(engine_id)
        families, keys = state.sizes if state is not None else (0, 0)
        size = (families, loads.get(engine_id, 0.0), keys)
        if best is None or size < best:
            best, fewest = size, [engine_id]
        elif size == best:
            fewest.append(engine_id)
    return fewest


def blind_members_py(members: list[str], engines: Mapping[str, Any], now: float,
                     timeout: float) -> tuple[list[str], float]:
    """(the members kv_aware places by the hash: without a stream's state in `engines`, or not synced and
    followed for `timeout` by `now`; when the next member awaiting its snapshot runs out of time, inf if
    none). A state has `synced` and `followed_at` (KvIndex's engines)."""
    blind: list[str] = []
    expires = math.inf
    get = engines.get
    for c in members:
        state = get(c)
        if state is None:
            blind.append(c)
        elif not state.synced:
            until = state.followed_at + timeout
            if now >= until:
                blind.append(c)
            else:
                expires = min(expires, until)
    return blind, expires


_c = load("_shortlist")
IMPLEMENTATION = "c" if _c is not None else "python"
score = _c.score if _c is not None else score_py
least_cached = _c.least_cached if _c is not None else least_cached_py
blind_members = _c.blind_members if _c is not None else blind_members_py
