"""Pre-established prefill -> decode links, run by the DECODE side's agent.

For every compatible prefill engine in etcd (same model, tp size, block size, KV layout and transfer
protocol) the decode agent runs the lmdeploy handshake against both engines (p2p_initialize on both, then
p2p_connect on both) and records `links/<prefill>/<decode>` under its own lease.

Concurrency: one worker task per prefill (so at most one handshake, drop or record write in flight per
pair), a semaphore bounding the handshakes in flight for the whole agent, jittered exponential back-off
between attempts, a bounded number of attempts per round, and a jittered start for new pairs, so many
engines joining at once never pile up on one engine.

Identity: a link is valid while both engine *processes* are the ones it was made with (the records'
`instance`). A new incarnation with the same instance (the other agent restarted, or its lease was
replaced) only rewrites the record; a new instance (the engine restarted) drops the link and
handshakes again. That is also how a restarted decode agent adopts the links its predecessor recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from discovery.backoff import delay_for
from distserve.agent.config import AgentConfig
from distserve.agent.engine_client import EngineClient, EngineError
from distserve.cluster.keys import Keys
from distserve.protocol import (
    PROTOCOL_BY_NAME,
    ConnectionStatus,
    ConnectRequest,
    DistServeEngineConfig,
    DropConnectRequest,
    InitRequest,
    MigrationProtocol,
    RDMAConfig,
    RDMALinkType,
    kv_layout_fingerprint,
)
from distserve.cluster.records import EngineRecord, LinkRecord

log = logging.getLogger("distserve.agent.links")

DROP_TIMEOUT = 2.0


class HandshakeError(Exception):
    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent  # retrying cannot help (the engines disagree on the KV layout)


@dataclass
class Link:
    """A link this agent holds (established by it, or adopted)."""

    prefill_id: str
    prefill_url: str
    prefill_instance: str | None
    decode_instance: str | None
    protocol: str
    handshake_ms: float | None
    established_at: float | None
    adopted: bool = False
    held_since: float | None = None  # monotonic time the prefill's record vanished (see LinkManager._hold)


@dataclass
class LinkStats:
    handshakes_started: int = 0
    handshakes_ok: int = 0
    handshakes_failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    adopted: int = 0
    dropped: int = 0
    handshake_ms: list[float] = field(default_factory=list)
    # (monotonic start, monotonic end, prefill id) of every handshake attempt, for benchmarks
    timeline: list[tuple[float, float, str]] = field(default_factory=list)


def incompatibility(prefill: EngineRecord, decode: EngineRecord) -> str | None:
    """None when `prefill` can send KV to `decode`, else why not."""
    if prefill.role != "prefill" or decode.role != "decode":
        return f"roles {prefill.role}->{decode.role}"
    if not set(prefill.models) & set(decode.models):
        return f"no common model ({prefill.models} vs {decode.models})"
    reason = prefill.engine_info.compatible_with(decode.engine_info)
    if reason:
        return reason
    if prefill.transfer.protocol != decode.transfer.protocol:
        return f"transfer protocol {prefill.transfer.protocol} != {decode.transfer.protocol}"
    return None


class HandshakeLimiter:
    """A semaphore whose waiters are served lowest priority first (FIFO among equals).

    Decode agents ask with the pair's place in a rotation (see LinkManager._priority), so when many
    engines join at once the first handshakes of each decode go to different prefills instead of all
    starting with the same ones."""

    def __init__(self, value: int) -> None:
        self.value = value
        self._free = value
        self._waiters: list[tuple[float, int, asyncio.Future]] = []
        self._seq = 0

    async def acquire(self, priority: float = 0.0) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiters, (priority, self._seq, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            else:
                self._waiters = [w for w in self._waiters if w[2] is not future]
                heapq.heapify(self._waiters)
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    @contextlib.asynccontextmanager
    async def slot(self, priority: float = 0.0):
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()


class LinkManager:
    """Keeps this decode engine linked with every compatible prefill engine, and the link records true."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        keys: Keys,
        http: aiohttp.ClientSession,
        me: Callable[[], EngineRecord | None],
        prefills: Callable[[], dict[str, EngineRecord]],
        put: Callable[[str, bytes], Awaitable[None]],
        delete: Callable[[str], Awaitable[None]],
        semaphore: HandshakeLimiter | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.http = http
        self._me = me
        self._prefills = prefills
        self._put = put
        self._delete = delete
        self._semaphore = semaphore or HandshakeLimiter(config.handshake_concurrency)
        self._order: tuple[int, dict[str, int], int] | None = None  # cache for _priority
        self.links: dict[str, Link] = {}
        self.recorded: dict[str, LinkRecord] = {}  # what we last wrote, per prefill id
        self._found: dict[str, LinkRecord] = {}  # records of a previous agent of this engine (adoption)
        self._workers: dict[str, asyncio.Task] = {}
        self._wakers: dict[str, asyncio.Event] = {}
        self._closing = False
        self.stats = LinkStats()
        self.changed = asyncio.Event()  # set whenever a link or its record changes (tests, benchmarks)

    # --- lifecycle -----------------------------------------------------------------------------------
    def adopt_candidates(self, records: dict[str, LinkRecord]) -> None:
        """Link records found in etcd for this decode (prefill id -> record), written by an earlier agent."""
        self._found.update(records)
        for prefill_id in records:
            self.wake(prefill_id)

    def wake(self, prefill_id: str, start_delay: float | None = None) -> None:
        """Have the pair's worker look at it again (creating the worker for a new pair). A prefill that
        joins later is first tried after a random 0-join_jitter delay, so the decodes do not all hit it
        at the same instant."""
        if self._closing:
            return
        event = self._wakers.get(prefill_id)
        if event is None or prefill_id not in self._workers:
            if start_delay is None:
                start_delay = random.uniform(0, self.config.join_jitter)
            event = self._wakers[prefill_id] = asyncio.Event()
            self._workers[prefill_id] = asyncio.create_task(self._worker(prefill_id, event, start_delay),
                                                            name=f"link-{prefill_id}")
        event.set()

    def wake_all(self) -> None:
        """Every pair; new pairs start in rotation order, 1 ms apart (see _priority), so a whole fleet
        starting together spreads its first handshakes evenly over the prefills."""
        for prefill_id in set(self._prefills()) | set(self._workers) | set(self.links):
            self.wake(prefill_id, self._priority(prefill_id) * 0.001 + random.uniform(0, 0.001))

    async def close(self) -> list[Link]:
        """Stop every worker; returns the links held (the caller decides whether to tear them down)."""
        self._closing = True
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()
        held = list(self.links.values())
        self.links.clear()
        return held

    async def drop_on_engines(self, links: list[Link]) -> None:
        """p2p_drop_connect for each link on both engines (after their records are gone)."""
        await asyncio.gather(*(self._drop_on_engines(self.config.url, link.prefill_url) for link in links),
                             return_exceptions=True)

    async def rewrite_records(self, me: EngineRecord) -> None:
        """Our incarnation changed (a new lease): name it in every record we hold. Creates no task."""
        for prefill_id, record in list(self.recorded.items()):
            updated = record.model_copy(update={"decode_incarnation": me.incarnation})
            await self._put(self.keys.link(prefill_id, me.id), updated.encode())
            self.recorded[prefill_id] = updated
        self.changed.set()

    def established(self) -> dict[str, Link]:
        return dict(self.links)

    # --- one worker per prefill ------------------------------------------------------------------------
    async def _worker(self, prefill_id: str, wake: asyncio.Event, start_delay: float) -> None:
        attempt = 0  # failed attempts in the current round
        next_try = time.monotonic() + start_delay
        try:
            while True:
                wake.clear()
                delay = None
                me_before = self._me()
                try:
                    result = await self._step(prefill_id, attempt, next_try)
                    if self._me() is not me_before and result[0] == "idle":
                        result = ("wait", 0.0)  # our record changed meanwhile (a new lease): check again
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - an etcd write failed: retry this pair soon
                    log.warning("link %s: %s; retrying", prefill_id, exc)
                    result = ("wait", delay_for(1, base=0.5, cap=2.0))
                kind = result[0]
                if kind == "exit":
                    self._workers.pop(prefill_id, None)
                    self._wakers.pop(prefill_id, None)
                    return
                if kind == "attempted":
                    attempt, next_try = result[1], result[2]
                    delay = None if math.isinf(next_try) else max(0.0, next_try - time.monotonic())
                elif kind == "wait":
                    delay = None if math.isinf(result[1]) else result[1]
                elif kind == "idle":
                    attempt = 0 if result[1] else attempt
                    if len(result) > 2 and result[2] == "fresh":
                        next_try = time.monotonic()
                try:
                    await asyncio.wait_for(wake.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
        except asyncio.CancelledError:
            self._workers.pop(prefill_id, None)
            raise

    async def _step(self, prefill_id: str, attempt: int, next_try: float) -> tuple:
        """Move this pair one step toward what etcd says; returns what the worker should do next."""
        me = self._me()
        prefill = self._prefills().get(prefill_id)
        link = self.links.get(prefill_id)
        key = self.keys.link(prefill_id, self.config.id)

        if me is None:  # not registered (yet, or any more): hold what we have
            return ("idle", False)

        if link is not None:
            if prefill is None:
                return await self._hold(prefill_id, link, key)
            if link.held_since is not None:
                log.info("link %s -> %s: the prefill is back after %.2f s", prefill_id, me.id,
                         time.monotonic() - link.held_since)
                link.held_since = None
            reason = None
            if prefill.instance != link.prefill_instance:
                reason = "prefill engine restarted"
            elif me.instance != link.decode_instance:
                reason = "decode engine restarted"
            else:
                reason = incompatibility(prefill, me)
            if reason:
                await self._drop(prefill_id, link, key, reason)
                return ("wait", 0.0)
            await self._record(prefill_id, key, self._link_record(link, prefill, me, "established"))
            return ("idle", True)

        found = self._found.get(prefill_id)  # dropped from _found only once handled (a failed write retries)
        if found is not None:
            if prefill is not None and self._adoptable(found, prefill, me):
                link = Link(prefill_id=prefill_id, prefill_url=prefill.url, prefill_instance=prefill.instance,
                            decode_instance=me.instance, protocol=found.protocol, handshake_ms=found.handshake_ms,
                            established_at=found.established_at, adopted=True)
                await self._record(prefill_id, key, self._link_record(link, prefill, me, "established"))
                self._found.pop(prefill_id, None)
                self.links[prefill_id] = link
                self.stats.adopted += 1
                log.info("link %s -> %s adopted (engines unchanged, no handshake)", prefill_id, me.id)
                return ("idle", True)
            # A predecessor's record we cannot vouch for: delete it, and clear our engine's side of it.
            log.info("link %s -> %s: dropping a stale record from an earlier agent", prefill_id, me.id)
            await self._delete(key)
            self._found.pop(prefill_id, None)
            self.recorded.pop(prefill_id, None)
            self.changed.set()
            if found.decode_instance == me.instance and prefill is not None:
                await self._drop_on_engines(me.url, prefill.url, decode_only=True)

        if prefill is None:
            if prefill_id in self.recorded:
                await self._delete(key)
                self.recorded.pop(prefill_id, None)
                self.changed.set()
            return ("exit",)

        reason = incompatibility(prefill, me)
        eligible = (reason is None and prefill.state in ("starting", "ready") and me.state in ("starting", "ready"))
        if not eligible:
            if prefill_id in self.recorded:  # an establishing/failed record of a pair we no longer pursue
                await self._delete(key)
                self.recorded.pop(prefill_id, None)
                self.changed.set()
            if reason and prefill.role == "prefill":
                log.debug("link %s -> %s not possible: %s", prefill_id, me.id, reason)
            return ("idle", True, "fresh")  # when the pair becomes eligible again, start a fresh round

        now = time.monotonic()
        failed = self.recorded.get(prefill_id)
        if failed is not None and failed.state == "failed" and (
                failed.prefill_incarnation, failed.decode_incarnation) != (prefill.incarnation, me.incarnation):
            next_try = now  # an engine changed since the pair failed: try again now, not after the cool-down
        if now < next_try:
            return ("wait", next_try - now)

        if attempt == 0 and self.recorded.get(prefill_id, None) is None:
            await self._record(prefill_id, key, self._pending_record(prefill, me, "establishing"))
        try:
            link = await self._handshake(prefill, me)
        except HandshakeError as exc:
            attempt += 1
            self.stats.handshakes_failed += 1
            await self._drop_on_engines(me.url, prefill.url)  # clear half-made state before a retry
            if exc.permanent or attempt >= self.config.handshake_attempts:
                log.warning("link %s -> %s failed after %d attempt(s): %s", prefill_id, me.id, attempt, exc)
                await self._record(prefill_id, key, self._pending_record(prefill, me, "failed", error=str(exc)))
                if exc.permanent:  # retrying cannot help (and re-initializing leaks lmdeploy's sockets):
                    return ("attempted", 0, math.inf)  # wait until one of the engines changes
                retry = self.config.retry_failed_after * random.uniform(0.75, 1.25)
                return ("attempted", 0, time.monotonic() + retry)
            log.info("link %s -> %s attempt %d failed: %s", prefill_id, me.id, attempt, exc)
            return ("attempted", attempt,
                    time.monotonic() + delay_for(attempt, base=self.config.backoff_base, cap=self.config.backoff_max))
        self.links[prefill_id] = link
        await self._record(prefill_id, key, self._link_record(link, prefill, me, "established"))
        log.info("link %s -> %s established in %.1f ms", prefill_id, me.id, link.handshake_ms or 0.0)
        return ("idle", True)

    # --- records -------------------------------------------------------------------------------------
    @staticmethod
    def _adoptable(found: LinkRecord, prefill: EngineRecord, me: EngineRecord) -> bool:
        return (
            found.state == "established"
            and bool(found.prefill_instance) and bool(found.decode_instance)
            and found.prefill_instance == prefill.instance
            and found.decode_instance == me.instance
            and found.protocol == me.transfer.protocol
            and incompatibility(prefill, me) is None
        )

    def _link_record(self, link: Link, prefill: EngineRecord, me: EngineRecord, state: str) -> LinkRecord:
        return LinkRecord(
            prefill_id=prefill.id, decode_id=me.id,
            prefill_incarnation=prefill.incarnation, decode_incarnation=me.incarnation,
            prefill_instance=link.prefill_instance, decode_instance=link.decode_instance,
            state=state, protocol=link.protocol, handshake_ms=link.handshake_ms,
            established_at=link.established_at,
        )

    def _pending_record(self, prefill: EngineRecord, me: EngineRecord, state: str, error: str | None = None) -> LinkRecord:
        return LinkRecord(
            prefill_id=prefill.id, decode_id=me.id,
            prefill_incarnation=prefill.incarnation, decode_incarnation=me.incarnation,
            prefill_instance=prefill.instance, decode_instance=me.instance,
            state=state, protocol=me.transfer.protocol, error=error,
        )

    async def _record(self, prefill_id: str, key: str, record: LinkRecord) -> None:
        """Write the record unless etcd already holds the same facts (the timestamp aside)."""
        previous = self.recorded.get(prefill_id)
        if previous is not None and _same_link(previous, record):
            return
        await self._put(key, record.encode())
        self.recorded[prefill_id] = record
        self.changed.set()

    async def _hold(self, prefill_id: str, link: Link, key: str) -> tuple:
        """The prefill's record vanished. Its record goes at once (routers must not use it), but the
        engines keep their connection for `link_hold_s`: a lease the prefill agent lost (etcd revoking leases,
        a long pause) comes back with the same engine process within moments, and then the link is written
        again with no handshake. An engine that is really gone is dropped when the hold runs out."""
        now = time.monotonic()
        hold = self.config.link_hold_s
        if link.held_since is None:
            link.held_since = now
            if prefill_id in self.recorded:
                await self._delete(key)
                self.recorded.pop(prefill_id, None)
                self.changed.set()
            if hold > 0:
                log.info("link %s -> %s: prefill record gone; holding the link %.1f s", prefill_id,
                         self.config.id, hold)
        remaining = link.held_since + hold - now
        if remaining > 0:
            return ("wait", remaining)
        await self._drop(prefill_id, link, key, "prefill record gone")
        return ("wait", 0.0)

    async def _drop(self, prefill_id: str, link: Link, key: str, reason: str) -> None:
        """Delete the record first (routers stop using it at once), then tear the link down on both engines."""
        log.info("link %s -> %s dropped: %s", prefill_id, self.config.id, reason)
        await self._delete(key)
        self.recorded.pop(prefill_id, None)
        self.links.pop(prefill_id, None)
        self.stats.dropped += 1
        self.changed.set()
        await self._drop_on_engines(self.config.url, link.prefill_url)

    async def _drop_on_engines(self, decode_url: str, prefill_url: str, decode_only: bool = False) -> None:
        """p2p_drop_connect on both engines, best effort (a dead engine has nothing to drop)."""
        calls = [self._client(decode_url).p2p_drop_connect(
            DropConnectRequest(engine_id=decode_url, remote_engine_id=prefill_url), timeout=DROP_TIMEOUT)]
        if not decode_only:
            calls.append(self._client(prefill_url).p2p_drop_connect(
                DropConnectRequest(engine_id=prefill_url, remote_engine_id=decode_url), timeout=DROP_TIMEOUT))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.debug("p2p_drop_connect: %s", result)

    def _priority(self, prefill_id: str) -> float:
        """This pair's place in this decode's rotation over the prefills (ids sorted, starting at a place
        drawn from a hash of the decode's id): decodes that start together begin with different prefills,
        with no coordination between them."""
        prefills = self._prefills()
        if self._order is None or self._order[0] != len(prefills):  # membership changed (ordering only)
            index = {engine_id: i for i, engine_id in enumerate(sorted(prefills))}
            digest = int.from_bytes(hashlib.sha256(self.config.id.encode()).digest()[:8], "big")
            self._order = (len(prefills), index, digest % max(1, len(index)))
        _, index, offset = self._order
        position = index.get(prefill_id)
        return float(len(index)) if position is None else float((position - offset) % max(1, len(index)))

    # --- the handshake -------------------------------------------------------------------------------
    def _client(self, url: str) -> EngineClient:
        return EngineClient(self.http, url, self.config.token, self.config.handshake_timeout)

    async def _handshake(self, prefill: EngineRecord, me: EngineRecord) -> Link:
        protocol = PROTOCOL_BY_NAME[me.transfer.protocol]
        p_config, d_config = _wire_config(prefill), _wire_config(me)
        p_client, d_client = self._client(prefill.url), self._client(me.url)
        extra = _protocol_config(protocol, self.config)
        async with self._semaphore.slot(self._priority(prefill.id)):
            stats = self.stats
            stats.handshakes_started += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            started = time.perf_counter()
            try:
                p_init, d_init = await _both(
                    p_client.p2p_initialize(InitRequest(
                        local_engine_id=prefill.url, local_engine_config=p_config,
                        remote_engine_id=me.url, remote_engine_config=d_config, protocol=protocol, **extra)),
                    d_client.p2p_initialize(InitRequest(
                        local_engine_id=me.url, local_engine_config=d_config,
                        remote_engine_id=prefill.url, remote_engine_config=p_config, protocol=protocol, **extra)),
                )
                for side, answer in (("prefill", p_init), ("decode", d_init)):
                    if answer.status != ConnectionStatus.SUCCESS:
                        raise HandshakeError(f"p2p_initialize on the {side} engine answered status {answer.status}")
                p_layout = [kv_layout_fingerprint(i.cache_pools) for i in p_init.kvtransfer_endpoint_info]
                d_layout = [kv_layout_fingerprint(i.cache_pools) for i in d_init.kvtransfer_endpoint_info]
                if all(p_layout) and all(d_layout) and p_layout != d_layout:
                    raise HandshakeError(f"KV pools differ: prefill {p_layout} vs decode {d_layout}", permanent=True)
                p_conn, d_conn = await _both(
                    p_client.p2p_connect(ConnectRequest(
                        protocol=protocol, remote_engine_id=me.url,
                        remote_engine_endpoint_info=d_init.engine_endpoint_info,
                        remote_kvtransfer_endpoint_info=d_init.kvtransfer_endpoint_info)),
                    d_client.p2p_connect(ConnectRequest(
                        protocol=protocol, remote_engine_id=prefill.url,
                        remote_engine_endpoint_info=p_init.engine_endpoint_info,
                        remote_kvtransfer_endpoint_info=p_init.kvtransfer_endpoint_info)),
                )
                for side, answer in (("prefill", p_conn), ("decode", d_conn)):
                    if answer.status != ConnectionStatus.SUCCESS:
                        raise HandshakeError(f"p2p_connect on the {side} engine answered status {answer.status}")
            except EngineError as exc:
                raise HandshakeError(str(exc)) from None
            finally:
                stats.in_flight -= 1
                stats.timeline.append((started, time.perf_counter(), prefill.id))
                del stats.timeline[:-1000]  # bounded
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            stats.handshakes_ok += 1
            stats.handshake_ms.append(elapsed_ms)
            del stats.handshake_ms[:-1000]
        return Link(prefill_id=prefill.id, prefill_url=prefill.url, prefill_instance=prefill.instance,
                    decode_instance=me.instance, protocol=me.transfer.protocol,
                    handshake_ms=round(elapsed_ms, 3), established_at=time.time())


def _wire_config(record: EngineRecord) -> DistServeEngineConfig:
    info = record.engine_info
    return DistServeEngineConfig(
        tp_size=info.tp_size, ep_size=info.ep_size, dp_size=info.dp_size, pp_size=info.pp_size,
        dp_rank=info.dp_rank, block_size=info.block_size, num_cpu_blocks=info.num_cpu_blocks,
        num_gpu_blocks=info.num_gpu_blocks,
    )


def _protocol_config(protocol: MigrationProtocol, config: AgentConfig) -> dict:
    if protocol == MigrationProtocol.RDMA:
        return {"rdma_config": RDMAConfig(with_gdr=True, link_type=RDMALinkType[config.rdma_link_type])}
    if protocol == MigrationProtocol.NVLINK:
        return {"nvlink_config": {}}
    return {}  # tcp: lmdeploy declares the protocol but has no settings for it


async def _both(first: Awaitable, second: Awaitable) -> tuple:
    """Run two calls concurrently; if one fails, cancel the other (no orphaned request)."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        return tasks[0].result(), tasks[1].result()
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _same_link(a: LinkRecord, b: LinkRecord) -> bool:
    skip = {"updated_at"}
    return a.model_dump(exclude=skip) == b.model_dump(exclude=skip)
