"""The router's whole view of the cluster, built from etcd by list-and-watch (no other state).

Five informers (engines, links, load, operator flags, routing config) keep local copies of the records;
the routing table (distserve.topology plus per-model indexes) is recomputed lazily, at most once per
change, on the first request that needs it. Load records only feed the load tracker and never invalidate
the table. Local circuit breakers count as exclusions in the topology.

The routing config is the one record whose bad value is not dropped from the view: a value that fails the
schema (written with etcdctl, say) is passed on with its error, so the router keeps its last good config
instead of falling back to the defaults, and says so (see Router._on_config).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from discovery.record import MalformedRecord
from distserve.keys import ENGINES, LINKS, Keys
from distserve.records import EngineRecord, LinkRecord, LoadRecord, OperatorFlags, RoutingConfig
from distserve.router.breaker import CircuitBreakers
from distserve.router.load import LoadTracker
from distserve.router.metrics import RouterMetrics
from distserve.topology import (
    Topology,
    compute_topology,
    link_usable,
    same_engine_process,
    takes_new_requests,
)

log = logging.getLogger("distserve.router.view")


@dataclass(frozen=True)
class ConfigValue:
    """What config/routing holds: a config that passed the schema, or the reason it did not."""

    config: RoutingConfig | None
    error: str | None = None


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
    def __init__(
        self,
        client,
        keys: Keys,
        breakers: CircuitBreakers,
        load: LoadTracker,
        metrics: RouterMetrics,
        on_config: Callable[[RoutingConfig | None, str | None, int], None],
    ) -> None:
        self._client = client
        self.keys = keys
        self.breakers = breakers
        self.load = load
        self.metrics = metrics
        self._on_config = on_config
        self.engines: dict[str, EngineRecord] = {}
        self.links: dict[tuple[str, str], LinkRecord] = {}
        self.flags: dict[str, OperatorFlags] = {}
        self.loads: dict[str, LoadRecord] = {}
        self.routing_config: RoutingConfig | None = None  # the last value that passed the schema
        self._config_informer = None
        self._table: RoutingTable | None = None
        self._informers: list = []
        self.synced = asyncio.Event()
        self.last_event_at = 0.0
        self._changed: asyncio.Future | None = None  # resolved by the next invalidate() (wait_changed)
        metrics.pool_running.callback = lambda: self._pool_sum(lambda r: r.running)
        metrics.pool_waiting.callback = lambda: self._pool_sum(lambda r: r.waiting)
        metrics.pool_prefill_tokens.callback = lambda: self._pool_sum(lambda r: r.prefill_tokens_pending)
        metrics.pool_kv_usage.callback = self._pool_kv_usage

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        from discovery.informer import Informer

        k = self.keys
        specs = [
            (k.prefix(ENGINES), self._decode_engine, self._on_engine),
            (k.prefix(LINKS), self._decode_link, self._on_link),
            (k.prefix("load"), self._decode_load, self._on_load),
            (k.prefix("state"), self._decode_flags, self._on_flags),
            (k.config(), self._decode_config, self._on_config_event),
        ]
        for prefix, decode, listener in specs:
            inf = Informer(self._client, prefix, decode=decode)
            inf.add_listener(listener)
            self._informers.append(inf)
            if decode == self._decode_config:
                self._config_informer = inf
        for inf in self._informers:
            await inf.start()

    async def wait_synced(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(inf.wait_synced(timeout) for inf in self._informers)), timeout
            )
        except asyncio.TimeoutError:
            return False
        if not all(inf.synced.is_set() for inf in self._informers):
            return False
        self.synced.set()
        self.metrics.view_synced.set(1)
        self.invalidate()
        return True

    async def stop(self) -> None:
        for inf in self._informers:
            try:
                await inf.stop()
            except Exception:  # noqa: BLE001 - shutting down: keep stopping the others
                log.debug("informer stop failed", exc_info=True)

    @property
    def revision(self) -> int:
        return max((inf.revision or 0 for inf in self._informers), default=0)

    @property
    def malformed(self) -> int:
        return sum(inf.malformed_count for inf in self._informers)

    # ---------------------------------------------------------------- decoding (bad values are skipped)
    def _decode_engine(self, key: str, raw: bytes) -> EngineRecord:
        parsed = self.keys.parse(key)
        record = EngineRecord.decode(raw)
        if parsed is None or parsed.ids[0] != record.id:
            raise MalformedRecord(f"engine record id {record.id!r} does not match its key {key}")
        return record

    def _decode_link(self, key: str, raw: bytes) -> LinkRecord:
        parsed = self.keys.parse(key)
        record = LinkRecord.decode(raw)
        if parsed is None or parsed.ids != (record.prefill_id, record.decode_id):
            raise MalformedRecord(f"link record does not match its key {key}")
        return record

    def _decode_load(self, key: str, raw: bytes) -> LoadRecord:
        return LoadRecord.decode(raw)

    def _decode_flags(self, key: str, raw: bytes) -> OperatorFlags:
        return OperatorFlags.decode(raw)

    def _decode_config(self, key: str, raw: bytes) -> ConfigValue:
        if key != self.keys.config():
            raise MalformedRecord(f"not the routing config: {key}")
        try:
            return ConfigValue(RoutingConfig.decode(raw))
        except MalformedRecord as exc:  # kept in the view with its error: the last good config stays
            return ConfigValue(None, str(exc).removeprefix("RoutingConfig: "))

    # ---------------------------------------------------------------- events
    def _seen(self, updated_at: float | None = None) -> None:
        now = time.time()
        self.last_event_at = now
        if updated_at:
            self.metrics.view_lag.set(max(0.0, now - updated_at))

    def _id(self, key: str) -> tuple[str, ...] | None:
        parsed = self.keys.parse(key)
        return parsed.ids if parsed else None

    def _on_engine(self, kind: str, key: str, old, new) -> None:
        ids = self._id(key)
        if not ids:
            return
        engine_id = ids[0]
        if self.synced.is_set():  # lifecycle counters (flapping, lease-loss alerts); not the initial list
            self._count_change(engine_id, old, new if kind == "put" else None)
        if kind == "put" and new is not None:
            self.engines[engine_id] = new
            self.breakers.on_engine(engine_id, new.incarnation)
        else:
            self.engines.pop(engine_id, None)
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

    def _on_link(self, kind: str, key: str, old, new) -> None:
        ids = self._id(key)
        if not ids:
            return
        if kind == "put" and new is not None:
            self.links[(ids[0], ids[1])] = new
        else:
            self.links.pop((ids[0], ids[1]), None)
        self._seen(getattr(new, "updated_at", None))
        self.invalidate()

    def _on_load(self, kind: str, key: str, old, new) -> None:
        ids = self._id(key)
        if not ids:
            return
        if kind == "put" and new is not None:
            self.loads[ids[0]] = new
            self.load.on_load(ids[0], new)
        else:
            self.loads.pop(ids[0], None)
            self.load.on_load(ids[0], None)
        self._seen(getattr(new, "updated_at", None))

    def _on_flags(self, kind: str, key: str, old, new) -> None:
        ids = self._id(key)
        if not ids:
            return
        if kind == "put" and new is not None:
            self.flags[ids[0]] = new
        else:
            self.flags.pop(ids[0], None)
        self._seen(getattr(new, "updated_at", None))
        self.invalidate()

    def _on_config_event(self, kind: str, key: str, old, new: ConfigValue | None) -> None:
        # one key under this informer: its revision is the event's mod revision
        revision = self._config_informer.revision if self._config_informer is not None else 0
        if kind != "put" or new is None:  # deleted: back to the defaults, as documented
            self.routing_config = None
            self._seen()
            self._on_config(None, None, 0)
            return
        if new.config is None:
            self._seen()
            self._on_config(None, new.error or "invalid routing config", revision)
            return
        self.routing_config = new.config
        self._seen(new.config.updated_at)
        self._on_config(new.config, None, revision)

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
        """Decodes an in-flight request may finish on after its prefill on `prefill` succeeded.

        The prefill's own state no longer matters (it may have been cordoned, drained or marked unhealthy
        meanwhile: its preserved KV is still there); only its record must exist and name the same engine
        process (a new lease is fine: the KV lives in the process). Each decode must take new requests,
        serve the model, have a usable link to that prefill, and not be excluded by a local circuit breaker.
        """
        current = self.engines.get(prefill.id)
        if current is None or not same_engine_process(current, prefill.instance, prefill.incarnation):
            return []
        routable = self.table().decodes.get((prefill.id, model))
        if routable is not None:  # the prefill is still routable: the precomputed answer is the same
            return routable
        excluded = self.breakers.open_ids
        found = []
        for (prefill_id, decode_id), link in self.links.items():
            if prefill_id != prefill.id or decode_id in excluded:
                continue
            decode = self.engines.get(decode_id)
            if (
                decode is not None
                and decode.role == "decode"
                and model in decode.models
                and takes_new_requests(decode, self.flags.get(decode_id))
                and link_usable(link, self.engines)
            ):
                found.append(decode_id)
        return sorted(found)

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
