"""The prefix-cache stream (`GET /distserve/cache/events`) for stock lmdeploy PyTorch engines.

lmdeploy 0.17/0.18 has no KV-event API: its prefix cache is a `BlockTrie` (lmdeploy/pytorch/paging/
block_trie/) owned by the scheduler in the *engine* process, which the api_server reaches only by RPC
(`_collective_rpc_async`, the channel /distserve/ext/status already uses). So the work is split:

- engine process (`install_trie_hooks`): every trie node that attaches (`Node.attach_to`: a full block
  enters the cache) or is evicted (`Node.detach_leaf`: lmdeploy evicts leaves only) becomes a block event
  in `BlockLog`, a bounded ring; a block is named by a chain hash of its token ids (the parent's hash +
  this block's ids), which the api_server can compute from a prompt's ids alone. A new `BlockTrie` (a new
  scheduler) clears it. The RPC `distserve_cache_blocks(gen, since)` answers the events after `since` or,
  when they left the ring or the log was cleared, a snapshot of every cached block.
- api_server process (`CacheEventsService`): a poller task mirrors the cached block set; for every
  generation request it computes the design's tokenizer-free prefix keys (distserve.cluster.prefix_keys)
  and, with lmdeploy's own tokenizer and chat template, how many prompt tokens each key's prefix covers,
  hence the last full block that key needs. A key is stored while that block is cached (a trie node only
  exists under its parent, so the whole path is cached too) and removed when it is evicted. `KeyLog`
  serves those keys as the NDJSON list-then-watch stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from distserve.cluster.prefix_keys import CHUNK_BYTES, chat_keys, key_hex, message_text, text_keys

logger = logging.getLogger("distserve.lmdeploy_ext.cache_events")

PATH = "/distserve/cache/events"
VERSION = 1
RING_EVENTS = 4096  # key events kept for resuming clients (design)
BLOCK_RING = 65_536  # block events kept in the engine process for the poller
HEARTBEAT_S = 2.0
POLL_INTERVAL_S = 0.2
RPC_TIMEOUT_S = 5.0
MAX_KEYS = 65_536  # keys tracked by the api_server (least recently stored dropped first, as `removed`)
MAX_PENDING = 4096  # keys waiting for their block to enter the cache
PENDING_TTL_S = 120.0
MAX_KEYS_PER_REQUEST = 64  # text prompts: a longer chain is sampled down to this many keys
MAX_QUEUED_REQUESTS = 256  # requests waiting for key bookkeeping (beyond: dropped, counted)
_SEED = b"lmd-blk-v1"


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


ROOT_HASH = _h(_SEED)


def ids_bytes(ids: Iterable[int]) -> bytes:
    return b"".join((int(t) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for t in ids)


def block_hash(parent: int, ids: Iterable[int]) -> int:
    """The chain hash of one full block: its parent's hash and its token ids (engine and api_server)."""
    return _h(parent.to_bytes(8, "big") + ids_bytes(ids))


def block_chain(ids: list[int], block_size: int) -> list[int]:
    """The chain hashes of the full blocks of `ids`: [h_1..h_n], n = len(ids) // block_size."""
    out, parent = [], ROOT_HASH
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = block_hash(parent, ids[start: start + block_size])
        out.append(parent)
    return out


# ---------------------------------------------------------------- engine process: block events


class BlockLog:
    """Cached blocks of one engine process and the ordered events that changed them (bounded ring)."""

    def __init__(self, ring: int = BLOCK_RING) -> None:
        self.gen = uuid.uuid4().hex[:12]  # changes when the log is cleared (a new trie)
        self.seq = 0
        self.blocks: set[int] = set()
        self.events: deque[tuple[int, int, int]] = deque(maxlen=ring)  # (seq, +1 stored / -1 removed, hash)

    def stored(self, h: int) -> None:
        if h not in self.blocks:
            self.blocks.add(h)
            self.seq += 1
            self.events.append((self.seq, 1, h))

    def removed(self, h: int) -> None:
        if h in self.blocks:
            self.blocks.discard(h)
            self.seq += 1
            self.events.append((self.seq, -1, h))

    def clear(self) -> None:
        self.gen = uuid.uuid4().hex[:12]
        self.seq = 0
        self.blocks.clear()
        self.events.clear()

    def since(self, gen: str | None, since: int | None) -> dict[str, Any]:
        """Events after `since` of generation `gen`, or a snapshot when they cannot be given."""
        oldest = self.events[0][0] if self.events else self.seq + 1
        if gen == self.gen and since is not None and 0 <= since <= self.seq and since + 1 >= oldest:
            events = [[op, f"{h:016x}"] for s, op, h in self.events if s > since]
            return {"gen": self.gen, "seq": self.seq, "events": events}
        return {"gen": self.gen, "seq": self.seq, "snapshot": [f"{h:016x}" for h in self.blocks]}


BLOCKS = BlockLog()
_hooks_installed = False


def install_trie_hooks(node_cls=None, trie_cls=None, log: BlockLog = BLOCKS) -> bool:
    """Wrap lmdeploy's trie node attach/detach and trie construction (engine process). False when the
    classes lack the methods this relies on (another lmdeploy): the stream then stays empty."""
    global _hooks_installed
    if node_cls is None or trie_cls is None:
        try:
            # lmdeploy is optional (and loads torch): only the engine process installs the hooks.
            from lmdeploy.pytorch.paging.block_trie.node import Node as node_cls  # noqa: N813
            from lmdeploy.pytorch.paging.block_trie.trie import BlockTrie as trie_cls  # noqa: N813
        except ImportError as e:
            logger.warning("lmdeploy has no block_trie package (%s): no prefix-cache stream", e)
            return False
    if not all(hasattr(node_cls, name) for name in ("attach_to", "detach_leaf")):
        logger.warning("lmdeploy's trie Node has an unexpected shape: no prefix-cache stream")
        return False
    if getattr(node_cls, "_distserve_hooked", False):
        return True
    original_attach, original_detach = node_cls.attach_to, node_cls.detach_leaf
    original_init = trie_cls.__init__

    def attach_to(self, parent):
        original_attach(self, parent)
        try:
            if parent.parent is None and parent.block_id < 0:  # an adapter root
                parent_hash = ROOT_HASH if getattr(parent, "adapter_name", None) is None else None
            else:
                parent_hash = getattr(parent, "_distserve_hash", None)
            # Blocks of another adapter's root or with multimodal identity get no hash (and neither do their
            # descendants): a text prefix key never names them.
            if parent_hash is None or getattr(self, "extra_identity", ()) or self.token_ids is None:
                return
            h = block_hash(parent_hash, self.token_ids.tolist())
            self._distserve_hash = h
            log.stored(h)
        except Exception:  # noqa: BLE001 - bookkeeping must never break lmdeploy's scheduler
            logger.exception("prefix-cache stream: attach hook failed")

    def detach_leaf(self):
        detached = original_detach(self)
        h = getattr(self, "_distserve_hash", None)
        if detached and h is not None:
            log.removed(h)
        return detached

    def trie_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        log.clear()  # a new trie (a new scheduler): nothing of the old one is cached

    node_cls.attach_to, node_cls.detach_leaf, trie_cls.__init__ = attach_to, detach_leaf, trie_init
    node_cls._distserve_hooked = True
    _hooks_installed = True
    return True


def distserve_cache_blocks(self, gen: str | None = None, since: int | None = None) -> dict[str, Any]:
    """EngineWorkerBase RPC: block events since `since` (or a snapshot), and the engine's cache facts."""
    out = BLOCKS.since(gen, since)
    scheduler = getattr(getattr(self, "engine", None), "scheduler", None)
    trie = getattr(scheduler, "block_trie", None)
    out["enabled"] = bool(getattr(trie, "enabled", False)) and _hooks_installed
    out["block_size"] = getattr(trie, "block_size", None)
    stats = getattr(trie, "stats", None)
    if stats is not None:
        out["query_tokens"] = int(getattr(stats, "num_query_tokens", 0))
        out["hit_tokens"] = int(getattr(stats, "num_hit_tokens", 0))
    return out


# ---------------------------------------------------------------- api_server process: prefix keys


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_prefix_tokens(
    messages: list[dict], input_ids: list[int], render: Callable[[list[dict]], list[int]], limit: int
) -> list[int]:
    """Prompt tokens covered by the first i messages, i = 1..: the rendered template over messages[:i]
    (no generation prompt) tokenized, as far as it agrees with the full prompt's ids. Stops at the first
    i whose rendering is not a prefix (one merged boundary token tolerated) or at `limit` keys."""
    out = []
    for i in range(1, min(len(messages), limit) + 1):
        ids = render(messages[:i])
        agree = common_prefix(ids, input_ids)
        if agree < len(ids) - 1:
            break
        out.append(agree)
    return out


def text_prefix_tokens(
    prompt: str, input_ids: list[int], encode: Callable[[str], list[int]], indices: list[int],
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[int, int]:
    """{j: tokens} for the key indices j (1-based): the tokens of the first j*chunk_bytes bytes that agree
    with the full prompt's ids (each such token lies wholly inside those bytes)."""
    data = prompt.encode("utf-8", "surrogatepass")
    out = {}
    for j in indices:
        prefix = data[: j * chunk_bytes].decode("utf-8", "ignore")  # a cut character is not inside
        out[j] = common_prefix(encode(prefix), input_ids)
    return out


def sample_indices(n: int, limit: int) -> list[int]:
    """1..n, or `limit` of them spread evenly (always keeping n, the longest)."""
    if n <= limit:
        return list(range(1, n + 1))
    step = n / limit
    return sorted({max(1, round(n - k * step)) for k in range(limit)})


def request_key_blocks(
    body: dict, input_ids: list[int], block_size: int, *, render_chat: Callable | None,
    encode: Callable[[str], list[int]], chunk_bytes: int = CHUNK_BYTES,
) -> list[tuple[int, int, int]]:
    """[(key, tokens, last block hash)] for the keys of this request that cover at least one full block."""
    chain = block_chain(input_ids, block_size)
    pairs: list[tuple[int, int]] = []  # (key, prefix tokens)
    if isinstance(body.get("messages"), list):
        if render_chat is None:
            return []
        messages = message_list(body["messages"])
        if messages is None:
            return []
        keys = chat_keys(body["messages"])
        counts = chat_prefix_tokens(messages[: len(keys)], input_ids, render_chat, MAX_KEYS_PER_REQUEST)
        pairs = list(zip(keys, counts))
    elif isinstance(body.get("prompt"), str) or (
        isinstance(body.get("prompt"), list) and len(body["prompt"]) == 1 and isinstance(body["prompt"][0], str)
    ):
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
        keys = text_keys(prompt, chunk_bytes)
        counts = text_prefix_tokens(prompt, input_ids, encode, sample_indices(len(keys), MAX_KEYS_PER_REQUEST),
                                    chunk_bytes)
        pairs = [(keys[j - 1], t) for j, t in counts.items()]
    out = []
    for key, tokens in pairs:
        blocks = min(tokens // block_size, len(chain))
        if blocks > 0:
            out.append((key, blocks * block_size, chain[blocks - 1]))
    return out


class KeyLog:
    """The key stream's state: cached keys, the ring of key events, and a wake-up for stream readers."""

    def __init__(self, incarnation: str, ring: int = RING_EVENTS, max_keys: int = MAX_KEYS) -> None:
        self.incarnation = incarnation
        self.seq = 0
        self.keys: OrderedDict[int, int] = OrderedDict()  # key -> tokens, least recently stored first
        self.ring: deque[dict] = deque(maxlen=ring)
        self.max_keys = max_keys
        self.dropped = 0
        self._changed = asyncio.Event()

    def _emit(self, event: dict) -> None:
        self.seq += 1
        event = {**event, "seq": self.seq, "incarnation": self.incarnation}
        self.ring.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def store(self, items: list[tuple[int, int]]) -> list[int]:
        """Mark keys cached; returns the keys dropped to stay within max_keys (already sent as removed)."""
        fresh = []
        for key, tokens in items:
            if self.keys.get(key) != tokens:
                fresh.append([key_hex(key), tokens])
            self.keys[key] = tokens
            self.keys.move_to_end(key)
        dropped = []
        while len(self.keys) > self.max_keys:
            key, _ = self.keys.popitem(last=False)
            dropped.append(key)
        if fresh:
            self._emit({"type": "stored", "keys": fresh})
        if dropped:
            self.dropped += len(dropped)
            self._emit({"type": "removed", "keys": [key_hex(k) for k in dropped]})
        return dropped

    def remove(self, keys: Iterable[int]) -> None:
        gone = [k for k in keys if self.keys.pop(k, None) is not None]
        if gone:
            self._emit({"type": "removed", "keys": [key_hex(k) for k in gone]})

    def clear(self) -> None:
        self.keys.clear()
        self._emit({"type": "cleared"})

    def snapshot(self, block_size: int, chunk_bytes: int = CHUNK_BYTES) -> dict:
        return {
            "type": "snapshot", "incarnation": self.incarnation, "seq": self.seq, "block_size": block_size,
            "chunk_bytes": chunk_bytes, "keys": [[key_hex(k), t] for k, t in self.keys.items()],
        }

    def replay(self, incarnation: str | None, since: int | None) -> list[dict] | None:
        """The events after `since`, or None when a snapshot is needed."""
        if incarnation != self.incarnation or since is None or since > self.seq:
            return None
        if since == self.seq:
            return []
        if not self.ring or self.ring[0]["seq"] > since + 1:
            return None
        return [e for e in self.ring if e["seq"] > since]

    def changed(self) -> asyncio.Event:
        """Set at the next event (take it before checking `seq`, so no event slips in between)."""
        return self._changed


class KeyTracker:
    """Keys <-> the last block each needs, against the cached block set mirrored from the engine."""

    def __init__(self, log: KeyLog, max_pending: int = MAX_PENDING) -> None:
        self.log = log
        self.blocks: set[int] = set()
        self.key_block: dict[int, int] = {}
        self.block_keys: dict[int, set[int]] = {}
        self.pending: OrderedDict[int, tuple[int, int, float]] = OrderedDict()  # key -> (tokens, block, t)
        self.max_pending = max_pending

    def _link(self, key: int, block: int) -> None:
        old = self.key_block.get(key)
        if old is not None and old != block:
            self._unlink(key)
        self.key_block[key] = block
        self.block_keys.setdefault(block, set()).add(key)

    def _unlink(self, key: int) -> None:
        block = self.key_block.pop(key, None)
        if block is not None:
            keys = self.block_keys.get(block)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.block_keys[block]

    def add_request(self, items: list[tuple[int, int, int]], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        ready = []
        for key, tokens, block in items:
            if block in self.blocks:
                self._link(key, block)
                ready.append((key, tokens))
                self.pending.pop(key, None)
            else:
                self.pending[key] = (tokens, block, now)
                self.pending.move_to_end(key)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)
        self._store(ready)

    def _store(self, ready: list[tuple[int, int]]) -> None:
        if ready:
            for key in self.log.store(ready):
                self._unlink(key)

    def blocks_stored(self, hashes: Iterable[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.blocks.update(hashes)
        ready = []
        for key, (tokens, block, t) in list(self.pending.items()):
            if now - t > PENDING_TTL_S:
                del self.pending[key]
            elif block in self.blocks:
                del self.pending[key]
                self._link(key, block)
                ready.append((key, tokens))
        self._store(ready)

    def blocks_removed(self, hashes: Iterable[int]) -> None:
        gone: list[int] = []
        for h in hashes:
            self.blocks.discard(h)
            for key in self.block_keys.pop(h, ()):
                self.key_block.pop(key, None)
                gone.append(key)
        self.log.remove(gone)

    def reset(self, hashes: Iterable[int]) -> None:
        """A snapshot from the engine: keep the keys whose block is still cached, drop the others."""
        self.blocks = set(hashes)
        gone = [k for k, b in self.key_block.items() if b not in self.blocks]
        for key in gone:
            self._unlink(key)
        self.log.remove(gone)
        self.blocks_stored(())


class CacheEventsService:
    """Owned tasks of the api_server: the block poller and the request bookkeeper; serves the stream."""

    def __init__(self, incarnation: str, rpc: Callable, block_size: int, *, render_chat: Callable | None,
                 encode: Callable[[str], list[int]]) -> None:
        self.log = KeyLog(incarnation)
        self.tracker = KeyTracker(self.log)
        self.rpc = rpc
        self.block_size = block_size
        self.render_chat = render_chat
        self.encode = encode
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_QUEUED_REQUESTS)
        self.gen: str | None = None
        self.since: int | None = None
        self.polls = 0
        self.poll_errors = 0
        self.requests_dropped = 0
        self.engine: dict[str, Any] = {}  # the engine's last answer: enabled, hit counters
        self._tasks: list[asyncio.Task] = []
        self._poll_lock = asyncio.Lock()  # the poller and engine_info's first poll never apply one answer twice

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._poll_loop(), name="distserve-cache-poll"),
                           asyncio.create_task(self._request_loop(), name="distserve-cache-keys")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    @property
    def enabled(self) -> bool | None:
        """Whether the engine's trie caches (None: not known yet). lmdeploy 0.17/0.18 turn prefix caching
        off in the engine process for Prefill and Decode roles whatever the api_server was told."""
        value = self.engine.get("enabled")
        return None if value is None else bool(value)

    def offer(self, body: dict, input_ids: list[int]) -> None:
        """A served generation request (never blocks the request: full queue = dropped, counted)."""
        if self.enabled is False:
            return
        try:
            self.queue.put_nowait((body, list(input_ids)))
        except asyncio.QueueFull:
            self.requests_dropped += 1

    async def poll_once(self) -> None:
        async with self._poll_lock:
            await self._poll()

    async def _poll(self) -> None:
        answer = await asyncio.wait_for(self.rpc("distserve_cache_blocks", self.gen, self.since), RPC_TIMEOUT_S)
        self.polls += 1
        self.engine = {k: answer.get(k) for k in ("enabled", "query_tokens", "hit_tokens", "block_size")}
        if "snapshot" in answer:
            self.tracker.reset(int(h, 16) for h in answer["snapshot"])
        else:
            for op, h in answer.get("events", ()):
                if op > 0:
                    self.tracker.blocks_stored((int(h, 16),))
                else:
                    self.tracker.blocks_removed((int(h, 16),))
        self.gen, self.since = answer["gen"], answer["seq"]

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the engine may be busy or restarting: retry next tick
                self.poll_errors += 1
                if self.poll_errors in (1, 10) or self.poll_errors % 100 == 0:
                    logger.warning("prefix-cache poll failed (%d): %s: %s", self.poll_errors, type(e).__name__, e)
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _request_loop(self) -> None:
        while True:
            body, ids = await self.queue.get()
            try:
                items = await asyncio.to_thread(
                    request_key_blocks, body, ids, self.block_size, render_chat=self.render_chat,
                    encode=self.encode)
                self.tracker.add_request(items)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one odd request must not stop the bookkeeping
                logger.exception("prefix-cache keys of a request could not be computed")

    def status(self) -> dict[str, Any]:
        return {"keys": len(self.log.keys), "seq": self.log.seq, "cached_blocks": len(self.tracker.blocks),
                "pending_keys": len(self.tracker.pending), "polls": self.polls, "poll_errors": self.poll_errors,
                "requests_dropped": self.requests_dropped, "keys_dropped": self.log.dropped, **self.engine}

    def info(self) -> dict[str, Any]:
        """engine_info's `cache_events` capability (the agent copies it into the engine record)."""
        return {"path": PATH, "version": VERSION, "chunk_bytes": CHUNK_BYTES, "block_size": self.block_size}

    async def serve(self, query: dict[str, str], receive, send) -> None:
        """The NDJSON stream on ASGI `receive`/`send` (runs until the client goes away or the server stops)."""
        since_raw, inc = query.get("since"), query.get("incarnation")
        since = None
        if since_raw is not None:
            try:
                since = int(since_raw)
                if since < 0:
                    raise ValueError
            except ValueError:
                return await _send_error(send, 400, "since must be a non-negative integer")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-store")]})
        log = self.log
        events = log.replay(inc, since)
        if events is None:
            events = [log.snapshot(self.block_size)]
        last = since
        # The server may not fail a send to a client that left: watch for its disconnect instead.
        gone = asyncio.create_task(_wait_disconnect(receive))
        try:
            while not gone.done():
                if events:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": b"".join(json.dumps(e).encode() + b"\n" for e in events)})
                    last = events[-1]["seq"]
                changed = log.changed()
                if log.seq == last:
                    waiter = asyncio.ensure_future(changed.wait())
                    await asyncio.wait({waiter, gone}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if gone.done():
                        break
                events = log.replay(log.incarnation, last)
                if events is None:  # fell behind the ring while sending: start over with a snapshot
                    events = [log.snapshot(self.block_size)]
                elif not events:
                    await send({"type": "http.response.body", "more_body": True, "body": json.dumps(
                        {"type": "heartbeat", "seq": log.seq, "incarnation": log.incarnation}).encode() + b"\n"})
        finally:
            gone.cancel()


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def message_list(messages: Any) -> list[dict] | None:
    """The messages as lmdeploy's template takes them (text content), or None for non-text messages."""
    if not isinstance(messages, list):
        return None
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None
        text = message_text(m.get("content"))
        if text is None:
            return None
        out.append({**m, "content": text})
    return out
