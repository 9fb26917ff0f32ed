"""Every read command, in table and JSON form, against records planted in a real etcd.

(tests/ctl/test_live_cluster.py runs them again against real engines, agents and routers.)
"""

from __future__ import annotations

import asyncio
import json

from distserve.cluster.keys import Keys
from distserve.cluster.records import OperatorFlags
from tests.ctl.conftest import ctl_argv, ctl_env
from tests.ctl.plant import engine, link, load, router


async def test_engines_table_and_json(ctl, planter, etcd_client):
    await planter.small_cluster()
    await etcd_client.put(Keys().state("P2"), OperatorFlags(cordon=True, reason="disk").encode())
    doc = ctl("engines", "--json").json()
    rows = {r["id"]: r for r in doc["engines"]}
    assert set(rows) == {"P1", "P2", "D1", "H1"}
    p1 = rows["P1"]
    assert p1["role"] == "prefill" and p1["url"] == "http://127.0.0.1:1" and p1["models"] == ["tiny"]
    assert p1["state"] == "ready" and p1["routable"] and p1["links"] == {"usable": 1, "total": 1, "peers": ["D1"]}
    assert p1["load"]["running"] == 1 and p1["load"]["kv_blocks_total"] == 64
    assert 50 <= p1["lease"]["ttl_left_s"] <= 60 and p1["incarnation"] and p1["incarnation_age_s"] >= 0
    assert rows["P2"]["flags"]["cordon"] and not rows["P2"]["routable"]
    assert rows["P2"]["not_routable_because"] == "cordoned by an operator"
    assert rows["D1"]["links"]["usable"] == 2
    assert doc["revision"] > 0
    # filters
    assert [r["id"] for r in ctl("engines", "--role", "decode").json()["engines"]] == ["D1"]
    assert [r["id"] for r in ctl("engines", "--model", "other").json()["engines"]] == ["H1"]

    table = ctl("--table", "engines")
    assert table.rc == 0, table.err
    for header in ("ID", "ROLE", "URL", "MODELS", "STATE", "FLAGS", "LOAD", "LINKS", "LEASE TTL", "INCARNATION AGE"):
        assert header in table.out
    p2_line = next(line for line in table.out.splitlines() if "│ P2 " in line)
    assert "cordon" in p2_line and "not routable" in p2_line and "1r/0w" in p2_line


async def test_links_table_and_json(ctl, planter):
    engines = await planter.small_cluster()
    # a link whose prefill came back with a new incarnation: recorded but not usable
    stale = engine("P3", "prefill", "http://127.0.0.1:1")
    await planter.engine(stale)
    await planter.link(link(stale.model_copy(update={"incarnation": "old"}), engines["D1"]))
    doc = ctl("links", "--json").json()
    rows = {(r["prefill_id"], r["decode_id"]): r for r in doc["links"]}
    assert rows[("P1", "D1")]["usable"] and rows[("P1", "D1")]["handshake_ms"] == 12.0
    assert not rows[("P3", "D1")]["usable"]
    assert rows[("P3", "D1")]["problems"] == ["prefill P3 incarnation changed"]
    assert doc["usable"] == 2 and doc["possible"] == 3
    assert [(r["prefill_id"], r["decode_id"]) for r in ctl("links", "--engine", "P1").json()["links"]] == [("P1", "D1")]
    table = ctl("links", "--table")
    assert table.rc == 0 and "2 usable of 3 possible" in table.out
    assert "incarnation changed" in table.out and "12 ms" in table.out


async def test_routers_and_models_table_and_json(ctl, planter):
    await planter.small_cluster()
    routers = ctl("routers").json()["routers"]  # JSON because stdout is not a terminal
    assert [r["id"] for r in routers] == ["r1"] and routers[0]["strategy"] == "min_expected_latency"
    assert "r1" in ctl("routers", "--table").out
    models = {m["model"]: m for m in ctl("models", "--json").json()["models"]}
    assert models["tiny"]["routable"] and models["tiny"]["engines"]["prefill"] == ["P1", "P2"]
    assert models["other"]["routable_engines"]["hybrid"] == ["H1"]
    table = ctl("--table", "models").out
    assert "tiny" in table and "2/2" in table


async def test_status_table_and_json(ctl, planter, etcd):
    await planter.small_cluster()
    await planter.engine(engine("D2", "decode", "http://127.0.0.1:1", state="unhealthy", state_reason="probe failed"))
    doc = ctl("status").json()
    assert doc["etcd"]["healthy"] and doc["etcd"]["leader"] and len(doc["etcd"]["members"]) == 1
    assert doc["engines"]["total"] == 5
    assert doc["engines"]["by_role"]["decode"] == {"ready": 1, "unhealthy": 1}
    assert doc["links"] == {"recorded": 2, "established": 2, "usable": 2, "possible": 4}
    assert doc["routers"]["ids"] == ["r1"]
    assert {m["model"] for m in doc["models"]} == {"tiny", "other"}
    assert "engine D2 unhealthy: probe failed" in doc["warnings"]
    table = ctl("status", "--table")
    assert table.rc == 0
    for text in ("etcd members", etcd.client_url, "engines (5)", "links: 2 usable, 2 established of 4 possible",
                 "routers: 1 (r1)", "models: ", "warnings:", "engine D2 unhealthy"):
        assert text in table.out, text


async def test_describe_engine_link_router(ctl, planter):
    await planter.small_cluster()
    doc = ctl("describe", "engine", "P1", "--json").json()
    assert doc["record"]["transfer"]["ranks"][0]["host"] == "127.0.0.1"  # transfer metadata
    assert doc["record"]["engine_info"]["block_size"] == 16
    assert doc["etcd"]["lease"] == planter.lease and doc["etcd"]["lease_ttl_left_s"] > 0
    assert doc["summary"]["routable"] and doc["counterparts"] == [
        {"engine": "D1", "compatible": True, "mismatch": None, "linked": True}]
    table = ctl("--table", "describe", "engine", "P1").out
    assert "transfer.protocol" in table and "tcp" in table and "counterparts" in table

    for link_id in (["P1/D1"], ["P1→D1"], ["P1", "D1"]):
        doc = ctl("describe", "link", *link_id, "--json").json()
        assert doc["id"] == "P1/D1" and doc["summary"]["usable"], link_id
        assert doc["engines"]["decode"]["transfer"]["protocol"] == "tcp"
    assert "prefill engine" in ctl("--table", "describe", "link", "P1/D1").out

    doc = ctl("describe", "router", "r1").json()
    assert doc["record"]["url"] == "http://127.0.0.1:9"
    assert "routers/r1" in ctl("--table", "describe", "router", "r1").out


async def test_unknown_ids_exit_1_with_a_clear_message(ctl, planter):
    await planter.small_cluster()
    for argv, text in ((["describe", "engine", "nope"], "unknown engine 'nope'; known engines: D1, H1, P1, P2"),
                       (["describe", "link", "P1/D9"], "unknown link 'P1/D9'"),
                       (["describe", "router", "r9"], "unknown router 'r9'; known routers: r1"),
                       (["drain", "nope"], "unknown engine 'nope'"),
                       (["cordon", "nope"], "unknown engine 'nope'"),
                       (["uncordon", "nope"], "unknown engine 'nope'")):
        res = ctl(*argv)
        assert res.rc == 1, (argv, res.rc, res.err)
        assert res.err.strip() == f"distserve-ctl: {text}" or res.err.strip().startswith(f"distserve-ctl: {text}"), res.err
        assert len(res.err.strip().splitlines()) == 1


async def test_export_is_the_whole_key_space_at_one_revision(ctl, planter, etcd_client):
    await planter.small_cluster()
    await etcd_client.put(Keys().root + "odd", b"\xff\x00")
    doc = ctl("export").json()
    kvs, revision = await etcd_client.get_prefix(Keys().root)
    assert doc["revision"] == revision and doc["count"] == len(kvs)
    assert [e["key"] for e in doc["keys"]] == [kv.key for kv in kvs]
    engine_entry = next(e for e in doc["keys"] if e["key"].endswith("/engines/P1"))
    assert engine_entry["value"]["id"] == "P1" and engine_entry["lease"] == planter.lease
    assert engine_entry["kind"] == "engines" and engine_entry["ids"] == ["P1"]
    assert next(e for e in doc["keys"] if e["key"].endswith("/odd"))["value_base64"] == "/wA="
    table = ctl("export", "--table").out
    assert f"revision {revision}" in table and "engines/P1" in table


async def test_top_frames_follow_the_watch(ctl, planter, etcd_client, etcd):
    await planter.small_cluster()
    once = ctl("top", "--once", "--json").lines()
    assert len(once) == 1 and {e["id"] for e in once[0]["engines"]} == {"P1", "P2", "D1", "H1"}
    table = ctl("top", "--once", "--table").out
    assert "RUNNING" in table and "REQ/S" in table and "r1" in table

    # three frames 1.5 s apart; changes while it runs must show in the later frames (it follows a watch)
    proc = await asyncio.create_subprocess_exec(*ctl_argv("top", "--iterations", "3", "--interval", "1.5", "--json"),
                                                stdout=asyncio.subprocess.PIPE, env=ctl_env(etcd.endpoints))
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    await planter.load(load("P1", running=7, waiting=3))
    await planter.router(router("r1", requests_total=100, in_flight=4))
    await asyncio.sleep(0.1)
    await planter.router(router("r1", requests_total=150, in_flight=4))
    rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    frames = [json.loads(first)] + [json.loads(x) for x in rest.splitlines()]
    assert proc.returncode == 0 and len(frames) == 3
    p1 = [next(e for e in f["engines"] if e["id"] == "P1") for f in frames]
    assert p1[0]["running"] == 1 and (p1[-1]["running"], p1[-1]["waiting"]) == (7, 3)
    r1 = frames[-1]["routers"][0]
    assert r1["in_flight"] == 4 and frames[-1]["totals"]["router_in_flight"] == 4
    assert r1["requests_total"] == 150 and r1["requests_per_s"] > 0  # 50 requests between two records
