"""A derived ring's new lists (distserve/router/strategies.py, _Rings._derive): the last ring built, less the points
of the engines leaving or losing points, plus those joining or gaining.

`splice_py` is the specification, and the fallback. Where the C module `distserve.router._ring_edit` was built at
install (as `distserve.router._heads`: optional, skipped where no compiler is), `splice` is its version, with the
same results (tests/router/test_ring_edit.py compares them on generated rings and edits): one pass that copies
the old lists' runs between edits, where the Python version slices and appends per edit (~2/3 of the first pick
on a new candidate set at 500 prefills: docs/benchmarks.md, "Fifteenth pass"). `DISTSERVE_PURE_PYTHON=1`
selects the Python version.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from itertools import repeat
from typing import Any

from distserve.router.settings import env_pure_python


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


def _load_c() -> Any:
    try:
        if env_pure_python():
            return None
    except ValueError:
        pass  # `distserve router` refuses the value at its start (exit 2)
    try:
        from distserve.router import _ring_edit
    except ImportError:  # not built here: the Python version serves
        return None
    return _ring_edit


_c = _load_c()
IMPLEMENTATION = "c" if _c is not None else "python"
splice = _c.splice if _c is not None else splice_py
