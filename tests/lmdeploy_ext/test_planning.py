"""Planning and validation of staged-TCP migrations (pure functions: what is read, from where, in order)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distserve.lmdeploy_ext.staged_tcp import (
    MAX_ASSIGNMENTS_PER_CALL,
    MigrationError,
    Segment,
    chunk_calls,
    coalesce,
    plan_rounds,
    validate_segments,
)

REMOTE = {0: 1 << 20, 1: 4096}


@pytest.mark.parametrize(
    "seg, why",
    [
        (Segment(2, 0, 0, 10), "unknown remote region"),
        (Segment(1, 4000, 0, 97), "outside region"),
        (Segment(0, -1, 0, 10), "negative"),
        (Segment(0, 0, 0, 0), "empty"),
        (Segment(0, True, 0, 1), "integer"),
        (Segment(0, 0, 5000, 10), "outside region 0 of 4096"),
    ],
)
def test_validate_rejects_what_dlslime_would_not(seg, why):
    with pytest.raises(MigrationError, match=why):
        validate_segments([seg], REMOTE, local_regions={0: 4096, 1: 4096})


def test_validate_accepts_exact_region_end():
    assert validate_segments([Segment(1, 0, 0, 4096)], REMOTE, {1: 4096}) == [Segment(1, 0, 0, 4096)]


def test_coalesce_merges_runs_contiguous_on_both_sides_only():
    # blocks 3,4,5 -> 10,11,12 (one run), block 7 -> 14 (remote gap), block 8 -> 16 (local gap)
    segs = [Segment(0, b * 100, d * 100, 100) for b, d in ((4, 11), (3, 10), (5, 12), (7, 14), (8, 16))]
    assert coalesce(segs) == [
        Segment(0, 300, 1000, 300),
        Segment(0, 700, 1400, 100),
        Segment(0, 800, 1600, 100),
    ]


def test_coalesce_never_merges_across_regions():
    assert len(coalesce([Segment(0, 0, 0, 10), Segment(1, 10, 10, 10)])) == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=40), st.integers(1, 6000))
def test_plan_rounds_covers_every_byte_once_within_capacity(lengths, capacity):
    segs, off = [], 0
    for n in lengths:
        segs.append(Segment(0, off, off + 7, n))
        off += n
    rounds = plan_rounds(segs, capacity)
    assert all(0 < sum(s.length for s in r) <= capacity for r in rounds)
    covered = sorted((s.remote_offset, s.length, s.local_offset) for r in rounds for s in r)
    pos = 0
    for remote, length, local in covered:
        assert remote == pos and local == remote + 7
        pos += length
    assert pos == off


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10**7), st.integers(1 << 10, 1 << 22))
def test_chunk_calls_respect_the_31_assignment_limit(nbytes, chunk):
    calls = chunk_calls(nbytes, chunk)
    assert all(1 <= len(c) <= MAX_ASSIGNMENTS_PER_CALL for c in calls)
    flat = [x for c in calls for x in c]
    assert flat[0][0] == 0 and sum(n for _, n in flat) == nbytes
    assert all(a + n == b for (a, n), (b, _) in zip(flat, flat[1:], strict=False))


def test_chunk_calls_refuses_32():
    with pytest.raises(ValueError):
        chunk_calls(100, 1, per_call=32)
