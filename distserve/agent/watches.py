"""What the agent reads from etcd, through one cluster cache (distserve.cluster.cache): its engine's operator
flags (`state/<id>`) and, on a decode agent, the prefill engines it links with (`engines/`).

After an etcd outage `resync()` lists again at once (a fresh cache swapped in) instead of waiting for the
watches to come back; what vanished meanwhile is reported like a delete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from discovery.client import EtcdClient
from distserve.cluster.cache import Change, ClusterCache
from distserve.cluster.keys import ENGINES, STATE, Keys
from distserve.cluster.records import EngineRecord, OperatorFlags

log = logging.getLogger("distserve.agent")

SYNC_LOG_EVERY = 10.0  # seconds between "etcd not reachable yet" lines while the first list waits


class ClusterWatch:
    """`flags`: this engine's operator flags (defaults when absent); `prefills`: prefill engine id -> record
    (decode agents only). `on_flags()` runs after every flags change, `on_prefill(id)` after a prefill
    appeared, changed or vanished."""

    def __init__(self, client: EtcdClient, keys: Keys, engine_id: str, *, watch_engines: bool,
                 on_flags: Callable[[], None], on_prefill: Callable[[str], None]) -> None:
        self.client = client
        self.keys = keys
        self.engine_id = engine_id
        self.kinds = (STATE, ENGINES) if watch_engines else (STATE,)
        self.flags = OperatorFlags()
        self.prefills: dict[str, EngineRecord] = {}
        self._on_flags = on_flags
        self._on_prefill = on_prefill
        self._flags_changed = asyncio.Event()
        self.cache: ClusterCache | None = None  # the synced cache the maps come from
        self._active: ClusterCache | None = None  # the cache whose changes count (the newest one)

    async def start(self) -> None:
        """Until the first list arrived (etcd unreachable: keeps trying, logging now and then)."""
        await self._swap_in()

    async def resync(self) -> None:
        """List again now (after an etcd outage): a fresh cache replaces the current one."""
        await self._swap_in()

    async def close(self) -> None:
        cache, self.cache, self._active = self.cache, None, None
        if cache is not None:
            await cache.close()

    async def wait_flags(self, predicate: Callable[[OperatorFlags], bool]) -> OperatorFlags:
        """Until `predicate(flags)` holds."""
        while not predicate(self.flags):
            self._flags_changed.clear()
            await self._flags_changed.wait()
        return self.flags

    # --- internals -----------------------------------------------------------------------------------------
    async def _swap_in(self) -> None:
        cache = ClusterCache(self.client, self.keys, self.kinds, name=f"agent-{self.engine_id}")
        cache.on_flags(lambda change: self._flags_change(cache, change))
        if ENGINES in self.kinds:
            cache.on_engines(lambda change: self._engine_change(cache, change))
        previous_active, self._active = self._active, cache
        try:
            await cache.start()
            while not await cache.wait_synced(timeout=SYNC_LOG_EVERY):
                log.warning("agent %s: etcd not reachable yet (%s); still trying", self.engine_id,
                            ",".join(self.client.endpoints))
        except BaseException:
            self._active = previous_active
            await cache.close()
            raise
        previous, self.cache = self.cache, cache
        if previous is not None:
            await previous.close()
        # A list only reports what exists: what vanished while we were not watching goes now.
        self._set_flags(cache.flags.get(self.engine_id) or OperatorFlags())
        for engine_id in [e for e in self.prefills if e not in cache.engines]:
            del self.prefills[engine_id]
            self._on_prefill(engine_id)

    def _flags_change(self, cache: ClusterCache, change: Change[OperatorFlags]) -> None:
        if change.ids[0] != self.engine_id or cache is not self._active:
            return
        self._set_flags(change.new or OperatorFlags())

    def _set_flags(self, flags: OperatorFlags) -> None:
        if flags == self.flags:
            return
        if (flags.drain, flags.cordon) != (self.flags.drain, self.flags.cordon):
            log.info("engine %s operator flags: drain=%s cordon=%s (%s)", self.engine_id, flags.drain,
                     flags.cordon, flags.reason or "no reason given")
        self.flags = flags
        self._flags_changed.set()
        self._on_flags()

    def _engine_change(self, cache: ClusterCache, change: Change[EngineRecord]) -> None:
        if cache is not self._active:
            return  # an old cache still winding down
        engine_id = change.ids[0]
        if engine_id == self.engine_id:
            return
        new = change.new
        if new is not None and new.role == "prefill":
            if self.prefills.get(engine_id) == new:
                return
            self.prefills[engine_id] = new
        elif engine_id in self.prefills:
            del self.prefills[engine_id]
        else:
            return
        self._on_prefill(engine_id)
