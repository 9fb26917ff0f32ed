"""4 prefill x 4 decode null engines, each with a sidecar agent, all separate OS processes, on a real etcd.

The tests run in file order on one cluster; each leaves it full again (every engine ready, 16 usable links).
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from discovery.client import EtcdClient
from discovery.embedded import EmbeddedEtcd
from distserve.cluster.keys import Keys
from discovery.watch import watch_prefix
from distserve.cluster.records import EngineRecord, OperatorFlags
from tests.agent.conftest import (
    Fleet,
    View,
    engine_metrics,
    handshakes,
    pd_request,
    post_json,
    read_view,
    wait_full,
    wait_until,
)

TTL = 5
KEYS = Keys()


@pytest.fixture(scope="module")
def fleet():
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    fleet = Fleet(etcd.endpoints, ttl=TTL)
    try:
        for _ in range(4):
            fleet.add("prefill")
        for _ in range(4):
            fleet.add("decode")
        fleet.wait_engines()
        fleet.started_at = time.monotonic()
        for node in fleet.nodes:
            fleet.start_agent(node)
        yield fleet
    finally:
        fleet.stop()
        etcd.stop()


@pytest.fixture
async def client(fleet):
    async with EtcdClient(fleet.etcd_config()) as etcd_client:
        yield etcd_client


async def test_4x4_all_links_established_before_the_first_request(fleet, client):
    view = await wait_full(client, fleet, timeout=60)
    print(f"4x4: all 16 links usable {time.monotonic() - fleet.started_at:.2f}s after the agents started")
    # Every pair handshaken exactly once: each engine served one p2p_initialize per peer.
    counts = fleet.handshake_counts()
    assert counts == {node.id: 4 for node in fleet.nodes}, counts
    for (p, d), link in view.links.items():
        assert link.state == "established" and link.handshake_ms is not None and link.established_at
        assert link.prefill_incarnation == view.engines[p].incarnation
        assert link.decode_incarnation == view.engines[d].incarnation
        assert link.protocol == "tcp"
    for node in fleet.nodes:
        record = view.engines[node.id]
        assert record.url == node.url and record.role == node.role and record.models == ["distserve-reference"]
        assert record.engine_kind == "null" and record.instance and record.incarnation.startswith(record.instance)
        assert record.engine_info.block_size == 16 and record.engine_info.kv_layout
        assert record.transfer.backend == "dlslime" and record.transfer.protocol == "tcp"
        assert view.leases[node.id] != 0  # under the agent's lease
        assert view.load[node.id].kv_blocks_total == 512
    # Load is published on change only: an idle engine's load record is not rewritten.
    load_key = KEYS.load(fleet.decodes[0].id)
    revision = (await client.get(load_key)).mod_revision
    await asyncio.sleep(1.5)
    assert (await client.get(load_key)).mod_revision == revision
    # The first requests use the recorded links; no engine handshakes again.
    for p in fleet.prefills:
        for d in fleet.decodes:
            assert pd_request(p.url, d.url)
    assert fleet.handshake_counts() == counts


async def test_restarting_only_agents_adopts_links_without_handshakes(fleet, client):
    before_view = await wait_full(client, fleet, timeout=30)
    before = fleet.handshake_counts()
    victims = [fleet.prefills[0], fleet.decodes[0]]
    for node in victims:
        node.agent.kill()  # SIGKILL: the lease and its records stay until the TTL runs out
    for node in victims:
        fleet.start_agent(node)

    async def re_registered() -> bool:
        view = await read_view(client)
        return all(view.leases.get(n.id) not in (None, before_view.leases[n.id]) for n in victims)

    await wait_until(re_registered, 20, "restarted agents registered under new leases")
    view = await wait_full(client, fleet, timeout=20)
    for node in victims:
        old, new = before_view.engines[node.id], view.engines[node.id]
        assert new.instance == old.instance  # same engine process...
        assert new.incarnation != old.incarnation  # ...under a new lease
    # Stay a full TTL: the old leases expire, and nothing they held is lost.
    await asyncio.sleep(TTL + 1)
    view = await wait_full(client, fleet, timeout=5)
    assert fleet.handshake_counts() == before, "a restarted agent handshook again"
    assert "adopted" in fleet.decodes[0].agent.output()
    for p in fleet.prefills:
        assert pd_request(p.url, fleet.decodes[0].url)


async def test_sigstopped_engines_turn_unhealthy_then_return(fleet, client):
    await wait_full(client, fleet, timeout=30)
    before = fleet.handshake_counts()
    victims = [fleet.prefills[1], fleet.decodes[1]]
    for node in victims:
        node.engine.signal(signal.SIGSTOP)
    try:
        async def unhealthy() -> bool:
            view = await read_view(client)
            return all(view.engines[n.id].state == "unhealthy" for n in victims)

        took = await wait_until(unhealthy, 10, "stopped engines marked unhealthy")
        print(f"SIGSTOP -> unhealthy in {took:.2f}s")
        assert took <= 3.0
        topo = (await read_view(client)).topology()
        for node in victims:
            assert node.id not in topo.routable_prefills + topo.routable_decodes
        assert len(topo.routable_prefills) == 3 and len(topo.routable_decodes) == 3
    finally:
        for node in victims:
            node.engine.signal(signal.SIGCONT)
    took = await wait_until(lambda: _full(client, fleet), 10, "routable again after SIGCONT")
    print(f"SIGCONT -> routable again in {took:.2f}s")
    assert fleet.handshake_counts() == before  # same engine processes: the links held


async def test_sigkill_of_prefill_and_agent_then_restart_on_same_port(fleet, client):
    before_view = await wait_full(client, fleet, timeout=30)
    victim = fleet.prefills[2]
    decode_before = {d.id: handshakes(d.url) for d in fleet.decodes}
    killed_at = time.monotonic()
    victim.agent.kill()
    victim.engine.kill()

    async def gone() -> bool:
        view = await read_view(client)
        return victim.id not in view.engines and not any(p == victim.id for p, _ in view.links)

    took = await wait_until(gone, TTL + 10, "record and links of the killed prefill gone")
    print(f"SIGKILL -> record and links gone in {took:.2f}s (TTL {TTL}s)")
    assert took <= TTL + 1
    assert time.monotonic() - killed_at <= TTL + 1.5

    async def dropped_on_decodes() -> bool:  # p2p_drop_connect reached every decode engine
        return all(engine_metrics(d.url)["distserve_engine_peers"] == 3 for d in fleet.decodes)

    # The decode agents hold the link for --link-hold (default: the TTL) in case only the lease was lost.
    await wait_until(dropped_on_decodes, TTL + 5, "decode engines dropped the dead prefill")

    fleet.start_engine(victim)  # same port: same engine id, a new engine process
    fleet.wait_engines()
    fleet.start_agent(victim)
    view = await wait_full(client, fleet, timeout=30)
    old, new = before_view.engines[victim.id], view.engines[victim.id]
    assert new.instance != old.instance and new.incarnation != old.incarnation
    for d in fleet.decodes:
        link = view.links[(victim.id, d.id)]
        assert link.prefill_incarnation == new.incarnation and link.prefill_instance == new.instance
        assert handshakes(d.url) == decode_before[d.id] + 1
    assert handshakes(victim.url) == len(fleet.decodes)
    assert all(engine_metrics(d.url)["distserve_engine_peers"] == 4 for d in fleet.decodes)
    assert pd_request(victim.url, fleet.decodes[3].url)


async def test_graceful_stop_revokes_within_200ms(fleet, client):
    await wait_full(client, fleet, timeout=30)
    victim = fleet.decodes[3]
    lease = (await read_view(client)).leases[victim.id]
    _, before_stop = await client.get_prefix(KEYS.engine(victim.id))
    victim.agent.signal(signal.SIGTERM)

    async def gone() -> bool:
        view = await read_view(client)
        return victim.id not in view.engines and not any(d == victim.id for _, d in view.links)

    took = await wait_until(gone, 5, "records of the stopped agent gone", interval=0.01)
    print(f"SIGTERM -> records gone in {took * 1000:.0f} ms")
    assert took <= 0.2
    assert await client.time_to_live(lease) == -1
    assert victim.agent.popen.wait(timeout=10) == 0
    # The last value before the delete says "draining: stopping", so watchers tell a graceful stop from
    # an expired lease (distserve-ctl watch prints "deregistered (graceful stop)").
    history = []
    async with asyncio.timeout(10):
        async for ev in watch_prefix(client, KEYS.engine(victim.id), start_revision=before_stop + 1):
            history.append(ev)
            if ev.type == "delete":
                break
    last_put = EngineRecord.decode([ev for ev in history if ev.type == "put"][-1].value)
    assert (last_put.state, last_put.state_reason) == ("draining", "stopping")
    fleet.start_agent(victim)
    await wait_full(client, fleet, timeout=30)


async def test_cordon_and_drain(fleet, client):
    await wait_full(client, fleet, timeout=30)
    cordoned, drained = fleet.decodes[2], fleet.prefills[3]
    await client.put(KEYS.state(cordoned.id), OperatorFlags(cordon=True, reason="test").encode())

    async def cordon_applied() -> bool:
        topo = (await read_view(client)).topology()
        return cordoned.id not in topo.routable_decodes and len(topo.routable_decodes) == 3

    await wait_until(cordon_applied, 5, "cordoned decode not routable")
    view = await read_view(client)
    assert view.engines[cordoned.id].state == "ready"  # cordon: no new requests, nothing else changes
    await client.delete(KEYS.state(cordoned.id))

    # Work in flight on the prefill: KV kept for a decode that has not pulled it yet.
    status, first = post_json(f"{drained.url}/v1/completions", {
        "model": "distserve-reference", "prompt": "x" * 100, "max_tokens": 1, "with_cache": True,
        "preserve_cache": True})
    assert status == 200
    assert engine_metrics(drained.url)["distserve_engine_preserved_blocks"] > 0
    await client.put(KEYS.state(drained.id), OperatorFlags(drain=True, reason="test").encode())

    async def draining() -> bool:
        view = await read_view(client)
        record, load = view.engines.get(drained.id), view.load.get(drained.id)
        return record is not None and record.state == "draining" and load is not None and load.preserved_blocks > 0

    await wait_until(draining, 5, "prefill draining, its in-flight work reported")
    await asyncio.sleep(2.0)  # well past drain_quiet: still registered, because work is in flight
    view = await read_view(client)
    assert view.engines[drained.id].state == "draining"
    assert drained.id not in view.topology().routable_prefills

    status, _ = post_json(f"{drained.url}/distserve/free_cache", {
        "remote_engine_id": drained.url, "remote_session_id": first["remote_session_id"]})
    assert status == 200

    async def deregistered() -> bool:
        view = await read_view(client)
        return drained.id not in view.engines and not any(p == drained.id for p, _ in view.links)

    took = await wait_until(deregistered, 10, "drained prefill deregistered once idle")
    print(f"drain: deregistered {took:.2f}s after the last work finished")
    assert drained.agent.alive()  # the agent waits for the flag to be cleared
    await client.delete(KEYS.state(drained.id))
    await wait_full(client, fleet, timeout=30)


async def _full(client: EtcdClient, fleet: Fleet) -> bool:
    view: View = await read_view(client)
    return (all(view.engines.get(n.id) is not None and view.engines[n.id].state == "ready" for n in fleet.nodes)
            and view.usable_links() == fleet.all_pairs())
