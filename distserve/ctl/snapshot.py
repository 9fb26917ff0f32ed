"""One consistent read of a cluster's key space (a single range request), decoded into typed records by
distserve.cluster.codec (the decoder routers and agents use)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from discovery.record import VersionedRecord
from distserve.cluster import keys as K, records
from distserve.cluster.codec import LEASED_KINDS, MalformedValue, decode_value
from distserve.cluster.topology import Topology, compute_topology

R = TypeVar("R", bound=VersionedRecord)


@dataclass
class Entry(Generic[R]):
    key: str
    record: R
    kv: Any  # discovery.client.KeyValue

    @property
    def lease(self) -> int:
        return int(getattr(self.kv, "lease", 0) or 0)


@dataclass
class Malformed:
    key: str
    reason: str
    kv: Any


@dataclass
class ClusterSnapshot:
    keys: K.Keys
    revision: int
    kvs: list[Any]
    taken_at: float = field(default_factory=time.time)
    engines: dict[str, Entry[records.EngineRecord]] = field(default_factory=dict)
    links: dict[tuple[str, str], Entry[records.LinkRecord]] = field(default_factory=dict)
    loads: dict[str, Entry[records.LoadRecord]] = field(default_factory=dict)
    flags: dict[str, Entry[records.OperatorFlags]] = field(default_factory=dict)
    routers: dict[str, Entry[records.RouterRecord]] = field(default_factory=dict)
    routing: Entry[records.RoutingConfig] | None = None
    malformed: list[Malformed] = field(default_factory=list)
    unknown: list[Any] = field(default_factory=list)  # keys under the cluster root outside the schema
    # lease id -> seconds left (-1: gone); filled by fetch_lease_ttls
    lease_ttl: dict[int, int] = field(default_factory=dict)
    _topology: Topology | None = None
    _links_by_engine: dict[str, list[Entry[records.LinkRecord]]] | None = None
    _engine_records: dict[str, records.EngineRecord] | None = None

    @classmethod
    def from_kvs(cls, keys: K.Keys, kvs: list[Any], revision: int) -> "ClusterSnapshot":
        snap = cls(keys=keys, revision=revision, kvs=list(kvs))
        for kv in kvs:
            snap._add(kv)
        return snap

    def _add(self, kv: Any) -> None:
        parsed = self.keys.parse(kv.key)
        if parsed is None:
            self.unknown.append(kv)
            return
        try:
            record = decode_value(parsed.kind, parsed.ids, kv.value)
        except MalformedValue as exc:
            self.malformed.append(Malformed(kv.key, str(exc), kv))
            return
        entry = Entry(kv.key, record, kv)
        if parsed.kind == K.ENGINES:
            self.engines[parsed.ids[0]] = entry
        elif parsed.kind == K.LINKS:
            self.links[(parsed.ids[0], parsed.ids[1])] = entry
        elif parsed.kind == K.LOAD:
            self.loads[parsed.ids[0]] = entry
        elif parsed.kind == K.STATE:
            self.flags[parsed.ids[0]] = entry
        elif parsed.kind == K.ROUTERS:
            self.routers[parsed.ids[0]] = entry
        elif parsed.kind == K.CONFIG:
            self.routing = entry

    # derived views --------------------------------------------------------------------------------
    @property
    def engine_records(self) -> dict[str, records.EngineRecord]:
        if self._engine_records is None:
            self._engine_records = {i: e.record for i, e in self.engines.items()}
        return self._engine_records

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = compute_topology(
                self.engine_records,
                {p: e.record for p, e in self.links.items()},
                {i: e.record for i, e in self.flags.items()},
            )
        return self._topology

    def flags_of(self, engine_id: str) -> records.OperatorFlags | None:
        entry = self.flags.get(engine_id)
        return entry.record if entry else None

    def load_of(self, engine_id: str) -> records.LoadRecord | None:
        entry = self.loads.get(engine_id)
        return entry.record if entry else None

    def links_of(self, engine_id: str) -> list[Entry[records.LinkRecord]]:
        """The links an engine is part of (either side), sorted by (prefill, decode); indexed once."""
        if self._links_by_engine is None:
            index: dict[str, list[Entry[records.LinkRecord]]] = {}
            for (p, d), entry in sorted(self.links.items()):
                index.setdefault(p, []).append(entry)
                if d != p:
                    index.setdefault(d, []).append(entry)
            self._links_by_engine = index
        return self._links_by_engine.get(engine_id, [])

    def ttl_of(self, lease: int) -> int | None:
        """Seconds left on a lease; None when unknown or the key has no lease."""
        if not lease:
            return None
        return self.lease_ttl.get(lease)

    def leased_kvs(self) -> list[Any]:
        out = []
        for kv in self.kvs:
            parsed = self.keys.parse(kv.key)
            if parsed is not None and parsed.kind in LEASED_KINDS:
                out.append(kv)
        return out


async def load_snapshot(client: Any, keys: K.Keys, *, leases: bool = True) -> ClusterSnapshot:
    kvs, revision = await client.get_prefix(keys.root)
    snap = ClusterSnapshot.from_kvs(keys, kvs, revision)
    if leases:
        await fetch_lease_ttls(client, snap)
    return snap


async def fetch_lease_ttls(client: Any, snap: ClusterSnapshot, concurrency: int = 16) -> None:
    """One TimeToLive per distinct lease, a bounded number in flight."""
    lease_ids = sorted({int(getattr(kv, "lease", 0) or 0) for kv in snap.kvs} - {0})
    gate = asyncio.Semaphore(concurrency)

    async def one(lease_id: int) -> None:
        async with gate:
            snap.lease_ttl[lease_id] = int(await client.time_to_live(lease_id))

    await asyncio.gather(*(one(lease_id) for lease_id in lease_ids))
