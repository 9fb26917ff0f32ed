"""tools/bench_router.py: the direct-parallel baseline against real null engines, the per-mode baselines and
goal lines of the report, the scaling verdicts and CPU layout, and py-spy's collapsed stacks."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_router_under_test", REPO / "tools" / "bench_router.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_direct_parallel_calls_both_null_engines_at_once_without_a_prefill_session(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BENCH", tmp_path)  # engine logs there
    engines = bench.Engines(1, None, "unused", "dp")
    try:
        before = {u: bench.engine_metric(u, "distserve_engine_requests_total") for u in engines.urls}

        async def run() -> list[float]:
            async with bench.new_session() as session:
                lat = []
                for stream in (False, True):
                    client = bench.Client(session, "direct-parallel", (engines.prefills, engines.decodes), stream)
                    lat += await bench.burst(client, 3)
                return lat

        lat = asyncio.run(run())
        assert bench.FAILED not in lat, open(tmp_path / "dp-decode-0.log").read()[-2000:]
        # each request: one plain completion on the prefill and one on the decode, no KV migration
        for url in engines.urls:
            assert bench.engine_metric(url, "distserve_engine_requests_total") - before[url] == 6
        assert bench.engine_metric(engines.decodes[0], "distserve_engine_migrations_total") == 0
    finally:
        engines.stop()


def _rows(mode: str, stream: bool, conc: int, p50_ms: float, p99_ms: float) -> dict:
    return {"rep": 0, "mode": mode, "stream": stream, "concurrency": conc, "n": 100, "failed": 0, "rps": 500.0,
            "p50": p50_ms / 1e3, "p99": p99_ms / 1e3, "cpu_ms_per_req": 0.5, "cpu_util": 0.3}


def test_report_takes_the_gateways_added_latency_over_direct_parallel(bench):
    steady = [
        _rows("direct", False, 1, 2.0, 4.0),
        _rows("direct-parallel", False, 1, 1.0, 2.0),
        _rows("distserve", False, 1, 2.3, 4.5),  # +0.3 / +0.5 over direct
        _rows("sglang", False, 1, 1.2, 2.1),  # +0.2 / +0.1 over direct-parallel (-0.8 over direct)
        _rows("lmdeploy", False, 1, 5.0, 9.0),
    ]
    out = bench.report({"steady": steady})
    lines = {line.split("|")[3].strip(): line for line in out.splitlines() if line.startswith("| no | 1 |")}
    assert "| 0.20 | 0.10 | direct-parallel |" in lines["sglang"]
    assert "| 0.30 | 0.50 | direct |" in lines["distserve"]
    assert "| 3.00 | 5.00 | direct |" in lines["lmdeploy"]
    assert "| - | - | - |" in lines["direct-parallel"]
    goal = next(line for line in out.splitlines() if line.startswith("Added latency at concurrency 1"))
    # p50: 0.3 <= 0.2 + 0.3 met; p99: 0.5 > 0.1 + 0.3, missed by 0.1 ms
    assert "p50: distserve +0.30 ms over direct, gateway +0.20 ms over direct-parallel: met" in goal
    assert "p99: distserve +0.50 ms over direct, gateway +0.10 ms over direct-parallel: missed by 0.10 ms" in goal


def test_without_direct_parallel_the_gateway_falls_back_to_direct_and_no_goal_line(bench):
    steady = [_rows("direct", True, 1, 2.0, 4.0), _rows("sglang", True, 1, 1.2, 2.1)]
    out = bench.report({"steady": steady})
    assert "| -0.80 | -1.90 | direct |" in out
    assert "Added latency at concurrency 1" not in out


def test_scaling_verdicts(bench):
    # 2 workers: 1,800 >= 0.85 x 2 x 1,000
    assert bench.scaling_verdict(2, 1800, 1000, 5000, 0.5) == "scales"
    # below target, at the engines' ceiling: they saturate, and the ceiling is named
    assert bench.scaling_verdict(4, 2900, 1000, 3000, 0.7) == "engines+load saturate (direct ceiling 3000 req/s)"
    # below target and ceiling but engines+load are at 95 % of their CPUs
    assert bench.scaling_verdict(4, 2000, 1000, 3000, 0.95).startswith("engines+load saturate")
    # well below the ceiling with CPU to spare on the engines' side: a miss, with the numbers
    missed = bench.scaling_verdict(8, 3000, 1000, 9000, 0.5)
    assert missed.startswith("missed: 0.38 x N x w1") and "9000 req/s" in missed and "50%" in missed


def test_scaling_table_rows(bench):
    def row(n, mode, rps, others):
        return {"rep": 0, "workers": n, "mode": mode, "stream": False, "concurrency": 64 * n, "n": 10, "failed": 0,
                "rps": rps, "p50": 0.01, "p99": 0.02, "router_util": 0.9, "others_util": others}

    rows = [row(1, "direct", 9000, 0.9), row(1, "distserve", 3000, 0.5),
            row(2, "direct", 8000, 0.95), row(2, "distserve", 5500, 0.7),
            row(4, "direct", 7000, 0.99), row(4, "distserve", 6900, 0.95)]
    layout = {"1": {"router_cpus": "1", "other_cpus": "0,2-15"}, "2": {"router_cpus": "1,2"},
              "4": {"router_cpus": "1,2,3,4"}}
    table = bench.scaling_table(rows, layout)
    by_n = {line.split("|")[2].strip(): line for line in table[2:]}
    assert "| 5100 |" in by_n["2"] and by_n["2"].rstrip().endswith("| scales |")  # 5,500 >= 0.85 x 2 x 3,000
    assert "| 10200 |" in by_n["4"] and "engines+load saturate (direct ceiling 7000 req/s)" in by_n["4"]
    assert "one worker (the reference)" in by_n["1"]


def test_worker_cpus_stay_the_routers_after_this_process_is_pinned_elsewhere(bench, monkeypatch):
    # amain pins itself to the non-router CPUs; worker CPUs must still be 1..N, never the engines' CPUs
    monkeypatch.setattr(bench, "OTHER_CPUS", bench.OTHER_CPUS)  # restored after the test
    monkeypatch.setattr(bench, "ALL_CPUS", list(range(16)))
    monkeypatch.setattr(bench, "smt_siblings", lambda cpu: set())  # this machine's topology must not matter
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 9, 10, 11, 12, 13, 14, 15})
    bench.set_router_cpus(8)
    assert bench.worker_cpus(2) == "1,2"
    assert bench.worker_cpus(8) == "1,2,3,4,5,6,7,8"
    assert bench.OTHER_CPUS == "0,9,10,11,12,13,14,15"
    assert bench.cpu_layout(4) == ("1,2,3,4", "0,5,6,7,8,9,10,11,12,13,14,15")
    monkeypatch.setattr(bench, "ALL_CPUS", [0, 1])  # no CPU left over: both share every CPU
    assert bench.cpu_layout(2) == ("0,1", "0,1")


def test_the_routers_smt_siblings_stay_idle_while_half_the_cpus_remain(bench, monkeypatch):
    # 8 cores of 2 threads: CPU c and c + 8 share a core, as Linux numbers them on most x86 hosts
    monkeypatch.setattr(bench, "OTHER_CPUS", bench.OTHER_CPUS)
    monkeypatch.setattr(bench, "SIBLINGS_IDLE", True)
    monkeypatch.setattr(bench, "ALL_CPUS", list(range(16)))
    monkeypatch.setattr(bench, "smt_siblings", lambda cpu: {(cpu + 8) % 16})
    assert bench.cpu_layout(1) == ("1", "0,2,3,4,5,6,7,8,10,11,12,13,14,15")  # CPU 9 idle
    assert bench.cpu_layout(4) == ("1,2,3,4", "0,5,6,7,8,13,14,15")  # 9-12 idle: 8 CPUs remain
    assert bench.cpu_layout(5)[1] == "0,6,7,8,9,10,11,12,13,14,15"  # only 6 would remain: shared
    bench.set_router_cpus(1, siblings_idle=False)  # --router-sibling shared
    assert bench.OTHER_CPUS == "0,2,3,4,5,6,7,8,9,10,11,12,13,14,15"
    bench.set_router_cpus(1)
    assert bench.OTHER_CPUS == "0,2,3,4,5,6,7,8,10,11,12,13,14,15"


def test_smt_siblings_read_from_the_kernels_list(bench, monkeypatch, tmp_path):
    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path).endswith("cpu3/topology/thread_siblings_list"):
            path = tmp_path / "list"
            path.write_text("3,67\n")
        elif str(path).endswith("cpu5/topology/thread_siblings_list"):
            path = tmp_path / "list"
            path.write_text("4-7\n")
        elif "topology" in str(path):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert bench.smt_siblings(3) == {67}
    assert bench.smt_siblings(5) == {4, 6, 7}
    assert bench.smt_siblings(1) == set()  # no list: no siblings known


def test_top_frames_from_pyspy_collapsed_stacks(bench):
    site = "/usr/lib/python3/site-packages"
    collapsed = "\n".join([
        f"thread (1): MainThread;run (asyncio/runners.py:86);handle ({site}/aiohttp/web_app.py:500);"
        f"pick ({REPO}/distserve/router/strategies.py:10) 6",
        f"thread (1): MainThread;run (asyncio/runners.py:86);handle ({site}/aiohttp/web_app.py:500) 3",
        "thread (2): grpc;poll (/usr/lib/python3.12/threading.py:1) 1",
        "garbage line",
    ])
    got = bench.top_frames(collapsed)
    assert got["samples"] == 10
    assert [(t["frame"], t["samples"]) for t in got["self"]] == [
        ("pick (distserve/router/strategies.py:10)", 6), ("handle (aiohttp/web_app.py:500)", 3),
        ("poll (threading.py:1)", 1)]
    handle = next(t for t in got["total"] if t["frame"].startswith("handle"))
    assert handle["share"] == pytest.approx(0.9)
    assert got["threads"] == {"thread (1): MainThread": pytest.approx(0.9), "thread (2): grpc": pytest.approx(0.1)}
    assert "| 60.0 | 60.0 | `pick (distserve/router/strategies.py:10)` |" in bench.format_profile(got)


def test_the_gateway_runs_the_policy_asked_for(bench, monkeypatch):
    """--sglang-policy reaches the gateway's command line (round_robin, as in every pass so far, by default)."""
    launched = []
    monkeypatch.setattr(bench, "sglang_command", lambda: ["sglang-router"])
    monkeypatch.setattr(bench, "bench_proc", lambda argv, *_a, **_k: launched.append(argv))
    engines = type("E", (), {"prefills": ["http://127.0.0.1:1"], "decodes": ["http://127.0.0.1:2"]})()
    bench.start_sglang("t", engines)
    bench.start_sglang("t", engines, "cache_aware")
    policies = [argv[argv.index("--policy") + 1] for argv in launched]
    assert policies == ["round_robin", "cache_aware"]
    assert launched[1][-4:] == ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]


def test_device_bundle_carries_pyspy(bench):
    assert f"py-spy=={bench.PYSPY_VERSION}" in bench.DEVICE_WHEELS


@pytest.mark.parametrize("argv, message", [
    (["--profile", "--scenarios", "cold"], "--profile needs the steady scenario"),
    (["--scaling-workers", "0"], "--scaling-workers takes positive integers"),
    (["--scaling-concurrency", "0"], "--scaling-concurrency must be positive"),
    (["--sglang-policy", "fastest"], "argument --sglang-policy: invalid choice"),
])
def test_bad_options_exit_2_with_one_line(argv, message):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_router.py"), *argv],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_routers_take_turns_at_each_place_in_the_order_across_repeats(bench):
    fronts = {m: (m, None) for m in ("direct", "direct-parallel", "distserve", "sglang", "distserve-base")}
    orders = [[m for m, _ in bench.front_order(fronts, rep)] for rep in range(3)]
    assert all(order[:2] == ["direct", "direct-parallel"] for order in orders)
    assert {order[2] for order in orders} == {"distserve", "sglang", "distserve-base"}
    assert all(sorted(order) == sorted(fronts) for order in orders)
