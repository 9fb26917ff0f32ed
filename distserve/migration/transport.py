"""One transfer endpoint per peer engine: the null transport (no data) and DLSlime TCP / RDMA / NVLink.

dlslime is imported only when a DLSlime endpoint is created. Every DLSlime call that can block runs in a
worker thread; completion is polled with `wait_for(0)` and back-off, never a blocking `wait()` on the
event loop, and every read has a deadline that turns a hang into a clean error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

from distserve.migration import settings
from distserve.migration.errors import MigrationError, TransportUnavailable
from distserve.migration.geometry import MAX_ASSIGNMENTS_PER_CALL, chunk, split
from distserve.migration.staging import STAGING_REGION
from distserve.protocol import MigrationProtocol

REMOTE_PREFIX = "peer_"




@functools.cache
def tuning() -> settings.MigrationTuning:
    """Large contiguous ranges are cut into pieces of `split_bytes` so concurrent calls share the work;
    migrations of at least `spread_bytes` are spread over all the calls allowed in flight. Knobs for
    tools/bench_migration.py A/B runs (defaults measured there), read once at first use from the environment
    (migration/settings.py bounds them): a bad value is logged and the default used, never an import error;
    `distserve engine` refuses it at start-up."""
    return settings.migration_tuning_or_default()


# How long a wait polls by yielding to the event loop before handing off to a thread: about as long as
# the read should take at a slow loopback rate, at most SPIN_MAX_S. A hand-off costs a thread wake-up and
# a loop wake-up (0.1-1 ms on a busy machine), as much as a whole 1 MiB read.
SPIN_BYTES_PER_S = 1 << 30
SPIN_MAX_S = 0.002

LOCAL_REGION = "kv"


class MigrationTimeout(MigrationError):
    """A read did not finish before the deadline; `pending` futures may still write local memory."""

    def __init__(self, message: str, pending: list[Any]) -> None:
        super().__init__(message, status=504, code="migration_timeout")
        self.pending = pending


class Transport(ABC):
    protocol: MigrationProtocol

    @abstractmethod
    def endpoint_info(self) -> dict: ...

    @abstractmethod
    async def connect(self, peer_info: dict, remote_pool_bytes: int) -> None: ...

    # Byte size of the peer's staging region, when it advertised one (see distserve.migration.staging).
    remote_staging_bytes: int | None = None
    has_local_staging: bool = False

    @abstractmethod
    async def read(self, plan: list[tuple[int, int, int]], deadline: float, remote_region: str = LOCAL_REGION,
                   local_region: str = LOCAL_REGION, per_call: int | None = None,
                   on_call_done: Callable[[list[tuple[int, int, int]]], None] | None = None) -> None:
        """Copy (remote_offset, local_offset, length) ranges from a peer region into a local one
        (LOCAL_REGION: the KV pools; STAGING_REGION: the staging arenas)."""

    @abstractmethod
    def close(self) -> None: ...

    @staticmethod
    def future_done(fut: Any) -> bool:
        return True


class NullTransport(Transport):
    """For null-mode engines: the handshake shapes without moving any data."""

    def __init__(self, protocol: MigrationProtocol, host: str) -> None:
        self.protocol = protocol
        self.host = host

    def endpoint_info(self) -> dict:
        return {"transport": "null", "host": self.host, "port": 0, "mr_info": {}}

    async def connect(self, peer_info: dict, remote_pool_bytes: int) -> None:
        if peer_info.get("transport") != "null":
            raise MigrationError("a null engine can only link with null engines", code="transport_mismatch")

    async def read(self, plan: list[tuple[int, int, int]], deadline: float, remote_region: str = LOCAL_REGION,
                   local_region: str = LOCAL_REGION, per_call: int | None = None,
                   on_call_done: Callable[[list[tuple[int, int, int]]], None] | None = None) -> None:
        await asyncio.sleep(0)
        if on_call_done is not None:
            on_call_done(plan)

    def close(self) -> None:
        pass


def _parse_peer_region(peer_info: dict, remote_pool_bytes: int) -> dict:
    if not isinstance(peer_info, dict):
        raise MigrationError("peer endpoint_info is not an object", code="invalid_endpoint_info")
    mr = (peer_info.get("mr_info") or {}).get(LOCAL_REGION)
    if not isinstance(mr, dict) or not isinstance(mr.get("addr"), int) or not isinstance(mr.get("length"), int):
        raise MigrationError(f"peer endpoint_info has no '{LOCAL_REGION}' memory region", code="invalid_endpoint_info")
    if mr["length"] < remote_pool_bytes:
        raise MigrationError(f"peer memory region ({mr['length']} bytes) is smaller than its advertised KV pool "
                             f"({remote_pool_bytes} bytes)", code="geometry_mismatch")
    return mr


def _peer_regions(peer_info: dict, remote_pool_bytes: int) -> dict[str, dict]:
    """The peer's memory regions to import: its KV pool (required, checked), and its staging region when
    it advertises a well-formed one (else staging is not used with this peer)."""
    regions = {LOCAL_REGION: _parse_peer_region(peer_info, remote_pool_bytes)}
    staging = (peer_info.get("mr_info") or {}).get(STAGING_REGION)
    if isinstance(staging, dict) and type(staging.get("addr")) is int and type(staging.get("length")) is int \
            and staging["length"] > 0:
        regions[STAGING_REGION] = staging
    return regions


# Completion waits run here: DLSlime's wait() spins a core and wait_for(t) keeps the GIL, so a worker
# thread polls wait_for(0) with short sleeps (time.sleep releases the GIL and has microsecond
# resolution, unlike event-loop timers) and the event loop only awaits the result.
_WAITERS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="kv-migration-wait")
_CLOSING = threading.Event()


def stop_waiters() -> None:
    """At process exit: waiting threads give up at once instead of at their deadline."""
    _CLOSING.set()


def _wait_blocking(fut: Any, deadline: float) -> int | None:
    delay = 0.00005
    while True:
        status = fut.wait_for(0)
        if status is not None:
            return status
        if time.monotonic() >= deadline or _CLOSING.is_set():
            return None
        time.sleep(delay)
        delay = min(delay * 1.5, 0.0002)  # a late poll adds its whole delay to the migration


async def _poll(fut: Any, deadline: float, failed: Any, nbytes: int = 0) -> None:
    """Wait for a DLSlime future without blocking the loop; raise MigrationTimeout at the deadline."""
    # Small reads finish within a few milliseconds: poll by yielding first (no thread hand-off), for
    # about as long as the read should take on loopback, at most SPIN_MAX_S.
    spin_until = time.monotonic() + min(SPIN_MAX_S, 0.0003 + nbytes / SPIN_BYTES_PER_S)
    status = fut.wait_for(0)
    while status is None and time.monotonic() < spin_until:
        await asyncio.sleep(0)
        status = fut.wait_for(0)
    if status is None:
        status = await asyncio.get_running_loop().run_in_executor(_WAITERS, _wait_blocking, fut, deadline)
    if status is None:
        raise MigrationTimeout("KV migration did not finish before its deadline", [fut])
    if failed(status):
        raise MigrationError(f"DLSlime read failed (status {status})", status=502, code="migration_failed")


class DlslimeTcpTransport(Transport):
    """DLSlime TcpEndpoint; works around its measured defects (see docs/reference-engine.md)."""

    protocol = MigrationProtocol.TCP

    def __init__(self, host: str, pool_ptr: int, pool_bytes: int, max_inflight_calls: int = 2,
                 max_assignments: int = MAX_ASSIGNMENTS_PER_CALL, staging_ptr: int | None = None,
                 staging_bytes: int = 0) -> None:
        try:
            import dlslime  # lazy: optional native library (null engines and --help run without it)
        except ImportError as exc:  # e.g. libibverbs.so.1 missing
            raise TransportUnavailable(f"dlslime cannot be imported: {exc}") from None
        if host in ("0.0.0.0", "::", ""):
            raise TransportUnavailable("the transfer endpoint must bind a concrete private interface, not 0.0.0.0")
        self.endpoint = dlslime.TcpEndpoint(ip=host, port=0)
        self._register_local(pool_ptr, pool_bytes, staging_ptr, staging_bytes)
        # Bounded calls in flight per peer: each assignment opens a TCP connection and the listen backlog
        # is 64, so more than two calls of 31 at once drop SYNs (1 s stalls).
        self._inflight = asyncio.Semaphore(max(1, max_inflight_calls))
        self._max_inflight_calls = max(1, max_inflight_calls)
        self._max_assignments = max_assignments

    def _register_local(self, pool_ptr: int, pool_bytes: int, staging_ptr: int | None, staging_bytes: int) -> None:
        self.local_handles = {LOCAL_REGION: self.endpoint.register_memory_region(LOCAL_REGION, pool_ptr, 0, pool_bytes)}
        if staging_ptr and staging_bytes > 0:
            self.local_handles[STAGING_REGION] = self.endpoint.register_memory_region(
                STAGING_REGION, staging_ptr, 0, staging_bytes)
        self.has_local_staging = STAGING_REGION in self.local_handles
        self.remote_handles: dict[str, int] = {}

    async def _import_remote(self, regions: dict[str, dict]) -> None:
        for name, mr in regions.items():
            self.remote_handles[name] = await asyncio.to_thread(
                self.endpoint.register_remote_memory_region, REMOTE_PREFIX + name, mr)
        staging = regions.get(STAGING_REGION)
        self.remote_staging_bytes = staging["length"] if staging else None

    def _handles(self, remote_region: str, local_region: str) -> tuple[int, int]:
        remote, local = self.remote_handles.get(remote_region), self.local_handles.get(local_region)
        if remote is None or local is None:
            if LOCAL_REGION not in self.remote_handles:
                raise MigrationError("transfer endpoint is not connected to the peer", status=409,
                                     code="peer_not_connected")
            raise MigrationError(f"no {remote_region!r} region at the peer or {local_region!r} region here",
                                 code="invalid_kv_staging")
        return local, remote

    def endpoint_info(self) -> dict:
        return self.endpoint.endpoint_info()

    async def connect(self, peer_info: dict, remote_pool_bytes: int) -> None:
        regions = _peer_regions(peer_info, remote_pool_bytes)
        host, port = peer_info.get("host"), peer_info.get("port")
        if not isinstance(host, str) or host in ("0.0.0.0", "::", "") or not isinstance(port, int) or not 0 < port < 65536:
            raise MigrationError(f"peer transfer address {host!r}:{port!r} is not usable", code="invalid_endpoint_info")
        await asyncio.to_thread(self.endpoint.connect, {"host": host, "port": port, "mr_info": regions})
        await self._import_remote(regions)

    async def read(self, plan: list[tuple[int, int, int]], deadline: float, remote_region: str = LOCAL_REGION,
                   local_region: str = LOCAL_REGION, per_call: int | None = None,
                   on_call_done: Callable[[list[tuple[int, int, int]]], None] | None = None) -> None:
        """`per_call`: ranges per DLSlime call (default: as many as allowed, spread over the calls in flight
        for large reads); `on_call_done(ranges)`: called on the event loop as each call completes, while
        the next calls are in flight (a landing pull unpacks there)."""
        local_handle, remote_handle = self._handles(remote_region, local_region)
        issued: list[Any] = []

        async def one(part: list[tuple[int, int, int]]) -> None:
            assigns = [(local_handle, remote_handle, r, l, n) for r, l, n in part]
            async with self._inflight:
                if time.monotonic() >= deadline:
                    raise MigrationTimeout("KV migration did not finish before its deadline", [])
                fut = self.endpoint.read(assigns)
                issued.append(fut)
                await _poll(fut, deadline, failed=lambda st: st != 0, nbytes=sum(n for _, _, n in part))
            if on_call_done is not None:
                on_call_done(part)

        # Calls run concurrently up to the per-peer bound; large ranges are split so both calls get work.
        pieces = split(plan, tuning().split_bytes)
        if per_call is None:
            per_call = self._max_assignments
            if sum(n for _, _, n in pieces) >= tuning().spread_bytes:  # big enough to keep every allowed call busy
                per_call = min(per_call, -(-len(pieces) // self._max_inflight_calls))
        per_call = max(1, min(per_call, self._max_assignments))
        calls = chunk(pieces, per_call)
        if not calls:
            return
        # One call (every small pull): no tasks to create and gather, about 0.05 ms saved on 0.3-0.5 ms.
        tasks = [] if len(calls) == 1 else [asyncio.ensure_future(one(part)) for part in calls]
        try:
            await (one(calls[0]) if not tasks else asyncio.gather(*tasks))
        except BaseException as exc:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            late = [f for f in issued if f.wait_for(0) is None]  # may still write our memory
            if isinstance(exc, MigrationError):
                exc.pending = late
                raise
            if isinstance(exc, Exception):
                err = MigrationError(f"KV migration failed: {exc}", status=502, code="migration_failed")
                err.pending = late
                raise err from None
            raise

    @staticmethod
    def future_done(fut: Any) -> bool:
        return fut.wait_for(0) is not None

    def close(self) -> None:
        try:
            self.endpoint.shutdown()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


class DlslimeRdmaTransport(DlslimeTcpTransport):
    """DLSlime RDMAEndpoint (one per peer, the whole pool one memory region), as lmdeploy uses it."""

    protocol = MigrationProtocol.RDMA

    def __init__(self, host: str, pool_ptr: int, pool_bytes: int, max_inflight_calls: int = 4,
                 device_name: str = "", ib_port: int = 1, link_type: str = "auto", staging_ptr: int | None = None,
                 staging_bytes: int = 0) -> None:
        try:
            import dlslime  # lazy: optional native library (null engines and --help run without it)
        except ImportError as exc:
            raise TransportUnavailable(f"dlslime cannot be imported: {exc}") from None
        nics = dlslime.available_nic()
        if not nics:
            raise TransportUnavailable("RDMA migration needs an RDMA NIC, and this machine has none "
                                       "(dlslime.available_nic() is empty); use --migration-protocol tcp")
        try:
            self.endpoint = dlslime.RDMAEndpoint(device_name=device_name or nics[0], ib_port=ib_port,
                                                 link_type=link_type)
        except RuntimeError as exc:
            raise TransportUnavailable(f"cannot open RDMA device: {exc}") from None
        self._register_local(pool_ptr, pool_bytes, staging_ptr, staging_bytes)
        self._inflight = asyncio.Semaphore(max(1, max_inflight_calls))
        self._max_assignments = 1 << 16  # the 31-assignment limit is a TCP defect only

    async def connect(self, peer_info: dict, remote_pool_bytes: int) -> None:
        regions = _peer_regions(peer_info, remote_pool_bytes)
        await asyncio.to_thread(self.endpoint.connect, peer_info)
        await self._import_remote(regions)

    async def read(self, plan: list[tuple[int, int, int]], deadline: float, remote_region: str = LOCAL_REGION,
                   local_region: str = LOCAL_REGION, per_call: int | None = None,
                   on_call_done: Callable[[list[tuple[int, int, int]]], None] | None = None) -> None:
        local_handle, remote_handle = self._handles(remote_region, local_region)
        assigns = [(local_handle, remote_handle, r, l, n) for r, l, n in plan]
        async with self._inflight:  # RDMA: one call, however many ranges (no 31-range defect)
            fut = self.endpoint.read(assigns)
            # RDMA futures raise on failure instead of returning a status: wait in a thread, bounded.
            try:
                await asyncio.wait_for(asyncio.to_thread(fut.wait), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise MigrationTimeout("KV migration did not finish before its deadline", []) from None
            except RuntimeError as exc:
                raise MigrationError(f"RDMA read failed: {exc}", status=502, code="migration_failed") from None
        if on_call_done is not None:
            on_call_done(plan)


def create_transport(protocol: MigrationProtocol, host: str, pool_ptr: int | None, pool_bytes: int,
                     null: bool = False, max_inflight_calls: int = 2, staging_ptr: int | None = None,
                     staging_bytes: int = 0) -> Transport:
    if null:
        return NullTransport(protocol, host)
    if pool_ptr is None:
        raise TransportUnavailable("this engine has no KV pool memory to register")
    if protocol == MigrationProtocol.TCP:
        return DlslimeTcpTransport(host, pool_ptr, pool_bytes, max_inflight_calls=max_inflight_calls,
                                   staging_ptr=staging_ptr, staging_bytes=staging_bytes)
    if protocol == MigrationProtocol.RDMA:
        return DlslimeRdmaTransport(host, pool_ptr, pool_bytes, staging_ptr=staging_ptr, staging_bytes=staging_bytes)
    if protocol == MigrationProtocol.NVLINK:
        try:
            import dlslime  # lazy: optional native library (null engines and --help run without it)
        except ImportError as exc:
            raise TransportUnavailable(f"dlslime cannot be imported: {exc}") from None
        if not hasattr(dlslime, "NVLinkEndpoint"):
            raise TransportUnavailable("NVLink migration needs a dlslime build with NVLink (the PyPI wheel has "
                                       "none) and a KV pool in GPU memory; this engine's pool is on the CPU")
        raise TransportUnavailable("NVLink migration needs a KV pool in GPU memory; the reference engine "
                                   "keeps its pool on the CPU")
    raise TransportUnavailable(f"unknown migration protocol {protocol!r}")


def check_transport(protocol: MigrationProtocol) -> None:
    """Fail at start-up, with a clear message, when the configured transport cannot run here."""
    if protocol == MigrationProtocol.TCP:
        try:
            import dlslime  # noqa: F401 - lazy: optional native library, checked here at start-up
        except ImportError as exc:
            raise TransportUnavailable(f"dlslime cannot be imported ({exc}); on Debian/Ubuntu install libibverbs1") \
                from None
        return
    if protocol == MigrationProtocol.RDMA:
        try:
            import dlslime  # lazy: optional native library (null engines and --help run without it)
        except ImportError as exc:
            raise TransportUnavailable(f"dlslime cannot be imported: {exc}") from None
        if not dlslime.available_nic():
            raise TransportUnavailable("--migration-protocol rdma needs an RDMA NIC, and this machine has none "
                                       "(dlslime.available_nic() is empty); use --migration-protocol tcp")
        return
    create_transport(protocol, "127.0.0.1", 0, 0)  # NVLink: raises with the reason
