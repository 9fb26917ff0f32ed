"""kv_aware's shortlist scoring (distserve/router/shortlist.py): the C version gives the Python version's result
(or declines with None, and the caller runs the Python version) for every input, and declines only where the
module says it does; the C module is what the router runs wherever it can be built."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve.router import shortlist
from tests.router.fuzzing import needs_gcc, run_sanitized_fuzz
from tests.util import examples

c = shortlist._c
needs_c = pytest.mark.skipif(c is None, reason="distserve.router._shortlist is not built here")

ENGINES = [f"p{i}" for i in range(12)]
LIMIT = 3  # holders_limit: small, so generated levels are distinctive or common alike


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except (KeyError, ZeroDivisionError, TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


_tokens = st.one_of(st.integers(0, 5000), st.sampled_from([0, 16, 100, 3000, 1 << 62, 1 << 70]))
_level = st.dictionaries(st.sampled_from(ENGINES), _tokens, min_size=1, max_size=6)
_engine_set = st.frozensets(st.sampled_from(ENGINES), max_size=12)
_load = st.one_of(st.integers(0, 40), st.floats(0, 40, allow_nan=False), st.sampled_from([0, 1, 2, 1 << 70]))
_weight = st.floats(-2.0, 8.0, allow_nan=False, allow_infinity=False)


@st.composite
def _inputs(draw):
    levels = draw(st.lists(_level, max_size=6))
    if draw(st.integers(0, 3)):  # the usual shape: distinctive levels deeper (first) than the common ones
        levels.sort(key=lambda holders: len(holders) > LIMIT)
    members = draw(st.one_of(st.none(), _engine_set))
    sample = draw(st.lists(st.sampled_from(ENGINES), min_size=1, max_size=8, unique=True))
    blind = draw(st.one_of(st.none(), _engine_set))
    min_match = draw(st.sampled_from([0, 0, 16, 100, 3000]))
    current = draw(st.dictionaries(st.sampled_from(ENGINES), _load, max_size=12))
    if draw(st.booleans()):
        speed = None
    else:
        speed = {e: draw(st.sampled_from([1.0, 2.0, 0.5, 3.0, 1.0])) for e in ENGINES}
        if draw(st.integers(0, 4)) == 0:
            speed[draw(st.sampled_from(ENGINES))] = 0.0
        if draw(st.integers(0, 4)) == 0:
            for e in draw(st.lists(st.sampled_from(ENGINES), max_size=2)):
                speed.pop(e, None)
    return [levels, members, sample, blind, min_match, current, speed, draw(_weight), draw(_weight), LIMIT]


@needs_c
@settings(max_examples=examples(2500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_inputs())
def test_c_scores_as_the_specification(args):
    expected = outcome(shortlist.score_py, *args)
    got = c.score(*args)
    if got is None:  # declined: the caller runs score_py
        return
    assert ("ok", got) == expected


def _declines_only_where_documented(args) -> bool:
    """score_py's _credit shape (a common level deeper than a distinctive one), a match or load that is not an int
    of 64 bits or a float, a member without a speed or a speed of 0."""
    levels, members, sample, blind, min_match, current, speed = args[:7]
    seen_distinctive = False
    for holders in reversed(levels):
        if len(holders) <= LIMIT:
            seen_distinctive = True
        elif seen_distinctive:
            return True
    values = [v for holders in levels for v in holders.values()] + list(current.values())
    if any(isinstance(v, int) and v >= 1 << 63 for v in values):
        return True
    return speed is not None and any(speed.get(e, 0.0) == 0.0 for e in ENGINES)


@needs_c
@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_inputs())
def test_c_declines_only_the_documented_inputs(args):
    if c.score(*args) is None:
        assert _declines_only_where_documented(args), args


@pytest.mark.parametrize("fn", [shortlist.score_py, pytest.param("c", marks=needs_c)])
def test_the_shortlist_by_hand(fn):
    fn = c.score if fn == "c" else fn
    common = {e: 100 for e in ENGINES[:5]}  # the shared system prompt: more holders than the limit
    deep = {"p1": 900, "p7": 900}  # a conversation's key: distinctive
    levels = [deep, common]  # longest key first
    current = {"p0": 1, "p1": 3, "p7": 0, "p9": 2}
    matched, best, low, near = fn(levels, None, ["p0", "p9", "p1"], None, 0, current, None, 1.0, 1.0 / 1024, LIMIT)
    # p1 and p7 credited at their distinctive level; the sample's p0 at the common one, p9 holding nothing
    assert matched == {"p1": 900, "p7": 900, "p0": 100, "p9": 0}
    assert best == 900
    assert low == 0 - 900 / 1024 and [n[1] for n in near] == ["p7"]
    # members leave the shortlist unless they are candidates; blind ones leave it too; min_match zeroes
    matched, best, low, near = fn(levels, frozenset({"p0", "p1", "p9"}), ["p0", "p9"], frozenset({"p9"}), 200,
                                  current, {e: 2.0 for e in ENGINES}, 1.0, 1.0 / 1024, LIMIT)
    assert matched == {"p1": 900, "p0": 0} and best == 900
    # p1: load 3 / 2 less its match, 0.62; p0: 1 / 2 and nothing matched (100 is below min_match)
    assert near == [(0.5, "p0", 0.5)] and low == 0.5
    # equal costs within 1e-9 are all near, in the shortlist's order
    matched, best, low, near = fn([], None, ["p3", "p4", "p5"], None, 0, {"p4": 1}, None, 1.0, 0.0, LIMIT)
    assert best == 0 and low == 0.0 and [n[1] for n in near] == ["p3", "p5"]
    # only blind engines in the shortlist
    assert fn([], None, ["p3"], frozenset({"p3"}), 0, {}, None, 1.0, 0.0, LIMIT)[0] == {}


@needs_c
def test_c_holds_no_reference_it_should_not():
    """Every object handed in or made keeps its reference count: no leak (memory growing per pick) and no extra
    release (a crash later, elsewhere)."""
    engines = ["".join(["engine-", str(i)]) for i in range(12)]  # made at run time: counts of their own
    tokens = [10**20 // 10**19 * 1000 + i for i in range(12)]  # ints outside the small-int cache
    loads = [float(i) + 0.5 for i in range(12)]
    common = {e: t for e, t in zip(engines[:6], tokens)}
    levels = [{engines[7]: tokens[7], engines[8]: tokens[8]}, common]
    current = dict(zip(engines, loads))
    speed = {e: 2.0 for e in engines}
    states = {e: _State((i % 2, i)) for i, e in enumerate(engines)}
    watched = [*engines, *tokens, *loads, common, current, speed, *states.values()]
    before = [sys.getrefcount(o) for o in watched]
    for i in range(20_000):
        blind = frozenset(engines[i % 3: i % 3 + 1]) if i % 2 else None
        members = frozenset(engines[:10]) if i % 3 else None
        result = c.score(levels, members, engines[i % 5: i % 5 + 4], blind, 1005 if i % 4 else 0, current,
                         speed if i % 2 else None, 1.0, 1.0 / 1024, 1)
        assert result is not None
        del result, blind, members
        tied = engines[i % 4: i % 4 + 3]
        assert c.least_cached(tied, current, states) is not None
        del tied
    assert [sys.getrefcount(o) for o in watched] == before


@needs_c
@needs_gcc
def test_the_c_version_under_address_and_undefined_behaviour_sanitizers():
    assert "20000 inputs, C and Python alike" in run_sanitized_fuzz("fuzz_shortlist.py")


class _State:
    __slots__ = ("sizes",)

    def __init__(self, sizes) -> None:
        self.sizes = sizes


_sizes = st.tuples(st.integers(0, 3), st.integers(0, 3))


@needs_c
@settings(max_examples=examples(2000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ENGINES), min_size=1, max_size=8),
       st.dictionaries(st.sampled_from(ENGINES), st.one_of(st.integers(0, 3), st.sampled_from([0.0, 0.5, 1.0, 2.0]))),
       st.dictionaries(st.sampled_from(ENGINES), _sizes))
def test_c_ranks_ties_as_the_specification(tied, loads, sizes):
    engines = {e: _State(s) for e, s in sizes.items()}
    assert c.least_cached(tied, loads, engines) == shortlist.least_cached_py(tied, loads, engines)


@pytest.mark.parametrize("fn", [shortlist.least_cached_py, pytest.param("c", marks=needs_c)])
def test_least_cached_by_hand(fn):
    fn = c.least_cached if fn == "c" else fn
    engines = {"a": _State((1, 5)), "b": _State((1, 3)), "c": _State((2, 0))}
    assert fn(["a", "b", "c"], {}, engines) == ["b"]  # fewest families, then fewest keys
    assert fn(["a", "b"], {"b": 1}, engines) == ["a"]  # then the lower load before the keys
    assert fn(["a", "d", "e"], {}, engines) == ["d", "e"]  # without a stream's state: (0, 0)
    assert fn(["a", "b"], {"a": 1, "b": 1.0}, {"a": _State((0, 0)), "b": _State((0, 0))}) == ["a", "b"]


class _Stream:
    __slots__ = ("synced", "followed_at")

    def __init__(self, synced, followed_at) -> None:
        self.synced, self.followed_at = synced, followed_at


@needs_c
@settings(max_examples=examples(2000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ENGINES), max_size=10, unique=True),
       st.dictionaries(st.sampled_from(ENGINES), st.tuples(st.booleans(), st.sampled_from([0.0, 5.0, 9.5, 10.0, 12]))),
       st.sampled_from([0.0, 10.0, 14.5, 20.0]), st.sampled_from([0.0, 2.5, 5.0]))
def test_c_finds_the_blind_members_as_the_specification(members, streams, now, timeout):
    engines = {e: _Stream(*s) for e, s in streams.items()}
    assert c.blind_members(members, engines, now, timeout) == shortlist.blind_members_py(members, engines, now, timeout)


@pytest.mark.parametrize("fn", [shortlist.blind_members_py, pytest.param("c", marks=needs_c)])
def test_blind_members_by_hand(fn):
    fn = c.blind_members if fn == "c" else fn
    engines = {"a": _Stream(True, 0.0), "b": _Stream(False, 8.0), "c": _Stream(False, 1.0), "d": _Stream(False, 9.0)}
    # x has no stream; c has waited past its 5 s for a snapshot; b and d still wait, b's time ends first
    assert fn(["a", "b", "c", "d", "x"], engines, 10.0, 5.0) == (["c", "x"], 13.0)
    assert fn(["a"], engines, 10.0, 5.0) == ([], math.inf)
