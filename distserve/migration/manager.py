"""Per-peer transfer state of one engine: the p2p handshake routes and validated KV pulls.

The decode side pulls: it validates the migration request against the peer's advertised pool geometry
(from p2p_connect's cache_pools), plans coalesced reads and issues them with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass, field

from distserve import tracing
from distserve.migration.errors import MigrationError, TransportUnavailable
from distserve.migration.geometry import PoolGeometry, plan_reads, validate_block_ids
from distserve.migration.staging import (
    LANDING_PIECE_BYTES,
    LANDING_PIECES_PER_CALL,
    STAGING_REGION,
    StagingArena,
    check_remote_staging,
    is_one_run,
    landing_pieces,
    source_ranges,
)
from distserve.migration.transport import LOCAL_REGION, Transport, create_transport, tuning
from distserve.protocol import (
    PROTOCOL_NAMES,
    ConnectionStatus,
    ConnectRequest,
    ConnectResponse,
    DistServeEngineConfig,
    DropConnectRequest,
    EngineEndpointInfo,
    InitRequest,
    InitResponse,
    KVTransferEndpointInfo,
    MigrationProtocol,
    KvStagingRange,
    MigrationRequest,
)

log = logging.getLogger("distserve.migration")

# Landed pieces are unpacked here, one at a time per engine, off the event loop (numpy and torch copies
# release the GIL), so the copy of one piece overlaps the transfer of the next.
_UNPACKER = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-unpack")
# A call that landed this little is unpacked on the event loop (a copy of 0.05-0.2 ms).
INLINE_UNPACK_BYTES = 1 << 20


@dataclass
class Peer:
    remote_engine_id: str
    local_engine_id: str
    transport: Transport
    remote_config: DistServeEngineConfig
    remote_geometry: PoolGeometry | None = None
    connected: bool = False
    created_at: float = field(default_factory=time.time)


@dataclass
class MigrationStats:
    handshakes_total: int = 0
    connects_total: int = 0
    migrations_total: int = 0
    migration_failures_total: int = 0
    migration_bytes_total: int = 0
    migration_seconds_total: float = 0.0
    quarantined_blocks: int = 0
    reads_total: int = 0  # transfer ranges (DLSlime assignments) issued by pulls
    landed_total: int = 0  # pulls landed in the staging arena, then unpacked
    packed_sources_total: int = 0  # pulls that read a prefill's packed slot


class MigrationManager:
    def __init__(self, local_geometry: PoolGeometry, local_config: DistServeEngineConfig,
                 protocol: MigrationProtocol, transfer_host: str, pool_ptr: int | None = None,
                 null: bool = False, deadline_s: float = 30.0, max_inflight_calls: int = 2,
                 staging: StagingArena | None = None) -> None:
        self.local_geometry = local_geometry
        self.local_config = local_config
        self.protocol = protocol
        self.transfer_host = transfer_host
        self.pool_ptr = pool_ptr
        self.null = null
        self.deadline_s = deadline_s
        self.max_inflight_calls = max_inflight_calls
        self.staging = None if null else staging
        self.peers: dict[str, Peer] = {}
        self.stats = MigrationStats()
        self._lock = asyncio.Lock()
        self._watchers: set[asyncio.Task] = set()

    # -- handshake ---------------------------------------------------------------------------------
    def local_endpoint_info(self, transport: Transport) -> KVTransferEndpointInfo:
        return KVTransferEndpointInfo(protocol=self.protocol, endpoint_info=json.dumps(transport.endpoint_info()),
                                      cache_pools=[self.local_geometry.to_cache_pool()])

    async def initialize(self, req: InitRequest) -> InitResponse:
        """p2p_initialize: a fresh transfer endpoint for this peer (re-initializing replaces, never leaks)."""
        self.stats.handshakes_total += 1
        fail = self._check_init(req)
        if fail:
            raise MigrationError(fail, code="handshake_rejected")
        transport = create_transport(self.protocol, self.transfer_host, self.pool_ptr,
                                     self.local_geometry.total_bytes, null=self.null,
                                     max_inflight_calls=self.max_inflight_calls,
                                     staging_ptr=self.staging.ptr if self.staging else None,
                                     staging_bytes=self.staging.nbytes if self.staging else 0)
        async with self._lock:
            old = self.peers.pop(req.remote_engine_id, None)
            self.peers[req.remote_engine_id] = Peer(req.remote_engine_id, req.local_engine_id, transport,
                                                    req.remote_engine_config)
        if old is not None:
            old.transport.close()
        return InitResponse(status=ConnectionStatus.SUCCESS, engine_endpoint_info=EngineEndpointInfo(zmq_address=""),
                            kvtransfer_endpoint_info=[self.local_endpoint_info(transport)])

    def _check_init(self, req: InitRequest) -> str | None:
        if req.protocol != self.protocol:
            return (f"protocol {PROTOCOL_NAMES.get(req.protocol, req.protocol)} requested, this engine migrates with "
                    f"{PROTOCOL_NAMES[self.protocol]}")
        remote = req.remote_engine_config
        if remote.block_size != self.local_config.block_size:
            return f"block_size {remote.block_size} != {self.local_config.block_size}"
        if remote.tp_size != self.local_config.tp_size:
            return f"tp_size {remote.tp_size} != {self.local_config.tp_size}"
        return None

    async def connect(self, req: ConnectRequest) -> ConnectResponse:
        self.stats.connects_total += 1
        peer = self.peers.get(req.remote_engine_id)
        if peer is None:
            raise MigrationError(f"p2p_connect before p2p_initialize for {req.remote_engine_id}", status=409,
                                 code="peer_not_initialized")
        if req.protocol != self.protocol:
            raise MigrationError(f"protocol {int(req.protocol)} != {int(self.protocol)}", code="handshake_rejected")
        if len(req.remote_kvtransfer_endpoint_info) != 1:
            raise MigrationError("expected one kvtransfer endpoint (tp_size 1)", code="handshake_rejected")
        info = req.remote_kvtransfer_endpoint_info[0]
        if not info.cache_pools or len(info.cache_pools) != 1:
            raise MigrationError("the peer advertises no single cache pool: its block ids cannot be validated",
                                 code="geometry_mismatch")
        geo = PoolGeometry.from_cache_pool(info.cache_pools[0])
        reason = self.local_geometry.mismatch(geo)
        if reason:
            raise MigrationError(f"KV geometry mismatch: {reason}", code="geometry_mismatch")
        try:
            endpoint_info = json.loads(info.endpoint_info)
        except ValueError:
            raise MigrationError("endpoint_info is not JSON", code="invalid_endpoint_info") from None
        await peer.transport.connect(endpoint_info, geo.total_bytes)
        peer.remote_geometry = geo
        peer.connected = True
        return ConnectResponse(status=ConnectionStatus.SUCCESS)

    async def drop(self, req: DropConnectRequest) -> None:
        async with self._lock:
            peer = self.peers.pop(req.remote_engine_id, None)
        if peer is not None:
            peer.transport.close()

    # -- migration ---------------------------------------------------------------------------------
    def check(self, mig: MigrationRequest, num_prompt_tokens: int, block_size: int, vocab_size: int) -> Peer:
        """Validate a decode request's migration_request before anything is allocated or read."""
        if mig.protocol != self.protocol:
            raise MigrationError(f"migration protocol {int(mig.protocol)} != this engine's {int(self.protocol)}")
        if mig.is_dummy_prefill:
            raise MigrationError("is_dummy_prefill is not supported")
        peer = self.peers.get(mig.remote_engine_id)
        if peer is None or not peer.connected or peer.remote_geometry is None:
            raise MigrationError(f"unknown peer {mig.remote_engine_id!r}: no completed p2p handshake",
                                 code="unknown_peer")
        if not 0 <= mig.remote_token_id < vocab_size:
            raise MigrationError(f"remote_token_id {mig.remote_token_id} out of range [0, {vocab_size})")
        expected = -(-num_prompt_tokens // block_size)
        if len(mig.remote_block_ids) != expected:
            raise MigrationError(f"{len(mig.remote_block_ids)} remote blocks for a {num_prompt_tokens}-token prompt "
                                 f"(expected {expected} of {block_size} tokens)", code="invalid_block_ids")
        validate_block_ids(mig.remote_block_ids, peer.remote_geometry)
        mig.remote_kv_staging = _usable_staging(peer, mig.remote_kv_staging, len(mig.remote_block_ids))
        return peer

    def _plan(self, peer: Peer, remote_ids: list[int], local_ids: list[int],
              remote_staging: KvStagingRange | None) -> tuple[list[tuple[int, int, int]], str, str, object]:
        """The reads of one pull: (plan, remote region, local region, landing slot or None).

        Fewest reads wins: DLSlime TCP pays a TCP connection per read. Straight into our blocks when they
        are one run (from the prefill's packed slot when it made one, one read per layer); else landed in
        a slot of our staging arena and unpacked, when that takes fewer reads than block-to-block.
        """
        remote, local = peer.remote_geometry, self.local_geometry
        assert remote is not None
        direct = plan_reads(remote, local, remote_ids, local_ids)  # validates every id, never reads
        remote_staging = _usable_staging(peer, remote_staging, len(remote_ids))
        if len(direct) <= local.outer:
            return direct, LOCAL_REGION, LOCAL_REGION, None  # already one read per layer
        n, eb = len(local_ids), local.entry_bytes
        if remote_staging is not None:
            source, remote_region = [(remote_staging.offset, 0, remote_staging.length)], STAGING_REGION
        else:
            source, remote_region = source_ranges(remote, remote_ids), LOCAL_REGION
        if is_one_run(local_ids):  # slot order [layer][i] maps onto our run layer by layer
            layer_bytes = n * eb
            plan = []
            for r_off, coord, length in source:
                while length > 0:
                    layer, within = divmod(coord, layer_bytes)
                    step = min(length, layer_bytes - within)
                    plan.append((r_off, (layer * local.num_entries + local_ids[0]) * eb + within, step))
                    r_off, coord, length = r_off + step, coord + step, length - step
            if len(plan) < len(direct):
                return plan, remote_region, LOCAL_REGION, None
            return direct, LOCAL_REGION, LOCAL_REGION, None
        if self.staging is None or not peer.transport.has_local_staging or len(source) >= len(direct):
            return direct, LOCAL_REGION, LOCAL_REGION, None
        slot = self.staging.allocate(n)
        if slot is None:  # arena full: correct, only slower
            return direct, LOCAL_REGION, LOCAL_REGION, None
        return source, remote_region, STAGING_REGION, slot

    async def pull(self, peer: Peer, remote_ids: list[int], local_ids: list[int],
                   on_quarantine_release=None, remote_staging: KvStagingRange | None = None) -> int:
        """Read the peer's blocks into ours; returns bytes moved. Raises MigrationError.

        `remote_staging`: the prefill's packed copy of these blocks (see distserve.migration.staging).
        On a deadline the local blocks may still be written later: the caller must not reuse them; when
        `on_quarantine_release` is given it is called once the late reads have finished.
        """
        plan, remote_region, local_region, slot = self._plan(peer, remote_ids, local_ids, remote_staging)
        started = time.monotonic()
        span = None
        if tracing.ENABLED:  # a child of the decode request's span (current in the caller's task)
            span = tracing.start_span("kv migration", {
                "distserve.migration.transport": "null" if self.null else PROTOCOL_NAMES[self.protocol].lower(),
                "distserve.migration.remote_engine_id": peer.remote_engine_id,
                "distserve.migration.blocks": len(local_ids),
                "distserve.migration.landed": slot is not None,
                "distserve.migration.packed_source": remote_region == STAGING_REGION})
        release = on_quarantine_release
        pulled = False
        if slot is not None:
            def release(base=on_quarantine_release, slot=slot) -> None:
                self.staging.release(slot)
                if base is not None:
                    base()
        try:
            if slot is None:
                await peer.transport.read(plan, started + self.deadline_s, remote_region=remote_region,
                                          local_region=local_region)
            else:
                plan = await self._land(peer, plan, remote_region, slot, local_ids, started + self.deadline_s)
            pulled = True
        except MigrationError as exc:
            self.stats.migration_failures_total += 1
            if span is not None:
                tracing.fail(span, exc.message, **{"error.type": exc.code})
            if exc.pending or exc.code == "migration_timeout":
                exc.quarantined = True
                self.stats.quarantined_blocks += len(local_ids)
                self._watch_late(exc.pending, peer.transport, len(local_ids), release)
                slot = None  # released by the watcher once the late reads have landed
            raise
        except Exception as exc:  # noqa: BLE001 - a transport bug must become a clean error
            self.stats.migration_failures_total += 1
            if span is not None:
                tracing.fail(span, f"KV migration failed: {exc}", **{"error.type": "migration_failed"})
            raise MigrationError(f"KV migration failed: {exc}", status=502, code="migration_failed") from None
        finally:
            if slot is not None:
                self.staging.release(slot)
            if span is not None and not pulled:
                span.end()  # failed (or cancelled): ended here; a success ends below with its figures
        moved = sum(n for _, _, n in plan)
        if span is not None:
            span.set_attribute("distserve.migration.bytes", moved)
            span.set_attribute("distserve.migration.reads", len(plan))
            span.end()
        log.debug("pulled %d bytes in %d ranges from %s in %.2f ms", moved, len(plan), peer.remote_engine_id,
                  (time.monotonic() - started) * 1e3)
        self.stats.reads_total += len(plan)
        self.stats.landed_total += slot is not None
        self.stats.packed_sources_total += remote_region == STAGING_REGION
        self.stats.migrations_total += 1
        self.stats.migration_bytes_total += moved
        self.stats.migration_seconds_total += time.monotonic() - started
        return moved

    async def _land(self, peer: Peer, source: list[tuple[int, int, int]], remote_region: str, slot,
                    local_ids: list[int], deadline: float) -> list[tuple[int, int, int]]:
        """Read `source` into the landing slot piece by piece; each landed piece is unpacked into our blocks
        by a worker thread while the event loop issues the next reads (the copy overlaps the transfer).
        Every unpack has finished when this returns or raises: none may write our blocks afterwards."""
        assert self.staging is not None
        pieces = landing_pieces(source, slot, self.local_geometry.entry_bytes, min(LANDING_PIECE_BYTES, tuning().split_bytes))
        rows = {local_off: (first, end) for _, local_off, _, first, end in pieces}
        arena, loop = self.staging, asyncio.get_running_loop()
        unpacks: list[asyncio.Future] = []

        def landed(part: list[tuple[int, int, int]]) -> None:
            inline = sum(length for _, _, length in part) <= INLINE_UNPACK_BYTES
            for _, local_off, _ in part:
                if inline:  # cheaper than the hand-off to a thread and back
                    arena.unpack_rows(slot, *rows[local_off], local_ids)
                else:
                    unpacks.append(loop.run_in_executor(_UNPACKER, arena.unpack_rows, slot, *rows[local_off],
                                                        local_ids))

        plan = [(r, local_off, length) for r, local_off, length, *_ in pieces]
        try:
            await peer.transport.read(plan, deadline, remote_region=remote_region, local_region=STAGING_REGION,
                                      per_call=min(LANDING_PIECES_PER_CALL, max(1, -(-len(plan) // 2))),
                                      on_call_done=landed)
        finally:
            done = await asyncio.gather(*unpacks, return_exceptions=True)  # short: every copy has ended
        for result in done:
            if isinstance(result, BaseException):
                raise MigrationError(f"unpacking landed KV failed: {result}", status=500, code="migration_failed")
        return plan

    def _watch_late(self, pending, transport: Transport, nblocks: int, release) -> None:
        async def watch() -> None:
            while not all(transport.future_done(f) for f in pending):
                await asyncio.sleep(0.5)
            self.stats.quarantined_blocks -= nblocks
            if release is not None:
                release()

        if not pending:
            return  # nothing to watch: the blocks stay quarantined (counted) rather than risk corruption
        task = asyncio.get_running_loop().create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def close(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        for peer in list(self.peers.values()):
            peer.transport.close()
        self.peers.clear()


def _usable_staging(peer: Peer, staging: KvStagingRange | None, count: int) -> KvStagingRange | None:
    """The prefill's packed slot when it can be read: None when absent or when the peer advertised no
    staging region (linked before it had one: a rolling upgrade, its blocks are read instead); a slot
    that is not exactly `count` blocks inside that region raises MigrationError (400)."""
    if staging is None or peer.transport.remote_staging_bytes is None:
        return None
    assert peer.remote_geometry is not None
    check_remote_staging(staging.offset, staging.length, count, peer.remote_geometry,
                         peer.transport.remote_staging_bytes)
    return staging


__all__ = ["MigrationManager", "MigrationError", "TransportUnavailable", "Peer"]
