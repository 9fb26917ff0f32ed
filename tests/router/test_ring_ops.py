"""Ring operations (distserve/router/ring_ops.py): the C splice gives the Python version's new lists, or its None,
for every ring and edit; the C sample and first clockwise give the Python versions' results, and the first
clockwise found by walking the ring is the one kv_aware's Python fallback finds from the tied engines' points; the
C versions decline (None) only inputs the router never makes."""

from __future__ import annotations

import sys
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve.router import ring_ops
from tests.router.fuzzing import needs_gcc, run_sanitized_fuzz
from tests.util import examples

c = ring_ops._c
needs_c = pytest.mark.skipif(c is None, reason="distserve.router._ring_ops is not built here")

OWNERS = ["a", "b", "c", "d", "e"]
_hash = st.one_of(st.integers(0, 60), st.integers(0, (1 << 64) - 1))  # small: collisions and equal neighbours


@st.composite
def _edit(draw):
    """A ring (sorted by hash, then owner), points leaving it (mostly on it as their owner's, now and then not),
    and points joining it (mostly new hashes)."""
    points = sorted(draw(st.lists(st.tuples(_hash, st.sampled_from(OWNERS)), max_size=40)))
    hashes, owners = array("Q", [p[0] for p in points]), [p[1] for p in points]
    leaving = draw(st.lists(st.integers(0, max(0, len(points) - 1)), max_size=8)) if points else []
    leave_h, leave_o = [hashes[i] for i in leaving], [owners[i] for i in leaving]
    if leave_h and draw(st.integers(0, 9)) == 0:  # not on the ring, or not as that owner's
        k = draw(st.integers(0, len(leave_h) - 1))
        if draw(st.booleans()):
            leave_h[k] = draw(_hash)
        else:
            leave_o[k] = draw(st.sampled_from(OWNERS))
    joins = draw(st.lists(st.tuples(_hash, st.sampled_from(OWNERS)), max_size=8))
    return hashes, owners, leave_h, leave_o, [j[0] for j in joins], [j[1] for j in joins]


@needs_c
@settings(max_examples=examples(3000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_edit())
def test_c_splices_as_the_specification(args):
    assert c.splice(*args) == ring_ops.splice_py(*args)


@pytest.mark.parametrize("fn", [ring_ops.splice_py, pytest.param("c", marks=needs_c)])
def test_the_splice_by_hand(fn):
    fn = c.splice if fn == "c" else fn
    hashes, owners = array("Q", [10, 20, 20, 30]), ["a", "a", "b", "c"]
    # b's point leaves; d joins at 20 (after the equal hashes? no: a hash on the ring already declines) and at 25
    assert fn(hashes, owners, [20], ["b"], [20], ["d"]) is None
    new_h, new_o = fn(hashes, owners, [20], ["a"], [25, 5, 25], ["e", "d", "a"])
    assert list(new_h) == [5, 10, 20, 25, 25, 30] and new_o == ["d", "a", "b", "a", "e", "c"]
    assert isinstance(new_h, array) and new_h.typecode == "Q"
    assert list(hashes) == [10, 20, 20, 30] and owners == ["a", "a", "b", "c"]  # the old lists unchanged
    assert fn(hashes, owners, [30], ["a"], [], []) is None  # not that owner's point
    assert fn(hashes, owners, [31], ["c"], [], []) is None  # not on the ring
    assert fn(hashes, owners, [30, 30], ["c", "c"], [], []) is None  # leaving twice
    assert fn(hashes, owners, [], [], [], []) == (hashes, owners)
    assert fn(array("Q"), [], [], [], [1 << 63], ["a"]) == (array("Q", [1 << 63]), ["a"])


@needs_c
def test_c_declines_what_the_router_never_makes():
    hashes, owners = array("Q", [10, 20]), ["a", "b"]
    assert c.splice(array("q", [10, 20]), owners, [], [], [5], ["c"]) is None  # signed
    assert c.splice(list(hashes), owners, [], [], [5], ["c"]) is None  # not an array
    assert c.splice(hashes, owners, [], [], [1 << 64], ["c"]) is None  # past 64 bits
    assert c.splice(hashes, owners, [], [], [5], [b"c"]) is None  # an owner not a str
    assert c.splice(hashes, owners + ["x"], [], [], [5], ["c"]) is None  # lists of other lengths


@needs_c
def test_c_holds_no_reference_it_should_not():
    owners_all = ["".join(["engine-", str(i)]) for i in range(6)]
    hashes = array("Q", range(0, 6000, 10))
    owners = [owners_all[i % 6] for i in range(600)]
    before = [sys.getrefcount(o) for o in owners_all]
    for i in range(2000):
        leave = [(i * 7) % 600, (i * 13 + 1) % 600]
        out = c.splice(hashes, owners, [hashes[k] for k in leave] if leave[0] != leave[1] else [],
                       [owners[k] for k in leave] if leave[0] != leave[1] else [], [i * 10 + 5], [owners_all[i % 6]])
        assert out is not None
        del out
        i_, picked = c.sample(hashes, owners, i * 3, 4)
        assert len(picked) == 4
        del picked
        assert c.first_clockwise(owners, i % 600, owners_all[i % 6: i % 6 + 2]) in owners_all
    assert [sys.getrefcount(o) for o in owners_all] == before


@needs_c
@needs_gcc
def test_the_c_version_under_address_and_undefined_behaviour_sanitizers():
    assert "20000 rings, C and Python alike" in run_sanitized_fuzz("fuzz_ring_ops.py")


@st.composite
def _ring(draw):
    points = sorted(draw(st.lists(st.tuples(_hash, st.sampled_from(OWNERS)), max_size=40)))
    return array("Q", [p[0] for p in points]), [p[1] for p in points]


@needs_c
@settings(max_examples=examples(2000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ring(), _hash, st.integers(0, 7))
def test_c_samples_as_the_specification(ring, start, k):
    hashes, owners = ring
    assert c.sample(hashes, owners, start, k) == ring_ops.sample_py(hashes, owners, start, k)


@needs_c
@settings(max_examples=examples(2000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ring(), _hash, st.lists(st.sampled_from(OWNERS + ["z"]), min_size=1, max_size=4, unique=True))
def test_c_finds_the_first_clockwise_as_the_specification(ring, start, tied):
    from bisect import bisect_right

    hashes, owners = ring
    i = bisect_right(hashes, start)
    assert c.first_clockwise(owners, i, tied) == ring_ops.first_clockwise_py(owners, i, tied)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([f"p{i}" for i in range(40)]), min_size=33, max_size=40, unique=True).map(sorted),
       st.integers(0, (1 << 64) - 1), st.data())
def test_walking_the_ring_finds_what_the_tied_engines_points_find(members, start, data):
    """kv_aware's last tie rule: the walk (the C version) and the tied engines' own sorted points (the Python
    fallback) pick the same engine on a real ring."""
    from bisect import bisect_right

    from distserve.router.load import LoadTracker
    from distserve.router.strategies import KvAwareStrategy, PickContext, _KvSet

    strategy = KvAwareStrategy()
    ring = _KvSet(members, PickContext(load=LoadTracker(), weights={}, params={}), strategy._affinity._rings)
    tied = data.draw(st.lists(st.sampled_from(members), min_size=1, max_size=4, unique=True))
    walked = ring_ops.first_clockwise_py(ring.owners, bisect_right(ring.hashes, start), tied)
    assert walked == _points_rule(ring, tied, start)
    assert ring.first_clockwise(tied, start) == walked  # what the router runs here (C where built)


def _points_rule(ring, tied, start):
    """The tied engine whose first point after `start` (wrapping) is nearest; equal distances to the lower id (the
    rule of _KvSet.first_clockwise's Python fallback)."""
    from bisect import bisect_right

    best, best_d = None, None
    for engine in tied:
        points = ring.owner_points(engine)
        j = bisect_right(points, start)
        d = (points[j] - start) if j < len(points) else (points[0] + (1 << 64) - start)
        if best is None or d < best_d or (d == best_d and engine < best):
            best, best_d = engine, d
    return best


@needs_c
def test_sample_and_first_clockwise_by_hand():
    hashes, owners = array("Q", [10, 20, 30, 40, 50]), ["a", "a", "b", "a", "c"]
    assert c.sample(hashes, owners, 15, 2) == (1, ["a", "b"])
    assert c.sample(hashes, owners, 45, 3) == (4, ["c", "a", "b"])  # around the end
    assert c.sample(hashes, owners, 45, 9) == (4, ["c", "a", "b"])  # fewer owners than asked
    assert c.sample(array("Q"), [], 5, 2) == (0, [])
    assert c.first_clockwise(owners, 1, ["c", "b"]) == "b"
    assert c.first_clockwise(owners, 5, ["b"]) == "b"  # from past the end: from the start
    assert c.first_clockwise(owners, 0, ["z"]) is None
    assert c.sample(list(hashes), owners, 5, 2) is None  # not an array('Q')
    assert c.first_clockwise([b"a"], 0, ["a"]) is None  # an owner not a str


_counts = st.dictionaries(st.sampled_from(OWNERS + ["f", "g"]), st.sampled_from([1, 2, 3, 32, 33, 1000]), max_size=7)


@needs_c
@settings(max_examples=examples(2000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_counts, _counts)
def test_c_counts_changes_as_the_specification(counts, old_counts):
    assert c.count_changes(counts, old_counts) == ring_ops.count_changes_py(counts, old_counts)


@pytest.mark.parametrize("fn", [ring_ops.count_changes_py, pytest.param("c", marks=needs_c)])
def test_count_changes_by_hand(fn):
    fn = c.count_changes if fn == "c" else fn
    old = {"a": 32, "b": 32, "c": 33, "d": 32}
    new = {"a": 32, "c": 32, "e": 33, "b": 33}
    groups = fn(new, old)
    assert groups == {(33, 32): ["c"], (0, 33): ["e"], (32, 33): ["b"], (32, 0): ["d"]}
    assert list(groups) == [(33, 32), (0, 33), (32, 33), (32, 0)]  # the new set's order, then those gone
    assert fn(old, old) == {}
