"""LeaseSession against a real etcd: crash, graceful close, outside revoke, outage, incarnations."""

from __future__ import annotations

import asyncio
import signal
import time

from discovery.client import EtcdClient
from discovery.lease import LeaseSession
from tests.util import Proc


async def _wait_until(predicate, timeout: float, step: float = 0.02) -> float:
    """Poll an async predicate; returns the seconds it took (raises AssertionError on timeout)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await predicate():
            return time.monotonic() - t0
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def _start_holder(etcd, ttl: int, keys: list[str]) -> tuple[Proc, int]:
    proc = Proc.python(["tests.discovery.lease_holder", ",".join(etcd.endpoints), str(ttl), *keys], name="holder")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = proc.output()
        if "READY" in out:
            return proc, int(out.split("READY", 1)[1].split()[0])
        assert proc.alive(), f"holder died:\n{out}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"holder not ready:\n{proc.output()}")


async def _all_gone(client: EtcdClient, keys: list[str]) -> bool:
    return all([await client.get(k) is None for k in keys])


async def test_keys_vanish_within_ttl_plus_1s_after_holder_sigkill(etcd, etcd_client: EtcdClient):
    ttl, keys = 2, ["/lease/crash/a", "/lease/crash/b"]
    proc, lease_id = _start_holder(etcd, ttl, keys)
    try:
        assert all([(await etcd_client.get(k)).lease == lease_id for k in keys])
        await asyncio.sleep(ttl)  # several renewals happened: the holder really kept the lease alive
        assert all([await etcd_client.get(k) is not None for k in keys])
        proc.kill()  # SIGKILL: no revoke
        took = await _wait_until(lambda: _all_gone(etcd_client, keys), ttl + 3)
        assert took <= ttl + 1, f"keys outlived the holder by {took:.2f}s (ttl {ttl})"
        assert took >= 0.2, "keys vanished before the lease could expire: not a lease expiry"
    finally:
        proc.kill()


async def test_keys_vanish_within_half_a_second_after_graceful_close(etcd, etcd_client: EtcdClient):
    keys = ["/lease/close/a", "/lease/close/b"]
    proc, _ = _start_holder(etcd, 30, keys)
    try:
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        await _wait_until(lambda: _all_gone(etcd_client, keys), 5)
        took = time.monotonic() - t0
        assert took <= 0.5, f"keys vanished {took:.2f}s after a graceful close"
        proc.popen.wait(10)
        assert proc.popen.returncode == 0 and "CLOSED" in proc.output()
    finally:
        proc.kill()


async def test_outside_revoke_is_replaced_and_keys_restored_within_1s(etcd_client: EtcdClient):
    keys = [f"/lease/revoke/{i}" for i in range(5)]
    session = LeaseSession(etcd_client, ttl=10, name="victim")
    seen_at_callback: list[tuple[int, bool]] = []

    async def on_new_lease(lease_id: int) -> None:
        present = not await _all_gone(etcd_client, keys)
        seen_at_callback.append((lease_id, present))
        await session.put("/lease/revoke/0", f"incarnation-{session.incarnation}".encode())  # callbacks may update

    session.on_new_lease(on_new_lease)
    await session.start()
    try:
        first_lease = session.lease_id
        assert session.incarnation == 1 and session.alive
        for key in keys:
            await session.put(key, b"v")
        await asyncio.sleep(0.5)  # settled: the next renewal is seconds away, so only the guard can notice
        t0 = time.monotonic()
        assert await etcd_client.revoke(first_lease) is True  # an operator (or a bug) revokes it

        async def restored() -> bool:
            kvs = [await etcd_client.get(k) for k in keys]
            return all(kv is not None and kv.lease not in (0, first_lease) for kv in kvs)

        await _wait_until(restored, 3)
        took = time.monotonic() - t0
        assert took <= 1.0, f"restored after {took:.2f}s"
        assert session.incarnation == 2 and session.lease_id != first_lease and session.alive
        assert (await etcd_client.get("/lease/revoke/0")).value == b"incarnation-2"
        assert seen_at_callback[0][0] == first_lease and seen_at_callback[1] == (session.lease_id, False)
        assert await etcd_client.time_to_live(session.lease_id) > 0
    finally:
        await session.close()
    assert await _all_gone(etcd_client, keys)


async def test_owned_key_deleted_from_outside_is_restored(etcd_client: EtcdClient):
    async with LeaseSession(etcd_client, ttl=10) as session:
        await session.put("/lease/own/a", b"mine")
        await session.put("/lease/own/b", b"mine too")
        await asyncio.sleep(0.5)
        await etcd_client.delete("/lease/own/a")
        await etcd_client.put("/lease/own/b", b"someone else")

        async def restored() -> bool:
            a, b = await etcd_client.get("/lease/own/a"), await etcd_client.get("/lease/own/b")
            return bool(a and b and a.value == b"mine" and b.value == b"mine too" and b.lease == session.lease_id)

        await _wait_until(restored, 1.0)
        assert session.incarnation == 1  # the lease itself was fine
        await session.delete("/lease/own/a")  # no longer owned: stays deleted
        await asyncio.sleep(0.3)
        assert await etcd_client.get("/lease/own/a") is None


async def test_ten_second_outage_with_ttl_3_loses_no_registration(etcd, etcd_client: EtcdClient):
    keys = [f"/lease/outage/{i}" for i in range(3)]
    session = LeaseSession(etcd_client, ttl=3, name="survivor")
    await session.start()
    try:
        for key in keys:
            await session.put(key, b"registered")
        lease_id = session.lease_id
        etcd.kill()
        await asyncio.sleep(10)
        assert not session.alive  # nobody could confirm it for 10 s
        await asyncio.get_running_loop().run_in_executor(None, etcd.restart)
        await _wait_until(lambda: asyncio.sleep(0, session.alive), 5)
        # for more than a TTL after the outage: every key present, same lease, same incarnation
        t_end = time.monotonic() + 4
        while time.monotonic() < t_end:
            kvs = [await etcd_client.get(k) for k in keys]
            assert all(kv is not None and kv.lease == lease_id for kv in kvs), kvs
            await asyncio.sleep(0.1)
        assert session.lease_id == lease_id and session.incarnation == 1 and session.recoveries == 0
        assert session.alive
    finally:
        await session.close()


async def test_put_needs_a_started_open_session(etcd_client: EtcdClient):
    from discovery.client import EtcdError
    import pytest

    session = LeaseSession(etcd_client, ttl=5)
    with pytest.raises(EtcdError, match="not started"):
        await session.put("/lease/early", b"x")
    await session.start()
    await session.close()
    with pytest.raises(EtcdError, match="closed"):
        await session.put("/lease/late", b"x")
    assert await etcd_client.get("/lease/early") is None and await etcd_client.get("/lease/late") is None


async def test_lease_lost_in_a_partition_is_replaced_as_soon_as_etcd_answers(etcd, etcd_client: EtcdClient):
    """The session itself rechecks an unconfirmed lease every 0.25 s (no holder-side watchdog): the moment
    etcd is reachable again a lost lease is replaced, the keys are back, and on_confirmed says so once."""
    from discovery.config import EtcdConfig
    from tests.agent.conftest import TcpProxy

    proxy = await TcpProxy(etcd.client_url).start()
    keys = [f"/lease/partition/{i}" for i in range(3)]
    confirmed: list[tuple[bool, int]] = []
    async with EtcdClient(EtcdConfig(endpoints=[proxy.url], timeout=2.0)) as cut_off:
        session = LeaseSession(cut_off, ttl=3, name="partitioned")

        async def on_confirmed(replaced: bool) -> None:
            confirmed.append((replaced, session.incarnation))

        session.on_confirmed(on_confirmed)
        await session.start()
        try:
            for key in keys:
                await session.put(key, b"mine")
            first_lease = session.lease_id
            await proxy.cut()
            assert await etcd_client.revoke(first_lease) is True  # gone while the holder cannot hear it
            await _wait_until(lambda: asyncio.sleep(0, not session.alive), 5)
            await asyncio.sleep(1.0)  # well into the outage: the streams' retries are spaced out by now
            assert confirmed == []
            await proxy.start()
            t0 = time.monotonic()

            async def restored() -> bool:
                kvs = [await etcd_client.get(k) for k in keys]
                return all(kv is not None and kv.lease not in (0, first_lease) for kv in kvs)

            await _wait_until(restored, 5)
            took = time.monotonic() - t0
            assert took <= 1.5, f"keys restored {took:.2f}s after etcd became reachable"
            await _wait_until(lambda: asyncio.sleep(0, bool(confirmed)), 2)
            assert confirmed == [(True, 2)] and session.incarnation == 2 and session.alive
        finally:
            await session.close()
            await proxy.close()
    assert await _all_gone(etcd_client, keys)
