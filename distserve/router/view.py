"""The router's routing table, built from a cluster cache (distserve.cluster.cache: list-and-watch, no other
state).

The cache keeps typed maps of engines, links, load, operator flags and the routing config; this module
subscribes to their changes and keeps the routing table (distserve.cluster.topology plus per-model indexes),
recomputed lazily, at most once per change, on the first request that needs it. Load records only feed
the load tracker and never invalidate the table. Local circuit breakers count as exclusions in the topology.

The routing config is the one record whose bad value does not send the router back to its defaults: a
value that fails the schema (written with etcdctl, say) reaches the router with its error, so it keeps its
last good config and says so (see Router._on_config).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from distserve.cluster.cache import Change, ClusterCache
from distserve.cluster.keys import CONFIG, ENGINES, LINKS, LOAD, ROUTING_CONFIG_NAME, STATE, Keys
from distserve.cluster.records import EngineRecord, LinkRecord, LoadRecord, OperatorFlags, RoutingConfig
from distserve.cluster.topology import Topology, compute_topology, inflight_decodes, same_engine_process
from distserve.router.breaker import CircuitBreakers
from distserve.router.load import LoadTracker
from distserve.router.metrics import RouterMetrics

log = logging.getLogger("distserve.router.view")


@dataclass
class ConfigStatus:
    """The routing config a router runs on, reported in /health/ready's body."""

    valid: bool = True  # False: the stored value was refused, the router keeps `applied_revision`
    error: str | None = None
    revision: int = 0  # mod revision of the last value read from etcd (0: none yet or deleted)
    applied_revision: int = 0  # mod revision of the config in force (0: the defaults)

    def as_dict(self) -> dict:
        return {"valid": self.valid, "error": self.error, "revision": self.revision,
                "applied_revision": self.applied_revision}


@dataclass
class RoutingTable:
    topology: Topology
    # model -> sorted routable entry engines (prefills with a usable link to a decode serving the model,
    # and hybrids) serving it
    entries: dict[str, list[str]] = field(default_factory=dict)
    # (prefill id, model) -> routable decodes linked to that prefill and serving the model
    decodes: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # every model any registered engine claims (tells "unknown model" 404 from "nothing routable" 503)
    known_models: frozenset[str] = frozenset()

    @property
    def has_path(self) -> bool:
        return any(self.entries.values())


class ClusterView:
    """The routing table over a ClusterCache of engines, links, load, operator flags and config/routing."""

    def __init__(
        self,
        client,
        keys: Keys,
        breakers: CircuitBreakers,
        load: LoadTracker,
        metrics: RouterMetrics,
        on_config: Callable[[RoutingConfig | None, str | None, int], None],
    ) -> None:
        self.keys = keys
        self.breakers = breakers
        self.load = load
        self.metrics = metrics
        self._on_config = on_config
        self.cache = ClusterCache(client, keys, (ENGINES, LINKS, LOAD, STATE, CONFIG), name="router")
        self.routing_config: RoutingConfig | None = None  # the last value that passed the schema
        self._table: RoutingTable | None = None
        self.synced = self.cache.synced
        self.last_event_at = 0.0
        self._changed: asyncio.Future | None = None  # resolved by the next invalidate() (wait_changed)
        self.cache.on_engines(self._on_engine)
        self.cache.on_links(self._on_table_input)
        self.cache.on_flags(self._on_table_input)
        self.cache.on_load(self._on_load)
        self.cache.on_config(self._on_config_change)
        self.cache.on_synced(self._on_synced)
        metrics.pool_running.callback = lambda: self._pool_sum(lambda r: r.running)
        metrics.pool_waiting.callback = lambda: self._pool_sum(lambda r: r.waiting)
        metrics.pool_prefill_tokens.callback = lambda: self._pool_sum(lambda r: r.prefill_tokens_pending)
        metrics.pool_kv_usage.callback = self._pool_kv_usage

    # the cache's typed maps (live; read only)
    @property
    def engines(self) -> dict[str, EngineRecord]:
        return self.cache.engines

    @property
    def links(self) -> dict[tuple[str, str], LinkRecord]:
        return self.cache.links

    @property
    def flags(self) -> dict[str, OperatorFlags]:
        return self.cache.flags

    @property
    def loads(self) -> dict[str, LoadRecord]:
        return self.cache.loads

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.cache.start()

    async def wait_synced(self, timeout: float) -> bool:
        return await self.cache.wait_synced(timeout)

    async def stop(self) -> None:
        await self.cache.close()

    @property
    def revision(self) -> int:
        return self.cache.revision

    @property
    def malformed(self) -> int:
        return self.cache.malformed

    def _on_synced(self) -> None:
        self.metrics.view_synced.set(1)
        self.invalidate()

    # ---------------------------------------------------------------- events
    def _seen(self, updated_at: float | None = None) -> None:
        now = time.time()
        self.last_event_at = now
        if updated_at:
            self.metrics.view_lag.set(max(0.0, now - updated_at))

    def _on_engine(self, change: Change[EngineRecord]) -> None:
        if change.old is None and change.new is None:  # a malformed value came or went: nothing was routable
            return
        engine_id = change.ids[0]
        if change.synced:  # lifecycle counters (flapping, lease-loss alerts); not the initial list
            self._count_change(engine_id, change.old, change.new)
        if change.new is not None:
            self.breakers.on_engine(engine_id, change.new.incarnation)
        else:
            self.breakers.on_engine(engine_id, None)
            self.load.forget(engine_id)
        self._seen()  # engine records carry no write time (registered_at is the first registration)
        self.invalidate()

    def _count_change(self, engine_id: str, old: EngineRecord | None, new: EngineRecord | None) -> None:
        if new is None:  # the same rule as `distserve-ctl watch`: a draining engine deregistered
            change = "deregistered" if old is not None and old.state == "draining" else "lease_expired"
        elif old is None or old.incarnation != new.incarnation:
            change = "registered"
        elif old.state != new.state:
            change = new.state
        else:
            return
        self.metrics.engine_changes.inc((engine_id, change))

    def _on_table_input(self, change: Change[LinkRecord] | Change[OperatorFlags]) -> None:
        if change.old is None and change.new is None:
            return
        self._seen(getattr(change.new, "updated_at", None))
        self.invalidate()

    def _on_load(self, change: Change[LoadRecord]) -> None:
        if change.old is None and change.new is None:
            return
        self.load.on_load(change.ids[0], change.new)
        self._seen(getattr(change.new, "updated_at", None))

    def _on_config_change(self, change: Change[RoutingConfig]) -> None:
        if change.ids != (ROUTING_CONFIG_NAME,):  # another config/ key: not this router's business
            return
        self._seen(change.new.updated_at if change.new is not None else None)
        if change.type == "malformed":  # kept out of the cache; the router keeps its last good config
            self._on_config(None, (change.error or "invalid routing config").removeprefix("RoutingConfig: "),
                            change.revision)
        elif change.new is None:  # deleted: back to the defaults, as documented
            self.routing_config = None
            self._on_config(None, None, 0)
        else:
            self.routing_config = change.new
            self._on_config(change.new, None, change.revision)

    # ---------------------------------------------------------------- scaling signals (read at scrape time)
    def _pool_loads(self):
        for engine_id, load in self.loads.items():
            engine = self.engines.get(engine_id)
            if engine is not None:
                yield engine.role, load

    def _pool_sum(self, field: Callable[[LoadRecord], int | None]) -> dict[tuple, float]:
        out: dict[tuple, float] = {(role,): 0 for role in ("prefill", "decode", "hybrid")}
        for role, load in self._pool_loads():
            out[(role,)] += field(load) or 0
        return out

    def _pool_kv_usage(self) -> dict[tuple, float]:
        used: dict[str, int] = {}
        total: dict[str, int] = {}
        for role, load in self._pool_loads():
            if load.kv_blocks_total and load.kv_blocks_free is not None:
                used[role] = used.get(role, 0) + load.kv_blocks_total - load.kv_blocks_free
                total[role] = total.get(role, 0) + load.kv_blocks_total
        return {(role,): used[role] / total[role] for role in total}

    # ---------------------------------------------------------------- routing table
    def invalidate(self) -> None:
        self._table = None
        waiter, self._changed = self._changed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_changed(self, timeout: float) -> bool:
        """Wait until the routing table may have changed (any engine, link, flag or breaker event), at most
        `timeout` seconds; False on timeout."""
        if timeout <= 0:
            return False
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def table(self) -> RoutingTable:
        table = self._table
        if table is None:
            table = self._table = self._build()
        return table

    def decodes_for_inflight(self, prefill: EngineRecord, model: str) -> list[str]:
        """Decodes an in-flight request may finish on after its prefill on `prefill` succeeded
        (distserve.cluster.topology.inflight_decodes, local circuit breakers excluded)."""
        current = self.engines.get(prefill.id)
        if current is None or not same_engine_process(current, prefill.instance, prefill.incarnation):
            return []
        routable = self.table().decodes.get((prefill.id, model))
        if routable is not None:  # the prefill is still routable: the precomputed answer is the same
            return routable
        return inflight_decodes(prefill, model, self.engines, self.links, self.flags, self.breakers.open_ids)

    def _build(self) -> RoutingTable:
        engines = self.engines
        topo = compute_topology(engines, self.links, self.flags, excluded=self.breakers.open_ids)
        table = RoutingTable(topology=topo)
        known: set[str] = set()
        for e in engines.values():
            known.update(e.models)
        table.known_models = frozenset(known)
        entries: dict[str, list[str]] = {}
        for prefill_id, decode_ids in topo.decodes_of_prefill.items():
            for model in engines[prefill_id].models:
                decodes = [d for d in decode_ids if model in engines[d].models]
                if decodes:
                    table.decodes[(prefill_id, model)] = decodes
                    entries.setdefault(model, []).append(prefill_id)
        for hybrid_id in topo.routable_hybrids:
            for model in engines[hybrid_id].models:
                entries.setdefault(model, []).append(hybrid_id)
        for ids in entries.values():
            ids.sort()
        table.entries = entries
        self._export(table)
        return table

    def _export(self, table: RoutingTable) -> None:
        m = self.metrics
        by_role: dict[tuple, float] = {("prefill",): 0, ("decode",): 0, ("hybrid",): 0}
        for e in self.engines.values():
            by_role[(e.role,)] = by_role.get((e.role,), 0) + 1
        m.engines_known.values = by_role
        topo = table.topology
        m.engines_routable.values = {
            ("prefill",): len(topo.routable_prefills),
            ("decode",): len(topo.routable_decodes),
            ("hybrid",): len(topo.routable_hybrids),
        }
        m.links_usable.set(sum(len(v) for v in topo.decodes_of_prefill.values()))
        states = {("establishing",): 0, ("established",): 0, ("failed",): 0}
        for link in self.links.values():
            states[(link.state,)] = states.get((link.state,), 0) + 1
        m.links.values = states
        prefills = [set(e.models) for e in self.engines.values() if e.role == "prefill"]
        decodes = [set(e.models) for e in self.engines.values() if e.role == "decode"]
        m.links_possible.set(sum(1 for p in prefills for d in decodes if p & d))
        m.model_routable.values = {(model,): int(bool(table.entries.get(model))) for model in table.known_models}
        m.breaker_open.set(len(self.breakers.open_ids))
