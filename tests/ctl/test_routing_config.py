"""The routing config's one schema on the operator side: `config set` refuses what routers would refuse (one
line, exit 2, nothing written), and a bad value written around it (etcdctl) is reported by `doctor` and
`status`, and repaired key by key with `config set|unset`."""

from __future__ import annotations

import json

from distserve.cluster.keys import Keys
from distserve.cluster.records import RoutingConfig

KEYS = Keys()
OFFLINE = ("--skip", "reachability")


async def _revision(client) -> int | None:
    kv = await client.get(KEYS.config())
    return kv.mod_revision if kv else None


async def test_config_set_refuses_values_outside_the_schema(ctl, planter, etcd_client):
    await planter.small_cluster()
    assert ctl("config", "set", "strategy", "prefix_affinity").rc == 0
    before = await _revision(etcd_client)
    for argv, text in ((["params.load_factor", "abc"], "params.load_factor: Input should be a valid number"),
                       (["params.load_factor", "0.5"], "params.load_factor: Input should be greater than or equal to 1"),
                       (["params.vnodes", "100000000"], "params.vnodes: Input should be less than or equal to 1024"),
                       (["params.vnodes", "true"], "params.vnodes: Input should be a valid integer"),
                       (["params.prefix_chars", "0"], "params.prefix_chars: Input should be greater than or equal to 1"),
                       (["params.mode", "fast"], "params.mode is not a parameter of strategy prefix_affinity"),
                       (["weights.P1", "1000"], "weights.P1: Input should be less than or equal to 100"),
                       (["weights.P1", "-1"], "weights.P1: Input should be greater than 0"),
                       (["weights.P1", "inf"], "weights.P1: Input should be a finite number")):
        res = ctl("config", "set", *argv)
        assert res.rc == 2, (argv, res.rc, res.err)
        assert text in res.err and len(res.err.strip().splitlines()) == 1, (argv, res.err)
        assert "Traceback" not in res.err
    assert await _revision(etcd_client) == before, "a refused value must not be written"

    # params are per strategy: switching to one that does not take a param set says which one to unset
    assert ctl("config", "set", "params.vnodes", "128").rc == 0
    res = ctl("config", "set", "strategy", "round_robin")
    assert res.rc == 2 and "does not take params.vnodes" in res.err and "config unset params.vnodes" in res.err
    assert ctl("config", "unset", "params.vnodes").rc == 0
    assert ctl("config", "set", "strategy", "round_robin").rc == 0
    res = ctl("config", "set", "params.load_factor", "2")
    assert res.rc == 2 and "not a parameter of strategy round_robin (its parameters: none)" in res.err
    # the bounds themselves are accepted
    assert ctl("config", "set", "weights.P1", "100").rc == 0
    assert ctl("config", "set", "strategy", "prefix_affinity").rc == 0
    assert ctl("config", "set", "params.vnodes", "1024").rc == 0
    stored = RoutingConfig.decode((await etcd_client.get(KEYS.config())).value)
    assert stored.weights == {"P1": 100.0} and stored.params == {"vnodes": 1024}


async def test_doctor_and_status_report_an_invalid_stored_config_and_set_repairs_it(ctl, planter, etcd_client):
    await planter.small_cluster()
    assert ctl("doctor", *OFFLINE, "--json").rc == 0
    # what `etcdctl put` can write: the schema refuses it, so every router ignores it
    bad = {"schema_version": 1, "strategy": "prefix_affinity", "weights": {"P1": 2.0},
           "params": {"load_factor": "abc", "prefix_chars": 128}, "updated_at": 1.0}
    await etcd_client.put(KEYS.config(), json.dumps(bad).encode())
    revision = await _revision(etcd_client)

    res = ctl("doctor", *OFFLINE, "--json")
    assert res.rc == 1, res.out
    doc = res.json()
    assert doc["checks"]["routing"] == "problems" and doc["checks"]["records"] == "ok"
    [finding] = [f for f in doc["findings"] if f["check"] == "routing"]
    assert finding["severity"] == "problem" and finding["subject"] == "config/routing"
    assert f"revision {revision}" in finding["message"] and "params.load_factor" in finding["message"]
    assert "'abc'" in finding["message"] and "last good config" in finding["message"]
    assert "invalid routing config" in ctl("doctor", *OFFLINE, "--table").out

    doc = ctl("status").json()
    assert doc["routing"] == {"strategy": None, "revision": revision, "valid": False,
                              "error": "params.load_factor: Input should be a valid number (got 'abc')"}
    assert any("routing config" in w and "invalid" in w and "load_factor" in w for w in doc["warnings"])
    assert not any("unreadable value" in w for w in doc["warnings"])
    assert f"routing: INVALID config at revision {revision}" in ctl("status", "--table").out

    res = ctl("config", "get")
    assert res.rc == 1 and "params.load_factor" in res.err and len(res.err.strip().splitlines()) == 1

    # repaired by setting the bad key: the rest of what the operator wrote stays
    assert ctl("config", "set", "params.load_factor", "1.5").rc == 0, ctl("config", "get").err
    stored = RoutingConfig.decode((await etcd_client.get(KEYS.config())).value)
    assert stored.strategy == "prefix_affinity" and stored.weights == {"P1": 2.0}
    assert stored.params == {"load_factor": 1.5, "prefix_chars": 128}
    assert ctl("doctor", *OFFLINE, "--json").rc == 0
    doc = ctl("status").json()
    assert doc["routing"]["valid"] and doc["routing"]["strategy"] == "prefix_affinity"

    # an unknown strategy is repaired by setting the strategy; an unknown param by unsetting it
    await etcd_client.put(KEYS.config(), json.dumps({**bad, "params": {"ring": 9}}).encode())
    res = ctl("config", "set", "weights.P2", "3")
    assert res.rc == 2 and "params.ring is not a parameter of strategy prefix_affinity" in res.err
    assert ctl("config", "unset", "params.ring").rc == 0
    assert RoutingConfig.decode((await etcd_client.get(KEYS.config())).value).params == {}
