"""tools/bench_hot_path.py --bytecodes: the Python work per request as a number two runs agree on (what a cut to
the router's hot path is first judged by), against a real etcd and two null engines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_hot_path.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_bytecodes_per_request_are_counted_per_function_and_repeatable():
    out = _run("--bytecodes", "--trees", str(ROOT), str(ROOT), "--concurrency", "4", "--seconds", "0.5", "--top", "40")
    assert out.returncode == 0, out.stderr[-3000:]
    totals = [float(m) for m in re.findall(r"^\| \S+ \| (\d+)", out.stdout, re.M)]
    assert len(totals) == 2, out.stdout
    # the router's work per request: thousands of bytecodes, the same in two runs of one tree (the requests in
    # flight when counting starts and stops are the only difference)
    assert 1_000 < totals[0] < 20_000, out.stdout
    assert abs(totals[1] - totals[0]) / totals[0] < 0.03, out.stdout
    functions = dict(re.findall(r"^\| (\S.*\(\S+\.py\)) \| ([\d.]+) \|", out.stdout, re.M))
    # the router's own functions, named: its handler, validation, the engine client (the unary lane's path)
    for name in ("Router.serve_now (app.py)", "validate_request (validation.py)",
                 "EnginePool.call (http1.py)"):
        assert name in functions, out.stdout
    # once per request, with the same work each time: a whole number of bytecodes per request
    assert float(functions["validate_request (validation.py)"]) > 10


def test_bad_arguments_get_one_line_and_exit_2():
    out = _run("--bytecodes", "--top", "0")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--top" in out.stderr
