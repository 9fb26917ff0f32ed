"""A 3-member etcd cluster with each member SIGKILLed in turn: writes, watches and leases carry on."""

from __future__ import annotations

import asyncio
import time

from discovery.client import EtcdClient, EtcdError
from discovery.config import EtcdConfig
from discovery.lease import LeaseSession
from discovery.watch import WatchEvent, watch_prefix


async def test_each_member_killed_in_turn(etcd_cluster3):
    client = EtcdClient(EtcdConfig(endpoints=etcd_cluster3.endpoints, timeout=5.0))
    await client.connect()
    session = LeaseSession(client, ttl=3, name="cluster-survivor")
    await session.start()
    await session.put("/cl/registered/a", b"a")
    await session.put("/cl/registered/b", b"b")
    lease_id = session.lease_id

    written: list[int] = []  # revisions of successful writes, in order
    failures: list[str] = []
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            try:
                written.append(await client.put(f"/cl/seq/{n:05d}", str(n).encode()))
                n += 1
            except EtcdError as exc:
                failures.append(f"{time.monotonic():.2f} {exc}")
            await asyncio.sleep(0.01)

    events: list[WatchEvent] = []

    async def watcher() -> None:
        agen = watch_prefix(client, "/cl/seq/", start_revision=client.last_revision + 1)
        try:
            async for ev in agen:
                events.append(ev)
        finally:
            await agen.aclose()

    tasks = [asyncio.create_task(writer()), asyncio.create_task(watcher())]
    try:
        killed_leader = False
        for i, member in enumerate(etcd_cluster3.members):
            killed_leader |= etcd_cluster3.leader_index() == i
            member.kill()
            t_kill, before = time.monotonic(), len(written)
            # a lost leader stalls writes for an election (~1-2 s); they must carry on without errors
            while len(written) < before + 20 and time.monotonic() - t_kill < 6:
                await asyncio.sleep(0.05)
            assert len(written) >= before + 20, f"writes stalled with member {i} down: {failures[-3:]}"
            await asyncio.to_thread(member.restart)
            await asyncio.sleep(0.5)
        assert killed_leader
        stop.set()
        await tasks[0]
        deadline = time.monotonic() + 10
        while len(events) < len(written) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert failures == []
        assert [e.mod_revision for e in events] == written  # every write seen once, in order
        assert session.lease_id == lease_id and session.incarnation == 1 and session.recoveries == 0
        for key in ("/cl/registered/a", "/cl/registered/b"):
            kv = await client.get(key)
            assert kv is not None and kv.lease == lease_id
        status = await client.status()
        assert status.leader != 0 and all(m.healthy for m in status.members)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        await client.close()


def test_a_cluster_whose_ports_were_taken_starts_on_new_ones():
    """Ports are picked free, then bound by etcd a moment later: another process may take one in between
    (seen in a chaos run). The cluster starts anyway, every member on new ports."""
    import socket

    from discovery.embedded import EmbeddedEtcdCluster

    cluster = EmbeddedEtcdCluster(size=3, unsafe_no_fsync=True)
    squatter = socket.socket()
    squatter.bind((cluster.members[1].host, cluster.members[1].peer_port))
    squatter.listen(1)
    taken = cluster.members[1].peer_port
    try:
        cluster.start(timeout=30)
        assert taken not in {m.peer_port for m in cluster.members}
        assert all(m.health() for m in cluster.members)
        assert cluster.leader_index(timeout=10) in (0, 1, 2)
    finally:
        squatter.close()
        cluster.stop()
