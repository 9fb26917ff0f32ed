"""Operator writes: drain/cordon/uncordon flags, drain --wait (planted load and router records), routing config."""

from __future__ import annotations

import asyncio
import json

from distserve.cluster.keys import Keys
from distserve.cluster.records import OperatorFlags, RoutingConfig
from tests.ctl.conftest import ctl_argv, ctl_env
from tests.ctl.plant import load, router

KEYS = Keys()


async def _flags(client, engine_id: str) -> OperatorFlags | None:
    kv = await client.get(KEYS.state(engine_id))
    return OperatorFlags.decode(kv.value) if kv else None


async def test_cordon_drain_uncordon_table_and_json(ctl, planter, etcd_client):
    await planter.small_cluster()
    res = ctl("cordon", "D1", "--reason", "bad NIC", "--table")
    assert res.rc == 0 and "D1 cordoned" in res.out
    flags = await _flags(etcd_client, "D1")
    assert flags.cordon and not flags.drain and flags.reason == "bad NIC" and "@" in flags.updated_by
    kv = await etcd_client.get(KEYS.state("D1"))
    assert kv.lease == 0  # operator intent survives restarts: no lease

    doc = ctl("drain", "D1", "--json").json()
    assert doc["flags"]["drain"] and doc["flags"]["cordon"]  # drain keeps the cordon
    assert doc["revision"] == (await etcd_client.get(KEYS.state("D1"))).mod_revision
    # the shared routability rule now excludes D1 (and P1, P2 lose their only decode)
    engines = {r["id"]: r for r in ctl("engines").json()["engines"]}
    assert not engines["D1"]["routable"] and not engines["P1"]["routable"]
    assert engines["D1"]["flags"]["drain"]

    doc = ctl("uncordon", "D1", "--json").json()
    assert doc["flags"] is None and await _flags(etcd_client, "D1") is None
    assert ctl("engines").json()["engines"][0]["routable"]
    assert "takes new requests" in ctl("uncordon", "D1", "--table").out

    # an id that is not registered needs --force (pre-cordon a machine before it joins)
    assert ctl("cordon", "D7").rc == 1
    assert ctl("cordon", "D7", "--force").rc == 0 and (await _flags(etcd_client, "D7")).cordon
    assert ctl("uncordon", "D7").rc == 0  # clearing a flag of an unregistered id is allowed
    assert ctl("cordon", "bad/id", "--force").rc == 2  # a malformed id is a bad argument, not an unknown one


async def test_drain_wait_returns_when_work_is_done_and_routers_applied_the_flag(planter, etcd, etcd_client):
    await planter.small_cluster()
    await planter.load(load("D1", running=2, waiting=1))
    await planter.router(router("r1", view_revision=1))
    proc = await asyncio.create_subprocess_exec(
        *ctl_argv("drain", "D1", "--wait", "--timeout", "60", "--json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ctl_env(etcd.endpoints))

    async def still_waiting(seconds: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"drain --wait returned early: {(await proc.stderr.read()).decode()}")

    # the flag is written first
    for _ in range(100):
        if (flags := await _flags(etcd_client, "D1")) is not None:
            break
        await asyncio.sleep(0.05)
    assert flags.drain
    flag_rev = (await etcd_client.get(KEYS.state("D1"))).mod_revision
    await still_waiting(1.0)
    # work finishes, but router r1 has not applied the flag yet: a new request could still arrive
    await planter.load(load("D1", running=0, waiting=0))
    await still_waiting(2.5)
    # r1's view passes the flag's revision: it will not pick D1 again
    await planter.router(router("r1", view_revision=flag_rev))
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["drained"] and doc["in_flight"] == 0 and doc["routers_acknowledged"] == ["r1"]


async def test_drain_wait_times_out_with_exit_1(ctl, planter):
    await planter.small_cluster()
    await planter.load(load("D1", running=3))
    res = ctl("drain", "D1", "--wait", "--timeout", "1")
    assert res.rc == 1
    assert "timed out after 1 s waiting for D1 to drain: 3 request(s) in flight" in res.err
    assert len(res.err.strip().splitlines()) == 1


async def test_drain_wait_ends_when_the_engine_deregisters(ctl, planter, etcd_client):
    await planter.small_cluster()
    await planter.load(load("D1", running=3))

    async def deregister_later() -> None:
        await asyncio.sleep(1.0)
        await etcd_client.delete(KEYS.engine("D1"))

    task = asyncio.create_task(deregister_later())
    res = await asyncio.to_thread(ctl, "drain", "D1", "--wait", "--timeout", "30", "--json")
    await task
    assert res.rc == 0, res.err
    assert res.json()["deregistered"]


async def test_config_get_set_unset_table_and_json(ctl, planter, etcd_client):
    await planter.small_cluster()
    doc = ctl("config", "get").json()
    assert doc["default"] and doc["config"]["strategy"] == "min_expected_latency"
    assert "defaults (no config written)" in ctl("config", "get", "--table").out

    assert ctl("config", "set", "strategy", "prefix_affinity").json()["value"] == "prefix_affinity"
    assert ctl("config", "set", "weights.P1", "2.5", "--table").rc == 0
    assert ctl("config", "set", "params.prefix_chars", "256").json()["config"]["params"] == {"prefix_chars": 256}
    assert ctl("config", "set", "params.load_factor", "1.5").json()["value"] == 1.5
    stored = RoutingConfig.decode((await etcd_client.get(KEYS.config())).value)
    assert stored.strategy == "prefix_affinity" and stored.weights == {"P1": 2.5}
    assert stored.params == {"prefix_chars": 256, "load_factor": 1.5}

    assert ctl("config", "get", "weights.P1").json()["value"] == 2.5
    assert ctl("config", "get", "weights.P2").json()["value"] == 1.0  # not listed: weight 1
    assert ctl("config", "get", "strategy", "--table").out.strip() == "prefix_affinity"
    table = ctl("config", "get", "--table").out
    assert "weights.P1" in table and "params.prefix_chars" in table

    assert ctl("config", "unset", "weights.P1").rc == 0
    assert RoutingConfig.decode((await etcd_client.get(KEYS.config())).value).weights == {}

    # validation: one line, exit 2 (a bad argument), nothing written
    before = (await etcd_client.get(KEYS.config())).mod_revision
    for argv, text in ((["strategy", "fastest"], "unknown strategy 'fastest': choose one of"),
                       (["weights.P1", "0"], "weights.P1: Input should be greater than 0"),
                       (["weights.P1", "nan"], "weights.P1: Input should be a finite number"),
                       (["weights.P1", "heavy"], "is not a number"),
                       (["weights.bad/id", "1"], "bad key"),
                       (["colour", "red"], "unknown config key 'colour'"),
                       (["weights", "1"], "set one entry at a time")):
        res = ctl("config", "set", *argv)
        assert res.rc == 2 and text in res.err and len(res.err.strip().splitlines()) == 1, (argv, res.err)
    assert (await etcd_client.get(KEYS.config())).mod_revision == before
    assert ctl("config", "unset", "weights.P9").rc == 1
    # a weight for an engine not registered yet is accepted with a note
    res = ctl("config", "set", "weights.P9", "3")
    assert res.rc == 0 and "not registered" in res.err
