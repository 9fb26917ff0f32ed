"""etcd faults under a running fleet: member failures, a total outage, leases revoked from outside.

Engines run with their agent in-process (`distserve engine --null --count 2 --etcd ...`): 2 prefill and
2 decode engines in two OS processes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from discovery.watch import watch_prefix
from distserve.cluster.keys import ENGINES, LINKS, Keys
from tests.agent.conftest import (
    Fleet,
    TcpProxy,
    View,
    engine_metrics,
    handshakes,
    read_view,
    wait_full,
    wait_until,
)

KEYS = Keys()


def _fleet(endpoints: list[str], ttl: int = 5) -> Fleet:
    fleet = Fleet(endpoints, ttl=ttl)
    fleet.start_in_process("prefill", 2)
    fleet.start_in_process("decode", 2)
    fleet.wait_engines()
    return fleet


async def test_three_member_etcd_each_member_killed_in_turn(etcd_cluster3):
    fleet = _fleet(etcd_cluster3.endpoints)
    try:
        async with EtcdClient(fleet.etcd_config()) as client:
            start = await wait_full(client, fleet, timeout=60)
            changes: list[str] = []

            async def record_changes() -> None:
                async for ev in watch_prefix(client, KEYS.root, start.revision + 1):
                    parsed = KEYS.parse(ev.key)
                    if parsed is not None and parsed.kind in (ENGINES, LINKS):
                        changes.append(f"{ev.type} {ev.key}")

            watcher = asyncio.create_task(record_changes())
            for index, member in enumerate(etcd_cluster3.members):
                member.kill()
                await asyncio.sleep(3.0)  # > one keepalive period (TTL/3): renewals must use another member
                view = await read_view(client)
                assert view.leases == start.leases, f"a lease changed while member {index} was down"
                assert view.usable_links() == fleet.all_pairs()
                await asyncio.to_thread(member.restart)
            await asyncio.sleep(1.0)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            end = await wait_full(client, fleet, timeout=10)
            assert end.leases == start.leases, "no lease may be lost"
            assert {k: v.incarnation for k, v in end.engines.items()} == \
                   {k: v.incarnation for k, v in start.engines.items()}
            assert changes == [], f"engine or link records changed (flaps): {changes}"
    finally:
        fleet.stop()


@pytest.mark.parametrize("mode", ["kill", "partition", pytest.param("pause", marks=pytest.mark.slow)])
async def test_total_etcd_outage_of_10s_recovers_within_2s(etcd, mode):
    """kill: etcd SIGKILLed and restarted (it re-arms the leases); partition: etcd runs on but the agents
    cannot reach it (their leases expire: new leases, new incarnations); pause: etcd SIGSTOPped."""
    proxy = await TcpProxy(etcd.client_url).start() if mode == "partition" else None
    fleet = _fleet([proxy.url] if proxy else etcd.endpoints)
    try:
        async with EtcdClient(EtcdConfig(endpoints=etcd.endpoints, timeout=3.0)) as client:
            start = await wait_full(client, fleet, timeout=60)
            counts = fleet.handshake_counts()
            if mode == "kill":
                etcd.kill()
                await asyncio.sleep(10)
                await asyncio.to_thread(etcd.restart)
            elif mode == "partition":
                await proxy.cut()
                await asyncio.sleep(10)
                gone = await read_view(client)
                assert not gone.engines and not gone.links, "records outlived their leases"
                await proxy.start()
            else:
                etcd.pause()
                await asyncio.sleep(10)
                etcd.resume()
            back = time.monotonic()
            took, view = await _settle(client, fleet, window=5.0)
            print(f"etcd outage ({mode}, 10 s): every record and link back for good {took:.2f}s after etcd returned; "
                  f"handshakes {sum(counts.values())} -> {sum(fleet.handshake_counts().values())}")
            if took > 2.0:
                print(f"etcd returned at {time.time() - (time.monotonic() - back):.3f} (epoch)\n{fleet.logs()}")
            assert took <= 2.0
            assert len(view.links) == 4
            if mode == "partition":  # the leases were lost: re-registered as new incarnations of the same engines
                for engine_id, record in view.engines.items():
                    assert record.incarnation != start.engines[engine_id].incarnation
                    assert record.instance == start.engines[engine_id].instance
    finally:
        fleet.stop()
        if proxy is not None:
            await proxy.close()


async def _settle(client: EtcdClient, fleet: Fleet, window: float) -> tuple[float, View]:
    """Watch the cluster for `window` seconds; returns when it was last seen incomplete (0 if never) and the
    final view. A view that is full only until the old leases expire does not count as back."""
    started = time.monotonic()
    last_incomplete = 0.0
    view = None
    while time.monotonic() - started < window:
        try:
            view = await read_view(client)
            full = (all(view.engines.get(n.id) is not None and view.engines[n.id].state == "ready"
                        for n in fleet.nodes) and view.usable_links() == fleet.all_pairs())
        except Exception:  # noqa: BLE001 - etcd not answering yet
            full = False
        if not full:
            last_incomplete = time.monotonic() - started
        await asyncio.sleep(0.05)
    assert view is not None and last_incomplete < window - 1.0, "the cluster did not settle"
    return last_incomplete, view


async def test_lease_revoked_from_outside_is_replaced_with_a_new_incarnation(etcd):
    fleet = _fleet(etcd.endpoints)
    try:
        async with EtcdClient(fleet.etcd_config()) as client:
            start = await wait_full(client, fleet, timeout=60)
            decode = fleet.decodes[0]
            decode_handshakes = handshakes(decode.url)
            await client.revoke(start.leases[decode.id])
            revoked = time.monotonic()

            async def replaced() -> bool:
                view = await read_view(client)
                record = view.engines.get(decode.id)
                return record is not None and record.incarnation != start.engines[decode.id].incarnation

            await wait_until(replaced, 5, "decode re-registered")
            view = await wait_full(client, fleet, timeout=5)
            print(f"outside revoke: decode registered again and linked in {time.monotonic() - revoked:.2f}s")
            assert view.engines[decode.id].instance == start.engines[decode.id].instance
            for prefill in fleet.prefills:
                link = view.links[(prefill.id, decode.id)]
                assert link.decode_incarnation == view.engines[decode.id].incarnation
            # Same engine process on both sides: the links were re-recorded, not handshaken again.
            assert handshakes(decode.url) == decode_handshakes
            assert all(p.engine.alive() for p in fleet.nodes)
    finally:
        fleet.stop()


async def test_every_lease_revoked_at_once_keeps_every_link_without_a_handshake(etcd):
    """What etcd 3.5.1 does when a SIGSTOPped leader resumes (etcd-io/etcd#15247): every lease revoked at
    once. The engine processes are unchanged, so their connections are still good: each agent registers
    again under a new lease and the decode agents hold their links through the gap (--link-hold) and
    write them again, with no new handshake and no p2p_drop_connect."""
    fleet = _fleet(etcd.endpoints)
    try:
        async with EtcdClient(fleet.etcd_config()) as client:
            start = await wait_full(client, fleet, timeout=60)
            before = fleet.handshake_counts()
            peers_before = {d.id: engine_metrics(d.url)["distserve_engine_peers"] for d in fleet.decodes}
            await asyncio.gather(*(client.revoke(lease) for lease in set(start.leases.values())))

            async def back() -> bool:
                view = await read_view(client)
                return all(
                    view.engines.get(n.id) is not None
                    and view.engines[n.id].incarnation != start.engines[n.id].incarnation
                    and view.engines[n.id].state == "ready"
                    for n in fleet.nodes
                ) and view.usable_links() == fleet.all_pairs() and all(
                    # usable already while the decode rewrites it (same instances): wait for the rewrite
                    (view.links[pair].prefill_incarnation, view.links[pair].decode_incarnation)
                    == (view.engines[pair[0]].incarnation, view.engines[pair[1]].incarnation)
                    for pair in fleet.all_pairs())

            took = await wait_until(back, 5, "every engine back under a new lease, every link rewritten naming it")
            print(f"all leases revoked: every engine and link back in {took:.2f}s")
            assert took <= 2.0
            await asyncio.sleep(fleet.ttl + 1.0)  # past the link hold: nothing was dropped meanwhile
            assert fleet.handshake_counts() == before
            assert {d.id: engine_metrics(d.url)["distserve_engine_peers"] for d in fleet.decodes} == peers_before
            assert (await read_view(client)).usable_links() == fleet.all_pairs()
    finally:
        fleet.stop()
