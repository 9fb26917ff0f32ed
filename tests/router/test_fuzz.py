"""Property-based fuzz of the client API through a real router process (null engines behind it).

Whatever a client sends, the router answers a 2xx or a 4xx with an OpenAI-style error (never a 5xx,
never a 200 carrying an error), internal fields never get through, and it keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distserve.cluster.keys import Keys
from distserve.protocol import INTERNAL_REQUEST_FIELDS
from tests.router.cluster import (
    MODEL,
    etcd_client,
    null_farm,
    publish_pd,
    start_router,
)

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def router():
    with null_farm(prefills=1, decodes=1) as farm:
        keys = Keys(f"fuzz{uuid.uuid4().hex[:6]}")

        async def publish():
            async with etcd_client(farm["etcd"].endpoints) as client:
                await publish_pd(client, keys, farm)

        asyncio.run(publish())
        rp, url = start_router(
            farm["etcd"].endpoints,
            "--cluster",
            keys.cluster,
            "--max-body-bytes",
            str(MAX_BODY),
            env={"ROUTER_LOG_LEVEL": "WARNING"},
        )
        try:
            with httpx.Client(base_url=url, timeout=20) as http:
                yield http, rp
        finally:
            rp.kill()


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stop",
        "seed",
        "echo",
        "logprobs",
        "ignore_eos",
        "user",
        # issue 19: capability-gated fields, fan-out, the prefill's internal answers
        "best_of",
        "suffix",
        "top_logprobs",
        "tools",
        "tool_choice",
        "response_format",
        "logit_bias",
        "presence_penalty",
        "min_p",
        "remote_logprobs",
        "remote_session_ids",
        *sorted(INTERNAL_REQUEST_FIELDS),
        "session_id",
        "x_unknown",
    ]
)
DELETE = object()
valid_completion = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "prompt": st.one_of(
            st.text(min_size=1, max_size=40),
            st.lists(st.integers(0, 200), min_size=1, max_size=8),
            st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3),  # a batch
        ),
    },
    optional={
        "n": st.integers(1, 3),
        "best_of": st.integers(1, 3),
        "echo": st.booleans(),
        "logprobs": st.integers(0, 3),
        "max_tokens": st.integers(1, 20),
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
        "seed": st.integers(0, 1 << 32),
    },
)
valid_chat = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={
        "max_tokens": st.integers(1, 20),
        "stream": st.booleans(),
        "top_p": st.floats(0.1, 1),
        "max_completion_tokens": st.integers(1, 20),
        "n": st.integers(1, 3),
        "logprobs": st.booleans(),
    },
)
mutations = st.lists(st.tuples(field_names, st.one_of(json_values, st.just(DELETE))), max_size=2)


def mutate(body: dict, changes: list) -> dict:
    body = dict(body)
    for name, value in changes:
        if value is DELETE:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def encode(body) -> bytes:
    return json.dumps(body).encode()


requests_ = st.one_of(
    st.tuples(st.just("/v1/completions"), st.builds(mutate, valid_completion, mutations).map(encode)),
    st.tuples(st.just("/v1/chat/completions"), st.builds(mutate, valid_chat, mutations).map(encode)),
    st.tuples(
        st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
        st.one_of(
            st.binary(max_size=200),  # malformed JSON, wrong encodings
            json_values.map(encode),  # JSON that is not an object
            st.dictionaries(field_names, json_values, max_size=5).map(encode),
            st.integers(MAX_BODY + 1, MAX_BODY * 3).map(lambda n: b'{"model": "' + b"x" * n + b'"}'),  # huge
        ),
    ),
)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests_)
def test_fuzzed_bodies_get_4xx_never_5xx(router, request):
    http, proc = router
    path, raw = request
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text[:500], raw[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"] and err["code"]
        if len(raw) > MAX_BODY:
            assert r.status_code == 413
        return
    assert r.status_code == 200
    try:
        body = json.loads(raw)
    except ValueError:
        pytest.fail(f"malformed JSON accepted: {raw[:200]!r}")
    assert not INTERNAL_REQUEST_FIELDS.intersection(body), "an internal field got through"
    assert body.get("model") == MODEL
    if body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    else:
        assert "error" not in r.json() and r.json()["choices"]


def test_router_still_serves_after_the_fuzz(router):
    http, proc = router
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "still alive?", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert proc.alive()
    assert "Traceback" not in proc.output()
