"""The KV block allocator and the preserved prefill sessions (thread-safe, no torch).

The allocator hands out a contiguous run of free ids when there is one, so a request's blocks are
usually contiguous (fewer, larger migration reads: DLSlime TCP pays a connection per assignment). Preserved sessions hold a finished prefill's blocks until a decode
engine frees them (free_cache) or their TTL runs out: they are never evicted before that.
"""

from __future__ import annotations

import bisect
import random
import threading
import time


class BlockAllocator:
    """First fit: the first run of n consecutive free ids, else the n lowest free ids.

    `scattered=True` hands out n random free ids instead: the worst case of a fragmented pool, for tests
    and benchmarks of the migration path (`distserve engine --kv-allocation scattered`).
    """

    # Above this many free blocks the run search is skipped (it is a Python loop).
    MAX_SCAN = 1 << 16

    def __init__(self, num_blocks: int, scattered: bool = False, seed: int | None = None) -> None:
        self.total = num_blocks
        self._scatter = random.Random(seed) if scattered else None
        self._free = list(range(num_blocks))  # sorted
        self._used: set[int] = set()
        self._lock = threading.Lock()

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
        with self._lock:
            for block in ids:
                if block in self._used:  # tolerate double frees
                    self._used.discard(block)
                    bisect.insort(self._free, block)

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
        self._sessions: dict[int, tuple[list[int], float, object]] = {}
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
            self._sessions[session_id] = (blocks, time.monotonic() + self.ttl, slot)

    def _release(self, entry: tuple) -> None:
        blocks, _, slot = entry
        self.allocator.free(blocks)
        if slot is not None and self.arena is not None:
            self.arena.release(slot)

    def free(self, session_id: int) -> bool:
        with self._lock:
            entry = self._sessions.pop(session_id, None)
        if entry is None:
            return False
        self._release(entry)
        self.freed_total += 1
        return True

    def expire(self) -> int:
        """Free every session past its TTL; returns how many."""
        now = time.monotonic()
        with self._lock:
            dead = [sid for sid, (_, deadline, _) in self._sessions.items() if deadline <= now]
            entries = [self._sessions.pop(sid) for sid in dead]
        for entry in entries:
            self._release(entry)
        self.expired_total += len(entries)
        return len(entries)

    def clear(self) -> None:
        with self._lock:
            entries = list(self._sessions.values())
            self._sessions.clear()
        for entry in entries:
            self._release(entry)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def num_blocks(self) -> int:
        with self._lock:
            return sum(len(entry[0]) for entry in self._sessions.values())
