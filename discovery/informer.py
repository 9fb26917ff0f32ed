"""A live, typed, in-memory view of an etcd prefix (list-then-watch), with change callbacks.

The view converges to etcd's content under the prefix: it follows `watch_prefix` (exactly-once, ordered,
compaction-safe) and, if the watch ever fails for good (say a permission error), starts it again from
its revision. A value that does not decode (the decoder raises `MalformedRecord`, or anything else) is
logged, counted in `malformed_count` and kept out of the view; if the key held a good value before, that
value leaves the view (listeners get a "delete"), because the record it described is no longer valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from discovery.client import EtcdClient, backoff_delay, raise_if_cancelling
from discovery.record import MalformedRecord
from discovery.watch import watch_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")

ChangeKind = Literal["put", "delete"]
Listener = Callable[[ChangeKind, str, Any, Any], None]


def _raw(key: str, raw: bytes) -> Any:
    return raw



async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """True once `event` is set; False after `timeout` seconds (None: no limit). For "synced" flags."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True

class Informer(Generic[T]):
    """`items()`: key -> decoded value. Listeners run in order, synchronously, for every change
    (the initial list arrives as "put"s before `synced` is set)."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        decode: Callable[[str, bytes], T] = _raw,  # type: ignore[assignment]
        *,
        name: str | None = None,
        progress_interval: float = 5.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.decode = decode
        self.name = name or prefix
        self.progress_interval = progress_interval
        self.synced = asyncio.Event()
        self.revision = 0
        self.malformed_count = 0
        self._items: dict[str, T] = {}
        self._mod_revisions: dict[str, int] = {}  # every key under the prefix, malformed ones included
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    # --- reading the view ----------------------------------------------------------------------------
    def items(self) -> dict[str, T]:
        return dict(self._items)

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    # --- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> "Informer[T]":
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"informer:{self.name}")
        return self

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait for the first full list; raises TimeoutError after `timeout` seconds."""
        if not await wait_set(self.synced, timeout):
            raise TimeoutError(f"informer {self.name}: not synced with etcd within {timeout}s")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> "Informer[T]":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the loop --------------------------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while True:
            start = None if not self.synced.is_set() else self.revision + 1
            try:
                async for ev in watch_prefix(
                    self.client, self.prefix, start, known=dict(self._mod_revisions), meta_events=True,
                    progress_interval=self.progress_interval,
                ):
                    attempt = 0
                    if ev.type in ("progress", "synced"):
                        self.revision = max(self.revision, ev.revision)
                        if ev.type == "synced" and not self.synced.is_set():
                            self.synced.set()
                        continue
                    self._apply(ev.type, ev.key, ev.value, ev.mod_revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the view must outlive any error; retried with back-off
                raise_if_cancelling()
                attempt += 1
                log.error("informer %s: watch failed (%s); restarting from revision %d", self.name, exc,
                          self.revision + 1)
                await asyncio.sleep(backoff_delay(attempt, base=0.2, cap=5.0))

    def _apply(self, kind: str, key: str, value: bytes | None, mod_revision: int) -> None:
        self.revision = max(self.revision, mod_revision)
        old = self._items.get(key)
        if kind == "delete":
            self._mod_revisions.pop(key, None)
            if key in self._items:
                del self._items[key]
                self._notify("delete", key, old, None)
            return
        self._mod_revisions[key] = mod_revision
        try:
            new = self.decode(key, value or b"")
        except Exception as exc:  # noqa: BLE001 - a bad value is counted and skipped, never a crash
            self.malformed_count += 1
            reason = str(exc) if isinstance(exc, MalformedRecord) else f"{type(exc).__name__}: {exc}"
            log.warning("informer %s: skipping malformed value at %s (revision %d): %s", self.name, key,
                        mod_revision, reason[:300])
            if key in self._items:
                del self._items[key]
                self._notify("delete", key, old, None)
            return
        self._items[key] = new
        self._notify("put", key, old, new)

    def _notify(self, kind: ChangeKind, key: str, old: Any, new: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, key, old, new)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the view
                log.exception("informer %s: listener %r failed on %s %s", self.name, listener, kind, key)
