"""Operations on prefix_affinity's and kv_aware's rings (distserve/router/strategies.py): a ring is `hashes`, an
array('Q') sorted, and `owners`, the engine of each point (equal hashes ordered by owner).

- `count_changes`, then `splice`: a derived ring's new lists (_Rings._derive): the last ring built, less the
  points of the engines leaving or losing points, plus those joining or gaining;
- `sample`: the first k distinct owners clockwise from a hash (kv_aware's sample), and where the hash falls;
- `first_clockwise`: which of some engines owns the first point clockwise from a position (kv_aware's last tie
  rule).

The `*_py` functions are the specification, and the fallback. Where the C module `distserve.router._ring_ops` was
built at install (as `distserve.router._heads`: optional, skipped where no compiler is), the others are its
versions, with the same results (tests/router/test_ring_ops.py compares them on generated rings): the splice in
one pass that copies the old lists' runs between edits, where the Python version slices and appends per edit
(~2/3 of the first pick on a new candidate set at 500 prefills); the sample and the first clockwise by walking
the ring's owners from a bisection of its hashes, with no int made per probe (docs/benchmarks.md, "Fifteenth
pass"). `DISTSERVE_PURE_PYTHON=1` selects the Python versions.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from itertools import chain, filterfalse, islice, repeat

from distserve.router.compiled import load


def splice_py(hashes: array, owners: list[str], leave_h: list[int], leave_o: list[str], join_h: list[int],
              join_o: list[str]) -> tuple[array, list[str]] | None:
    """The ring (`hashes` an array('Q') sorted, then by owner; `owners` alike) without the points `leave_h` (each
    owned by the same place of `leave_o`) and with `join_h` (owned by `join_o`): new lists, the old ones unchanged
    (other candidate sets hold them); None where the edit cannot be made in place (a leaving point not on the
    ring as that owner's, one leaving twice, a joining hash on the ring already): the caller builds the ring from
    the engines' points instead. Joining points equal to each other sort by owner; an insertion at a leaving
    point's position goes first: both keep the ring's order."""
    size = len(hashes)
    drops = list(map(bisect_left, repeat(hashes), leave_h))
    for i, h, c in zip(drops, leave_h, leave_o):
        if i >= size or hashes[i] != h or owners[i] != c:
            return None
    if len(set(leave_h)) < len(leave_h):
        return None
    if not drops and not join_h:
        return hashes, owners
    edits: list[tuple] = [(i, 1) for i in drops]
    for i, h, c in zip(map(bisect_left, repeat(hashes), join_h), join_h, join_o):
        if i < size and hashes[i] == h:
            return None
        edits.append((i, 0, h, c))
    edits.sort()
    new_h = array("Q")
    new_o: list[str] = []
    prev = 0
    for edit in edits:
        i = edit[0]
        new_h += hashes[prev:i]
        new_o += owners[prev:i]
        if edit[1]:
            prev = i + 1
        else:
            new_h.append(edit[2])
            new_o.append(edit[3])
            prev = i
    new_h += hashes[prev:]
    new_o += owners[prev:]
    return new_h, new_o


def ring_walk(hashes: array, owners: list[str], start: int, k: int, i: int | None = None) -> list[str]:
    """The first k distinct owners clockwise from `start` (k <= the number of owners). `i`: where `start` falls
    (bisect_right), when the caller has it and found the k points from there not distinct already (a bisection
    of a ring gone cold between picks was ~3 us of the 5 a walk cost kv_aware's pick)."""
    n = len(owners)
    if i is None:
        i = bisect_right(hashes, start)
        window = owners[i: i + k]
        if len(window) == k and len(set(window)) == k:  # most often on a ring of many owners: no repeat, no wrap
            return window
    span = 2 * k + 8  # a ring of many owners needs barely more than k points for k distinct ones
    while True:
        window = owners[i: i + span]
        if i + span > n:  # wrap around
            window += owners[: min(i, i + span - n)]
        out = dict.fromkeys(window)  # C-level, first occurrences in order
        if len(out) >= k or span >= n:
            return list(islice(out, k))
        span *= 4


def sample_py(hashes: array, owners: list[str], start: int, k: int) -> tuple[int, list[str]]:
    """(where `start` falls on the ring (bisect_right), the first k distinct owners clockwise from it); k <= the
    number of owners."""
    i = bisect_right(hashes, start)
    window = owners[i: i + k]  # most often k distinct owners already
    if len(window) < k or len(set(window)) < k:
        window = ring_walk(hashes, owners, start, k, i)
    return i, window


def first_clockwise_py(owners: list[str], i: int, tied: list[str]) -> str | None:
    """The engine of `tied` that owns the first point from position `i` on (wrapping around): the tied engine
    whose point comes first clockwise from a hash that falls at `i`; of equal hashes, the lower id (the ring's
    order). None when none of them is on the ring."""
    wanted = set(tied)
    for owner in chain(islice(owners, i, None), islice(owners, 0, i)):
        if owner in wanted:
            return owner
    return None


def count_changes_py(counts: dict[str, int], old_counts: dict[str, int]) -> dict[tuple[int, int], list[str]]:
    """The engines whose point count differs between the last ring built (`old_counts`) and a new one (`counts`),
    grouped by (old count, new count): 0 for an engine new to the set or gone from it; the new set's members in
    its order, then those gone in the old set's order. A join or a leave is one engine (and, above the cap, the
    few that the spare points pass to or from); a weight change of many engines moves them alike."""
    groups: dict[tuple[int, int], list[str]] = {}
    for c, old, n in zip(counts, map(old_counts.get, counts, repeat(0)), counts.values()):
        if old != n:
            group = groups.get((old, n))
            if group is None:
                group = groups[(old, n)] = []
            group.append(c)
    for c in filterfalse(counts.__contains__, old_counts):  # engines no longer in the set
        groups.setdefault((old_counts[c], 0), []).append(c)
    return groups


_c = load("_ring_ops")
IMPLEMENTATION = "c" if _c is not None else "python"
splice = _c.splice if _c is not None else splice_py
sample = _c.sample if _c is not None else sample_py
count_changes = _c.count_changes if _c is not None else count_changes_py
