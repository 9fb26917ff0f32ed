"""Real reference engines as separate OS processes, shared by the engine tests of one session."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.util import Proc, spawn_engine


@dataclass
class Engines:
    procs: dict[str, Proc]
    urls: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.urls[name]


def start_engines(specs: dict[str, tuple[str, ...]]) -> Engines:
    """name -> (role, extra args...); started in parallel."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(spawn_engine, args[0], None, *args[1:], name=f"engine-{name}")
                   for name, args in specs.items()}
        results = {}
        errors = []
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
    if errors:
        for proc, _ in results.values():
            proc.stop()
        raise errors[0]
    return Engines({n: r[0] for n, r in results.items()}, {n: r[1] for n, r in results.items()})


@pytest.fixture(scope="session")
def pd_engines():
    """A prefill, a decode and a hybrid engine with the default model."""
    engines = start_engines({"prefill": ("prefill",), "decode": ("decode",), "hybrid": ("hybrid",)})
    yield engines
    for proc in engines.procs.values():
        proc.stop()
