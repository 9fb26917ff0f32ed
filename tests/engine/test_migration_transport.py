"""Read planning and validation, and the DLSlime TCP transport on real loopback endpoints."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from distserve.migration.errors import MigrationError
from distserve.migration.geometry import MAX_ASSIGNMENTS_PER_CALL, PoolGeometry, chunk, plan_reads
from distserve.protocol import CachePool

GEO = PoolGeometry((4, 64, 2, 16, 4, 64), "float32", 4, 1)  # the default engine's pool, 64 blocks


def test_plan_coalesces_contiguous_blocks_per_layer():
    plan = plan_reads(GEO, GEO, [3, 4, 5, 9], [0, 1, 2, 7])
    eb = GEO.entry_bytes
    assert len(plan) == 2 * 4  # two runs per layer
    assert plan[0] == (3 * eb, 0, 3 * eb) and plan[1] == (9 * eb, 7 * eb, eb)
    assert plan[2][0] == (64 + 3) * eb  # layer 1 starts after the 64 blocks of layer 0


@pytest.mark.parametrize("remote_ids,local_ids", [
    ([64], [0]), ([-1], [0]), ([1, 1], [0, 1]), ([True], [0]), ([0, 1], [0]), ([0], [64]),
])
def test_plan_rejects_hostile_ids(remote_ids, local_ids):
    with pytest.raises(MigrationError):
        plan_reads(GEO, GEO, remote_ids, local_ids)


def test_plan_rejects_geometry_mismatch():
    other = PoolGeometry((4, 64, 2, 16, 8, 32), "float32", 4, 1)
    with pytest.raises(MigrationError, match="geometry"):
        plan_reads(other, GEO, [0], [0])
    with pytest.raises(MigrationError):
        PoolGeometry.from_cache_pool(CachePool(shape=[4, 0, 2], dtype="float32", element_size=4, entry_axis=1))
    with pytest.raises(MigrationError):
        PoolGeometry.from_cache_pool(CachePool(shape=[4, 8, 2], dtype="float32", element_size=2, entry_axis=1))
    with pytest.raises(MigrationError):
        PoolGeometry.from_cache_pool(CachePool(shape=[4, 8, 2], dtype="float32", element_size=4, entry_axis=3))


def test_chunks_never_exceed_31_assignments():
    plan = [(i, i, 1) for i in range(100)]
    parts = chunk(plan)
    assert max(len(p) for p in parts) == MAX_ASSIGNMENTS_PER_CALL and sum(map(len, parts)) == 100
    assert max(len(p) for p in chunk(plan, 1000)) == MAX_ASSIGNMENTS_PER_CALL


async def test_dlslime_tcp_scattered_read_is_exact():
    """A fragmented migration (hundreds of assignments, many calls) lands every byte in the right place."""
    torch = pytest.importorskip("torch")
    from distserve.migration.transport import DlslimeTcpTransport

    src = torch.randn(GEO.shape)
    dst = torch.zeros(GEO.shape)
    remote = DlslimeTcpTransport("127.0.0.1", src.data_ptr(), GEO.total_bytes)
    local = DlslimeTcpTransport("127.0.0.1", dst.data_ptr(), GEO.total_bytes)
    try:
        assert remote.endpoint_info()["host"] == "127.0.0.1"
        await local.connect(json.loads(json.dumps(remote.endpoint_info())), GEO.total_bytes)
        rng = random.Random(5)
        remote_ids = rng.sample(range(64), 48)
        local_ids = rng.sample(range(64), 48)
        plan = plan_reads(GEO, GEO, remote_ids, local_ids)
        assert len(plan) > 4 * MAX_ASSIGNMENTS_PER_CALL
        await local.read(plan, time.monotonic() + 20)
        for r, l in zip(remote_ids, local_ids):
            assert torch.equal(dst[:, l], src[:, r])
        untouched = sorted(set(range(64)) - set(local_ids))
        assert torch.count_nonzero(dst[:, untouched]) == 0
        # Concurrent migrations on one pair share the bounded in-flight calls.
        dst.zero_()
        halves = [(remote_ids[:24], local_ids[:24]), (remote_ids[24:], local_ids[24:])]
        await asyncio.gather(*(local.read(plan_reads(GEO, GEO, r, l), time.monotonic() + 20) for r, l in halves))
        for r, l in zip(remote_ids, local_ids):
            assert torch.equal(dst[:, l], src[:, r])
    finally:
        local.close()
        remote.close()


def test_rdma_and_nvlink_fail_clearly_without_hardware():
    from distserve.migration.errors import TransportUnavailable
    from distserve.migration.transport import check_transport
    from distserve.protocol import MigrationProtocol

    dlslime = pytest.importorskip("dlslime")
    if not dlslime.available_nic():
        with pytest.raises(TransportUnavailable, match="RDMA NIC"):
            check_transport(MigrationProtocol.RDMA)
    with pytest.raises(TransportUnavailable, match="NVLink"):
        check_transport(MigrationProtocol.NVLINK)
