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

import importlib
from types import ModuleType

from distserve.router.settings import env_pure_python

SOURCES = {"heads": "distserve/router/_heads.c", "shortlist": "distserve/router/_shortlist.c",
           "ring_ops": "distserve/router/_ring_ops.c"}


def load(module: str) -> ModuleType | None:
    """The C module `distserve.router.<module>` where it is built and not ruled out by DISTSERVE_PURE_PYTHON=1;
    None where the Python version is to serve."""
    try:
        if env_pure_python():
            return None
    except ValueError:
        pass  # `distserve router` refuses the value at its start (exit 2); anything else importing this keeps C
    try:
        return importlib.import_module(f"distserve.router.{module}")
    except ImportError:  # not built here (no compiler at install): the Python versions serve
        return None


def implementations() -> dict[str, str]:
    """{part: "c" or "python"}."""
    from distserve.router import heads, ring_ops, shortlist  # noqa: PLC0415 - they load their C modules through load()

    return {"heads": heads.IMPLEMENTATION, "shortlist": shortlist.IMPLEMENTATION,
            "ring_ops": ring_ops.IMPLEMENTATION}


def summary() -> str:
    """`c` or `python` when every part runs the same, else each part's (`heads c, shortlist python, ...`)."""
    kinds = implementations()
    if len(set(kinds.values())) == 1:
        return next(iter(kinds.values()))
    return ", ".join(f"{part} {kind}" for part, kind in kinds.items())
