"""A request that cannot fit the model's context costs no prefill (issue 16, defects 5 and 10).

Real etcd, a prefill and a decode reference engine (torch model, context of 256 tokens) registered by
their real agents, a real router, the official `openai` client. What the router can decide exactly (a
prompt given as token ids, or max_tokens alone) is answered 400 before any engine call; a text prompt is
answered 400 by the prefill engine before it accepts the request (so before any forward pass), and the
decode is never called. `stream_options` without `stream: true` is a 400, as on OpenAI.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

from discovery.embedded import EmbeddedEtcd
from tests.router.cluster import MODEL, engine_metric, start_router, wait_links_usable
from tests.util import Proc, free_port, wait_http

CONTEXT = 256
COUNTERS = (
    "distserve_engine_requests_total",  # requests accepted (past validation): a forward pass follows
    "distserve_engine_request_errors_total",
    "distserve_engine_decode_tokens_total",
    "distserve_engine_migrations_total",
    "distserve_engine_preserved_blocks",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = tmp_path_factory.mktemp("ctx") / "model.json"
    config.write_text(json.dumps({"max_model_len": CONTEXT}))
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    name = f"ctx{uuid.uuid4().hex[:6]}"
    procs: list[Proc] = []
    urls: dict[str, str] = {}
    try:
        for role in ("prefill", "decode"):
            port = free_port()
            procs.append(
                Proc.python(
                    ["distserve", "engine", "--role", role, "--host", "127.0.0.1", "--port", str(port),
                     "--model-config", str(config), "--log-level", "WARNING",
                     "--etcd", ",".join(etcd.endpoints), "--cluster", name, "--ttl", "3"],
                    name=f"engine-{role}",
                )
            )
            urls[role] = f"http://127.0.0.1:{port}"
        for proc, url in zip(procs, urls.values()):
            try:
                wait_http(f"{url}/health", timeout=90)
            except TimeoutError:
                pytest.fail(f"engine did not start:\n{proc.output()[-3000:]}")
        rp, router = start_router(etcd.endpoints, "--cluster", name)
        procs.append(rp)
        wait_links_usable(router, log=procs[1])
        yield router, urls
    finally:
        for proc in procs:
            proc.kill()
        etcd.stop()


def counters(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    return {role: {m: engine_metric(url, m) for m in COUNTERS} for role, url in urls.items()}


def client(router: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0)


def test_a_fitting_request_is_served_through_prefill_and_decode(cluster):
    router, urls = cluster
    before = counters(urls)
    # 200 token ids + 56 = exactly the context: fits
    out = client(router).completions.create(model=MODEL, prompt=[65] * 200, max_tokens=56, temperature=0)
    assert out.usage.prompt_tokens == 200 and out.usage.completion_tokens >= 1
    after = counters(urls)
    assert after["prefill"]["distserve_engine_requests_total"] == before["prefill"]["distserve_engine_requests_total"] + 1
    assert after["decode"]["distserve_engine_migrations_total"] == before["decode"]["distserve_engine_migrations_total"] + 1


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": [65] * 201, "max_tokens": 56}, "prompt"),  # one token over: exact for token ids
        ({"prompt": [[65] * 250], "max_tokens": 7}, "prompt"),
        ({"prompt": [65] * 250}, "prompt"),  # OpenAI's default max_tokens (16) counts
        ({"prompt": "short", "max_tokens": CONTEXT}, "max_tokens"),  # max_tokens alone leaves no room
    ],
)
def test_what_the_router_can_decide_is_rejected_before_any_engine_call(cluster, body, param):
    router, urls = cluster
    before = counters(urls)
    with pytest.raises(openai.BadRequestError) as info:
        client(router).completions.create(model=MODEL, temperature=0, **body)
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == param, err
    assert str(CONTEXT) in err["message"]
    assert counters(urls) == before  # neither engine saw the request


def test_chat_max_completion_tokens_alone_is_rejected_by_the_router(cluster):
    router, urls = cluster
    before = counters(urls)
    with pytest.raises(openai.BadRequestError) as info:
        client(router).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=CONTEXT + 1
        )
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "max_completion_tokens"
    assert counters(urls) == before


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_a_text_prompt_whose_bytes_cannot_fit_is_rejected_by_the_router(cluster, kind):
    """The reference engine's tokenizer publishes max_token_bytes 1: 220 bytes are at least 220 tokens."""
    router, urls = cluster
    text = "x" * 220
    before = counters(urls)
    c = client(router)
    with pytest.raises(openai.BadRequestError) as info:
        if kind == "completions":
            c.completions.create(model=MODEL, prompt=text, max_tokens=50, temperature=0)
        else:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=50)
    err = info.value.body
    assert err["code"] == "context_length_exceeded", err
    assert err["param"] == ("prompt" if kind == "completions" else "messages"), err
    assert "at least 270" in err["message"], err
    assert counters(urls) == before  # neither engine saw the request


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_text_prompt_too_long_is_rejected_by_the_prefill_before_computing(cluster, kind, stream):
    """What the router cannot be sure of (the BOS token, a chat's earlier turns and template) the prefill
    rejects before accepting the request."""
    router, urls = cluster
    before = counters(urls)
    c = client(router)
    t0 = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as info:
        if kind == "completions":  # 206 bytes + 50 fit the router's bound; with BOS 207 + 50 do not
            c.completions.create(model=MODEL, prompt="x" * 206, max_tokens=50, temperature=0, stream=stream)
        else:  # only the last user message is certain to be rendered
            messages = [{"role": "user", "content": "x" * 170}, {"role": "assistant", "content": "ok"},  # 226 tokens
                        {"role": "user", "content": "and?"}]
            c.chat.completions.create(model=MODEL, messages=messages, max_tokens=50, stream=stream)
    elapsed = time.perf_counter() - t0
    err = info.value.body
    assert err["code"] == "context_length_exceeded", err
    assert err["param"] == ("prompt" if kind == "completions" else "messages"), err
    assert "max_tokens (50)" in err["message"], err
    after = counters(urls)
    # the prefill answered it as an error without accepting it (no forward pass, nothing preserved) ...
    assert after["prefill"]["distserve_engine_request_errors_total"] == (
        before["prefill"]["distserve_engine_request_errors_total"] + 1
    )
    assert after["prefill"]["distserve_engine_requests_total"] == before["prefill"]["distserve_engine_requests_total"]
    assert after["prefill"]["distserve_engine_preserved_blocks"] == 0
    # ... and the decode never heard of it
    assert after["decode"] == before["decode"]
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_without_stream_is_a_400(cluster, route, stream):
    router, urls = cluster
    body = {"model": MODEL, "max_tokens": 2, "stream_options": {"include_usage": True}}
    body.update({"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    if stream is not None:
        body["stream"] = stream
    before = counters(urls)
    r = httpx.post(router + route, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stream_options" and "stream" in err["message"], err
    assert counters(urls) == before
    # the same through the official client; with stream=True it is served
    with pytest.raises(openai.BadRequestError):
        client(router).completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                          stream_options={"include_usage": True})
    chunks = list(client(router).completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True,
                                                    stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 2


def test_the_router_limit_is_the_largest_path_and_unknown_when_any_engine_is_silent():
    """Pure: a PD path offers min(prefill, decode); the model's limit is the best path; one engine that
    publishes no max_model_len (stock lmdeploy) leaves every decision to the engines."""
    from types import SimpleNamespace

    from distserve.cluster.records import EngineGeometry, EngineRecord
    from distserve.router.errors import ApiError
    from distserve.router.orchestrator import Orchestrator
    from distserve.router.view import RoutingTable

    def rec(eid: str, role: str, mml: int | None) -> EngineRecord:
        return EngineRecord(id=eid, incarnation="i", role=role, url=f"http://127.0.0.1:1/{eid}", models=["m"],
                            engine_info=EngineGeometry(block_size=16, num_gpu_blocks=8), max_model_len=mml)

    engines = {r.id: r for r in (rec("p0", "prefill", 512), rec("d0", "decode", 256), rec("d1", "decode", 384),
                                 rec("h0", "hybrid", 300))}
    table = RoutingTable(topology=None, entries={"m": ["h0", "p0"]},
                         decodes={("p0", "m"): ["d0", "d1"]})
    view = SimpleNamespace(load=None, breakers=None, engines=engines, table=lambda: table)
    orch = Orchestrator(None, view, None, None, None, None, b"")
    assert orch._context_limit("m") == 384  # min(512, 384) beats the hybrid's 300 and min(512, 256)
    assert orch._context_limit("other") is None  # nothing routable: nothing known
    table = RoutingTable(topology=None, entries={"m": ["h0", "p0"]}, decodes={("p0", "m"): ["d0", "d1"]})
    engines["d0"] = rec("d0", "decode", None)
    assert orch._context_limit("m") is None  # a new table is recomputed; d0 is silent
    # the tokenizer's longest token: a prefill's bounds its path's prompts; distinct paths, largest first
    engines.update(d0=rec("d0", "decode", 256), p0=rec("p0", "prefill", 512).model_copy(update={"max_token_bytes": 4}),
                   h0=rec("h0", "hybrid", 300).model_copy(update={"max_token_bytes": 1}))
    table = RoutingTable(topology=None, entries={"m": ["h0", "p0"]}, decodes={("p0", "m"): ["d0", "d1"]})
    assert orch._context_paths("m") == ((384, 4), (300, 1), (256, 4))
    orch._check_context("completions", {"prompt": "x" * 1200, "max_tokens": 16}, orch._context_paths("m"))  # 300+16 on p0-d1
    with pytest.raises(ApiError) as info:
        orch._check_context("completions", {"prompt": "x" * 1600, "max_tokens": 16}, orch._context_paths("m"))
    assert "384" in info.value.message and "at least 416" in info.value.message
