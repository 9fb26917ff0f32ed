"""Which of the router's compiled parts this install runs: each C module (built by `pip install` where a C compiler
and Python's headers are, skipped where not) stands beside its Python specification, which serves where it is
missing or where `DISTSERVE_PURE_PYTHON=1` asks for it (distserve/router/settings.py).

- heads (`_heads.c`): the HTTP/1.1 head parsers of the fast path and the engine client;
- shortlist (`_shortlist.c`): kv_aware's shortlist scoring;
- ring_ops (`_ring_ops.c`): the rings' operations (a derived ring's new lists after an engine change, kv_aware's
  sample and its first tied engine clockwise).

`python -c "from distserve.router import compiled; print(compiled.summary())"` says `c` where all are compiled.
"""

from __future__ import annotations

from distserve.router import heads, ring_ops, shortlist

SOURCES = {"heads": "distserve/router/_heads.c", "shortlist": "distserve/router/_shortlist.c",
           "ring_ops": "distserve/router/_ring_ops.c"}


def implementations() -> dict[str, str]:
    """{part: "c" or "python"}."""
    return {"heads": heads.IMPLEMENTATION, "shortlist": shortlist.IMPLEMENTATION,
            "ring_ops": ring_ops.IMPLEMENTATION}


def summary() -> str:
    """`c` or `python` when every part runs the same, else each part's (`heads c, shortlist python, ...`)."""
    kinds = implementations()
    if len(set(kinds.values())) == 1:
        return next(iter(kinds.values()))
    return ", ".join(f"{part} {kind}" for part, kind in kinds.items())
