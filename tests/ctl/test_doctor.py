"""`doctor` against planted records: each kind of problem is found, and a clean cluster exits 0."""

from __future__ import annotations

import json
import time

from distserve.cluster.keys import Keys
from tests.ctl.plant import engine, link, load, router

KEYS = Keys()
# planted engines have fake URLs: leave the HTTP probe to the live-cluster test and to its own test below
OFFLINE = ("--skip", "reachability")


def _findings(res, check: str) -> list[dict]:
    return [f for f in res.json()["findings"] if f["check"] == check and f["severity"] == "problem"]


async def test_clean_cluster_exits_0(ctl, planter):
    await planter.small_cluster()
    res = ctl("doctor", *OFFLINE, "--json")
    assert res.rc == 0, res.out
    doc = res.json()
    assert doc["ok"] and doc["problems"] == 0
    assert set(doc["checks"]) == {"etcd", "stale-keys", "records", "routing", "geometry", "links", "incarnations",
                                  "engines", "routers", "clock"}
    table = ctl("doctor", *OFFLINE, "--table")
    assert table.rc == 0 and "no problems found" in table.out


async def test_planted_stale_key_and_geometry_mismatch(ctl, planter, etcd_client):
    engines = await planter.small_cluster()
    # a stale key: an engine record written without a lease (it would never go away)
    await etcd_client.put(KEYS.engine("P9"), engine("P9", "prefill", "http://127.0.0.1:1").encode())
    # a geometry mismatch: a decode for the same model with another block size
    await planter.engine(engine("D9", "decode", "http://127.0.0.1:1", block_size=32))
    res = ctl("doctor", *OFFLINE, "--json")
    assert res.rc == 1
    stale = _findings(res, "stale-keys")
    assert [(f["subject"], "no lease" in f["message"]) for f in stale] == [("engines/P9", True)]
    geometry = _findings(res, "geometry")
    assert {f["subject"] for f in geometry} == {"P1→D9", "P2→D9", "P9→D9"}
    assert all("block_size 16 != 32" in f["message"] and "D9 has no compatible partner" in f["message"]
               for f in geometry)
    table = ctl("doctor", *OFFLINE, "--table")
    assert table.rc == 1 and "engines/P9" in table.out and "block_size 16 != 32" in table.out
    assert "stale-keys FAILED" in table.out and "geometry FAILED" in table.out
    assert engines  # the rest of the cluster is untouched

    # fixing them makes the doctor happy again (D9 also lacks links: remove it)
    await etcd_client.delete(KEYS.engine("P9"))
    await etcd_client.delete(KEYS.engine("D9"))
    assert ctl("doctor", *OFFLINE).rc == 0


async def test_links_incarnations_routers_records_and_clock(ctl, planter, etcd_client):
    engines = await planter.small_cluster()
    # a decode without links (compatible, just not linked yet)
    await planter.engine(engine("D2", "decode", "http://127.0.0.1:1"))
    # a link naming an incarnation P2 no longer has
    await planter.link(link(engines["P2"].model_copy(update={"incarnation": "gone"}), engines["D1"]))
    # a router on a newer schema version (this tool cannot decode it: it says so)
    raw = json.loads(router("r2").encode())
    raw["schema_version"] = 2
    await etcd_client.put(KEYS.router("r2"), json.dumps(raw).encode(), lease=planter.lease)
    # a load record stamped 30 s in the future: that agent's clock runs ahead
    await planter.load(load("P1", updated_at=time.time() + 30))
    # a lease that is gone while its key remains cannot happen in etcd; a key with lease 0 can:
    await etcd_client.put(KEYS.load("H1"), load("H1").encode())
    res = ctl("doctor", *OFFLINE, "--json")
    assert res.rc == 1
    links = {f["subject"]: f["message"] for f in _findings(res, "links")}
    assert set(links) == {"D2", "P2"}
    assert "no link to any prefill engine" in links["D2"] and "1 link(s) recorded, none usable" in links["P2"]
    inc = _findings(res, "incarnations")
    assert [f["subject"] for f in inc] == ["P2→D1"] and "incarnation changed" in inc[0]["message"]
    assert "routers on different schema versions (v1: r1; v2: r2)" in _findings(res, "routers")[0]["message"]
    assert [f["subject"] for f in _findings(res, "records")] == ["routers/r2"]
    clock = _findings(res, "clock")
    assert [f["subject"] for f in clock] == ["load/P1"] and "ahead" in clock[0]["message"]
    assert [f["subject"] for f in _findings(res, "stale-keys")] == ["load/H1"]


async def test_unreachable_engine_urls(ctl, planter):
    await planter.small_cluster()  # every URL is http://127.0.0.1:1: nothing listens there
    res = ctl("doctor", "--json", "--http-timeout", "1")
    assert res.rc == 1
    subjects = sorted(f["subject"] for f in _findings(res, "reachability"))
    assert subjects == ["D1", "H1", "P1", "P2"]


def test_unhealthy_etcd_member(etcd_cluster3, monkeypatch):
    from tests.ctl.conftest import run_ctl_inprocess

    monkeypatch.setenv("COLUMNS", "250")
    victim = (etcd_cluster3.leader_index() + 1) % 3
    etcd_cluster3.members[victim].kill()
    res = run_ctl_inprocess(etcd_cluster3.endpoints, "doctor", "--json", "--etcd-timeout", "2")
    assert res.rc == 1
    etcd = _findings(res, "etcd")
    assert len(etcd) == 1 and "member unhealthy" in etcd[0]["message"]
    assert etcd_cluster3.members[victim].client_url in etcd[0]["subject"] or etcd[0]["subject"] == etcd_cluster3.members[victim].name
