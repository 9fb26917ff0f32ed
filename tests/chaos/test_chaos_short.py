"""The chaos suite's short form (CI): live clusters of real processes under load, one fault each.

Each scenario starts its own cluster (real etcd, tiny reference engines with in-process agents, two routers),
injects its fault and asserts what docs/chaos.md says; the long forms run with
`python tools/chaos.py --scenario all` (and here with DISTSERVE_SLOW=1 / `-m slow`).
"""

from __future__ import annotations

import pytest

from distserve.testing.chaos.scenarios import SCENARIOS, run

CI = [name for name, sc in SCENARIOS.items() if sc.in_ci]


def test_the_ci_set_is_the_one_the_issue_names():
    assert CI == ["etcd-member-kill", "prefill-kill", "decode-kill", "router-kill"]


@pytest.mark.parametrize("name", CI)
async def test_short_form(name, tmp_path):
    result = await run(name, "short", keep_dir=tmp_path / "run")
    assert result.passed, f"{result.text()}\nlogs: {tmp_path / 'run' / 'logs'}"
    # the scenario really exercised the cluster
    assert sum(1 for r in result.requests if r.ok) >= 50


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_long_form(name, tmp_path):
    result = await run(name, "long", keep_dir=tmp_path / "run")
    assert result.passed, f"{result.text()}\nlogs: {tmp_path / 'run' / 'logs'}"


async def test_bad_routing_config_short_form(tmp_path):
    """An operator's bad routing config under load (outside the issue's CI set, ~16 s): 0 failed requests,
    the bad value reported by every router, doctor and status."""
    result = await run("bad-routing-config", "short", keep_dir=tmp_path / "run")
    assert result.passed, f"{result.text()}\nlogs: {tmp_path / 'run' / 'logs'}"
    assert sum(1 for r in result.requests if r.ok) >= 50


async def test_router_rolling_restart_short_form(tmp_path):
    """One of two routers SIGTERMed under load behind a readiness-polling balancer (outside the issue's CI set):
    readiness turns 503 and the record leaves etcd first, in-flight requests and streams finish, none fails."""
    result = await run("router-rolling-restart", "short", keep_dir=tmp_path / "run")
    assert result.passed, f"{result.text()}\nlogs: {tmp_path / 'run' / 'logs'}"
