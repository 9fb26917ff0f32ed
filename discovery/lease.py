"""A lease that stays held: keepalive on one stream, owned keys, recovery as a new incarnation.

In the spirit of etcd's Go `concurrency.Session`, plus what a registry needs:

- one LeaseKeepAlive stream, a renewal every TTL/3; transient errors are retried forever with jittered
  exponential back-off (discovery.backoff), moving to the next endpoint; a stream that stops answering is dropped;
- the session *owns* keys (`put`/`delete`); a guard watches exactly those keys, so a lease revoked from
  outside (its keys vanish) or an owned key deleted or overwritten is noticed at once, not at the next
  renewal;
- a lease is declared lost only when etcd says so (`time_to_live` = -1). An outage alone proves nothing:
  etcd re-arms every lease's TTL when it restarts or elects a new leader, so after an outage the old
  lease usually still holds and nothing is re-registered;
- when the lease is really gone (expired or revoked): grant a new one, bump `incarnation`, run the
  `on_new_lease` callbacks, re-put every owned key under it. Never gives up, never exits the process;
- while the lease is unconfirmed (an outage), etcd is asked about it every `recheck_interval` instead of
  waiting for the streams' back-off (up to ~2 s apart): the moment etcd answers, a lost lease is replaced
  and the `on_confirmed` callbacks learn that the outage is over (a holder re-reads what it missed);
- `close()` revokes the lease so the keys vanish at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from etcd3aio._protobuf import rpc_pb2

from discovery.backoff import Backoff, retry
from discovery.client import (
    EtcdClient,
    EtcdError,
    LeaseNotFound,
    _retrieve,
    classify,
    raise_if_cancelling,
    read_stream,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

NewLeaseCallback = Callable[[int], Awaitable[None]]
ConfirmedCallback = Callable[[bool], Awaitable[None]]

# Set while on_new_lease callbacks run, so that a callback's session.put() only records the value
# (the re-put that follows writes it) instead of waiting for the lock the recovery holds.
_IN_RECOVERY: contextvars.ContextVar[object | None] = contextvars.ContextVar("lease_in_recovery", default=None)


class _StreamBroken(Exception):
    pass


class LeaseSession:
    """See the module docstring and docs/internals.md ("discovery API")."""

    def __init__(self, client: EtcdClient, ttl: int = 5, name: str = "session", *,
                 recheck_interval: float | None = 0.25) -> None:
        if int(ttl) < 1:
            raise ValueError("lease ttl must be >= 1 second")
        if recheck_interval is not None and not recheck_interval > 0:
            raise ValueError("recheck_interval must be > 0 seconds (or None: no recheck during outages)")
        self.recheck_interval = recheck_interval
        self.client = client
        self.ttl = int(ttl)
        self.name = name
        self.lease_id = 0
        self.incarnation = 0
        self.granted_ttl = self.ttl  # etcd may raise a short TTL to its minimum
        self._owned: dict[str, bytes] = {}
        self._callbacks: list[NewLeaseCallback] = []
        self._confirmed_callbacks: list[ConfirmedCallback] = []
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()  # "check the lease and owned keys now"
        self._keys_changed = asyncio.Event()  # the guard must start over (new lease, many stale watchers)
        # The live guard stream's request queue: (key, start_revision) of owned keys to watch; None while
        # the guard is reconnecting (its next reconcile then covers every owned key).
        self._guard_queue: asyncio.Queue[tuple[str, int]] | None = None
        self._stale_watchers = 0  # watchers on keys no longer owned (their events are ignored)
        self._renewed_at = 0.0  # monotonic time of the last renewal etcd confirmed
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._recovering = False  # on_new_lease callbacks are running
        self.renewals = 0
        self.recoveries = 0  # new leases after a loss

    # --- public API -------------------------------------------------------------------------------
    def on_new_lease(self, callback: NewLeaseCallback) -> None:
        """`await callback(lease_id)` for every new lease (the first one too), before owned keys are re-put."""
        self._callbacks.append(callback)

    def on_confirmed(self, callback: ConfirmedCallback) -> None:
        """`await callback(replaced)` when etcd answers again after the lease went unconfirmed (an outage);
        `replaced` is True when the lease turned out gone and was replaced (after the on_new_lease callbacks
        and the re-put). Needs `recheck_interval`."""
        self._confirmed_callbacks.append(callback)

    @property
    def alive(self) -> bool:
        """True while etcd confirmed the lease within its TTL (False during an outage: unknown)."""
        return (not self._closed and self.lease_id != 0
                and time.monotonic() - self._renewed_at < self.granted_ttl)

    @property
    def owned_keys(self) -> list[str]:
        return sorted(self._owned)

    async def start(self) -> "LeaseSession":
        """Grant the first lease (raises EtcdUnavailable if etcd does not answer), then keep it forever."""
        if self._tasks:
            return self
        self._closed = False
        async with self._lock:
            await self._new_lease_locked(reason="start")
        self._tasks = [
            asyncio.create_task(self._keepalive_forever(), name=f"lease-keepalive:{self.name}"),
            asyncio.create_task(self._guard_forever(), name=f"lease-guard:{self.name}"),
        ]
        if self.recheck_interval is not None:
            self._tasks.append(asyncio.create_task(self._recheck_forever(), name=f"lease-recheck:{self.name}"))
        return self

    async def put(self, key: str, value: bytes) -> None:
        """Write `key` under the lease and own it (re-put on every new lease).

        Raises EtcdUnavailable when etcd does not answer; the key stays owned and is written as soon as
        etcd is back.
        """
        if self._recovering and _IN_RECOVERY.get() is self:
            self._owned[key] = value  # written by the recovery's re-put that follows the callbacks
            return
        if self._closed or self.lease_id == 0:
            raise EtcdError(f"lease session {self.name} is {'closed' if self._closed else 'not started'}")
        async with self._lock:
            new_key = key not in self._owned
            self._owned[key] = value
            try:
                revision = await self.client.put(key, value, lease=self.lease_id)
                if new_key and self._guard_queue is not None:
                    self._guard_queue.put_nowait((key, revision + 1))  # watched from right after our write
            except LeaseNotFound:
                log.warning("lease %s: lease %x gone on put of %s", self.name, self.lease_id, key)
                await self._new_lease_locked(reason="lease not found on put")
            except EtcdError:
                self._kick.set()
                raise

    async def delete(self, key: str) -> None:
        """Stop owning `key` and delete it."""
        async with self._lock:
            if self._owned.pop(key, None) is not None:
                self._stale_watchers += 1
                if self._stale_watchers > len(self._owned) + 16:
                    self._keys_changed.set()  # rebuild the guard stream without them
            await self.client.delete(key)

    async def close(self, revoke: bool = True) -> None:
        """Stop keeping the lease; with `revoke` the owned keys vanish at once (else at TTL expiry)."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if revoke and self.lease_id:
            try:
                await self.client.revoke(self.lease_id, timeout=min(self.client.config.timeout, 3.0))
            except EtcdError as exc:
                log.warning("lease %s: revoke of %x failed (keys expire within %ds): %s", self.name,
                            self.lease_id, self.granted_ttl, exc)
        self.lease_id = 0

    async def __aenter__(self) -> "LeaseSession":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- lease replacement --------------------------------------------------------------------------
    def _backoff(self) -> Backoff:
        """Full jitter, capped at TTL/3 (0.2-2 s), so a retry lands well within the lease's lifetime."""
        return Backoff(base=0.1, cap=max(0.2, min(2.0, self.ttl / 3)), jitter=1.0)

    async def _until_done(self, op: Callable[[], Awaitable[T]]) -> T:
        """`op()` retried while etcd fails (a session never gives up; the delays are bounded)."""
        return await retry(lambda attempt: op(), attempts=sys.maxsize, backoff=self._backoff(),
                           retry_if=lambda exc: isinstance(exc, EtcdError),
                           on_retry=lambda attempt, exc, delay: log.warning("lease %s: %s; retrying", self.name, exc))

    async def _new_lease_locked(self, reason: str) -> None:
        """Grant a lease, run callbacks, re-put every owned key. Caller holds the lock."""
        old = self.lease_id
        if self.lease_id == 0 and not self._tasks:
            lease_id = await self.client.grant(self.ttl)  # start(): let the caller see an outage
        else:
            lease_id = await self._until_done(lambda: self.client.grant(self.ttl))
        self.lease_id = lease_id
        self.incarnation += 1
        self._renewed_at = time.monotonic()
        if old:
            self.recoveries += 1
            log.warning("lease %s: lease %x lost (%s); new lease %x, incarnation %d, re-putting %d keys",
                        self.name, old, reason, lease_id, self.incarnation, len(self._owned))
        token = _IN_RECOVERY.set(self)
        self._recovering = True
        try:
            for callback in list(self._callbacks):
                try:
                    await callback(lease_id)
                except Exception:  # noqa: BLE001 - a callback bug must not stop the recovery
                    log.exception("lease %s: on_new_lease callback failed", self.name)
        finally:
            self._recovering = False
            _IN_RECOVERY.reset(token)
        for key, value in list(self._owned.items()):
            if not await self._until_done(lambda key=key, value=value: self._put_under(key, value, lease_id)):
                # lost again while re-putting (revoked twice?): start over with a fresh lease
                return await self._new_lease_locked(reason="lease lost during re-put")
        self._keys_changed.set()

    async def _put_under(self, key: str, value: bytes, lease_id: int) -> bool:
        """False when the lease is gone."""
        try:
            await self.client.put(key, value, lease=lease_id)
        except LeaseNotFound:
            return False
        return True

    async def _reconcile(self) -> asyncio.Queue[tuple[str, int]]:
        """Check the lease and every owned key, repair what is missing; return the new guard queue,
        filled with every owned key to watch from the revision checked at."""
        async with self._lock:
            # Any change after the reads below has a higher revision than what the client saw before them.
            start = self.client.last_revision + 1
            await self._check_locked()
            queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
            for key in self._owned:
                queue.put_nowait((key, start))
            self._guard_queue = queue  # from now on put() adds new keys to it (it holds the lock)
            self._stale_watchers = 0
            return queue

    async def _check_locked(self) -> None:
        ttl_left = await self.client.time_to_live(self.lease_id)
        if ttl_left < 0:
            await self._new_lease_locked(reason="expired or revoked")
            return
        self._renewed_at = max(self._renewed_at, time.monotonic() - max(0, self.granted_ttl - ttl_left))
        for key, value in list(self._owned.items()):
            kv = await self.client.get(key)
            if kv is None or kv.lease != self.lease_id or kv.value != value:
                log.warning("lease %s: owned key %s was %s; restoring it", self.name, key,
                            "deleted" if kv is None else "overwritten")
                await self.client.put(key, value, lease=self.lease_id)

    # --- outages ------------------------------------------------------------------------------------
    async def _recheck_forever(self) -> None:
        assert self.recheck_interval is not None
        interval = self.recheck_interval
        outage_lease = 0  # the lease that was unconfirmed when this outage began (0: no outage seen)
        while True:
            await asyncio.sleep(interval)
            lease_id = self.lease_id
            if self._closed or lease_id == 0:
                continue
            if self.alive:
                if outage_lease:  # the keepalive or the guard ended the outage first: still say so, once
                    replaced, outage_lease = lease_id != outage_lease, 0
                    await self._confirmed(replaced)
                continue
            outage_lease = outage_lease or lease_id
            try:
                ttl_left = await self.client.time_to_live(lease_id, timeout=max(0.5, 2 * interval))
            except EtcdError:
                continue  # still unreachable
            async with self._lock:
                replaced = self.lease_id != outage_lease  # the guard replaced it while we asked
                if self.lease_id == lease_id and ttl_left < 0:
                    await self._new_lease_locked(reason="expired or revoked during an outage")
                    replaced = True
                elif not replaced:  # still held: etcd confirmed it, so it is alive again
                    self._renewed_at = max(self._renewed_at,
                                           time.monotonic() - max(0, self.granted_ttl - ttl_left))
            log.info("lease %s: etcd answers again (lease %x %s)", self.name, lease_id,
                     "gone: replaced" if replaced else f"held, {ttl_left}s left")
            outage_lease = 0
            await self._confirmed(replaced)

    async def _confirmed(self, replaced: bool) -> None:
        for callback in list(self._confirmed_callbacks):
            try:
                await callback(replaced)
            except Exception:  # noqa: BLE001 - a callback bug must not stop the recheck
                log.exception("lease %s: on_confirmed callback failed", self.name)

    # --- keepalive ----------------------------------------------------------------------------------
    async def _keepalive_forever(self) -> None:
        backoff = self._backoff()
        while True:
            try:
                await self._keepalive_stream()
            except (_StreamBroken, EtcdError) as exc:
                log.info("lease %s: keepalive stream: %s", self.name, exc)
            raise_if_cancelling()
            if self.alive:
                backoff.reset()  # the stream worked until now: reconnect at once-ish
            await asyncio.sleep(backoff.next_delay())

    async def _keepalive_stream(self) -> None:
        conn = self.client.active_conn()
        interval = max(0.2, self.granted_ttl / 3)

        async def requests() -> AsyncIterator[rpc_pb2.LeaseKeepAliveRequest]:
            while True:
                yield rpc_pb2.LeaseKeepAliveRequest(ID=self.lease_id)
                await asyncio.sleep(max(0.2, self.granted_ttl / 3))

        call = conn.lease_stub.LeaseKeepAlive(requests(), metadata=self.client.metadata())
        try:
            while True:
                try:
                    resp = await read_stream(call, interval + min(1.0, interval))
                except asyncio.TimeoutError:
                    self.client.failover(conn)
                    raise _StreamBroken(f"no keepalive answer from {conn.endpoint.url}") from None
                except grpc.aio.AioRpcError as exc:
                    kind = await self.client.handle_stream_error(conn, exc)
                    if kind == "lease_not_found":
                        self._kick.set()
                    raise _StreamBroken(f"{conn.endpoint.url}: {classify(exc)[1]}") from None
                if resp is grpc.aio.EOF:
                    raise _StreamBroken(f"{conn.endpoint.url} closed the keepalive stream")
                if resp.ID != self.lease_id:
                    continue  # an answer for the lease we just replaced
                self.client.note_revision(resp.header.revision)
                if resp.TTL <= 0:
                    # etcd says the lease does not exist: let the guard confirm with time_to_live and recover
                    log.warning("lease %s: keepalive says lease %x is gone", self.name, resp.ID)
                    self._kick.set()
                    await asyncio.sleep(interval)
                    continue
                self.granted_ttl = int(resp.TTL)
                interval = max(0.2, self.granted_ttl / 3)
                self._renewed_at = time.monotonic()
                self.renewals += 1
        finally:
            call.cancel()

    # --- guard: watch the owned keys ----------------------------------------------------------------
    async def _guard_forever(self) -> None:
        backoff = self._backoff()
        while True:
            self._kick.clear()
            self._keys_changed.clear()
            try:
                queue = await self._reconcile()
                backoff.reset()
                await self._guard_stream(queue)
            except (_StreamBroken, EtcdError) as exc:
                raise_if_cancelling()
                log.info("lease %s: guard: %s", self.name, exc)
                await asyncio.sleep(backoff.next_delay())

    async def _guard_stream(self, queue: asyncio.Queue[tuple[str, int]]) -> None:
        """Watch every key the queue names (more arrive as they are put) on one stream. Return when an
        owned key was deleted or written by someone else, or a check or a rebuild was requested."""
        kick = asyncio.ensure_future(self._wait_any(self._kick, self._keys_changed))
        conn = self.client.active_conn()

        async def requests() -> AsyncIterator[rpc_pb2.WatchRequest]:
            while True:
                key, start_revision = await queue.get()
                yield rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                    key=key.encode(), start_revision=start_revision))

        metadata = tuple(self.client.metadata() or ()) + (("hasleader", "true"),)
        call = conn.watch_stub.Watch(requests(), metadata=metadata)
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                read.add_done_callback(_retrieve)
                try:
                    done, _ = await asyncio.wait({read, kick}, return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    read.cancel()
                    raise
                if kick in done:
                    read.cancel()
                    return
                try:
                    resp = read.result()
                except grpc.aio.AioRpcError as exc:
                    await self.client.handle_stream_error(conn, exc)
                    raise _StreamBroken(f"{conn.endpoint.url}: {classify(exc)[1]}") from None
                if resp is grpc.aio.EOF:
                    raise _StreamBroken(f"{conn.endpoint.url} closed the guard stream")
                if resp.canceled or resp.compact_revision:
                    raise _StreamBroken(resp.cancel_reason or "guard watch canceled")
                for ev in resp.events:
                    key = ev.kv.key.decode("utf-8", errors="surrogateescape")
                    if key not in self._owned:
                        continue
                    if ev.type == 1 or ev.kv.lease != self.lease_id:  # DELETE, or written by someone else
                        return  # _guard_forever reconciles now
        finally:
            self._guard_queue = None  # puts from now on are covered by the next reconcile
            kick.cancel()
            call.cancel()

    @staticmethod
    async def _wait_any(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
