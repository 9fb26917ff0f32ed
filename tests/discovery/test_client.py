"""EtcdClient against a real etcd: reads, writes, conditional writes, leases, status, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from discovery.client import EtcdClient, EtcdUnavailable, KeyValue
from discovery.config import EtcdConfig


async def test_put_get_prefix_and_delete(etcd_client: EtcdClient):
    rev1 = await etcd_client.put("/t/b", b"2")
    rev2 = await etcd_client.put("/t/a", b"1")
    await etcd_client.put("/u/x", b"other prefix")
    assert rev2 > rev1
    kv = await etcd_client.get("/t/a")
    assert isinstance(kv, KeyValue) and kv.value == b"1" and kv.mod_revision == rev2 and kv.version == 1
    assert await etcd_client.get("/t/missing") is None
    kvs, revision = await etcd_client.get_prefix("/t/")
    assert [k.key for k in kvs] == ["/t/a", "/t/b"] and revision >= rev2
    assert await etcd_client.delete("/t/a") == 1
    assert await etcd_client.delete("/t/a") == 0
    assert await etcd_client.delete_prefix("/t/") == 1
    assert (await etcd_client.get_prefix("/t/"))[0] == []
    assert (await etcd_client.get("/u/x")).value == b"other prefix"


async def test_get_prefix_pages_at_one_revision(etcd_client: EtcdClient, monkeypatch):
    monkeypatch.setattr("discovery.client.PAGE_SIZE", 7)
    for i in range(30):
        await etcd_client.put(f"/p/{i:03d}", str(i).encode())
    kvs, revision = await etcd_client.get_prefix("/p/")
    assert [kv.key for kv in kvs] == [f"/p/{i:03d}" for i in range(30)]
    # reading at an older revision sees the older state
    await etcd_client.delete("/p/000")
    old, rev_old = await etcd_client.get_prefix("/p/", revision=revision)
    assert rev_old == revision and len(old) == 30
    assert len((await etcd_client.get_prefix("/p/"))[0]) == 29


async def test_create_if_absent_and_compare_and_swap(etcd_client: EtcdClient):
    assert await etcd_client.create("/c/k", b"first") is True
    assert await etcd_client.create("/c/k", b"second") is False
    kv = await etcd_client.get("/c/k")
    assert kv.value == b"first"
    assert await etcd_client.compare_and_swap("/c/k", b"v2", kv.mod_revision) is True
    assert await etcd_client.compare_and_swap("/c/k", b"v3", kv.mod_revision) is False  # stale revision
    assert (await etcd_client.get("/c/k")).value == b"v2"
    assert await etcd_client.compare_and_swap("/c/new", b"n", 0) is True  # 0: must not exist
    assert await etcd_client.compare_and_swap("/c/new", b"n", 0) is False
    kv = await etcd_client.get("/c/k")
    assert await etcd_client.delete_if("/c/k", kv.mod_revision - 1) is False
    assert await etcd_client.delete_if("/c/k", kv.mod_revision) is True
    assert await etcd_client.get("/c/k") is None


async def test_lease_grant_ttl_revoke(etcd_client: EtcdClient):
    lease = await etcd_client.grant(10)
    assert 8 <= await etcd_client.time_to_live(lease) <= 10
    await etcd_client.put("/l/k", b"v", lease=lease)
    assert (await etcd_client.get("/l/k")).lease == lease
    assert await etcd_client.revoke(lease) is True
    assert await etcd_client.get("/l/k") is None
    assert await etcd_client.time_to_live(lease) == -1
    assert await etcd_client.revoke(lease) is False  # idempotent


async def test_status_names_the_leader(etcd, etcd_client: EtcdClient):
    await etcd_client.put("/s", b"1")
    st = await etcd_client.status()
    assert st.healthy and st.leader != 0 and st.version.startswith("3.")
    assert st.members[0].endpoint == etcd.client_url and st.members[0].is_leader
    assert st.revision >= 2


async def test_unreachable_endpoint_fails_within_timeout_naming_it(etcd):
    etcd.kill()
    client = EtcdClient(EtcdConfig(endpoints=etcd.endpoints, timeout=1.0))
    await client.connect()
    try:
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable) as info:
            await client.get("/x")
        assert time.monotonic() - t0 < 2.5
        assert etcd.client_url in str(info.value)
        with pytest.raises(EtcdUnavailable):
            await client.put("/x", b"1")
    finally:
        await client.close()


async def test_paused_server_times_out_then_recovers(etcd, etcd_client: EtcdClient):
    await etcd_client.put("/k", b"1")
    etcd.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            await etcd_client.get("/k", timeout=0.5)
        assert time.monotonic() - t0 < 1.5
    finally:
        etcd.resume()
    assert (await asyncio.wait_for(etcd_client.get("/k"), 5)).value == b"1"


async def test_reconnects_quickly_after_restart(etcd, etcd_client: EtcdClient):
    await etcd_client.put("/k", b"1")
    etcd.kill()
    with pytest.raises(EtcdUnavailable):
        await etcd_client.get("/k", timeout=0.3)
    etcd.restart()
    t0 = time.monotonic()
    assert (await etcd_client.get("/k")).value == b"1"  # data dir kept across the restart
    assert time.monotonic() - t0 < 2.0


async def test_fails_over_from_a_dead_endpoint(etcd):
    from tests.util import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = EtcdClient(EtcdConfig(endpoints=[dead, etcd.client_url], timeout=3.0))
    await client.connect()
    try:
        for attempt in range(4):  # whichever endpoint it starts on, every call succeeds
            client._active = attempt % 2
            t0 = time.monotonic()
            assert await client.put("/f", str(attempt).encode()) > 0
            assert (await client.get("/f")).value == str(attempt).encode()
            assert time.monotonic() - t0 < 2.0
        st = await client.status()
        assert [m.healthy for m in st.members] == [False, True] and st.members[0].error
    finally:
        await client.close()
