"""Capabilities (issue 19): what a request needs, which paths honour it, lmdeploy's table, the agent's copy."""

from __future__ import annotations

import pytest

from distserve.agent.record import capabilities as agent_capabilities
from distserve.cluster.capabilities import effective, lmdeploy_capabilities
from distserve.cluster.records import EngineGeometry, EngineRecord
from distserve.router.capabilities import required, unsupported
from distserve.router.validation import CHAT, COMPLETIONS


def test_required_ignores_neutral_values():
    assert required(CHAT, {"tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0,
                           "logit_bias": {}, "top_k": -1, "logprobs": False}) == ()
    assert required(CHAT, {"tools": [{}], "logprobs": True, "top_logprobs": 2, "seed": 1}) == (
        ("seed", "seed"), ("logprobs", "logprobs"), ("top_logprobs", "top_logprobs"), ("tools", "tools"))
    assert required(COMPLETIONS, {"logprobs": 0, "echo": True, "suffix": "x"}) == (
        ("logprobs", "completion_logprobs"), ("echo", "echo"), ("suffix", "suffix"))
    assert required(COMPLETIONS, {"best_of": 3, "n": 1}) == (("best_of", "completion_logprobs"),)


def test_unsupported_names_the_field():
    needs = required(CHAT, {"tools": [{}], "logprobs": True})
    ref = frozenset({"logprobs", "seed"})
    lmd_pd = frozenset({"tools", "seed"})
    assert unsupported(needs, [ref]) == "tools"
    assert unsupported(needs, [ref, lmd_pd]) == "tools"  # each honoured somewhere, never together
    assert unsupported(needs, [ref | lmd_pd]) is None
    assert unsupported((), []) is None


def test_lmdeploy_table_by_version_and_role():
    prefill = lmdeploy_capabilities("0.18.0", "prefill")
    assert {"tools", "response_format", "logprobs", "seed"} <= set(prefill)
    assert "completion_logprobs" not in prefill and "echo" not in prefill and "suffix" not in prefill
    assert "logprobs" not in lmdeploy_capabilities("lmdeploy 0.18.1", "decode")
    assert lmdeploy_capabilities("0.19.2", "hybrid") == lmdeploy_capabilities("0.18.0", "hybrid")
    assert lmdeploy_capabilities("", "hybrid") == lmdeploy_capabilities("0.17.0", "hybrid")


def test_agent_copies_reported_else_fills_lmdeploy():
    assert agent_capabilities({"capabilities": ["seed", "echo", "seed"]}, "reference", "", "hybrid") == ["echo", "seed"]
    assert agent_capabilities({"capabilities": "bad"}, "reference", "", "hybrid") is None
    assert agent_capabilities({}, "lmdeploy", "0.18.0", "decode") == lmdeploy_capabilities("0.18.0", "decode")


def test_old_record_without_capabilities():
    base = dict(id="e", incarnation="i", role="hybrid", url="http://127.0.0.1:1", models=["m"],
                engine_info=EngineGeometry(block_size=16, num_gpu_blocks=8))
    assert effective(EngineRecord(**base, engine_kind="reference")) == frozenset({"seed"})
    assert "tools" in effective(EngineRecord(**base, engine_kind="lmdeploy", software_version="0.18.0"))
    assert effective(EngineRecord(**base, capabilities=["echo"])) == frozenset({"echo"})


@pytest.mark.parametrize("kind, field, value", [
    (COMPLETIONS, "seed", 1), (COMPLETIONS, "top_k", 5), (COMPLETIONS, "min_p", 0.1),
    (COMPLETIONS, "repetition_penalty", 1.1), (COMPLETIONS, "presence_penalty", 0.5),
    (COMPLETIONS, "frequency_penalty", 0.5), (COMPLETIONS, "logit_bias", {"1": 2}), (COMPLETIONS, "min_tokens", 3),
    (COMPLETIONS, "min_new_tokens", 3), (COMPLETIONS, "skip_special_tokens", False), (COMPLETIONS, "logprobs", 1),
    (COMPLETIONS, "best_of", 2), (COMPLETIONS, "echo", True), (COMPLETIONS, "suffix", "x"), (CHAT, "logprobs", True),
    (CHAT, "top_logprobs", 1), (CHAT, "tools", [{}]), (CHAT, "tool_choice", "auto"),
    (CHAT, "response_format", {"type": "json_object"}),
])
def test_every_gated_field_alone_is_required(kind, field, value):
    """Each gated field, alone in an otherwise plain body, is found (the no-gated-field shortcut misses none)."""
    body = {"model": "m", "max_tokens": 4, "temperature": 0.5, "stream": False, field: value}
    assert [f for f, _ in required(kind, body)] == [field]
