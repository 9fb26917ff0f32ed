"""The KV block allocator (with its prefix cache) and the preserved prefill sessions (thread-safe, no torch).

The allocator hands out a contiguous run of free ids when there is one, so a request's blocks are
usually contiguous (fewer, larger migration reads: DLSlime TCP pays a connection per assignment). Preserved sessions hold a finished prefill's blocks until a decode
engine frees them (free_cache) or their TTL runs out: they are never evicted before that.

Prefix caching (`prefix_caching=True`): a full block whose KV is computed can be registered under the
chained hash of its tokens (`block_hashes`). A registered block is shared: every holder (a running
request, a preserved session) took one reference and gives it back with `free`; at 0 references it stays
cached ("evictable": counted as free) until an allocation needs the room, least recently used first and
never a block whose child block is still cached (leaf blocks first), so a cached hash always has its
whole prefix cached.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import random
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Callable

_ROOT = b"\0" * 16


def block_hashes(tokens: list[int], block_size: int, count: int | None = None) -> list[bytes]:
    """The chained hashes of the first `count` (default: every) full blocks of `tokens`:
    h_i = blake2b(h_{i-1} || tokens of block i), so a hash names the block and its whole prefix."""
    full = len(tokens) // block_size
    count = full if count is None else max(0, min(count, full))
    out, parent = [], _ROOT
    for i in range(count):
        ids = array("q", tokens[i * block_size: (i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + ids, digest_size=16).digest()
        out.append(parent)
    return out


@dataclass
class _Cached:
    hash: bytes
    parent: bytes  # _ROOT for a first block
    refs: int = 0
    children: int = 0  # cached blocks whose parent is this one


class BlockAllocator:
    """First fit: the first run of n consecutive free ids, else the n lowest free ids.

    `scattered=True` hands out n random free ids instead: the worst case of a fragmented pool, for tests
    and benchmarks of the migration path (`distserve engine --kv-allocation scattered`).
    """

    # Above this many free blocks the run search is skipped (it is a Python loop).
    MAX_SCAN = 1 << 16

    def __init__(self, num_blocks: int, scattered: bool = False, seed: int | None = None,
                 prefix_caching: bool = False) -> None:
        self.total = num_blocks
        self._scatter = random.Random(seed) if scattered else None
        self._free = list(range(num_blocks))  # sorted
        self._used: set[int] = set()  # held blocks and evictable cached blocks
        self._lock = threading.RLock()
        self.prefix_caching = prefix_caching
        self._cached: dict[int, _Cached] = {}  # block id -> its cache entry
        self._by_hash: dict[bytes, int] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # refs 0, LRU first
        self.evictions_total = 0
        # Called (under the allocator's lock, so a listener's view never lags) with the hashes evicted.
        self.on_evict: Callable[[list[bytes]], None] | None = None

    def allocate(self, n: int) -> list[int] | None:
        """All n blocks, or None when fewer are free (the caller waits: back-pressure)."""
        return self._take(n, run_only=False)

    def allocate_run(self, n: int) -> list[int] | None:
        """n consecutive ids, or None when no run of n is free (never scattered ids)."""
        return self._take(n, run_only=True)

    def _take(self, n: int, run_only: bool) -> list[int] | None:
        if n <= 0:
            return []
        with self._lock:
            if len(self._free) < n <= len(self._free) + len(self._evictable):
                self._evict(n - len(self._free))  # only when it can succeed: a failed wait keeps the cache
            free = self._free
            if len(free) < n:
                return None
            if self._scatter is not None and not run_only:
                ids = self._scatter.sample(free, n)
                taken = set(ids)
                self._free = [b for b in free if b not in taken]
            else:
                scan = n > 1 and (run_only or len(free) <= self.MAX_SCAN)
                start = self._find_run(n) if scan else 0
                if start is None:
                    if run_only:
                        return None
                    start = 0  # no run of n: the n lowest free ids
                ids = free[start: start + n]
                del free[start: start + n]
            self._used.update(ids)
            return ids

    def _find_run(self, n: int) -> int | None:
        free = self._free
        i, last = 0, len(free) - n
        while i <= last:
            if free[i + n - 1] - free[i] == n - 1:
                return i
            # Jump past the first gap inside the window.
            j = i
            while free[j + 1] == free[j] + 1:
                j += 1
            i = j + 1
        return None

    def free(self, ids: list[int]) -> None:
        """Give blocks back: a cached block loses one reference (kept cached at 0), any other is freed."""
        with self._lock:
            # Deepest first: at equal age the leaf of a chain is evicted before its parents.
            for block in reversed(ids):
                entry = self._cached.get(block)
                if entry is not None:
                    if entry.refs > 0:  # tolerate double frees
                        entry.refs -= 1
                        if entry.refs == 0:
                            self._evictable[block] = None
                            self._evictable.move_to_end(block)
                elif block in self._used:  # tolerate double frees
                    self._used.discard(block)
                    bisect.insort(self._free, block)

    # -- prefix cache ------------------------------------------------------------------------------
    def acquire_cached(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes`, one reference taken on each (give them
        back with `free`)."""
        if not self.prefix_caching:
            return []
        out = []
        with self._lock:
            for h in hashes:
                block = self._by_hash.get(h)
                if block is None:
                    break
                out.append(block)
            for block in out:
                entry = self._cached[block]
                entry.refs += 1
                self._evictable.pop(block, None)
        return out

    def register(self, blocks: list[int], hashes: list[bytes]) -> int:
        """Cache held blocks (their KV computed) under `hashes` (block_hashes of their tokens, in chain
        order); returns how many are newly cached. A hash already cached in another block leaves this
        block private (freed as usual); the chain stops at a parent that is not cached."""
        if not self.prefix_caching:
            return 0
        added = 0
        with self._lock:
            parent = _ROOT
            for block, h in zip(blocks, hashes):
                if parent != _ROOT and parent not in self._by_hash:
                    break
                owner = self._by_hash.get(h)
                if owner is None and block not in self._cached and block in self._used:
                    self._cached[block] = _Cached(h, parent, refs=1)
                    self._by_hash[h] = block
                    if parent != _ROOT:
                        self._cached[self._by_hash[parent]].children += 1
                    added += 1
                parent = h
        return added

    def is_cached(self, h: bytes) -> bool:
        return h in self._by_hash

    def _evict(self, want: int) -> None:
        """Free up to `want` evictable blocks, least recently used leaves first (lock held)."""
        gone: list[bytes] = []
        while want > 0 and self._evictable:
            victim = next((b for b in self._evictable if self._cached[b].children == 0), None)
            if victim is None:
                break  # every evictable block has a cached child still held: nothing to evict now
            del self._evictable[victim]
            entry = self._cached.pop(victim)
            del self._by_hash[entry.hash]
            parent = self._by_hash.get(entry.parent)
            if parent is not None:
                self._cached[parent].children -= 1
            self._used.discard(victim)
            bisect.insort(self._free, victim)
            gone.append(entry.hash)
            want -= 1
        self.evictions_total += len(gone)
        if gone and self.on_evict is not None:
            self.on_evict(gone)

    def clear_cache(self) -> int:
        """Evict every cached block nobody holds; returns how many."""
        with self._lock:
            n = len(self._evictable)
            self._evict(n)
            return n

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def num_free(self) -> int:
        """Free blocks, cached blocks nobody holds included (an allocation evicts them)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by a request, a preserved session or a migration."""
        return len(self._used) - len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)


class _Shared:
    """The sessions of one shared prefill (n > 1) still holding its blocks."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


class PreservedSessions:
    """Prefill KV kept for a decode engine to read, by internal session id.

    A shared prefill (`add_shared`: n choices from one prompt) keeps one session id per choice over the same
    blocks: each decode frees its own id, and the blocks (and packed copy) go when the last id is freed or
    expires. The group holds one allocator reference per block, like any session: the allocator counts
    references only on cached blocks (full, registered), never on a prompt's last partial block or on any
    block with prefix caching off, so the count of live choices is kept here.
    """

    def __init__(self, allocator: BlockAllocator, ttl: float) -> None:
        self.allocator = allocator
        self.ttl = ttl
        # id -> (blocks, deadline, slot, the shared group or None)
        self._sessions: dict[int, tuple[list[int], float, object, _Shared | None]] = {}
        # Set by the engine when it has a staging arena: a session's packed copy is released with it.
        self.arena = None
        self._lock = threading.Lock()
        # Random start: a stale free_cache from before a restart cannot free a new session's blocks.
        self._next_id = random.randrange(1, 1 << 40)
        self.expired_total = 0
        self.freed_total = 0

    def new_session_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def add(self, session_id: int, blocks: list[int], slot: object = None) -> None:
        """Keep `blocks` (and `slot`, their packed copy in the staging arena) until freed or expired."""
        with self._lock:
            self._sessions[session_id] = (blocks, time.monotonic() + self.ttl, slot, None)

    def add_shared(self, session_ids: list[int], blocks: list[int], slot: object = None) -> None:
        """Keep `blocks` (and `slot`) for several sessions (one per choice of a shared prefill) until the
        last of them is freed or expired; freeing one id twice counts once."""
        ids = list(dict.fromkeys(session_ids))
        if not ids:
            raise ValueError("add_shared needs at least one session id")
        group = _Shared(len(ids)) if len(ids) > 1 else None
        deadline = time.monotonic() + self.ttl
        with self._lock:
            if any(sid in self._sessions for sid in ids):
                raise ValueError("session id already preserved")
            for sid in ids:
                self._sessions[sid] = (blocks, deadline, slot, group)

    def _pop(self, session_id: int) -> tuple | None:
        """Remove one id (lock held); the entry to release when it was the last holder of its blocks."""
        entry = self._sessions.pop(session_id, None)
        if entry is None:
            return None
        group = entry[3]
        if group is not None:
            group.left -= 1
            if group.left > 0:
                return ()  # other choices still hold the blocks
        return entry

    def _release(self, entry: tuple) -> None:
        if not entry:
            return
        blocks, _, slot, _ = entry
        self.allocator.free(blocks)
        if slot is not None and self.arena is not None:
            self.arena.release(slot)

    def free(self, session_id: int) -> bool:
        with self._lock:
            entry = self._pop(session_id)
        if entry is None:
            return False
        self._release(entry)
        self.freed_total += 1
        return True

    def expire(self) -> int:
        """Free every session past its TTL; returns how many."""
        now = time.monotonic()
        with self._lock:
            dead = [sid for sid, entry in self._sessions.items() if entry[1] <= now]
            entries = [self._pop(sid) for sid in dead]
        for entry in entries:
            self._release(entry)
        self.expired_total += len(entries)
        return len(entries)

    def clear(self) -> None:
        with self._lock:
            entries, groups = [], set()
            for entry in self._sessions.values():
                group = entry[3]
                if group is None or id(group) not in groups:
                    groups.add(id(group))
                    entries.append(entry)
            self._sessions.clear()
        for entry in entries:
            self._release(entry)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def num_blocks(self) -> int:
        """Blocks held, a shared prefill's counted once."""
        with self._lock:
            total, groups = 0, set()
            for blocks, _, _, group in self._sessions.values():
                if group is not None:
                    if id(group) in groups:
                        continue
                    groups.add(id(group))
                total += len(blocks)
            return total
