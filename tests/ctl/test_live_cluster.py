"""Every distserve-ctl command against a live cluster: real etcd, null engines registered by their real
agents, two real router replicas (all separate processes). Tests run in file order; destructive last."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.ctl.conftest import ctl_argv, ctl_env, run_ctl_inprocess
from tests.ctl.live import LiveCluster, http_json, metric, wait_for

PREFILLS = ["P-0", "P-1"]
DECODES = ["D-0", "D-1"]
ROUTERS = ["r1", "r2"]
MODEL_KEY = "model"


@pytest.fixture(scope="module")
def live():
    cluster = LiveCluster(ttl=2)
    try:
        cluster.start_engines("P", "prefill", 2)
        cluster.start_engines("D", "decode", 2)
        for router_id in ROUTERS:
            cluster.start_router(router_id)
        cluster.wait_engines(PREFILLS + DECODES)
        cluster.wait_routers_ready(ROUTERS)

        def ready() -> bool:
            doc = run_ctl_inprocess(cluster.endpoints, "--cluster", cluster.name, "status", "--json").json()
            return doc["links"]["usable"] == 4 and doc["routers"]["total"] == 2
        wait_for(ready, 60, "4 usable links and 2 routers")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ctl(live, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")

    def call(*args: str, **kwargs):
        return run_ctl_inprocess(live.endpoints, "--cluster", live.name, *args, **kwargs)

    return call


def test_read_commands_table_and_json(live, ctl):
    status = ctl("status", "--json").json()
    assert status["etcd"]["healthy"] and status["engines"]["total"] == 4
    assert status["engines"]["by_role"] == {"prefill": {"ready": 2}, "decode": {"ready": 2}, "hybrid": {}}
    assert status["links"] == {"recorded": 4, "established": 4, "usable": 4, "possible": 4}
    assert status["routers"]["ids"] == ROUTERS and status["warnings"] == []
    model = status["models"][0]["model"]
    assert status["models"] == [{"model": model, "routable": True}]
    table = ctl("status", "--table").out
    assert "links: 4 usable, 4 established of 4 possible" in table and "no warnings" in table

    engines = {r["id"]: r for r in ctl("engines", "--json").json()["engines"]}
    assert set(engines) == set(PREFILLS + DECODES)
    for engine_id, row in engines.items():
        assert row["url"] == live.urls[engine_id] and row["state"] == "ready" and row["routable"]
        assert row["links"]["usable"] == 2 and row["load"] is not None and row["load"]["in_flight"] == 0
        assert 0 <= row["lease"]["ttl_left_s"] <= live.ttl and row["incarnation"]
        assert row["models"] == [model] and row["engine_kind"] == "null"
    table = ctl("engines", "--table").out
    for engine_id in engines:
        assert engine_id in table and live.urls[engine_id] in table

    links = ctl("links", "--json").json()
    assert {(r["prefill_id"], r["decode_id"]) for r in links["links"]} == {(p, d) for p in PREFILLS for d in DECODES}
    assert all(r["usable"] and r["handshake_ms"] > 0 for r in links["links"])
    assert "4 usable of 4 possible" in ctl("links", "--table").out

    routers = {r["id"]: r for r in ctl("routers", "--json").json()["routers"]}
    assert set(routers) == set(ROUTERS)
    assert routers["r1"]["url"] == live.urls["r1"] and routers["r1"]["version"]
    assert "r2" in ctl("routers", "--table").out

    models = ctl("models", "--json").json()["models"]
    assert models[0]["routable_engines"]["prefill"] == PREFILLS and models[0]["routable_engines"]["decode"] == DECODES
    assert model in ctl("models", "--table").out

    doc = ctl("describe", "engine", "D-0", "--json").json()
    assert doc["record"]["transfer"]["protocol"] == "tcp" and doc["record"]["transfer"]["backend"] == "dlslime"
    assert doc["record"]["engine_info"]["block_size"] > 0 and len(doc["links"]) == 2
    assert "transfer.protocol" in ctl("describe", "engine", "D-0", "--table").out
    assert ctl("describe", "link", "P-0/D-1", "--json").json()["summary"]["usable"]
    assert "P-0" in ctl("describe", "link", "P-0→D-1", "--table").out
    assert ctl("describe", "router", "r2").json()["record"]["url"] == live.urls["r2"]
    assert "routers/r2" in ctl("describe", "router", "r2", "--table").out
    assert ctl("describe", "engine", "X-9").rc == 1

    frame = ctl("top", "--once", "--json").lines()[0]
    assert {e["id"] for e in frame["engines"]} == set(PREFILLS + DECODES) and len(frame["routers"]) == 2
    assert "REQ/S" in ctl("top", "--once", "--table").out

    export = ctl("export").json()
    assert export["revision"] >= status["revision"] and export["count"] >= 4 + 4 + 4 + 2
    assert f"{live.name}" in ctl("export", "--table").out


def test_doctor_is_clean_on_a_healthy_cluster(ctl):
    res = ctl("doctor", "--json")
    assert res.rc == 0, res.out
    assert res.json()["checks"]["reachability"] == "ok" and res.json()["checks"]["clock"] == "ok"
    assert "no problems found" in ctl("doctor", "--table").out


def _complete(router_url: str, model: str, prompt: str) -> dict:
    return http_json(f"{router_url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8})


def test_cordon_is_honoured_and_config_hot_reloads(live, ctl):
    model = ctl("models", "--json").json()["models"][0]["model"]
    assert ctl("cordon", "P-0", "--table").rc == 0
    # every router stops picking P-0 (its /health/ready counts routable prefills)
    for router_id in ROUTERS:
        wait_for(lambda r=router_id: http_json(f"{live.urls[r]}/health/ready")["prefill"] == 1, 10, f"{router_id} sees the cordon")
    before = metric(live.urls["P-0"], "distserve_engine_requests_total")
    for i in range(6):
        _complete(live.urls[ROUTERS[i % 2]], model, f"cordoned {i}")
    assert metric(live.urls["P-0"], "distserve_engine_requests_total") == before
    assert ctl("uncordon", "P-0", "--json").json()["flags"] is None
    for router_id in ROUTERS:
        wait_for(lambda r=router_id: http_json(f"{live.urls[r]}/health/ready")["prefill"] == 2, 10, f"{router_id} sees the uncordon")

    assert ctl("config", "set", "strategy", "round_robin").rc == 0
    for router_id in ROUTERS:
        wait_for(lambda r=router_id: http_json(f"{live.urls[r]}/health/ready")["strategy"] == "round_robin", 10,
                 f"{router_id} reloads the strategy")
    assert ctl("config", "get", "strategy", "--table").out.strip() == "round_robin"
    assert ctl("config", "set", "strategy", "min_expected_latency").rc == 0


async def test_watch_tells_drain_deregistration_and_lease_expiry_apart(live, ctl):
    start = ctl("status", "--json").json()["revision"] + 1
    proc = await asyncio.create_subprocess_exec(
        *ctl_argv("--cluster", live.name, "watch", "--since-rev", str(start), "--table"),
        stdout=asyncio.subprocess.PIPE, env=ctl_env(live.endpoints))
    lines: list[str] = []

    async def until(text: str, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for line in lines:
                if text in line:
                    return line
            line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - loop.time()))
            lines.append(line.decode().rstrip())

    try:
        # drain: the agent marks D-1 draining, and with no work in flight deregisters it
        assert ctl("drain", "D-1", "--wait", "--timeout", "30").rc == 0
        await until("D-1 draining", 10)
        await until("engine D-1 draining", 10)
        await until("engine D-1 deregistered (graceful stop)", 10)
        await until("link P-0→D-1 removed", 10)
        # uncordon: it registers again and its links are re-established (real handshakes, timed)
        assert ctl("uncordon", "D-1").rc == 0
        await until("engine D-1 registered", 20)
        assert "ms (tcp)" in await until("link P-1→D-1 established in", 20)
        # a crash: the prefill process dies; its agent cannot revoke, the leases expire (TTL 2 s)
        live.procs["P"].signal(signal.SIGKILL)
        line = await until("engine P-0 lease expired", live.ttl + 8)
        await until("engine P-1 lease expired", 5)
        # a router replica leaves and a new one joins
        live.procs["r2"].stop()
        await until("router r2 left", 10)
        live.start_router("r3")
        await until("router r3 joined at", 30)
    finally:
        proc.kill()
        await proc.wait()
    assert line.split()[0].isdigit()  # each line starts with its revision
    # after the crash the doctor reports the prefills' absence as problems
    res = ctl("doctor", "--json")
    assert res.rc == 1
    assert {f["subject"] for f in res.json()["findings"] if f["check"] == "links"} == set(DECODES)
