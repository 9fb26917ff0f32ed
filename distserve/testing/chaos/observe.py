"""The cluster seen from outside, over time: routers' readiness, etcd's records, leftovers after a fault.

`Monitor` samples every `interval` seconds, concurrently:
- every live router's `GET /health/ready` (status and routable prefill/decode/hybrid counts);
- etcd's records (engine ids with their state and incarnation, links with their incarnations, the lease
  of every key), through one `EtcdClient` with a short timeout (a failed scan is a sample with etcd down).
Detection and recovery times are read from these samples (`first_time`).

`scan_etcd` also finds keys that should be under a lease but are not, and records pointing at engines or
incarnations that no longer exist.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.cluster.keys import ENGINES, LINKS, LOAD, ROUTERS, Keys
from distserve.cluster.records import EngineRecord, LinkRecord

LEASED_KINDS = (ENGINES, LINKS, LOAD, ROUTERS)


@dataclass
class EtcdView:
    ok: bool
    error: str | None = None
    engines: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (state, incarnation)
    links: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # "p>d" -> (state, p inc, d inc)
    leases: dict[str, int] = field(default_factory=dict)  # key -> lease id (0 = none)
    routers: list[str] = field(default_factory=list)
    unparsable: list[str] = field(default_factory=list)
    revision: int = 0

    def usable_links(self) -> int:
        n = 0
        for pair, (state, p_inc, d_inc) in self.links.items():
            p, d = pair.split(">")
            if (state == "established" and self.engines.get(p, ("", ""))[1] == p_inc
                    and self.engines.get(d, ("", ""))[1] == d_inc):
                n += 1
        return n

    def ready(self, ids) -> bool:
        return all(self.engines.get(i, ("",))[0] == "ready" for i in ids)

    def to_json(self) -> dict:
        return {"ok": self.ok, "error": self.error, "engines": self.engines, "links": sorted(self.links),
                "usable_links": self.usable_links(), "routers": self.routers, "revision": self.revision}


async def scan_etcd(client: EtcdClient, keys: Keys, timeout: float = 1.0) -> EtcdView:
    try:
        kvs, revision = await client.get_prefix(keys.root, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - etcd down is an observation, not an error
        return EtcdView(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    view = EtcdView(ok=True, revision=revision)
    for kv in kvs:
        parsed = keys.parse(kv.key)
        if parsed is None:
            view.unparsable.append(kv.key)
            continue
        if parsed.kind in LEASED_KINDS:
            view.leases[kv.key] = kv.lease
        try:
            if parsed.kind == ENGINES:
                rec = EngineRecord.decode(kv.value)
                view.engines[parsed.ids[0]] = (rec.state, rec.incarnation)
            elif parsed.kind == LINKS:
                link = LinkRecord.decode(kv.value)
                view.links[f"{parsed.ids[0]}>{parsed.ids[1]}"] = (link.state, link.prefill_incarnation,
                                                                  link.decode_incarnation)
            elif parsed.kind == ROUTERS:
                view.routers.append(parsed.ids[0])
        except Exception:  # noqa: BLE001 - planted garbage (the malformed-values scenario)
            view.unparsable.append(kv.key)
    return view


@dataclass
class Sample:
    t: float
    routers: dict[str, dict | None]  # router name -> ready counts (None: no answer)
    etcd: EtcdView


class Monitor:
    def __init__(self, cluster, interval: float = 0.1) -> None:
        self.cluster = cluster
        self.interval = interval
        self.keys = Keys()
        self.samples: list[Sample] = []
        self.events: list[tuple[float, str]] = []  # (time, label): faults and repairs, for the timeline
        self.client: EtcdClient | None = None
        self._task: asyncio.Task | None = None

    def mark(self, label: str, t: float | None = None) -> float:
        t = t or time.time()
        self.events.append((t, label))
        return t

    async def start(self) -> None:
        endpoints = self.cluster.etcd_endpoints.split(",")
        self.client = EtcdClient(EtcdConfig(endpoints=endpoints, timeout=1.0))
        await self.client.connect()
        self._task = asyncio.create_task(self._run(), name="monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    async def sample(self) -> Sample:
        routers = self.cluster.live_routers()
        t = time.time()
        results = await asyncio.gather(scan_etcd(self.client, self.keys),
                                       *(self.cluster.ready_counts(r) for r in routers))
        return Sample(t, {r.name: c for r, c in zip(routers, results[1:])}, results[0])

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            self.samples.append(await self.sample())
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    # ------------------------------------------------------------------ reading the samples
    def first_time(self, predicate, after: float) -> float | None:
        """Time of the first sample at or after `after` for which predicate(sample) holds."""
        for s in self.samples:
            if s.t >= after and predicate(s):
                return s.t
        return None

    def always(self, predicate, start: float, end: float) -> list[Sample]:
        """The samples in [start, end] for which predicate does NOT hold (empty: it always held)."""
        return [s for s in self.samples if start <= s.t <= end and not predicate(s)]

    def timeline(self) -> list[dict]:
        """Compact per-sample rows for the JSON result and the plots."""
        out = []
        for s in self.samples:
            out.append({"t": round(s.t, 3), "etcd_ok": s.etcd.ok,
                        "engines_ready": sum(1 for st, _ in s.etcd.engines.values() if st == "ready"),
                        "engines": len(s.etcd.engines), "links": s.etcd.usable_links(),
                        "routers": {n: (None if c is None else [c["status"], c["prefill"], c["decode"]])
                                    for n, c in s.routers.items()}})
        return out


def routers_report(sample: Sample, role: str, count: int, routers: list[str] | None = None) -> bool:
    """Every (named) router in the sample answered ready with `count` routable engines of `role`."""
    names = routers or list(sample.routers)
    return all(sample.routers.get(n) is not None and sample.routers[n]["status"] == 200
               and sample.routers[n][role] == count for n in names)


_LOG_LINE = re.compile(r"request (\S+) (\S+) -> (\d+)(?: stream=\S+)? in ([\d.]+) ms via (\S+)")  # streams say how they ended


def router_log_engines(log_paths: list[Path]) -> dict[str, tuple[str, int]]:
    """request id -> (engines "p>d", status) from the routers' one-line-per-request INFO logs."""
    out: dict[str, tuple[str, int]] = {}
    for path in log_paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for m in _LOG_LINE.finditer(text):
            out[m.group(1)] = (m.group(5), int(m.group(3)))
    return out


async def lease_alive(client: EtcdClient, lease_ids: set[int]) -> dict[int, int]:
    """lease id -> seconds left (-1: gone)."""
    ids = sorted(i for i in lease_ids if i)
    ttls = await asyncio.gather(*(client.time_to_live(i, timeout=2.0) for i in ids), return_exceptions=True)
    return {i: (t if isinstance(t, int) else -1) for i, t in zip(ids, ttls)}
