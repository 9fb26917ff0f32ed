"""The orchestrator's retry-or-fail over engines (one executor: discovery.backoff.retry), in process."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from distserve.router.errors import ApiError
from distserve.router.metrics import RouterMetrics
from distserve.router.orchestrator import Orchestrator, PDRequest, RetryElsewhere
from distserve.router.settings import RouterSettings
from distserve.router.upstream import UpstreamError


class FirstOf:
    name = "first"

    def pick(self, candidates, ctx):
        return sorted(candidates)[0]


def run(orch: Orchestrator, engines: list[str], fails: set[str], attempts: int):
    pd = PDRequest(None, "completions", "/v1/completions", "rid", 0.0)
    calls: list[str] = []

    async def attempt(engine_id: str) -> str:
        calls.append(engine_id)
        if engine_id in fails:
            raise RetryElsewhere(UpstreamError("connect", f"{engine_id} refused"), "prefill")
        return engine_id

    async def go():
        return await orch._on_engines(pd, attempts, lambda: list(engines), FirstOf(), attempt, "%s %s %s %s",
                                      lambda: ApiError(503, "none", "no_route"))

    return asyncio.run(go()), calls


def orchestrator() -> Orchestrator:
    view = SimpleNamespace(load=None, breakers=None)
    return Orchestrator(RouterSettings(), view, RouterMetrics(), None, None, None, b"")


def test_a_failed_engine_is_replaced_and_each_retry_counted_once():
    orch = orchestrator()
    result, calls = run(orch, ["a", "b", "c"], {"a", "b"}, 3)
    assert (result, calls) == ("c", ["a", "b", "c"])
    assert orch.metrics.retries.get(("prefill",)) == 2


def test_no_retry_is_counted_when_no_untried_engine_is_left_and_the_last_failure_is_the_error():
    orch = orchestrator()
    with pytest.raises(ApiError) as info:
        run(orch, ["a", "b"], {"a", "b"}, 5)
    assert info.value.status == 502 and "b refused" in info.value.message
    assert orch.metrics.retries.get(("prefill",)) == 1  # a -> b; nothing after b


def test_attempts_bound_the_engines_tried_and_no_engine_at_all_is_the_fallback_error():
    orch = orchestrator()
    with pytest.raises(ApiError):
        run(orch, ["a", "b", "c"], {"a", "b", "c"}, 2)
    assert orch.metrics.retries.get(("prefill",)) == 1
    with pytest.raises(ApiError) as info:
        run(orch, [], set(), 3)
    assert (info.value.status, info.value.message) == (503, "none")
