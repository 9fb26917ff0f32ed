"""The load record: what an engine is busy with, read from its /metrics, published on change.

Reference engine: `distserve_engine_*` gauges (running, waiting, KV blocks used/free, prefill tokens pending,
preserved blocks). Stock lmdeploy (`--enable-metrics`): `lmdeploy:num_requests_running`,
`lmdeploy:num_requests_waiting` and `lmdeploy:gpu_cache_usage_perc` (a fraction, turned into free blocks with
engine_info's num_gpu_blocks); it has no prefill-tokens-pending or preserved-blocks figure. Without
`--enable-metrics` lmdeploy exposes no load at all, and no load record is published (docs/agent.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from distserve.agent.engine_client import EngineClient, EngineError
from distserve.cluster.records import LoadRecord

log = logging.getLogger("distserve.agent.load")

REFERENCE_RUNNING = "distserve_engine_requests_running"
LMDEPLOY_RUNNING = "lmdeploy:num_requests_running"


def load_from_metrics(engine_id: str, metrics: dict[str, float] | None, num_gpu_blocks: int | None) -> LoadRecord | None:
    """A load record from parsed /metrics; None when the engine exposes no load figures."""
    if not metrics:
        return None

    def num(name: str) -> int | None:
        value = metrics.get(name)
        return None if value is None else int(round(value))

    if REFERENCE_RUNNING in metrics:
        used, free = num("distserve_engine_kv_blocks_used"), num("distserve_engine_kv_blocks_free")
        return LoadRecord(
            engine_id=engine_id,
            running=num(REFERENCE_RUNNING) or 0,
            waiting=num("distserve_engine_requests_waiting") or 0,
            kv_blocks_free=free,
            kv_blocks_total=(used + free) if used is not None and free is not None else None,
            prefill_tokens_pending=num("distserve_engine_prefill_tokens_pending"),
            preserved_blocks=num("distserve_engine_preserved_blocks"),
        )
    if LMDEPLOY_RUNNING in metrics:
        usage = metrics.get("lmdeploy:gpu_cache_usage_perc")
        free = None
        if usage is not None and num_gpu_blocks:
            free = max(0, int(round((1.0 - usage) * num_gpu_blocks)))
        return LoadRecord(
            engine_id=engine_id,
            running=num(LMDEPLOY_RUNNING) or 0,
            waiting=num("lmdeploy:num_requests_waiting") or 0,
            kv_blocks_free=free,
            kv_blocks_total=num_gpu_blocks if free is not None else None,
        )
    return None


def same_load(a: LoadRecord | None, b: LoadRecord | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.model_dump(exclude={"updated_at"}) == b.model_dump(exclude={"updated_at"})


class LoadPublisher:
    """Polls the engine's /metrics every `interval` and publishes the load record when it changed."""

    def __init__(self, engine: EngineClient, engine_id: str, interval: float,
                 publish: Callable[[LoadRecord], Awaitable[None]], num_gpu_blocks: Callable[[], int | None],
                 timeout: float) -> None:
        self.engine = engine
        self.engine_id = engine_id
        self.interval = interval
        self.timeout = timeout
        self._publish = publish
        self._num_gpu_blocks = num_gpu_blocks
        self.latest: LoadRecord | None = None  # last reading (published or not)
        self.published: LoadRecord | None = None
        self.known = False  # the engine exposes load figures
        self.updated = asyncio.Event()  # set after every reading (drain waits on it)
        self.publish_count = 0

    def reset(self) -> None:
        """Forget what was published (a new lease: publish the next reading whatever it is)."""
        self.published = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.poll_once()
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def poll_once(self) -> None:
        try:
            metrics = await self.engine.metrics(timeout=self.timeout)
        except EngineError as exc:
            log.debug("load: %s", exc)
            return
        record = load_from_metrics(self.engine_id, metrics, self._num_gpu_blocks())
        self.known = record is not None
        self.latest = record
        self.updated.set()
        if record is None or same_load(record, self.published):
            return
        try:
            await self._publish(record)
        except Exception as exc:  # noqa: BLE001 - etcd briefly unavailable: publish on the next change or tick
            log.warning("load: publishing failed: %s", exc)
            return
        self.published = record
        self.publish_count += 1
