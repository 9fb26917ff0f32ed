"""The router's routing table, built from a cluster cache (distserve.cluster.cache: list-and-watch, no other
state).

The cache keeps typed maps of engines, links, load, operator flags and the routing config; this module
subscribes to their changes and keeps the routing table (distserve.cluster.topology's rule plus per-model
indexes) up to date *incrementally*: a change re-evaluates only the engine, link or flag it names and the
links and prefills that touch it (work proportional to the change, not to the cluster: ~1,000 engines /
10,000 links cost tens of microseconds per change instead of tens of milliseconds for a rebuild). The first
request after a change takes a new snapshot of the table (shallow copies of the indexes: a request that
holds a table keeps a consistent one). `full_table()` is the reference rebuild (compute_topology), which
the tests compare the incremental table with. Load records only feed the load tracker and never touch the
table. Local circuit breakers count as exclusions. The topology gauges are computed at scrape time.

The routing config is the one record whose bad value does not send the router back to its defaults: a
value that fails the schema (written with etcdctl, say) reaches the router with its error, so it keeps its
last good config and says so (see Router._on_config).
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from distserve.cluster.cache import Change, ClusterCache
from distserve.cluster.keys import CONFIG, ENGINES, LINKS, LOAD, ROUTING_CONFIG_NAME, STATE, Keys
from distserve.cluster.records import EngineRecord, LinkRecord, LoadRecord, OperatorFlags, RoutingConfig
from distserve.cluster.topology import (
    Topology,
    compute_topology,
    inflight_decodes,
    link_usable,
    same_engine_process,
    takes_new_requests,
)
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
        self._table: RoutingTable | None = None  # the last snapshot; None: take a new one on next use
        # The incremental routing state. Lists are sorted and never mutated once stored (replaced instead),
        # so a snapshot shares them safely.
        self._open: set[str] = set()  # engines taking new requests, not excluded by a breaker
        self._excluded: frozenset[str] = frozenset()  # the breakers' open ids the state reflects
        self._links_p: dict[str, set[str]] = {}  # prefill -> decodes it has a link record to (any state)
        self._links_d: dict[str, set[str]] = {}  # decode -> prefills
        self._usable: dict[str, set[str]] = {}  # prefill -> decodes of usable links between open engines
        self._decode_refs: dict[str, int] = {}  # decode -> prefills with a usable link to it
        self._dop: dict[str, list[str]] = {}  # topology.decodes_of_prefill
        self._routable_prefills: list[str] = []
        self._routable_decodes: list[str] = []
        self._routable_hybrids: list[str] = []
        self._entries: dict[str, list[str]] = {}  # model -> entry engines
        self._decodes: dict[tuple[str, str], list[str]] = {}  # (prefill, model) -> decodes
        self._entry_of: dict[str, dict[str, list[str] | None]] = {}  # entry -> {model: its decodes (None: hybrid)}
        self._model_refs: dict[str, int] = {}  # model -> engines claiming it
        self.synced = self.cache.synced
        self.last_event_at = 0.0
        self._changed: asyncio.Future | None = None  # resolved by the next invalidate() (wait_changed)
        self.cache.on_engines(self._on_engine)
        self.cache.on_links(self._on_link)
        self.cache.on_flags(self._on_flags)
        self.cache.on_load(self._on_load)
        self.cache.on_config(self._on_config_change)
        self.cache.on_synced(self._on_synced)
        metrics.pool_running.callback = lambda: self._pool_sum(lambda r: r.running)
        metrics.pool_waiting.callback = lambda: self._pool_sum(lambda r: r.waiting)
        metrics.pool_prefill_tokens.callback = lambda: self._pool_sum(lambda r: r.prefill_tokens_pending)
        metrics.pool_kv_usage.callback = self._pool_kv_usage
        # topology gauges: computed when scraped, never on the path of a change or a request
        metrics.engines_known.callback = self._engines_known
        metrics.engines_routable.callback = lambda: {
            ("prefill",): len(self._routable_prefills),
            ("decode",): len(self._routable_decodes),
            ("hybrid",): len(self._routable_hybrids),
        }
        metrics.links_usable.callback = lambda: {(): sum(len(v) for v in self._dop.values())}
        metrics.links.callback = self._link_states
        metrics.links_possible.callback = self._links_possible
        metrics.model_routable.callback = lambda: {
            (model,): int(bool(self._entries.get(model))) for model in self._model_refs
        }
        metrics.breaker_open.callback = lambda: {(): len(self.breakers.open_ids)}

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
        for record, step in ((change.old, -1), (change.new, 1)):
            if record is not None:
                for model in record.models:
                    n = self._model_refs.get(model, 0) + step
                    if n > 0:
                        self._model_refs[model] = n
                    else:
                        self._model_refs.pop(model, None)
        self._seen()  # engine records carry no write time (registered_at is the first registration)
        self._engine_changed(engine_id)
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

    def _on_link(self, change: Change[LinkRecord]) -> None:
        if change.old is None and change.new is None:
            return
        self._seen(getattr(change.new, "updated_at", None))
        prefill_id, decode_id = change.ids
        if change.new is not None:
            self._links_p.setdefault(prefill_id, set()).add(decode_id)
            self._links_d.setdefault(decode_id, set()).add(prefill_id)
        else:
            _discard(self._links_p, prefill_id, decode_id)
            _discard(self._links_d, decode_id, prefill_id)
        self._link_changed(prefill_id, decode_id)
        self._prefill_changed(prefill_id)
        self.invalidate()

    def _on_flags(self, change: Change[OperatorFlags]) -> None:
        if change.old is None and change.new is None:
            return
        self._seen(getattr(change.new, "updated_at", None))
        self._engine_changed(change.ids[0])
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
        """The table may have changed: take the circuit breakers' exclusions in (the engines whose breaker
        opened or closed since the last call), take a new snapshot on next use, wake wait_changed()."""
        excluded = self.breakers.open_ids
        if excluded != self._excluded:
            flipped = excluded ^ self._excluded
            self._excluded = excluded
            for engine_id in flipped:
                self._engine_changed(engine_id)
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
            table = self._table = self._snapshot()
        return table

    def _snapshot(self) -> RoutingTable:
        topo = Topology(
            engines=dict(self.engines),
            decodes_of_prefill=dict(self._dop),
            routable_prefills=self._routable_prefills,
            routable_decodes=self._routable_decodes,
            routable_hybrids=self._routable_hybrids,
        )
        return RoutingTable(
            topology=topo,
            entries={m: ids for m, ids in self._entries.items() if ids},
            decodes=dict(self._decodes),
            known_models=frozenset(self._model_refs),
        )

    # ---------------------------------------------------------------- incremental updates
    def _engine_changed(self, engine_id: str) -> None:
        """Engine `engine_id`'s record, flags or breaker changed: its own state, its links, and the
        prefills whose decodes it is among."""
        engine = self.engines.get(engine_id)
        is_open = (
            engine is not None
            and engine_id not in self._excluded
            and takes_new_requests(engine, self.flags.get(engine_id))
        )
        if is_open:
            self._open.add(engine_id)
        else:
            self._open.discard(engine_id)
        hybrid = is_open and engine is not None and engine.role == "hybrid"
        self._routable_hybrids = _member(self._routable_hybrids, engine_id, hybrid)
        for decode_id in self._links_p.get(engine_id, ()):
            self._link_changed(engine_id, decode_id)
        prefills = self._links_d.get(engine_id, ())
        for prefill_id in prefills:
            self._link_changed(prefill_id, engine_id)
        for prefill_id in prefills:  # its models may have changed even where its links did not
            self._prefill_changed(prefill_id)
        self._prefill_changed(engine_id)  # as an entry: a prefill or a hybrid (or gone)

    def _link_changed(self, prefill_id: str, decode_id: str) -> None:
        """Re-evaluate one link: usable, between open engines of the right roles (compute_topology's rule)."""
        engines = self.engines
        link = self.links.get((prefill_id, decode_id))
        prefill, decode = engines.get(prefill_id), engines.get(decode_id)
        ok = (
            link is not None
            and prefill_id in self._open
            and decode_id in self._open
            and prefill.role == "prefill"  # type: ignore[union-attr]
            and decode.role == "decode"  # type: ignore[union-attr]
            and link_usable(link, engines)
        )
        usable = self._usable.get(prefill_id)
        was = usable is not None and decode_id in usable
        if ok == was:
            return
        refs = self._decode_refs.get(decode_id, 0)
        if ok:
            self._usable.setdefault(prefill_id, set()).add(decode_id)
            self._decode_refs[decode_id] = refs + 1
            if refs == 0:
                self._routable_decodes = _member(self._routable_decodes, decode_id, True)
        else:
            _discard(self._usable, prefill_id, decode_id)
            if refs <= 1:
                self._decode_refs.pop(decode_id, None)
                self._routable_decodes = _member(self._routable_decodes, decode_id, False)
            else:
                self._decode_refs[decode_id] = refs - 1

    def _prefill_changed(self, entry_id: str) -> None:
        """Re-derive one entry engine's rows: its usable decodes, the models it is an entry for, and its
        decodes per model."""
        engines = self.engines
        engine = engines.get(entry_id)
        decodes = sorted(self._usable.get(entry_id, ()))
        if decodes:
            if self._dop.get(entry_id) != decodes:
                self._dop[entry_id] = decodes
        else:
            self._dop.pop(entry_id, None)
        self._routable_prefills = _member(self._routable_prefills, entry_id, bool(decodes))
        rows: dict[str, list[str] | None] = {}
        if engine is not None:
            if engine.role == "hybrid":
                if entry_id in self._open:
                    rows = dict.fromkeys(engine.models)
            elif decodes:
                for model in engine.models:
                    serving = [d for d in decodes if model in engines[d].models]
                    if serving:
                        rows[model] = serving
        old = self._entry_of.get(entry_id, {})
        for model in old:
            if model not in rows:
                self._entries[model] = _member(self._entries.get(model, []), entry_id, False)
                if not self._entries[model]:
                    del self._entries[model]
                self._decodes.pop((entry_id, model), None)
        for model, serving in rows.items():
            if model not in old:
                self._entries[model] = _member(self._entries.get(model, []), entry_id, True)
            if serving is None:
                self._decodes.pop((entry_id, model), None)
            elif self._decodes.get((entry_id, model)) != serving:
                self._decodes[(entry_id, model)] = serving
        if rows:
            self._entry_of[entry_id] = rows
        else:
            self._entry_of.pop(entry_id, None)

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

    def full_table(self) -> RoutingTable:
        """The routing table rebuilt from scratch with compute_topology: the reference the incremental
        table must equal (tests); O(engines + links), never on the request path."""
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
        return table

    # ---------------------------------------------------------------- topology gauges (scrape time)
    def _engines_known(self) -> dict[tuple, float]:
        by_role: dict[tuple, float] = {("prefill",): 0, ("decode",): 0, ("hybrid",): 0}
        for e in self.engines.values():
            by_role[(e.role,)] = by_role.get((e.role,), 0) + 1
        return by_role

    def _link_states(self) -> dict[tuple, float]:
        states: dict[tuple, float] = {("establishing",): 0, ("established",): 0, ("failed",): 0}
        for link in self.links.values():
            states[(link.state,)] = states.get((link.state,), 0) + 1
        return states

    def _links_possible(self) -> dict[tuple, float]:
        """Prefill-decode pairs sharing a model: counted per model set, not per pair (1,000 engines of a
        handful of model sets cost a few dozen set intersections, not 250,000)."""
        prefills: dict[frozenset, int] = {}
        decodes: dict[frozenset, int] = {}
        for e in self.engines.values():
            if e.role in ("prefill", "decode"):
                side = prefills if e.role == "prefill" else decodes
                models = frozenset(e.models)
                side[models] = side.get(models, 0) + 1
        return {(): sum(np * nd for p, np in prefills.items() for d, nd in decodes.items() if p & d)}


def _member(ids: list[str], engine_id: str, present: bool) -> list[str]:
    """`ids` (sorted) with or without `engine_id`: the same list when nothing changes, else a new one (lists
    are shared by snapshots, never mutated)."""
    i = bisect_left(ids, engine_id)
    there = i < len(ids) and ids[i] == engine_id
    if present == there:
        return ids
    return ids[:i] + [engine_id] + ids[i:] if present else ids[:i] + ids[i + 1:]


def _discard(index: dict[str, set[str]], key: str, value: str) -> None:
    values = index.get(key)
    if values is not None:
        values.discard(value)
        if not values:
            del index[key]
