"""routers/<router_id>: this replica's record under its own lease (visibility only: nothing reads it to
route). Counters are refreshed at most every `interval` seconds and only when they changed."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from discovery.lease import LeaseSession
from distserve.cluster.keys import Keys
from distserve.cluster.records import RouterRecord, now

log = logging.getLogger("distserve.router.registration")


class Registration:
    def __init__(
        self,
        client,
        keys: Keys,
        router_id: str,
        url: str,
        version: str,
        ttl: float,
        interval: float,
        counters: Callable[[], tuple[str, int, int, int]],
    ) -> None:
        self._client = client
        self._key = keys.router(router_id)
        self._record = RouterRecord(
            id=router_id, url=url, version=version, hostname=socket.gethostname(), pid=os.getpid()
        )
        self._ttl = ttl
        self._interval = interval
        self._counters = counters  # -> (strategy, view revision, requests total, in flight)
        self._session = None
        self._task: asyncio.Task | None = None
        self._last: tuple | None = None

    async def start(self) -> None:
        self._session = LeaseSession(
            self._client, ttl=max(1, int(round(self._ttl))), name=f"router-{self._record.id}"
        )
        await self._session.start()
        await self._put()
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name="router-record")

    async def _put(self) -> None:
        strategy, revision, total, in_flight = self._counters()
        rec = self._record
        rec.strategy, rec.view_revision, rec.requests_total, rec.in_flight = (
            strategy,
            revision,
            total,
            in_flight,
        )
        rec.updated_at = now()
        self._last = (strategy, revision, total, in_flight)
        await self._session.put(self._key, rec.encode())

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._counters() == self._last:
                continue
            try:
                await self._put()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - visibility only: never let it hurt serving
                log.warning("could not refresh the router record: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            try:
                await asyncio.wait_for(self._session.close(revoke=True), 3)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself anyway
                log.warning("could not revoke the router lease: %s", exc)
