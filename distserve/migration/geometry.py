"""KV pool geometry, validation of remote block ids against it, and read planning.

A pool is one tensor whose `entry_axis` indexes blocks (lmdeploy's `cache_pools` entry): the axes
before it (layers) are "outer", the axes after it make one block's bytes. Block b of outer index o
starts at byte (o * num_entries + b) * entry_bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distserve.migration.errors import MigrationError
from distserve.protocol import CachePool

# The DLSlime TCP transport reports completion early with 32 or more assignments per call.
MAX_ASSIGNMENTS_PER_CALL = 31

_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1,
                "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class PoolGeometry:
    shape: tuple[int, ...]
    dtype: str
    element_size: int
    entry_axis: int

    @classmethod
    def from_cache_pool(cls, pool: CachePool) -> "PoolGeometry":
        shape = tuple(int(d) for d in pool.shape)
        if not shape or any(d <= 0 for d in shape) or len(shape) > 8:
            raise MigrationError(f"cache pool shape {list(shape)} is invalid", code="geometry_mismatch")
        if not 0 <= pool.entry_axis < len(shape):
            raise MigrationError(f"cache pool entry_axis {pool.entry_axis} out of range for shape {list(shape)}",
                                 code="geometry_mismatch")
        if not 0 < pool.element_size <= 16:
            raise MigrationError(f"cache pool element_size {pool.element_size} is invalid", code="geometry_mismatch")
        expected = _DTYPE_SIZES.get(pool.dtype)
        if expected is not None and expected != pool.element_size:
            raise MigrationError(f"cache pool dtype {pool.dtype} has element size {expected}, "
                                 f"not {pool.element_size}", code="geometry_mismatch")
        geo = cls(shape, pool.dtype, pool.element_size, pool.entry_axis)
        if geo.total_bytes > 1 << 46:
            raise MigrationError("cache pool larger than 64 TiB", code="geometry_mismatch")
        return geo

    def to_cache_pool(self) -> CachePool:
        return CachePool(shape=list(self.shape), dtype=self.dtype, element_size=self.element_size,
                         entry_axis=self.entry_axis)

    @property
    def num_entries(self) -> int:
        return self.shape[self.entry_axis]

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.entry_axis])

    @property
    def entry_bytes(self) -> int:
        return math.prod(self.shape[self.entry_axis + 1:]) * self.element_size

    @property
    def total_bytes(self) -> int:
        return math.prod(self.shape) * self.element_size

    def mismatch(self, other: "PoolGeometry") -> str | None:
        """Why blocks of `other` cannot be copied into this pool block for block (None when they can)."""
        if self.dtype != other.dtype or self.element_size != other.element_size:
            return f"dtype {other.dtype}/{other.element_size} != {self.dtype}/{self.element_size}"
        if self.outer != other.outer or self.shape[: self.entry_axis] != other.shape[: other.entry_axis]:
            return f"outer axes {list(other.shape[: other.entry_axis])} != {list(self.shape[: self.entry_axis])}"
        if self.shape[self.entry_axis + 1:] != other.shape[other.entry_axis + 1:]:
            return (f"block shape {list(other.shape[other.entry_axis + 1:])} != "
                    f"{list(self.shape[self.entry_axis + 1:])}")
        return None


def validate_block_ids(ids: list[int], geo: PoolGeometry, what: str = "remote_block_ids") -> None:
    """Every id in range and none twice (a hostile id would make DLSlime TCP read arbitrary memory)."""
    n = geo.num_entries
    for block in ids:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < n:
            raise MigrationError(f"{what}: block id {block!r} out of range [0, {n})", code="invalid_block_ids")
    if len(set(ids)) != len(ids):
        raise MigrationError(f"{what}: duplicate block ids", code="invalid_block_ids")


def plan_reads(remote: PoolGeometry, local: PoolGeometry, remote_ids: list[int],
               local_ids: list[int]) -> list[tuple[int, int, int]]:
    """(remote_offset, local_offset, length) per read, contiguous blocks coalesced, every byte checked.

    Raises MigrationError (never reads) on a geometry mismatch or a bad id.
    """
    reason = local.mismatch(remote)
    if reason:
        raise MigrationError(f"KV geometry mismatch: {reason}", code="geometry_mismatch")
    if len(remote_ids) != len(local_ids):
        raise MigrationError(f"{len(remote_ids)} remote blocks for {len(local_ids)} local blocks",
                             code="invalid_block_ids")
    validate_block_ids(remote_ids, remote)
    validate_block_ids(local_ids, local, "local block ids")
    # Runs where both sides are consecutive.
    runs: list[tuple[int, int, int]] = []  # (remote_start, local_start, count)
    for r, l in zip(remote_ids, local_ids):
        if runs and runs[-1][0] + runs[-1][2] == r and runs[-1][1] + runs[-1][2] == l:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((r, l, 1))
    eb = remote.entry_bytes
    plan = []
    for o in range(remote.outer):
        r_base = o * remote.num_entries * eb
        l_base = o * local.num_entries * eb
        for r, l, count in runs:
            plan.append((r_base + r * eb, l_base + l * eb, count * eb))
    for r_off, l_off, length in plan:  # defence in depth: never outside either pool
        if r_off < 0 or r_off + length > remote.total_bytes or l_off < 0 or l_off + length > local.total_bytes:
            raise MigrationError("read outside the KV pool", code="invalid_block_ids")
    return plan


def split(plan: list[tuple[int, int, int]], max_bytes: int) -> list[tuple[int, int, int]]:
    """Cut ranges longer than max_bytes (same bytes, more assignments)."""
    out = []
    for r, l, n in plan:
        done = 0
        while done < n:
            step = min(max_bytes, n - done)
            out.append((r + done, l + done, step))
            done += step
    return out


def chunk(plan: list, size: int = MAX_ASSIGNMENTS_PER_CALL) -> list[list]:
    size = max(1, min(size, MAX_ASSIGNMENTS_PER_CALL))
    return [plan[i: i + size] for i in range(0, len(plan), size)]
