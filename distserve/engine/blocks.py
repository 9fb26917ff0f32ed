"""The KV block allocator and the preserved prefill sessions (thread-safe, no torch).

The allocator hands out the lowest free ids first so that a request's blocks are usually contiguous
(fewer, larger migration reads). Preserved sessions hold a finished prefill's blocks until a decode
engine frees them (free_cache) or their TTL runs out: they are never evicted before that.
"""

from __future__ import annotations

import heapq
import random
import threading
import time


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.total = num_blocks
        self._free = list(range(num_blocks))  # a min-heap of free ids
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def allocate(self, n: int) -> list[int] | None:
        """All n blocks, or None when fewer are free (the caller waits: back-pressure)."""
        if n <= 0:
            return []
        with self._lock:
            if len(self._free) < n:
                return None
            ids = [heapq.heappop(self._free) for _ in range(n)]
            self._used.update(ids)
            return ids

    def free(self, ids: list[int]) -> None:
        with self._lock:
            for block in ids:
                if block in self._used:  # tolerate double frees
                    self._used.discard(block)
                    heapq.heappush(self._free, block)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)


class PreservedSessions:
    """Prefill KV kept for a decode engine to read, by internal session id."""

    def __init__(self, allocator: BlockAllocator, ttl: float) -> None:
        self.allocator = allocator
        self.ttl = ttl
        self._sessions: dict[int, tuple[list[int], float]] = {}
        self._lock = threading.Lock()
        # Random start: a stale free_cache from before a restart cannot free a new session's blocks.
        self._next_id = random.randrange(1, 1 << 40)
        self.expired_total = 0
        self.freed_total = 0

    def new_session_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def add(self, session_id: int, blocks: list[int]) -> None:
        with self._lock:
            self._sessions[session_id] = (blocks, time.monotonic() + self.ttl)

    def free(self, session_id: int) -> bool:
        with self._lock:
            entry = self._sessions.pop(session_id, None)
        if entry is None:
            return False
        self.allocator.free(entry[0])
        self.freed_total += 1
        return True

    def expire(self) -> int:
        """Free every session past its TTL; returns how many."""
        now = time.monotonic()
        with self._lock:
            dead = [sid for sid, (_, deadline) in self._sessions.items() if deadline <= now]
            entries = [self._sessions.pop(sid) for sid in dead]
        for blocks, _ in entries:
            self.allocator.free(blocks)
        self.expired_total += len(entries)
        return len(entries)

    def clear(self) -> None:
        with self._lock:
            entries = list(self._sessions.values())
            self._sessions.clear()
        for blocks, _ in entries:
            self.allocator.free(blocks)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def num_blocks(self) -> int:
        with self._lock:
            return sum(len(b) for b, _ in self._sessions.values())
