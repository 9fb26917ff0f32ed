"""A shared informer of the cluster (client-go's SharedInformer, in asyncio): one cache, many handlers.

`ClusterCache` runs one list+watch per record kind (a `discovery.informer.Informer` over the kind's prefix)
and keeps typed maps of the records (`engines`, `links`, `loads`, `flags`, `routers`, `configs`), decoded
by `distserve.cluster.codec`. Handlers subscribe per kind and get a typed `Change` for every put, delete or
malformed value, in etcd order within a kind; the initial list arrives as puts before `synced` is set.

A value that does not decode leaves its map (a record that is no longer valid must not be acted on) and
reaches handlers as a "malformed" change carrying the error, so a reader that must keep its last good
value (the router's routing config) can tell it from a delete. Keys under a kind's prefix that are not
keys of the schema are counted as malformed and not passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from discovery.informer import Informer, wait_set
from distserve.cluster import keys as K, records
from distserve.cluster.codec import Codec, Decoded, MalformedValue

log = logging.getLogger(__name__)

R = TypeVar("R")
ChangeType = Literal["put", "delete", "malformed"]


@dataclass(frozen=True)
class Change(Generic[R]):
    """One change of one key. `old`/`new` are typed records (None when absent or malformed)."""

    type: ChangeType  # "put": `new` is the value now; "delete": the key is gone; "malformed": see `error`
    kind: str
    ids: tuple[str, ...]
    key: str
    old: R | None
    new: R | None
    revision: int  # the cache's revision for this kind once the change applied (its mod revision)
    synced: bool  # False while the initial list is being delivered
    error: str | None = None  # "malformed": why the value was refused

    @property
    def gone(self) -> bool:
        """The key no longer holds a usable record (deleted or malformed)."""
        return self.new is None


Handler = Callable[[Change[Any]], None]


@dataclass(frozen=True)
class _Invalid:
    error: str


def _map_key(kind: str, ids: tuple[str, ...]) -> Any:
    return ids if kind == K.LINKS else ids[0]


class ClusterCache:
    """Typed, live maps of one cluster's records (read them; never write them).

    `kinds` picks the record kinds to list and watch (default: all). Handlers and `on_synced` callbacks
    are synchronous and run on the event loop in the informers' tasks; one that raises is logged and the
    others still run.
    """

    def __init__(
        self,
        client: Any,
        keys: K.Keys,
        kinds: Iterable[str] = K.KINDS,
        *,
        progress_interval: float = 5.0,
        name: str = "cluster",
    ) -> None:
        self.client = client
        self.keys = keys
        self.codec = Codec(keys)
        self.kinds = tuple(dict.fromkeys(kinds))
        for kind in self.kinds:
            keys.prefix(kind)  # ValueError for an unknown kind
        self.name = name
        self.engines: dict[str, records.EngineRecord] = {}
        self.links: dict[tuple[str, str], records.LinkRecord] = {}
        self.loads: dict[str, records.LoadRecord] = {}
        self.flags: dict[str, records.OperatorFlags] = {}
        self.routers: dict[str, records.RouterRecord] = {}
        self.configs: dict[str, records.RoutingConfig] = {}
        self._maps: dict[str, dict] = {
            K.ENGINES: self.engines, K.LINKS: self.links, K.LOAD: self.loads, K.STATE: self.flags,
            K.ROUTERS: self.routers, K.CONFIG: self.configs,
        }
        self.malformed = 0  # malformed values seen (each write counts once)
        self.malformed_keys: dict[str, str] = {}  # key -> error, for keys whose current value is malformed
        self.synced = asyncio.Event()
        self._handlers: dict[str, list[Handler]] = {kind: [] for kind in K.KINDS}
        self._on_synced: list[Callable[[], None]] = []
        self._informers: dict[str, Informer] = {
            kind: Informer(client, keys.prefix(kind), self._decoder(kind), name=f"{name}:{kind}",
                           progress_interval=progress_interval)
            for kind in self.kinds
        }
        for kind, informer in self._informers.items():
            informer.add_listener(self._listener(kind))
        self._sync_task: asyncio.Task[None] | None = None

    # --- reading ----------------------------------------------------------------------------------------
    @property
    def routing_config(self) -> records.RoutingConfig | None:
        """config/routing's value, None when absent or malformed."""
        return self.configs.get(K.ROUTING_CONFIG_NAME)

    def records(self, kind: str) -> dict:
        """The typed map of `kind` (links: keyed by (prefill id, decode id); the others by id)."""
        return self._maps[kind]

    @property
    def revision(self) -> int:
        """The highest etcd revision applied to any kind."""
        return max((inf.revision or 0 for inf in self._informers.values()), default=0)

    def kind_revision(self, kind: str) -> int:
        return self._informers[kind].revision

    # --- subscribing ------------------------------------------------------------------------------------
    def on(self, kind: str, handler: Handler) -> Callable[[], None]:
        """Call `handler(change)` for every change of `kind`; returns a function that unsubscribes."""
        if kind not in self._informers:
            raise ValueError(f"this cache does not watch {kind!r} (it watches {', '.join(self.kinds)})")
        handlers = self._handlers[kind]
        handlers.append(handler)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                handlers.remove(handler)

        return unsubscribe

    def on_engines(self, handler: Callable[[Change[records.EngineRecord]], None]) -> Callable[[], None]:
        return self.on(K.ENGINES, handler)

    def on_links(self, handler: Callable[[Change[records.LinkRecord]], None]) -> Callable[[], None]:
        return self.on(K.LINKS, handler)

    def on_load(self, handler: Callable[[Change[records.LoadRecord]], None]) -> Callable[[], None]:
        return self.on(K.LOAD, handler)

    def on_flags(self, handler: Callable[[Change[records.OperatorFlags]], None]) -> Callable[[], None]:
        return self.on(K.STATE, handler)

    def on_routers(self, handler: Callable[[Change[records.RouterRecord]], None]) -> Callable[[], None]:
        return self.on(K.ROUTERS, handler)

    def on_config(self, handler: Callable[[Change[records.RoutingConfig]], None]) -> Callable[[], None]:
        return self.on(K.CONFIG, handler)

    def on_synced(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once every kind has listed (at once if that already happened)."""
        if self.synced.is_set():
            self._call(callback)
        else:
            self._on_synced.append(callback)

    # --- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> "ClusterCache":
        if self._sync_task is None:
            for informer in self._informers.values():
                await informer.start()
            self._sync_task = asyncio.create_task(self._mark_synced(), name=f"{self.name}:synced")
        return self

    async def wait_synced(self, timeout: float | None) -> bool:
        """True once every kind has listed; False after `timeout` seconds."""
        return await wait_set(self.synced, timeout)

    async def close(self) -> None:
        """Stop every watch and owned task (idempotent). The maps keep their last contents."""
        task, self._sync_task = self._sync_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for informer in self._informers.values():
            try:
                await informer.stop()
            except Exception:  # noqa: BLE001 - closing: keep stopping the others
                log.debug("cache %s: informer stop failed", self.name, exc_info=True)

    async def __aenter__(self) -> "ClusterCache":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def tasks(self) -> list[asyncio.Task]:
        """The tasks this cache owns that are still running (for tests and shutdown checks)."""
        out = [inf._task for inf in self._informers.values() if inf._task is not None]
        return [t for t in (*out, self._sync_task) if t is not None and not t.done()]

    # --- internals --------------------------------------------------------------------------------------
    async def _mark_synced(self) -> None:
        await asyncio.gather(*(inf.synced.wait() for inf in self._informers.values()))
        self.synced.set()
        callbacks, self._on_synced = self._on_synced, []
        for callback in callbacks:
            self._call(callback)

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # noqa: BLE001 - one bad callback must not stop the cache
            log.exception("cache %s: on_synced callback %r failed", self.name, callback)

    def _decoder(self, kind: str) -> Callable[[str, bytes], Decoded | _Invalid]:
        def decode(key: str, raw: bytes) -> Decoded | _Invalid:
            # never raises: a malformed value stays in the informer as _Invalid so the cache can tell
            # handlers why, instead of the informer turning it into a bare delete
            try:
                decoded = self.codec.decode(key, raw)
            except MalformedValue as exc:
                return _Invalid(str(exc))
            if decoded.kind != kind:  # cannot happen under the kind's prefix; kept for safety
                return _Invalid(f"a {decoded.kind} key under {kind}/")
            return decoded

        return decode

    def _listener(self, kind: str) -> Callable[[str, str, Any, Any], None]:
        typed = self._maps[kind]
        informer_ref: list[Informer] = []

        def listener(change: str, key: str, _old: Any, new: Any) -> None:
            if not informer_ref:
                informer_ref.append(self._informers[kind])
            revision = informer_ref[0].revision
            parsed = self.keys.parse(key)
            ids = parsed.ids if parsed is not None and parsed.kind == kind else ()
            if isinstance(new, _Invalid):
                self.malformed += 1
                self.malformed_keys[key] = new.error
                log.warning("cache %s: skipping malformed value at %s (revision %d): %s", self.name, key,
                            revision, new.error[:300])
            else:
                self.malformed_keys.pop(key, None)
            if not ids:  # not a key of the schema: counted above, nothing to pass on
                return
            map_key = _map_key(kind, ids)
            old = typed.get(map_key)
            if change == "put" and isinstance(new, Decoded):
                typed[map_key] = new.record
                event: Change = Change("put", kind, ids, key, old, new.record, revision, self.synced.is_set())
            else:
                typed.pop(map_key, None)
                error = new.error if isinstance(new, _Invalid) and change == "put" else None
                event = Change("malformed" if error is not None else "delete", kind, ids, key, old, None,
                               revision, self.synced.is_set(), error)
            for handler in list(self._handlers[kind]):
                try:
                    handler(event)
                except Exception:  # noqa: BLE001 - one bad handler must not stop the others
                    log.exception("cache %s: handler %r failed on %s %s", self.name, handler, event.type, key)

        return listener
