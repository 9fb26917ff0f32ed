"""The engine's cache state for routers: prefix keys (distserve.cluster.prefix_keys) mapped to the cached
blocks they need, and the ordered event log behind `GET /distserve/cache/events` (no torch).

A key is registered when a request's prompt blocks are cached, with the number of prompt tokens its
prefix covers in full blocks, and removed as soon as the deepest block it needs is evicted (the allocator
evicts leaves first, so that block's eviction is the first that breaks the prefix).

A request's first registrable key (the shallowest prefix that fills a block: chat, usually the system
prompt) is its family's root; the stream marks roots (`roots`, optional: older routers ignore it) so every
router can count the prefix families an engine serves, a proxy for the traffic they bring that does not
grow with conversation length (docs/router.md "kv_aware").

A root is announced as soon as the engine admits a request whose root it does not hold (`pending`,
optional in snapshots and stored events): a family's first prefill takes 0.4-2 s, and until its root was
stored every other router replica saw the engine one family short and sent the next new family there too
(docs/benchmarks.md "Re-run 3"). The mark ends when the root is stored (it is then in `roots`), or, when
every request admitted under it ended with nothing cached (failed, cancelled), by `pending` in a removed
event.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

from distserve.cluster import prefix_keys as PK
from distserve.engine import tokenizer as T
from distserve.migration.blocks import BlockAllocator, block_hashes

RING_EVENTS = 4096
MAX_CHAT_MESSAGES = 64  # chat keys computed for at most this many messages (rendering is quadratic)
EVENTS_PATH = "/distserve/cache/events"
EVENTS_VERSION = 1


def _chat_prefix_tokens(tok, messages: list[dict], prompt_ids: list[int]) -> list[int | None]:
    """For i = 1..n: the token count of the template over messages[:i] without the generation prompt, or
    None from the first i whose tokens are not a prefix of the prompt's."""
    out: list[int | None] = []
    hf = getattr(tok, "tok", None)
    for i in range(1, min(len(messages), MAX_CHAT_MESSAGES) + 1):
        try:
            if hf is not None:
                text = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=False)
                ids = list(hf(text, add_special_tokens=False)["input_ids"])
            elif isinstance(tok, T.ByteTokenizer):
                ids = T.encode(T.render_chat(messages[:i])[: -len("<|assistant|>\n")])
            else:
                break
        except Exception:  # noqa: BLE001 - a template that refuses a partial conversation: no more keys
            break
        if ids != prompt_ids[: len(ids)]:
            break
        out.append(len(ids))
    return out + [None] * (len(messages) - len(out))


def _text_prefix_tokens(tok, prompt: str, prompt_ids: list[int], chunk: int) -> list[int]:
    """For j = 1..m: the tokens whose bytes lie wholly inside the first j*chunk bytes of the prompt."""
    data_len = len(prompt.encode("utf-8", "surrogatepass"))
    m = data_len // chunk
    if isinstance(tok, T.ByteTokenizer):
        return [1 + j * chunk for j in range(1, m + 1)]  # BOS + one token a byte
    hf = getattr(tok, "tok", None)
    if hf is None:
        return []
    enc = hf(prompt, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if ids != prompt_ids:
        return []
    # character offset -> byte offset
    byte_at = [0]
    for ch in prompt:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8", "surrogatepass")))
    ends = [byte_at[end] for _, end in offsets]
    out, t = [], 0
    for j in range(1, m + 1):
        limit = j * chunk
        while t < len(ends) and ends[t] <= limit:
            t += 1
        out.append(t)
    return out


def key_plan(kind: str, body: Any, prompt_ids: list[int], tok, block_size: int) -> list[tuple[int, int]]:
    """[(key, tokens)]: the request's prefix keys with the prompt tokens each covers in FULL blocks
    (0-token keys left out: nothing of them can be cached)."""
    if not isinstance(body, dict):
        return []
    pairs: list[tuple[int, int | None]] = []
    if kind == "chat":
        messages = body.get("messages")
        keys = PK.chat_keys(messages)
        if not keys:
            return []
        plain = [{"role": m["role"], "content": PK.message_text(m.get("content"))} for m in messages[: len(keys)]]
        pairs = list(zip(keys, _chat_prefix_tokens(tok, plain, prompt_ids)))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            keys = PK.text_keys(prompt)
            pairs = list(zip(keys, _text_prefix_tokens(tok, prompt, prompt_ids, PK.CHUNK_BYTES)))
        elif isinstance(prompt, list):
            keys = PK.request_keys({"prompt": prompt})
            pairs = [(k, (j + 1) * PK.CHUNK_IDS) for j, k in enumerate(keys)]
    out = []
    for key, tokens in pairs:
        if tokens is None:
            break
        full = min(tokens, len(prompt_ids)) // block_size * block_size
        if full:
            out.append((key, full))
    return out


class CacheEvents:
    """Registered keys and the event log (thread-safe: the scheduler thread evicts, the loop streams)."""

    def __init__(self, allocator: BlockAllocator, incarnation: str, block_size: int,
                 ring: int = RING_EVENTS) -> None:
        self.allocator = allocator
        self.incarnation = incarnation
        self.block_size = block_size
        self.seq = 0
        self._keys: dict[int, tuple[int, bytes]] = {}  # key -> (tokens, deepest block hash)
        self._roots: set[int] = set()  # keys that are a family's root (a subset of _keys)
        # pending roots (never in _roots): root -> [requests admitted under it while it was pending]; the
        # list's identity is the admit token, so a request admitted before the root was stored (and the
        # entry popped) cannot withdraw a later entry of the same root
        self._pending: dict[int, list[int]] = {}
        self._by_block: dict[bytes, set[int]] = {}
        self._ring: collections.deque[dict] = collections.deque(maxlen=ring)
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        allocator.on_evict = self._evicted

    # -- writers -----------------------------------------------------------------------------------
    def register(self, plan: list[tuple[int, int]], prompt_ids: list[int]) -> int:
        """Register the keys of `plan` whose blocks are all cached now; returns how many are new."""
        if not plan:
            return 0
        bs = self.block_size
        hashes = block_hashes(prompt_ids, bs, max(t for _, t in plan) // bs)
        stored = []
        roots = []
        root = plan[0][0]  # the shallowest key holding a full block: the same for every request sharing it
        # The allocator's lock first (as in eviction): a block cannot go between the check and the entry.
        with self.allocator.lock, self._lock:
            for key, tokens in plan:
                n = tokens // bs
                if n > len(hashes) or not self.allocator.is_cached(hashes[n - 1]):
                    continue
                h = hashes[n - 1]
                old = self._keys.get(key)
                if old == (tokens, h):
                    continue
                if old is not None:
                    self._by_block.get(old[1], set()).discard(key)
                self._keys[key] = (tokens, h)
                self._by_block.setdefault(h, set()).add(key)
                stored.append([PK.key_hex(key), tokens])
                if key == root:
                    self._roots.add(key)
                    self._pending.pop(key, None)  # routers drop a pending mark when its root is stored
                    roots.append(PK.key_hex(key))
            if stored:
                event: dict[str, Any] = {"type": "stored", "keys": stored}
                if roots:
                    event["roots"] = roots
                self._append(event)
        return len(stored)

    def admit(self, plan: list[tuple[int, int]]) -> tuple[int, list[int]] | None:
        """A request with this key plan was admitted: announce its root as pending unless the root is held or
        pending already. Returns the token for release() when the request ends (None: nothing to release)."""
        if not plan:
            return None
        root = plan[0][0]
        with self._lock:
            entry = self._pending.get(root)
            if entry is None:
                if root in self._roots:
                    return None  # the family is here already
                entry = self._pending[root] = [0]
                self._append({"type": "stored", "keys": [], "pending": [PK.key_hex(root)]})
            entry[0] += 1
        return root, entry

    def release(self, token: tuple[int, list[int]]) -> None:
        """The request admitted with `token` ended, whatever its outcome. When the root is still pending (not
        stored since) and no other request holds it, the mark is withdrawn: nothing of the family is here."""
        root, entry = token
        with self._lock:
            if self._pending.get(root) is not entry:
                return  # stored (now a root) or cleared since
            entry[0] -= 1
            if entry[0] > 0:
                return
            del self._pending[root]
            self._append({"type": "removed", "keys": [], "pending": [PK.key_hex(root)]})

    def _evicted(self, hashes: list[bytes]) -> None:
        # Called by the allocator with its lock held.
        with self._lock:
            removed = []
            for h in hashes:
                for key in self._by_block.pop(h, ()):
                    if self._keys.get(key, (0, b""))[1] == h:
                        del self._keys[key]
                        self._roots.discard(key)
                        removed.append(PK.key_hex(key))
            if removed:
                self._append({"type": "removed", "keys": removed})

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
            self._roots.clear()
            self._by_block.clear()
            self._pending.clear()  # "cleared" drops everything on the routers, pending marks too
            self._append({"type": "cleared"})

    def _append(self, event: dict) -> None:
        self.seq += 1
        event["seq"] = self.seq
        event["incarnation"] = self.incarnation
        self._ring.append(event)
        for loop, ev in list(self._waiters):
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed
                self._waiters.discard((loop, ev))

    # -- readers -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            snap = {"type": "snapshot", "incarnation": self.incarnation, "seq": self.seq,
                    "block_size": self.block_size, "chunk_bytes": PK.CHUNK_BYTES,
                    "keys": [[PK.key_hex(k), t] for k, (t, _) in self._keys.items()]}
            if self._roots:  # optional, like in stored events: absent means none
                snap["roots"] = [PK.key_hex(k) for k in self._roots]
            if self._pending:
                snap["pending"] = [PK.key_hex(k) for k in self._pending]
            return snap

    def after(self, since: int) -> list[dict] | None:
        """Events since+1.. in order, or None when the ring no longer holds since+1 (or since is ahead)."""
        with self._lock:
            if since > self.seq:
                return None
            if since == self.seq:
                return []
            if not self._ring or self._ring[0]["seq"] > since + 1:
                return None
            start = since + 1 - self._ring[0]["seq"]
            return [self._ring[i] for i in range(start, len(self._ring))]

    @property
    def num_keys(self) -> int:
        return len(self._keys)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def waiter(self) -> asyncio.Event:
        ev = asyncio.Event()
        entry = (asyncio.get_running_loop(), ev)
        with self._lock:
            self._waiters.add(entry)
        return ev

    def drop_waiter(self, ev: asyncio.Event) -> None:
        with self._lock:
            self._waiters = {w for w in self._waiters if w[1] is not ev}

    def info(self) -> dict:
        return {"path": EVENTS_PATH, "version": EVENTS_VERSION, "chunk_bytes": PK.CHUNK_BYTES,
                "block_size": self.block_size}
