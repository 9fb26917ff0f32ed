"""A derived ring's splice (distserve/router/ring_edit.py): the C version gives the Python version's new lists, or
its None, for every ring and edit, and declines (None) only inputs the router never makes; the C module is what
the router runs wherever it can be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve.router import ring_edit

c = ring_edit._c
needs_c = pytest.mark.skipif(c is None, reason="distserve.router._ring_edit is not built here")

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
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_edit())
def test_c_splices_as_the_specification(args):
    assert c.splice(*args) == ring_edit.splice_py(*args)


@pytest.mark.parametrize("fn", [ring_edit.splice_py, pytest.param("c", marks=needs_c)])
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
    assert [sys.getrefcount(o) for o in owners_all] == before


@needs_c
@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc here")
def test_the_c_version_under_address_and_undefined_behaviour_sanitizers():
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "fuzz_ring_edit.py")
    out = subprocess.run([sys.executable, tool, "--sanitize", "--iterations", "20000"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "20000 edits, C and Python alike" in out.stdout
