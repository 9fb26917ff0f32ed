"""KV staging: scattered blocks migrate as one packed range (distserve.migration.staging).

The parts (allocator, arena, read planning) on their own, then real engines with a worst-case fragmented
pool (`--kv-allocation scattered`): PD output equals hybrid output token for token, the prefill packs, the
decode lands and unpacks, with a read or two per migration instead of one per block and layer; every
fallback (no arena on the prefill, a full arena on the decode) stays correct; a bad `remote_kv_staging`
is a 400 and the engine keeps serving; nothing is left in any arena.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest
import torch

from distserve.migration.blocks import BlockAllocator
from distserve.migration.errors import MigrationError
from distserve.migration.geometry import PoolGeometry
from distserve.migration.staging import (
    StagingArena,
    check_remote_staging,
    is_one_run,
    landing_pieces,
    source_ranges,
)
from distserve.testing import pd
from tests.engine.conftest import start_engines
from tests.engine.test_pd_equals_hybrid import _run_all, bodies

MODEL = "distserve-reference"
LAYERS = 4  # the default model


# -- the parts -------------------------------------------------------------------------------------
def test_allocate_run_is_contiguous_or_nothing():
    alloc = BlockAllocator(10)
    a = alloc.allocate_run(4)
    b = alloc.allocate_run(4)
    assert a == [0, 1, 2, 3] and b == [4, 5, 6, 7]
    alloc.free([1, 5])
    assert alloc.allocate_run(3) is None  # 1, 5, 8, 9 are free: no run of 3
    assert alloc.allocate_run(2) == [8, 9]
    assert alloc.allocate(2) == [1, 5]  # the plain allocator still takes scattered ids


def test_scattered_allocator_fragments():
    alloc = BlockAllocator(512, scattered=True, seed=7)
    ids = alloc.allocate(64)
    assert len(set(ids)) == 64 and not is_one_run(ids) and not is_one_run(sorted(ids))
    assert alloc.num_free == 448
    alloc.free(ids)
    assert alloc.num_free == 512


def pool_and_arena(seed: int):
    """A pool of 3 layers x 40 blocks (seeded random contents) and a 16-block staging arena over it."""
    torch.manual_seed(seed)
    pool = torch.randn(3, 40, 2, 4, 8)
    return pool, StagingArena(pool, 16)


def test_pack_then_unpack_moves_exactly_those_blocks():
    pool, arena = pool_and_arena(seed=0)
    src = [33, 2, 17, 5, 9]
    dst = [11, 38, 0, 24, 30]
    expected = pool[:, src].clone()
    untouched = [b for b in range(40) if b not in dst]
    before = pool[:, untouched].clone()
    slot = arena.pack(src)
    assert slot is not None and arena.units_used == 5
    assert slot.length == 5 * 3 * 2 * 4 * 8 * 4  # blocks x layers x block bytes
    # [layer][i] order: layer 1 of the third block sits at (1 * 5 + 2) block-layers into the slot
    flat = arena.tensor.view(-1)[slot.offset // 4: (slot.offset + slot.length) // 4].view(3, 5, 2, 4, 8)
    assert torch.equal(flat[1, 2], pool[1, 17])
    arena.unpack(slot, dst)
    assert torch.equal(pool[:, dst], expected)
    assert torch.equal(pool[:, untouched], before)
    arena.release(slot)
    assert arena.units_used == 0


def test_landing_piece_by_piece_equals_a_whole_unpack():
    """Pieces of whole rows that cross layer boundaries, unpacked in any order, put every block in place."""
    pool, arena = pool_and_arena(seed=1)
    src, dst = [33, 2, 17, 5, 9, 21, 30], [11, 38, 0, 24, 31, 6, 19]
    expected = pool[:, src].clone()
    slot = arena.pack(src)
    eb = 2 * 4 * 8 * 4
    # A packed source is one range; pieces of 2 rows (3 layers x 7 blocks = 21 rows: the last piece is 1)
    pieces = landing_pieces([(0, 0, slot.length)], slot, eb, 2 * eb + eb // 2)
    assert [p[4] - p[3] for p in pieces] == [2] * 10 + [1]
    assert pieces[3][1] == slot.offset + 6 * eb and pieces[3][3:] == (6, 8)  # rows 6-7: layer 0 ends at 7
    for _, _, _, first, end in reversed(pieces):
        arena.unpack_rows(slot, first, end, dst)
    assert torch.equal(pool[:, dst], expected)


def test_arena_full_means_no_pack():
    arena = StagingArena(torch.zeros(2, 20, 4), 6)
    first = arena.pack([1, 3, 5, 7])
    assert first is not None
    assert arena.pack([0, 2, 4]) is None  # 2 units left
    assert arena.allocate(7) is None and arena.allocate(0) is None
    arena.release(first)
    assert arena.pack([0, 2, 4]) is not None


def test_source_ranges_cover_the_slot_once():
    geo = PoolGeometry((3, 50, 2, 4, 8), "float32", 4, 1)
    eb = geo.entry_bytes
    ids = [7, 8, 9, 20, 3, 4]
    plan = source_ranges(geo, ids)
    assert len(plan) == 3 * 3  # three runs (7-9, 20, 3-4) per layer
    covered = sorted((slot_off, slot_off + n) for _, slot_off, n in plan)
    assert covered[0][0] == 0 and covered[-1][1] == 3 * len(ids) * eb
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
    for remote_off, slot_off, n in plan:
        layer, index = divmod(slot_off // eb, len(ids))
        assert remote_off == (layer * 50 + ids[index]) * eb


def test_remote_staging_is_checked_against_the_peer():
    geo = PoolGeometry((4, 64, 2, 16, 4, 64), "float32", 4, 1)
    unit = 4 * geo.entry_bytes
    check_remote_staging(unit, 3 * unit, 3, geo, 16 * unit)
    for offset, length, region, why in [
        (0, 3 * unit, None, "advertised no staging"),
        (0, 2 * unit, 16 * unit, "length"),
        (14 * unit, 3 * unit, 16 * unit, "outside"),
        (-unit, 3 * unit, 16 * unit, "outside"),
    ]:
        with pytest.raises(MigrationError, match=why) as err:
            check_remote_staging(offset, length, 3, geo, region)
        assert err.value.code == "invalid_kv_staging" and err.value.status == 400


# -- real engines ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fragmented():
    """Scattered prefill and decode (both with arenas), the same without an arena on the prefill, a
    decode whose arena is too small for any prompt here, and a hybrid for the reference answers."""
    # Whole-prompt migrations: the tests below count packs per migration, and a decode that holds a prompt's
    # first blocks in its prefix cache pulls only the rest, block by block (tests/engine/test_prefix_cache.py).
    scattered = ("--kv-allocation", "scattered", "--prefix-caching", "off")
    roomy = ("--kv-staging-blocks", "512")  # as large as the pool: packing and landing never run out here
    engines = start_engines({
        "prefill": ("prefill", *scattered, *roomy),
        "decode": ("decode", *scattered, *roomy),
        "prefill_no_arena": ("prefill", *scattered, "--kv-staging-blocks", "0"),
        "decode_tiny_arena": ("decode", *scattered, "--kv-staging-blocks", "1"),
        "hybrid": ("hybrid",),
    })
    yield engines
    for proc in engines.procs.values():
        proc.stop()


def _delta(after: dict, before: dict, name: str) -> float:
    return after[f"distserve_engine_{name}"] - before[f"distserve_engine_{name}"]


async def _run(http, items, factory, in_flight: int = 8):
    return await _run_all(http, factory, items, in_flight)


async def _settled(http, urls: list[str]) -> None:
    """Every arena and every preserved session empty again (free_cache calls may still be in flight)."""
    for _ in range(100):
        ms = [await pd.metrics(http, u) for u in urls]
        if all(m["distserve_engine_staging_blocks_used"] == 0 and m["distserve_engine_preserved_blocks"] == 0
               for m in ms):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"arena or preserved blocks left: {ms}")


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
async def test_scattered_pd_equals_hybrid_with_packed_migrations(fragmented, stream):
    p_url, d_url, h_url = fragmented["prefill"], fragmented["decode"], fragmented["hybrid"]
    items = [(route, {**body, "stream": stream}) for route, body in bodies()]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await pd.handshake(http, p_url, d_url)
        p0, d0 = await pd.metrics(http, p_url), await pd.metrics(http, d_url)
        hybrid, disagg = await asyncio.gather(
            _run(http, items, lambda r, b: pd.generate(http, h_url, r, b)),
            _run(http, items, lambda r, b: pd.pd_generate(http, p_url, d_url, r, b)))
        for (route, body), want, got in zip(items, hybrid, disagg):
            assert got == want, f"{route}: PD {got!r} != hybrid {want!r}"
        p1, d1 = await pd.metrics(http, p_url), await pd.metrics(http, d_url)
        migrations = _delta(d1, d0, "migrations_total")
        assert migrations == len(items)
        # Prompts of one block (4 of the 20) need no packing; every longer one was scattered, so packed
        # and landed, unless an allocation happened to hand out one contiguous run (each seen once in CI):
        # on the decode, the pull reads straight into it (fewer reads still) and skips the arena; on the
        # prefill, nothing is packed but the decode may still land the run's per-layer reads in its arena.
        packs = _delta(p1, p0, "kv_packs_total")
        assert packs >= 15
        assert _delta(d1, d0, "migrations_from_packed_total") == packs
        assert packs - 2 <= _delta(d1, d0, "migrations_landed_total") <= packs + 2
        # A packed prompt of <= 600 tokens (<= 38 blocks, <= 4.75 MiB) lands in 2 MiB pieces: at most 3
        # reads, not one per block and layer (up to 152 here); one-block prompts take one read per layer.
        assert _delta(d1, d0, "migration_reads_total") <= 3 * packs + LAYERS * (migrations - packs)
        await _settled(http, [p_url, d_url])


async def test_fallbacks_without_arena_or_with_a_full_one(fragmented):
    """No arena on the prefill (nothing packed: the decode reads blocks), or a decode arena too small for
    any prompt (it reads straight into its blocks): the same answers, only more reads."""
    h_url = fragmented["hybrid"]
    items = [(route, {**body, "stream": False}) for route, body in bodies()[::3]]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        want = await _run(http, items, lambda r, b: pd.generate(http, h_url, r, b))
        for p_name, d_name in (("prefill_no_arena", "decode"), ("prefill", "decode_tiny_arena")):
            p_url, d_url = fragmented[p_name], fragmented[d_name]
            await pd.handshake(http, p_url, d_url)
            d0 = await pd.metrics(http, d_url)
            got = await _run(http, items, lambda r, b, p=p_url, d=d_url: pd.pd_generate(http, p, d, r, b))
            assert got == want, (p_name, d_name)
            d1 = await pd.metrics(http, d_url)
            assert _delta(d1, d0, "migrations_total") == len(items)
            if p_name == "prefill_no_arena":
                # nothing packed; the decode may still land a pull whose source blocks happen to form fewer
                # ranges than block-to-block reads (scattered ids do fall next to each other at times)
                assert _delta(d1, d0, "migrations_from_packed_total") == 0
            else:
                assert _delta(d1, d0, "migrations_landed_total") == 0, (p_name, d_name)
            await _settled(http, [p_url, d_url])


async def test_bad_remote_kv_staging_gets_400_and_the_engine_keeps_serving(fragmented):
    p_url, d_url, h_url = fragmented["prefill"], fragmented["decode"], fragmented["hybrid"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await pd.handshake(http, p_url, d_url)
        body = {"model": MODEL, "prompt": "scattered " * 30, "max_tokens": 6, "temperature": 0}
        pre = await pd.prefill(http, p_url, "completions", body)
        assert pre.get("remote_kv_staging"), pre  # > 1 block, scattered: packed
        good = pd.migration_request(p_url, pre)
        staging = good["remote_kv_staging"]
        unit = staging["length"] // len(good["remote_block_ids"])
        cases = [
            ({**staging, "length": staging["length"] - unit}, "invalid_kv_staging"),
            ({**staging, "offset": 1 << 40}, "invalid_kv_staging"),
            ({**staging, "offset": -1}, "invalid_migration_request"),
            ({**staging, "evil": 1}, "invalid_migration_request"),
            ({"offset": "0", "length": []}, "invalid_migration_request"),
        ]
        for bad, code in cases:
            async with http.post(f"{d_url}/v1/completions",
                                 json={**body, "migration_request": {**good, "remote_kv_staging": bad}}) as resp:
                err = await resp.json()
                assert resp.status == 400 and err["error"]["code"] == code, (bad, resp.status, err)
        # The prefill's session is intact: the genuine request still migrates it, token for token.
        got = await pd.generate(http, d_url, "completions", {**body, "migration_request": good})
        assert got == await pd.generate(http, h_url, "completions", body)
        await _settled(http, [p_url, d_url])


async def test_many_concurrent_packed_migrations_share_the_arenas(fragmented):
    """24 prompts in flight share the arenas (and may fill them: then a pull reads directly): every
    answer is right and both arenas end empty."""
    p_url, d_url, h_url = fragmented["prefill"], fragmented["decode"], fragmented["hybrid"]
    rng = random.Random(5)
    items = [("completions", {"model": MODEL, "max_tokens": 4, "temperature": 0,
                              "prompt": "".join(rng.choice("qwertyuiop ") for _ in range(rng.randrange(200, 500)))})
             for _ in range(24)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        await pd.handshake(http, p_url, d_url)
        want = await _run(http, items, lambda r, b: pd.generate(http, h_url, r, b), in_flight=24)
        got = await _run(http, items, lambda r, b: pd.pd_generate(http, p_url, d_url, r, b), in_flight=24)
        assert got == want
        await _settled(http, [p_url, d_url])
