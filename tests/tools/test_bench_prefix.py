"""tools/bench_prefix.py --quick: real engines, agents, etcd and two routers per strategy (about 40 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_shape_and_kv_aware_beats_round_robin(tmp_path):
    out = tmp_path / "prefix.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/bench_prefix.py"), "--quick", "--strategies", "round_robin", "kv_aware",
         "--out", str(out), "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=170, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (tmp_path / "prefix.png").stat().st_size > 0
    assert set(res["strategies"]) == {"round_robin", "kv_aware"}
    for strategy, s in res["strategies"].items():
        run = s["runs"]["low"]
        for key in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "prompt_tokens", "cached_tokens",
                    "computed_tokens", "hit_rate", "omniscient_hit_rate", "load_max_over_mean",
                    "router_cpu_ms_per_request", "prefill_requests"):
            assert run[key] is not None, (strategy, key)
        assert run["ok"] == run["requests"] > 0, run["failures"]
        assert run["prompt_tokens"] == run["computed_tokens"] + run["cached_tokens"]
        # every request is placed from the prefills' own streams (its whole prompt's key, stored where it ran)
        placed = run["placements"]
        assert placed["placed"] == run["requests"], placed
        assert sum(run["prefill_requests"].values()) == run["requests"]
        assert {str(c % 2) for c in range(run["requests"] // 3)} <= set(placed["families"])
        # what the engines cached never beats one cache that saw everything
        assert 0 < run["hit_rate"] <= run["omniscient_hit_rate"] + 1e-9
        probe = s["probe"]
        assert probe["later_turns"] >= 1 and set(probe["by_turn"]) == {"1", "2", "3"}
    kv, rr = res["strategies"]["kv_aware"]["runs"]["low"], res["strategies"]["round_robin"]["runs"]["low"]
    assert kv["hit_rate"] > rr["hit_rate"], (kv["hit_rate"], rr["hit_rate"])
    assert "ttft_p50_vs_round_robin" in res["goals"]["low"]
