"""Where each engine's KV lives, as this router replica knows it (the kv_aware strategy's input).

Each engine whose record has a `cache_events` capability serves its prefix cache as a list-then-watch
NDJSON stream (`GET <url><path>?incarnation=INC&since=SEQ`, docs/keys.md and docs/architecture.md): a
snapshot of its cached prefix keys, then ordered events (stored, removed, cleared) numbered by `seq`, and
heartbeats. This module keeps one owned task per such engine that follows it, like the etcd view:

- the first connection (or one after a gap it cannot bridge, or a new engine process) gets a snapshot;
  a reconnection resumes with since=<last seq>, and the engine answers with the missing events or, when
  they left its ring buffer, a fresh snapshot;
- an event out of order (a gap) or a heartbeat ahead of what we hold makes it reconnect with since;
- a message from another incarnation (the engine restarted) drops the old state at once;
- the engine leaving the router's view (or losing the capability, or changing URL or process) drops its
  state and cancels its task;
- every connection and read has a timeout (the engine heartbeats every 2 s while idle, so silence for
  IDLE_TIMEOUT means a dead stream); reconnects back off through discovery.backoff, jittered;
- the per-engine key map is bounded (max_keys, least recently stored dropped first: a dropped key only
  makes the router underestimate a match);
- keys the engine marks as roots (`roots` in a snapshot or a stored event: the shallowest cached key of a
  request, its prefix family) are counted per engine (`families`): kv_aware's tie rule for a new prefix;
  so are the roots it announces as pending (`pending` in a snapshot or a stored event: a request of that
  family admitted, nothing cached yet; the mark ends when the root is stored, or by `pending` in a removed
  event when the family's requests ended with nothing cached), so a family placed by any replica counts
  from its admission, not from the end of its first prefill;
- an inverted index (key -> {engine: tokens}) mirrors the per-engine maps (kept current by snapshots,
  stored/removed/cleared events, evictions, new incarnations and engines dropped; bounded by them), so
  `matches(keys)` costs O(request keys + holders), whatever the fleet size (kv_aware above SCAN_LIMIT
  candidates, distserve.router.strategies).

The index runs only while the routing strategy needs it (set_active), so other strategies pay nothing.
`ready` is what /health/ready waits for: inactive, or every streaming engine in the synced view delivered
its snapshot or refused the connection (a process that is down cannot be routed to either: its snapshot
is applied when it answers), or sync_timeout passed since activation (an engine that never answers must
not keep a replica out of service; its engine is then scored like one without a stream).
An engine followed but without a snapshot yet (`pending`) is scored as caching nothing, not by hash: it is
a new process (empty) or one this replica has just started following.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Mapping

import aiohttp
import orjson

from discovery.backoff import Backoff
from discovery.informer import wait_set
from distserve.cluster.prefix_keys import CHUNK_BYTES, longest_match, parse_key_hex
from distserve.router.shortlist import least_cached, least_cached_py

log = logging.getLogger("distserve.router.kv_index")

MAX_KEYS_PER_ENGINE = 65_536  # ~100 bytes each in an OrderedDict: <= ~7 MB per engine
MAX_LINE_BYTES = 32 << 20  # one NDJSON line (a snapshot) larger than this is a protocol error
CONNECT_TIMEOUT = 2.0
IDLE_TIMEOUT = 10.0  # five missed heartbeats
RECONNECT_BACKOFF = (0.2, 5.0)  # base, cap (seconds); reset after a connection that lasted RESET_AFTER
RESET_AFTER = 10.0
_MAX_TOKENS = 1 << 40


class StreamError(Exception):
    """The stream broke or said something it must not: reconnect (state kept, resume with since)."""


class NewIncarnation(StreamError):
    """An event from another engine process: its old state is gone; reconnect for a snapshot."""


class EngineCache:
    """One engine's cache state as streamed, and its stream's health (shown by ctl and metrics)."""

    __slots__ = ("engine_id", "url", "path", "instance", "keys", "roots", "pending_roots", "incarnation", "seq",
                 "block_size", "chunk_bytes", "synced", "refused", "followed_at", "state", "error", "connects", "snapshots",
                 "gaps", "dropped", "last_message_at", "task", "sizes")

    def __init__(self, engine_id: str, url: str, path: str, instance: str | None, chunk_bytes: int) -> None:
        self.engine_id = engine_id
        self.url = url
        self.path = path
        self.instance = instance
        self.keys: OrderedDict[int, int] = OrderedDict()  # prefix key -> prompt tokens it covers
        self.roots: set[int] = set()  # the keys that are a prefix family's root (a subset of keys)
        self.pending_roots: set[int] = set()  # roots of admitted requests, announced before anything is cached
        # (families, keys) as of the last message applied: kv_aware's tie rule reads both for each tied engine
        # (one field instead of three containers and two calls per engine)
        self.sizes = (0, 0)
        self.incarnation: str | None = None  # the stream's (the engine process's instance id)
        self.seq: int | None = None
        self.block_size: int | None = None
        self.chunk_bytes = chunk_bytes
        self.synced = False  # a snapshot of the current incarnation was applied
        self.refused = False  # the last connection attempt was refused (the process is down)
        self.followed_at = time.monotonic()
        self.state = "connecting"  # connecting | streaming | retrying
        self.error: str | None = None
        self.connects = 0
        self.snapshots = 0
        self.gaps = 0
        self.dropped = 0
        self.last_message_at = 0.0
        self.task: asyncio.Task | None = None

    def clear(self) -> None:
        self.keys.clear()
        self.roots.clear()
        self.pending_roots.clear()
        self.sizes = (0, 0)
        self.incarnation = None
        self.seq = None
        self.synced = False

    def families(self) -> int:
        """Roots cached or pending (the two sets are disjoint: a stored root ends its pending mark)."""
        return len(self.roots) + len(self.pending_roots)

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine_id, "state": self.state, "synced": self.synced, "keys": len(self.keys),
                "families": self.families(), "pending_roots": len(self.pending_roots),
                "incarnation": self.incarnation, "seq": self.seq, "connects": self.connects,
                "snapshots": self.snapshots, "gaps": self.gaps, "dropped": self.dropped, "error": self.error}


def _capability(record: Any) -> tuple[str, int] | None:
    """(path, chunk_bytes) of a record's cache_events capability when it is one this router speaks."""
    info = getattr(record, "cache_events", None)
    if info is None:
        return None
    if isinstance(info, dict):  # a record decoded by an older schema keeps it as an extra field
        path, version, chunk = info.get("path"), info.get("version", 1), info.get("chunk_bytes", CHUNK_BYTES)
    else:
        path = getattr(info, "path", None)
        version = getattr(info, "version", 1)
        chunk = getattr(info, "chunk_bytes", CHUNK_BYTES)
    if not isinstance(path, str) or not path.startswith("/") or version != 1:
        return None
    if not isinstance(chunk, int) or chunk <= 0:
        return None
    return path, chunk


class KvIndex:
    """Per-engine prefix-key maps, following the engines of a ClusterCache (distserve.cluster.cache)."""

    def __init__(
        self,
        cache: Any,
        cluster_token: str | None = None,
        metrics: Any = None,
        *,
        max_keys: int = MAX_KEYS_PER_ENGINE,
        sync_timeout: float = 10.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        backoff: tuple[float, float] = RECONNECT_BACKOFF,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._cache = cache
        self._headers = {"Authorization": f"Bearer {cluster_token}"} if cluster_token else {}
        self.metrics = metrics
        self.max_keys = max_keys
        self.sync_timeout = sync_timeout
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._backoff = backoff
        self.engines: dict[str, EngineCache] = {}
        # key -> {engine_id: tokens}: the per-engine maps inverted (the same entries, so bounded like them)
        self._holders: dict[int, dict[str, int]] = {}
        # +1 whenever an engine's has_stream()/pending() may change other than by time (followed, snapshot,
        # cleared, dropped): kv_aware's per-candidate-set partition is recomputed only then
        self.epoch = 0
        self._chunks: dict[int, int] = {}  # chunk_bytes -> engines followed with it
        self._chunk_sizes: list[int] = []  # sorted(self._chunks), kept by _chunks_changed (read per pick)
        self.active = False
        self.synced = asyncio.Event()
        self._activated_at = 0.0
        self._waived = False
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._unsubscribe = [cache.on_engines(self._on_engine)]
        cache.on_synced(self._check_synced)
        if metrics is not None:
            metrics.kv_index_keys.callback = lambda: {(e,): len(s.keys) for e, s in self.engines.items()}
            metrics.kv_index_families.callback = lambda: {(e,): s.families() for e, s in self.engines.items()}
            metrics.kv_index_streams.callback = self._stream_states

    # ---------------------------------------------------------------- lifecycle
    def set_active(self, active: bool) -> None:
        """Follow the streams (the strategy in force needs them) or drop everything (it does not)."""
        if active == self.active or self._closed:
            return
        self.active = active
        if active:
            self._activated_at = time.monotonic()
            self._waived = False
            self.synced.clear()
            self._reconcile()
        else:
            for engine_id in list(self.engines):
                self._drop(engine_id)
            self.synced.clear()

    def start(self) -> None:
        """Follow the engines already in the view (called once the event loop runs)."""
        if self.active and not self._closed:
            self._activated_at = time.monotonic()
            self._reconcile()

    @property
    def ready(self) -> bool:
        """/health/ready: nothing to wait for, the whole index is in, or sync_timeout has passed."""
        if not self.active or self.synced.is_set() or self._waived:
            return True
        if time.monotonic() - self._activated_at >= self.sync_timeout:
            self._waived = True
            missing = sorted(e for e, s in self.engines.items() if not s.synced)
            log.warning("kv index: no snapshot from %s after %.1fs: ready without it (scored by hash)",
                        ", ".join(missing) or "-", self.sync_timeout)
            return True
        return False

    async def wait_synced(self, timeout: float) -> bool:
        return await wait_set(self.synced, timeout)

    async def close(self) -> None:
        self._closed = True
        for unsubscribe in self._unsubscribe:
            if callable(unsubscribe):
                unsubscribe()
        tasks = [s.task for s in self.engines.values() if s.task is not None]
        self.engines.clear()
        self._holders.clear()
        self._chunks.clear()
        self._chunks_changed()
        self.epoch += 1
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def tasks(self) -> list[asyncio.Task]:
        return [s.task for s in self.engines.values() if s.task is not None and not s.task.done()]

    # ---------------------------------------------------------------- lookups (the hot path)
    def has_stream(self, engine_id: str) -> bool:
        state = self.engines.get(engine_id)
        return state is not None and state.synced

    def pending(self, engine_id: str) -> bool:
        """Followed, no snapshot yet, for less than sync_timeout: a new process (its cache is empty) or a
        replica that has just started; kv_aware scores it as caching nothing rather than by hash."""
        state = self.engines.get(engine_id)
        return (state is not None and not state.synced
                and time.monotonic() - state.followed_at < self.sync_timeout)

    def families(self, engine_id: str) -> int:
        """Prefix families (root keys) cached on the engine or pending there (a request of the family admitted,
        its first prefill not done): what kv_aware spreads new prefixes by."""
        state = self.engines.get(engine_id)
        return state.families() if state is not None else 0

    def key_count(self, engine_id: str) -> int:
        state = self.engines.get(engine_id)
        return len(state.keys) if state is not None else 0

    def least_cached(self, engine_ids: list[str], loads: Mapping[str, float]) -> list[str]:
        """The engines of the fewest prefix families, then the lowest `loads` (0 when absent), then the fewest
        keys: kv_aware's tie rule (distserve/router/shortlist.py: in C where built)."""
        fewest = least_cached(engine_ids, loads, self.engines)
        return fewest if fewest is not None else least_cached_py(engine_ids, loads, self.engines)

    def chunk_bytes(self, engine_id: str) -> int:
        state = self.engines.get(engine_id)
        return state.chunk_bytes if state is not None else CHUNK_BYTES

    def matched_tokens(self, engine_id: str, keys: list[int]) -> int | None:
        """Prompt tokens of the longest prefix of `keys` cached on the engine; None when the engine has no
        synced stream (the caller falls back to hashing)."""
        state = self.engines.get(engine_id)
        if state is None or not state.synced:
            return None
        if not keys or not state.keys:
            return 0
        return longest_match(keys, state.keys)[1]

    def matches(self, keys: list[int]) -> dict[str, int]:
        """{engine_id: matched_tokens(engine_id, keys)} for every engine that matches (> 0 tokens), through the
        inverted index: the request's keys longest-first, each engine credited at the first (longest) key it
        holds. O(len(keys) + holders), independent of the fleet size."""
        out: dict[str, int] = {}
        for holders in self.levels(keys):
            if out:
                for engine_id, tokens in holders.items():
                    if engine_id not in out:
                        out[engine_id] = tokens
            else:
                out.update(holders)
        return out

    def levels(self, keys: list[int]) -> list[dict[str, int]]:
        """The holders ({engine_id: tokens}, read-only) of each of `keys` cached somewhere, longest key first:
        an engine's matched_tokens is its value in the first level that holds it. O(len(keys))."""
        return list(filter(None, map(self._holders.get, reversed(keys))))  # C-level: no per-key bytecode

    def chunk_sizes(self) -> list[int]:
        """The chunk sizes of the engines followed, ascending (one in a fleet of one engine build); read-only."""
        return self._chunk_sizes

    def _chunks_changed(self) -> None:
        self._chunk_sizes = sorted(self._chunks)

    def describe(self, engine_id: str) -> dict[str, Any] | None:
        state = self.engines.get(engine_id)
        return None if state is None else state.as_dict()

    # ---------------------------------------------------------------- the view's engines
    def _on_engine(self, change: Any) -> None:
        if not self.active or self._closed:
            return
        engine_id = change.ids[0]
        self._follow(engine_id, change.new)
        self._check_synced()

    def _reconcile(self) -> None:
        engines = self._cache.engines
        for engine_id in list(self.engines):
            if engine_id not in engines:
                self._drop(engine_id)
        for engine_id, record in list(engines.items()):
            self._follow(engine_id, record)
        self._check_synced()

    def _follow(self, engine_id: str, record: Any) -> None:
        cap = _capability(record) if record is not None else None
        state = self.engines.get(engine_id)
        if cap is None:
            if state is not None:
                self._drop(engine_id)
            return
        path, chunk = cap
        if state is not None:
            if (state.url, state.path, state.instance, state.chunk_bytes) == (record.url, path, record.instance,
                                                                            chunk):
                return
            self._drop(engine_id)  # another process or address: its keys say nothing about the new one
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not started yet: start() reconciles
            return
        state = self.engines[engine_id] = EngineCache(engine_id, record.url, path, record.instance, chunk)
        self._chunks[chunk] = self._chunks.get(chunk, 0) + 1
        self._chunks_changed()
        self.epoch += 1
        state.task = loop.create_task(self._run(state), name=f"kv-index-{engine_id}")

    def _drop(self, engine_id: str) -> None:
        state = self.engines.pop(engine_id, None)
        if state is None:
            return
        if state.task is not None:
            state.task.cancel()
        left = self._chunks.get(state.chunk_bytes, 0) - 1
        if left > 0:
            self._chunks[state.chunk_bytes] = left
        else:
            self._chunks.pop(state.chunk_bytes, None)
        self._chunks_changed()
        self._clear(state)

    def _clear(self, state: EngineCache) -> None:
        """Forget the engine's state (a new incarnation, or dropped), its entries in the inverted index too."""
        self._unindex_all(state)
        state.clear()
        self.epoch += 1

    def _unindex_all(self, state: EngineCache) -> None:
        holders, engine_id = self._holders, state.engine_id
        for key in state.keys:
            entry = holders.get(key)
            if entry is not None:
                entry.pop(engine_id, None)
                if not entry:
                    del holders[key]

    def _unindex(self, engine_id: str, key: int) -> None:
        entry = self._holders.get(key)
        if entry is not None:
            entry.pop(engine_id, None)
            if not entry:
                del self._holders[key]

    def _check_synced(self) -> None:
        if not self.active or self.synced.is_set():
            return
        if not self._cache.synced.is_set():
            return
        if all(s.synced or s.refused for s in self.engines.values()):
            self.synced.set()
            if self.metrics is not None:
                self.metrics.kv_index_synced.set(1)

    def _stream_states(self) -> dict[tuple, float]:
        out: dict[tuple, float] = {("connecting",): 0, ("streaming",): 0, ("retrying",): 0}
        for s in self.engines.values():
            out[(s.state,)] = out.get((s.state,), 0) + 1
        return out

    def _count(self, attr: str, labels: tuple, amount: int = 1) -> None:
        if self.metrics is not None and amount:
            getattr(self.metrics, attr).inc(labels, amount)

    # ---------------------------------------------------------------- one engine's stream
    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return self._session

    async def _run(self, state: EngineCache) -> None:
        backoff = Backoff(*self._backoff, reset_after=RESET_AFTER)
        while True:
            started = time.monotonic()
            try:
                await self._stream(state)
                raise StreamError("the engine ended the stream")
            except asyncio.CancelledError:
                raise
            except NewIncarnation as exc:
                self._clear(state)
                reason, state.error = "incarnation", str(exc)
            except StreamError as exc:
                reason, state.error = "stream", str(exc)
            except aiohttp.ClientConnectorError as exc:  # nothing listens there: the process is down
                reason, state.error = "connect", f"{type(exc).__name__}: {exc}"[:300]
                if not state.refused:
                    state.refused = True
                    self._check_synced()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason, state.error = "connect", f"{type(exc).__name__}: {exc}"[:300]
            except Exception as exc:  # noqa: BLE001 - a bug must not end the engine's stream for good
                log.exception("kv index: stream of %s failed", state.engine_id)
                reason, state.error = "error", f"{type(exc).__name__}: {exc}"[:300]
            state.state = "retrying"
            self._count("kv_index_reconnects", (reason,))
            delay = backoff.after_run(time.monotonic() - started)
            log.debug("kv index: %s stream: %s; again in %.2fs", state.engine_id, state.error, delay)
            await asyncio.sleep(delay)

    async def _stream(self, state: EngineCache) -> None:
        params = {}
        if state.incarnation is not None and state.seq is not None:
            params = {"incarnation": state.incarnation, "since": str(state.seq)}
        state.state = "connecting"
        state.connects += 1
        timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout,
                                        sock_connect=self._connect_timeout, sock_read=self._idle_timeout)
        async with self._get_session().get(state.url.rstrip("/") + state.path, params=params,
                                           headers=self._headers, timeout=timeout) as resp:
            state.refused = False
            if resp.status != 200:
                raise StreamError(f"HTTP {resp.status} from {state.path}")
            state.state = "streaming"
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                scan = len(buf)
                buf += chunk
                while True:
                    end = buf.find(b"\n", scan)
                    if end < 0:
                        break
                    line = bytes(buf[:end])
                    del buf[: end + 1]
                    scan = 0
                    if line.strip():
                        self.apply(state, line)
                if len(buf) > MAX_LINE_BYTES:
                    raise StreamError(f"a line longer than {MAX_LINE_BYTES} bytes")

    # ---------------------------------------------------------------- the protocol
    def apply(self, state: EngineCache, line: bytes) -> None:
        """Apply one NDJSON message; StreamError (reconnect) for a gap or anything malformed."""
        try:
            self._apply(state, line)
        finally:  # whatever the message changed, even one that failed half-way
            state.sizes = (len(state.roots) + len(state.pending_roots), len(state.keys))

    def _apply(self, state: EngineCache, line: bytes) -> None:
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise StreamError("a line that is not JSON") from None
        if type(msg) is not dict:
            raise StreamError("a message that is not a JSON object")
        kind = msg.get("type")
        seq = msg.get("seq")
        incarnation = msg.get("incarnation")
        if type(seq) is not int or seq < 0:
            raise StreamError(f"{kind} message without a valid seq")
        if incarnation is not None and type(incarnation) is not str:
            raise StreamError("incarnation is not a string")
        state.last_message_at = time.time()
        if kind == "snapshot":
            if incarnation is None:
                raise StreamError("snapshot without incarnation")
            if state.incarnation is not None and incarnation != state.incarnation:
                self._count("kv_index_resyncs", ("incarnation",))
            elif state.snapshots:
                self._count("kv_index_resyncs", ("snapshot",))
            pairs = self._pairs(msg.get("keys"))
            roots = self._roots(msg.get("roots"))
            pending = self._roots(msg.get("pending"), "pending")
            self._unindex_all(state)
            state.keys.clear()
            state.roots.clear()
            state.pending_roots.clear()
            self._store(state, pairs, roots)
            self._add_pending(state, pending)
            state.incarnation = incarnation
            state.seq = seq
            block_size = msg.get("block_size")
            state.block_size = block_size if type(block_size) is int else None
            state.synced = True
            self.epoch += 1
            state.snapshots += 1
            state.error = None
            self._check_synced()
            return
        if state.incarnation is None:
            raise StreamError(f"{kind} message before a snapshot")
        if incarnation is not None and incarnation != state.incarnation:
            raise NewIncarnation(f"engine incarnation {incarnation} replaced {state.incarnation}")
        if kind == "heartbeat":
            if seq > state.seq:  # events we never got
                state.gaps += 1
                self._count("kv_index_resyncs", ("gap",))
                raise StreamError(f"heartbeat at seq {seq}, have {state.seq}")
            return
        if kind not in ("stored", "removed", "cleared"):
            raise StreamError(f"unknown message type {kind!r}")
        if seq <= state.seq:  # already applied (a resumed stream may repeat)
            return
        if seq != state.seq + 1:
            state.gaps += 1
            self._count("kv_index_resyncs", ("gap",))
            raise StreamError(f"event seq {seq} after {state.seq}")
        if kind == "stored":
            self._store(state, self._pairs(msg.get("keys")), self._roots(msg.get("roots")))
            self._add_pending(state, self._roots(msg.get("pending"), "pending"))
        elif kind == "removed":
            keys = msg.get("keys")
            if type(keys) is not list:
                raise StreamError("removed without a keys list")
            for text in keys:
                try:
                    key = parse_key_hex(text)
                except ValueError:
                    raise StreamError(f"bad key {str(text)[:40]!r}") from None
                if state.keys.pop(key, None) is not None:
                    self._unindex(state.engine_id, key)
                state.roots.discard(key)
            state.pending_roots.difference_update(self._roots(msg.get("pending"), "pending"))
        else:
            self._unindex_all(state)
            state.keys.clear()
            state.roots.clear()
            state.pending_roots.clear()
        state.seq = seq

    @staticmethod
    def _pairs(keys: Any) -> list[tuple[int, int]]:
        if type(keys) is not list:
            raise StreamError("keys is not a list")
        out = []
        for item in keys:
            if type(item) is not list or len(item) != 2:
                raise StreamError("a key is not a [hex, tokens] pair")
            text, tokens = item
            if type(tokens) is not int or not 1 <= tokens <= _MAX_TOKENS:  # a key covers at least a block
                raise StreamError(f"bad token count {str(tokens)[:40]!r}")
            try:
                out.append((parse_key_hex(text), tokens))
            except ValueError:
                raise StreamError(f"bad key {str(text)[:40]!r}") from None
        return out

    @staticmethod
    def _roots(roots: Any, field: str = "roots") -> set[int]:
        """An optional list of hex keys (`roots`, `pending`); absent: none."""
        if roots is None:
            return set()
        if type(roots) is not list:
            raise StreamError(f"{field} is not a list")
        try:
            return {parse_key_hex(text) for text in roots}
        except ValueError:
            raise StreamError(f"a bad key in {field}") from None

    def _add_pending(self, state: EngineCache, pending: set[int]) -> None:
        # bounded like the keys (an engine has at most its in-flight requests' roots pending); a root already
        # stored is not pending
        for key in pending:
            if len(state.pending_roots) >= self.max_keys:
                break
            if key not in state.roots:
                state.pending_roots.add(key)

    def _store(self, state: EngineCache, pairs: list[tuple[int, int]], roots: set[int] = frozenset()) -> None:
        keys, holders, engine_id = state.keys, self._holders, state.engine_id
        for key, tokens in pairs:
            if key in keys:
                keys.move_to_end(key)
            keys[key] = tokens
            entry = holders.get(key)
            if entry is None:
                holders[key] = {engine_id: tokens}
            else:
                entry[engine_id] = tokens
            if key in roots:
                state.roots.add(key)
                state.pending_roots.discard(key)  # stored: no longer pending
        over = len(keys) - self.max_keys
        if over > 0:  # the least recently stored go first
            for _ in range(over):
                key = keys.popitem(last=False)[0]
                state.roots.discard(key)
                self._unindex(engine_id, key)
            state.dropped += over
            self._count("kv_index_dropped", (state.engine_id,), over)
