"""The agent's parts on their own: configuration, metrics and load mapping, link compatibility, back-off,
and the CLI's answers to bad input (real processes, real etcd where one is needed)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from discovery.backoff import delay_for
from distserve.agent.config import AgentConfig
from distserve.agent.engine_client import Metrics, instance_from
from distserve.agent.links import incompatibility
from distserve.agent.load import load_from_metrics, same_load
from distserve.cluster.records import EngineGeometry, EngineRecord, TransferInfo
from distserve.testing.ports import free_port_range as consecutive_free_ports
from tests.util import REPO, Proc, free_port, spawn_engine


def test_config_normalizes_urls_and_derives_the_engine_id():
    config = AgentConfig(engine_url="127.0.0.1:8001", role="prefill")
    assert config.engine_url == "http://127.0.0.1:8001"
    assert config.url == "http://127.0.0.1:8001" and config.id == "127.0.0.1-8001"
    assert AgentConfig(engine_url="http://e:1", role="decode", engine_id="p-0").id == "p-0"


def test_config_never_advertises_a_wildcard_address():
    config = AgentConfig(engine_url="http://0.0.0.0:9000", role="decode")
    assert "0.0.0.0" not in config.url and config.url.endswith(":9000")
    with pytest.raises(ValidationError, match="wildcard"):
        AgentConfig(engine_url="http://127.0.0.1:9000", role="decode", advertise_url="http://0.0.0.0:9000")


@pytest.mark.parametrize("field, value, message", [
    ("engine_url", "ftp://x:1", "scheme"),
    ("engine_url", "http://x:1/v1", "host:port only"),
    ("role", "router", "role"),
    ("engine_id", "a/b", "invalid engine id"),
    ("ttl", 0, "ttl"),
    ("rdma_link_type", "ethernet", "IB or RoCE"),
])
def test_config_rejects_bad_values(field, value, message):
    values = {"engine_url": "http://127.0.0.1:1", "role": "prefill", field: value}
    with pytest.raises(ValidationError, match=message):
        AgentConfig(**values)


def test_token_is_secret():
    config = AgentConfig(engine_url="http://127.0.0.1:1", role="prefill", cluster_token="s3cret")
    assert config.token == "s3cret"
    assert "s3cret" not in repr(config) and "s3cret" not in config.describe()


def test_prometheus_text_is_summed_over_labels():
    text = """# HELP lmdeploy:num_requests_running x
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{model_name="m",engine="0"} 2.0
lmdeploy:num_requests_running{model_name="m",engine="1"} 3.0
lmdeploy:gpu_cache_usage_perc{model_name="m {odd}",engine="0"} 0.5 1700000000000
process_start_time_seconds 1.7e9
broken_line
nan_metric NaN
"""
    values = Metrics.parse(text).values
    assert values["lmdeploy:num_requests_running"] == 5.0
    assert values["lmdeploy:gpu_cache_usage_perc"] == 0.5
    assert values["process_start_time_seconds"] == 1.7e9
    assert "broken_line" not in values and "nan_metric" not in values


def test_load_from_reference_and_lmdeploy_metrics():
    reference = {"distserve_engine_requests_running": 3, "distserve_engine_requests_waiting": 4,
                 "distserve_engine_kv_blocks_used": 10, "distserve_engine_kv_blocks_free": 90,
                 "distserve_engine_prefill_tokens_pending": 120, "distserve_engine_preserved_blocks": 2}
    load = load_from_metrics("e", reference, 100)
    assert (load.running, load.waiting, load.kv_blocks_free, load.kv_blocks_total) == (3, 4, 90, 100)
    assert (load.prefill_tokens_pending, load.preserved_blocks, load.in_flight) == (120, 2, 7)
    lmdeploy = {"lmdeploy:num_requests_running": 1, "lmdeploy:num_requests_waiting": 0,
                "lmdeploy:gpu_cache_usage_perc": 0.9}
    load = load_from_metrics("e", lmdeploy, 1000)
    assert (load.running, load.kv_blocks_free, load.kv_blocks_total) == (1, 100, 1000)
    assert load.prefill_tokens_pending is None
    assert load_from_metrics("e", None, 100) is None
    assert load_from_metrics("e", {"something_else": 1}, 100) is None
    later = load_from_metrics("e", lmdeploy, 1000)
    assert same_load(load, later)  # only updated_at differs: not republished


def test_instance_identity_sources():
    assert instance_from({"instance_id": "abc"}, {"process_start_time_seconds": 5.0}) == "abc"
    assert instance_from({}, {"process_start_time_seconds": 1700000000.123}) == "pst-1700000000.12"
    assert instance_from({}, None) is None


def _record(role: str, **geometry) -> EngineRecord:
    info = {"block_size": 16, "num_gpu_blocks": 100, "tp_size": 1, "kv_layout": "4x100:f32"} | geometry
    return EngineRecord(id=f"{role}-1", incarnation="i.1", role=role, url=f"http://{role}:1", models=["m"],
                        engine_info=EngineGeometry(**info), transfer=TransferInfo(protocol="tcp"))


def test_link_compatibility():
    prefill, decode = _record("prefill"), _record("decode")
    assert incompatibility(prefill, decode) is None
    assert "tp_size" in incompatibility(_record("prefill", tp_size=2), decode)
    assert "block_size" in incompatibility(_record("prefill", block_size=32), decode)
    assert "kv_layout" in incompatibility(_record("prefill", kv_layout="other"), decode)
    assert incompatibility(_record("prefill", kv_layout=None), decode) is None  # lmdeploy: unknown, handshake checks
    other_model = _record("decode").model_copy(update={"models": ["n"]})
    assert "model" in incompatibility(prefill, other_model)
    rdma = _record("decode").model_copy(update={"transfer": TransferInfo(protocol="rdma")})
    assert "protocol" in incompatibility(prefill, rdma)
    assert incompatibility(decode, prefill) is not None


def test_backoff_is_jittered_and_capped():
    delays = [delay_for(attempt, base=0.2, cap=5.0) for attempt in range(1, 12) for _ in range(20)]
    assert max(delays) <= 5.0 * 1.5 and min(delays) >= 0.1
    assert len({round(d, 6) for d in delays}) > 100  # jittered, not a fixed schedule


def _agent_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distserve", "agent", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


@pytest.mark.parametrize("args, message", [
    (["--engine-url", "ftp://h:1", "--role", "prefill"], "engine URL 'ftp://h:1': scheme must be http or https"),
    (["--engine-url", "http://h:1", "--role", "prefill", "--etcd", "http://h:1/x"],
     "invalid --etcd endpoint 'http://h:1/x': expected http(s)://host:port"),
    (["--engine-url", "http://h:1", "--role", "prefill", "--ttl", "0"], "ttl"),
    (["--engine-url", "http://h:1", "--role", "prefill", "--engine-id", "a b"], "invalid engine id"),
])
def test_cli_bad_options_get_one_line_and_exit_2(args, message):
    result = _agent_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_cli_role_mismatch_is_refused(etcd):
    engine, url = spawn_engine("prefill", None, "--null")
    try:
        result = _agent_cli("--engine-url", url, "--role", "decode", "--etcd", etcd.client_url)
        assert result.returncode == 2
        assert "says role 'prefill'" in result.stderr.strip().splitlines()[-1]
    finally:
        engine.kill()


def test_agent_waits_for_its_engine_and_stops_cleanly(etcd):
    port = free_port()
    agent = Proc.python(["distserve", "agent", "--engine-url", f"http://127.0.0.1:{port}", "--role", "hybrid",
                         "--etcd", etcd.client_url], name="agent-waiting")
    engine = None
    try:
        time.sleep(1.5)
        assert agent.alive(), agent.output()  # no engine yet: it waits, it does not exit
        engine, url = spawn_engine("hybrid", port, "--null")
        deadline = time.monotonic() + 20
        while "state ready" not in agent.output():
            assert time.monotonic() < deadline, agent.output()
            time.sleep(0.1)
        assert agent.stop() == 0
    finally:
        agent.kill()
        if engine is not None:
            engine.kill()


def test_engine_with_etcd_runs_the_agent_in_process_and_revokes_on_stop(etcd):
    import asyncio

    from discovery.client import EtcdClient
    from discovery.config import EtcdConfig
    from distserve.cluster.keys import Keys

    port = free_port()
    engine = Proc.python(["distserve", "engine", "--role", "hybrid", "--null", "--port", str(port),
                          "--etcd", etcd.client_url, "--engine-id", "hybrid-1"], name="engine-in-process")

    async def scenario() -> float:
        key = Keys().engine("hybrid-1")
        async with EtcdClient(EtcdConfig(endpoints=etcd.endpoints)) as client:
            deadline = time.monotonic() + 30
            while (kv := await client.get(key)) is None or b'"ready"' not in kv.value:
                assert time.monotonic() < deadline, engine.output()
                await asyncio.sleep(0.05)
            assert b'"software_version":"distserve-reference ' in kv.value
            stopped = time.monotonic()
            engine.signal(15)
            while await client.get(key) is not None:
                assert time.monotonic() - stopped < 5, engine.output()
                await asyncio.sleep(0.01)
            return time.monotonic() - stopped

    try:
        took = asyncio.run(scenario())
        assert took < 0.5  # revoked while the engine still answers (before its HTTP server closes)
        assert engine.popen.wait(timeout=10) == 0
    finally:
        engine.kill()


def test_engine_with_etcd_rejects_an_advertise_url_shared_by_several_engines(etcd):
    result = subprocess.run([sys.executable, "-m", "distserve", "engine", "--role", "prefill", "--null", "--count", "2",
                             "--port", str(consecutive_free_ports(2)), "--etcd", etcd.client_url,
                             "--advertise-url", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=30,
                            cwd=str(REPO))
    assert result.returncode == 2
    assert "--advertise-url names one engine" in result.stderr.strip().splitlines()[-1]


async def test_engines_with_api_keys_need_the_cluster_token(etcd):
    from discovery.client import EtcdClient
    from tests.agent.conftest import Fleet, Node, wait_full

    fleet = Fleet(etcd.endpoints)
    nodes = [Node("prefill", free_port()), Node("decode", free_port())]
    try:
        for node in nodes:
            node.engine = Proc.python(["distserve", "engine", "--role", node.role, "--null", "--port", str(node.port),
                                       "--api-keys", "k-1", "k-2"], name=f"engine-auth-{node.port}")
            fleet.procs.append(node.engine)
            fleet.nodes.append(node)
        fleet.wait_engines()
        refused = _agent_cli("--engine-url", nodes[0].url, "--role", "prefill", "--etcd", etcd.client_url,
                             "--cluster-token", "wrong")
        assert refused.returncode == 2
        assert "refused the agent (HTTP 401)" in refused.stderr.strip().splitlines()[-1]
        assert "wrong" not in refused.stderr  # the token is never echoed
        for node in nodes:
            node.agent = Proc.python(["distserve", "agent", "--engine-url", node.url, "--role", node.role,
                                      "--etcd", etcd.client_url], name=f"agent-auth-{node.port}",
                                     env={"DISTSERVE_CLUSTER_TOKEN": "k-2"})
            fleet.procs.append(node.agent)
        async with EtcdClient(fleet.etcd_config()) as client:
            view = await wait_full(client, fleet, timeout=30)  # handshakes carried the token to both engines
        assert "k-2" not in str(view.engines) + fleet.logs()
    finally:
        fleet.stop()
