"""Per-engine circuit breakers: an engine that refuses a connection is skipped by this replica at once.

etcd notices a dead engine only when its agent's lease expires (seconds); a refused connection says so
now. The breaker closes again when etcd shows a new incarnation of the engine (it restarted) or when a
probe of its /health answers 200 (it was a blip). Probes back off (doubling, jittered) up to a ceiling.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

log = logging.getLogger("distserve.router.breaker")


class CircuitBreakers:
    def __init__(
        self,
        pool_getter: Callable,
        auth_header: bytes,
        probe_interval: float = 0.5,
        probe_max_interval: float = 5.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool_getter
        self._headers = auth_header
        self._probe_interval = probe_interval
        self._probe_max = probe_max_interval
        self._on_change = on_change or (lambda: None)
        # engine id -> (incarnation when tripped, time tripped, probe task)
        self._open: dict[str, tuple[str, float, asyncio.Task]] = {}
        self.open_ids: frozenset[str] = frozenset()

    def is_open(self, engine_id: str) -> bool:
        return engine_id in self._open

    def trip(self, engine_id: str, incarnation: str, url: str, reason: str) -> bool:
        """Open the breaker (no-op when already open); returns True when it was closed before."""
        if engine_id in self._open:
            return False
        task = asyncio.get_running_loop().create_task(self._probe(engine_id, url), name=f"probe-{engine_id}")
        self._open[engine_id] = (incarnation, time.monotonic(), task)
        self.open_ids = frozenset(self._open)
        log.warning("engine %s skipped locally (%s); probing %s/health", engine_id, reason, url)
        self._on_change()
        return True

    def on_engine(self, engine_id: str, incarnation: str | None) -> None:
        """etcd changed an engine's record: a new incarnation (or its removal) closes its breaker."""
        entry = self._open.get(engine_id)
        if entry is not None and entry[0] != incarnation:
            self._close(engine_id, "new incarnation in etcd" if incarnation else "removed from etcd")

    def _close(self, engine_id: str, why: str) -> None:
        entry = self._open.pop(engine_id, None)
        if entry is None:
            return
        task = entry[2]
        if task is not asyncio.current_task():
            task.cancel()
        self.open_ids = frozenset(self._open)
        log.info("engine %s back in rotation (%s)", engine_id, why)
        self._on_change()

    async def _probe(self, engine_id: str, url: str) -> None:
        delay = self._probe_interval
        timeout = max(0.5, self._probe_interval * 2)
        while True:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            resp = None
            try:
                resp = await asyncio.wait_for(
                    self._pool().request(url, b"GET", b"/health", b"", self._headers), timeout
                )
                await asyncio.wait_for(resp.read(), timeout)
                if resp.status == 200:
                    self._close(engine_id, "health probe answered")
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - still down: probe again later
                pass
            finally:
                if resp is not None:
                    resp.close()
            delay = min(delay * 2, self._probe_max)

    async def close(self) -> None:
        tasks = [entry[2] for entry in self._open.values()]
        self._open.clear()
        self.open_ids = frozenset()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
