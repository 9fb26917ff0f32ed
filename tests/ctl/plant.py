"""Records planted straight into a real etcd, for testing distserve-ctl without engines (the live-cluster
tests use real agents, engines and routers instead)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from distserve.cluster.keys import Keys
from distserve.cluster.records import (
    EngineGeometry,
    EngineRecord,
    LinkRecord,
    LoadRecord,
    RouterRecord,
    TransferInfo,
    TransferRank,
)


def engine(engine_id: str, role: str, url: str, *, model: str = "tiny", block_size: int = 16, tp: int = 1,
           state: str = "ready", incarnation: str | None = None, **extra: Any) -> EngineRecord:
    return EngineRecord(
        id=engine_id, incarnation=incarnation or uuid.uuid4().hex[:8], role=role, url=url, models=[model],
        engine_info=EngineGeometry(tp_size=tp, block_size=block_size, num_gpu_blocks=64, kv_layout="L2xH2xD16:f32"),
        transfer=TransferInfo(protocol="tcp", ranks=[TransferRank(rank=0, host="127.0.0.1", device="cpu")]),
        state=state, engine_kind="null", software_version="distserve-reference test", **extra,
    )


def link(prefill: EngineRecord, decode: EngineRecord, *, state: str = "established", handshake_ms: float = 12.0,
         **extra: Any) -> LinkRecord:
    return LinkRecord(prefill_id=prefill.id, decode_id=decode.id, prefill_incarnation=prefill.incarnation,
                      decode_incarnation=decode.incarnation, state=state, handshake_ms=handshake_ms,
                      established_at=time.time() if state == "established" else None, **extra)


def load(engine_id: str, running: int = 0, waiting: int = 0, **extra: Any) -> LoadRecord:
    return LoadRecord(engine_id=engine_id, running=running, waiting=waiting, kv_blocks_free=60, kv_blocks_total=64,
                      **extra)


def router(router_id: str, url: str = "http://127.0.0.1:9", **extra: Any) -> RouterRecord:
    return RouterRecord(id=router_id, url=url, version="test", strategy="min_expected_latency", **extra)


class Planter:
    """Writes records of one cluster; leased kinds go under one shared lease unless told otherwise."""

    def __init__(self, client: Any, cluster: str = "default") -> None:
        self.client = client
        self.keys = Keys(cluster)
        self.lease = 0

    async def start(self, ttl: int = 30) -> "Planter":
        self.lease = await self.client.grant(ttl)
        return self

    async def put(self, key: str, record: Any, lease: int | None = None) -> int:
        return await self.client.put(key, record.encode(), lease=self.lease if lease is None else lease)

    async def engine(self, record: EngineRecord, lease: int | None = None) -> int:
        return await self.put(self.keys.engine(record.id), record, lease)

    async def link(self, record: LinkRecord, lease: int | None = None) -> int:
        return await self.put(self.keys.link(record.prefill_id, record.decode_id), record, lease)

    async def load(self, record: LoadRecord, lease: int | None = None) -> int:
        return await self.put(self.keys.load(record.engine_id), record, lease)

    async def router(self, record: RouterRecord, lease: int | None = None) -> int:
        return await self.put(self.keys.router(record.id), record, lease)

    async def small_cluster(self, urls: dict[str, str] | None = None) -> dict[str, Any]:
        """P1, P2 (prefill), D1 (decode), H1 (hybrid), all links, loads and one router r1."""
        urls = urls or {}
        p1 = engine("P1", "prefill", urls.get("P1", "http://127.0.0.1:1"))
        p2 = engine("P2", "prefill", urls.get("P2", "http://127.0.0.1:1"))
        d1 = engine("D1", "decode", urls.get("D1", "http://127.0.0.1:1"))
        h1 = engine("H1", "hybrid", urls.get("H1", "http://127.0.0.1:1"), model="other")
        for rec in (p1, p2, d1, h1):
            await self.engine(rec)
            await self.load(load(rec.id, running=1))
        await self.link(link(p1, d1))
        await self.link(link(p2, d1))
        await self.router(router("r1"))
        return {"P1": p1, "P2": p2, "D1": d1, "H1": h1}
