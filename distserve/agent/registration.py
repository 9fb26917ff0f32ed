"""Registration: one epoch of the engine in etcd. A lease (discovery.lease.LeaseSession: keepalive,
recovery as a new lease, outages), the engine record under it with a single writer, and the other keys the
agent owns under the same lease (load, links).

The record writer coalesces changes (`mark_dirty`) and retries with back-off; a put of an unchanged record
is skipped. A new lease (the old one expired or was revoked) is a new incarnation: the record is rebuilt
before the session re-puts the owned keys, and the agent's `on_new_incarnation` hook rewrites what names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable

from discovery.backoff import Backoff, retry
from discovery.client import EtcdClient
from discovery.lease import LeaseSession
from distserve.agent.config import AgentConfig
from distserve.agent.record import same_record
from distserve.cluster.keys import Keys
from distserve.cluster.records import EngineRecord

log = logging.getLogger("distserve.agent")

# An agent never gives up on etcd (docs/agent.md): it keeps trying, with the delay between tries bounded.
FOREVER = sys.maxsize
LEASE_BACKOFF = (0.4, 5.0)  # base, cap (s): getting a lease while etcd is unreachable
WRITE_BACKOFF = (0.2, 2.0)  # base, cap (s): rewriting the engine record after a failed put

BuildRecord = Callable[[int, EngineRecord | None], EngineRecord | None]


class Registration:
    """`await start()` (a lease, the first record put), then `mark_dirty()` on every change; `put`/`delete`
    for other keys under the lease; `stop_writer()` and `release(revoke)` to end it."""

    def __init__(self, config: AgentConfig, keys: Keys, client: EtcdClient, build: BuildRecord, *,
                 on_written: Callable[[EngineRecord], None],
                 on_new_incarnation: Callable[[EngineRecord | None], Awaitable[None]],
                 on_etcd_back: Callable[[bool], Awaitable[None]]) -> None:
        self.config = config
        self.keys = keys
        self.client = client
        self._build = build  # (lease id, record written so far) -> the record to write now
        self._on_written = on_written
        self._on_new_incarnation = on_new_incarnation
        self._on_etcd_back = on_etcd_back
        self.session: LeaseSession | None = None
        self.record: EngineRecord | None = None  # what etcd holds for us (last successful put)
        self._key = keys.engine(config.id)
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._writer: asyncio.Task | None = None

    async def start(self) -> None:
        """Get a lease (retrying while etcd is unreachable) and put the engine record under it."""
        self.session = await retry(
            self._new_session, attempts=FOREVER, backoff=Backoff(*LEASE_BACKOFF),
            on_retry=lambda attempt, exc, delay: log.warning(
                "agent %s: cannot get a lease yet (%s); retrying in %.1fs", self.config.id, exc, delay))
        await self.write_now()
        self._writer = asyncio.create_task(self._write_forever(), name=f"agent-record-{self.config.id}")

    async def _new_session(self, attempt: int) -> LeaseSession:
        session = LeaseSession(self.client, ttl=self.config.ttl, name=f"agent-{self.config.id}")
        session.on_new_lease(self._new_lease)
        session.on_confirmed(self._on_etcd_back)
        try:
            return await session.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await session.close(revoke=False)
            raise

    def mark_dirty(self) -> None:
        self._dirty.set()

    # --- the engine record ---------------------------------------------------------------------------------
    async def _write_forever(self) -> None:
        """The only writer of the engine record after start(): coalesces changes, retries with back-off."""
        backoff = Backoff(*WRITE_BACKOFF)
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.write_now()
                backoff.reset()
            except Exception as exc:  # noqa: BLE001 - etcd unavailable: try again
                log.warning("agent %s: writing the engine record failed: %s", self.config.id, exc)
                await asyncio.sleep(backoff.next_delay())
                self._dirty.set()

    async def write_now(self) -> None:
        async with self._lock:  # one put at a time, so an older value never lands after a newer one
            session = self.session
            if session is None:
                return
            record = self._build(session.lease_id, self.record)
            if record is None or (self.record is not None and same_record(self.record, record)):
                return
            await session.put(self._key, record.encode())
            previous, self.record = self.record, record
        if previous is None or (previous.state, previous.incarnation) != (record.state, record.incarnation):
            log.info("engine %s registered: state %s, incarnation %s", record.id, record.state, record.incarnation)
        self._on_written(record)

    async def _new_lease(self, lease_id: int) -> None:
        """A new lease (the first one, or a replacement after a loss): a new incarnation.

        Called by the LeaseSession before it re-puts our keys, with its lock held: session.put() here only
        replaces the value that re-put writes, so the engine record (and what the hook rewrites) comes back
        with the new incarnation at once. No task may be created here (it would inherit the recovery
        context)."""
        session = self.session
        if session is None:  # the first lease, from start(): it writes the record itself
            return
        log.warning("agent %s: lease replaced (new lease %x): new incarnation", self.config.id, lease_id)
        record = self._build(lease_id, self.record)
        if record is not None:
            await session.put(self._key, record.encode())
            self.record = record
        await self._on_new_incarnation(record)
        self.mark_dirty()

    # --- other keys under the lease ------------------------------------------------------------------------
    async def put(self, key: str, value: bytes) -> None:
        session = self.session
        if session is None:
            raise RuntimeError("not registered")
        await session.put(key, value)

    async def delete(self, key: str) -> None:
        session = self.session
        if session is not None:
            await session.delete(key)
        else:
            await self.client.delete(key)

    # --- the end --------------------------------------------------------------------------------------------
    async def stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def release(self, revoke: bool) -> None:
        """Stop holding the lease; with `revoke` every key under it vanishes at once."""
        await self.stop_writer()
        session, self.session = self.session, None
        if session is not None:
            await session.close(revoke=revoke)
