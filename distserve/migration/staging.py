"""KV staging: migrations of fragmented blocks as a few large reads instead of many small ones.

Why: a pull reads one range per run of consecutive blocks per layer, and DLSlime TCP opens a TCP
connection for every range (docs/reference-engine.md). When a request's blocks are scattered over the
pool (a fragmented pool: the allocator found no contiguous run) a 1,000-token prompt becomes hundreds
of 32 KiB reads. So both ends keep a *staging arena*, a second memory region registered with the
transport:

- a prefill engine that preserves scattered blocks *packs* them into one slot of its arena (a local
  copy, tens of GiB/s) and answers the slot's byte range (`remote_kv_staging`) with its block ids;
- a decode engine whose pull would need more than one read per layer *lands* the bytes in a slot of its
  own arena, with as few reads as the source allows (one range when the prefill packed), then *unpacks*
  the slot into its blocks (a local copy, in a worker thread).

A slot of n blocks holds the blocks' bytes layer by layer: [layer][i-th block][block bytes], so packing
and unpacking are one gather / scatter along the pool's block axis. Anything that does not fit (arena
full, no staging advertised, an old peer) falls back to reading the blocks directly: staging only ever
changes how many reads a migration takes, never whether it works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distserve.migration.blocks import BlockAllocator
from distserve.migration.errors import MigrationError
from distserve.migration.geometry import PoolGeometry

STAGING_REGION = "kv_staging"
# A landing pull reads pieces of this size, several per DLSlime call (each piece its own TCP stream, as
# many streams in flight as a direct pull), and unpacks a call's pieces as soon as the call completes.
LANDING_PIECE_BYTES = 1 << 20
LANDING_PIECES_PER_CALL = 8


@dataclass(frozen=True)
class Slot:
    """n blocks' worth of arena, starting at block-unit `unit` (one unit = one block across all layers)."""

    unit: int
    count: int
    unit_bytes: int

    @property
    def offset(self) -> int:
        return self.unit * self.unit_bytes

    @property
    def length(self) -> int:
        return self.count * self.unit_bytes


class StagingArena:
    """A torch tensor of `units` block units next to a KV pool of shape [layers, blocks, *block] (entry axis 1).

    Thread-safe: the scheduler thread packs, the event loop allocates landing slots, worker threads unpack.
    """

    def __init__(self, pool: Any, units: int) -> None:
        import torch  # noqa: PLC0415 - null engines import this module and never load torch

        if pool.dim() < 2:
            raise ValueError("the KV pool must be [layers, blocks, ...]")
        self.pool = pool
        self.layers = pool.shape[0]
        self.block_shape = tuple(pool.shape[2:])
        self.units = units
        self.tensor = torch.zeros((units * self.layers, *self.block_shape), dtype=pool.dtype)
        self.unit_bytes = self.layers * self.tensor[0].numel() * self.tensor.element_size()
        # Scatter with numpy where the dtype allows: its fancy-index assignment copies rows about 3x faster
        # than torch's index_copy_ on the CPU (measured for 1-4 MiB slots), as fast as the gather.
        try:
            self._pool_rows = pool.view(self.layers, pool.shape[1], -1).numpy()
            self._arena_rows = self.tensor.view(-1, self._pool_rows.shape[2]).numpy()
        except (TypeError, RuntimeError):  # e.g. bfloat16, or a pool not viewable as rows
            self._pool_rows = self._arena_rows = None
        self._allocator = BlockAllocator(units)
        self.packs_total = 0

    @property
    def ptr(self) -> int:
        return self.tensor.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.units * self.unit_bytes

    @property
    def units_used(self) -> int:
        return self._allocator.num_used

    def allocate(self, count: int) -> Slot | None:
        """A contiguous slot of `count` units, or None (the caller reads blocks directly)."""
        if count <= 0 or count > self.units:
            return None
        ids = self._allocator.allocate_run(count)
        return None if ids is None else Slot(ids[0], count, self.unit_bytes)

    def release(self, slot: Slot) -> None:
        self._allocator.free(list(range(slot.unit, slot.unit + slot.count)))

    def view(self, slot: Slot) -> Any:
        """The slot as [layers, count, *block]."""
        rows = self.tensor[slot.unit * self.layers: (slot.unit + slot.count) * self.layers]
        return rows.view(self.layers, slot.count, *self.block_shape)

    def pack(self, block_ids: list[int]) -> Slot | None:
        """Copy these pool blocks into a new slot (a gather along the block axis); None when full."""
        import torch  # noqa: PLC0415 - null engines import this module and never load torch

        slot = self.allocate(len(block_ids))
        if slot is None:
            return None
        try:
            index = torch.tensor(block_ids, dtype=torch.long)
            torch.index_select(self.pool, 1, index, out=self.view(slot))
        except BaseException:
            self.release(slot)
            raise
        self.packs_total += 1
        return slot

    def unpack_rows(self, slot: Slot, first_row: int, end_row: int, block_ids: list[int]) -> None:
        """Copy rows [first_row, end_row) of a landed slot (row = layer * count + i: block i of a layer)
        into the pool blocks `block_ids` (the slot's blocks, in order)."""
        n, base = slot.count, slot.unit * self.layers
        for layer in range(first_row // n, (end_row - 1) // n + 1):
            lo, hi = max(first_row, layer * n), min(end_row, (layer + 1) * n)
            ids = block_ids[lo - layer * n: hi - layer * n]
            if self._pool_rows is not None:
                self._pool_rows[layer, ids] = self._arena_rows[base + lo: base + hi]
            else:
                import torch  # noqa: PLC0415 - null engines import this module and never load torch

                self.pool[layer].index_copy_(0, torch.tensor(ids, dtype=torch.long), self.tensor[base + lo: base + hi])

    def unpack(self, slot: Slot, block_ids: list[int]) -> None:
        """Copy a whole landed slot into these pool blocks."""
        self.unpack_rows(slot, 0, slot.count * self.layers, block_ids)


def is_one_run(ids: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(ids, ids[1:]))


def source_ranges(remote: PoolGeometry, remote_ids: list[int]) -> list[tuple[int, int, int]]:
    """(remote_offset, slot_offset, length) reading remote blocks into a slot in [layer][i] order,
    consecutive remote ids coalesced."""
    eb = remote.entry_bytes
    n = len(remote_ids)
    runs: list[tuple[int, int, int]] = []  # (first remote id, first index in the slot, count)
    for i, block in enumerate(remote_ids):
        if runs and runs[-1][0] + runs[-1][2] == block:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((block, i, 1))
    plan = []
    for layer in range(remote.outer):
        base = layer * remote.num_entries * eb
        for first, index, count in runs:
            plan.append((base + first * eb, (layer * n + index) * eb, count * eb))
    return plan


def landing_pieces(source: list[tuple[int, int, int]], slot: Slot, entry_bytes: int,
                   piece_bytes: int) -> list[tuple[int, int, int, int, int]]:
    """Reads of `source` ((remote_offset, slot_coordinate, length), see source_ranges) into a landing slot,
    cut into pieces of whole block-rows, at most `piece_bytes` each, so each piece can be unpacked as soon
    as it has landed: (remote_offset, local_offset, length, first_row, end_row), a row being one block of
    one layer (row = layer * count + i)."""
    step_max = max(entry_bytes, piece_bytes // entry_bytes * entry_bytes)
    out = []
    for r_off, coord, length in source:
        while length > 0:
            step = min(length, step_max)
            out.append((r_off, slot.offset + coord, step, coord // entry_bytes, (coord + step) // entry_bytes))
            r_off, coord, length = r_off + step, coord + step, length - step
    return out


def check_remote_staging(offset: int, length: int, count: int, geometry: PoolGeometry,
                         region_bytes: int | None) -> None:
    """A packed slot the peer advertised must be exactly `count` blocks inside its staging region."""
    if region_bytes is None:
        raise MigrationError("remote_kv_staging given, but the peer advertised no staging region",
                             code="invalid_kv_staging")
    want = count * geometry.outer * geometry.entry_bytes
    if length != want:
        raise MigrationError(f"remote_kv_staging length {length} != {want} ({count} blocks)",
                             code="invalid_kv_staging")
    if offset < 0 or offset + length > region_bytes:
        raise MigrationError(f"remote_kv_staging [{offset}, {offset + length}) is outside the peer's "
                             f"{region_bytes}-byte staging region", code="invalid_kv_staging")
