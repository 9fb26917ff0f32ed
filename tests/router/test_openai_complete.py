"""The OpenAI API in PD mode, complete (issue 19): logprobs through prefill -> decode, n > 1, batches of
prompts, best_of, echo, models/{id}, and capability rejections, with the official `openai` client.

Real etcd, real reference engines (one prefill, one decode registered by their agents; one hybrid not
registered, called directly as the reference answer), one router process.
"""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from discovery.embedded import EmbeddedEtcd
from tests.router.cluster import MODEL, engine_metric, router_metric, start_router, wait_links_usable
from tests.util import Proc, free_port, wait_http

TOKEN = "cluster-secret-issue19"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {"DISTSERVE_CLUSTER_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def cluster():
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    name = f"oa{uuid.uuid4().hex[:6]}"
    procs: list[Proc] = []
    urls: dict[str, str] = {}
    try:
        for engine, role, register in (("p0", "prefill", True), ("d0", "decode", True), ("h", "hybrid", False)):
            port = free_port()
            args = ["distserve", "engine", "--role", role, "--host", "127.0.0.1", "--port", str(port),
                    "--api-keys", TOKEN, "--log-level", "WARNING"]
            if register:
                args += ["--etcd", ",".join(etcd.endpoints), "--cluster", name, "--ttl", "3"]
            procs.append(Proc.python(args, name=f"engine-{engine}", env=ENV))
            urls[engine] = f"http://127.0.0.1:{port}"
        for engine, url in urls.items():
            wait_http(f"{url}/health", timeout=90)
        router, rurl = start_router(etcd.endpoints, "--cluster", name, env=ENV)
        procs.append(router)
        wait_links_usable(rurl)
        yield rurl, urls
    finally:
        for p in procs:
            p.kill()
        etcd.stop()


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def engines_requests(urls: dict[str, str]) -> dict[str, float]:
    return {n: engine_metric(u, "distserve_engine_requests_total", AUTH) for n, u in urls.items()}


MESSAGES = [{"role": "user", "content": "Tell me about prefill and decode."}]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_pd_equal_hybrid(cluster, stream):
    rurl, urls = cluster
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)

    def run(c):
        if not stream:
            ch = c.chat.completions.create(**args).choices[0]
            return ch.message.content, [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
                                        for t in ch.logprobs.content]
        text, lps = "", []
        for chunk in c.chat.completions.create(**args, stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                if chunk.choices[0].logprobs:
                    lps += [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
                            for t in chunk.choices[0].logprobs.content]
        return text, lps

    pd_text, pd_lps = run(client(rurl))
    hy_text, hy_lps = run(client(urls["h"], TOKEN))
    assert len(pd_lps) == 6 and all(len(top) == 3 for _, _, top in pd_lps)  # the first token's included
    assert (pd_text, pd_lps) == (hy_text, hy_lps)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_pd_equal_hybrid(cluster, stream):
    rurl, urls = cluster
    args = dict(model=MODEL, prompt="logprobs in PD", max_tokens=5, temperature=0, logprobs=2)

    def run(c):
        if not stream:
            lp = c.completions.create(**args).choices[0].logprobs
            return lp.tokens, lp.token_logprobs, lp.top_logprobs
        toks, lps, tops = [], [], []
        for chunk in c.completions.create(**args, stream=True):
            if chunk.choices and chunk.choices[0].logprobs:
                toks += chunk.choices[0].logprobs.tokens
                lps += chunk.choices[0].logprobs.token_logprobs
                tops += chunk.choices[0].logprobs.top_logprobs
        return toks, lps, tops

    pd = run(client(rurl))
    assert len(pd[1]) == 5
    assert pd == run(client(urls["h"], TOKEN))


def test_n3_with_seed_equals_three_seeded_requests(cluster):
    rurl, urls = cluster
    c = client(rurl)
    args = dict(model=MODEL, prompt="sample me", max_tokens=8, temperature=1.0)
    before = engines_requests(urls)
    resp = c.completions.create(**args, n=3, seed=41)
    after = engines_requests(urls)
    # one prefill for the three choices (shared_prefill), its KV pulled by three decodes
    assert (after["p0"] - before["p0"], after["d0"] - before["d0"]) == (1, 3)
    assert [ch.index for ch in resp.choices] == [0, 1, 2]
    single = [c.completions.create(**args, seed=41 + i) for i in range(3)]
    assert [ch.text for ch in resp.choices] == [s.choices[0].text for s in single]
    assert resp.usage.prompt_tokens == single[0].usage.prompt_tokens  # the prompt counted once
    assert resp.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
    # streamed: each chunk carries its choice's index; the texts are the same
    texts = {}
    before = engines_requests(urls)
    for chunk in c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, seed=5,
                                           stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        if chunk.usage:
            assert chunk.usage.completion_tokens == 18
    assert engines_requests(urls)["p0"] - before["p0"] == 1
    separate = [c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, seed=5 + i)
                .choices[0].message.content for i in range(3)]
    assert [texts[i] for i in range(3)] == separate


def test_batch_of_prompts_indexed_as_openai(cluster):
    rurl, _ = cluster
    c = client(rurl)
    prompts = ["first prompt", "second one"]
    resp = c.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, seed=3)
    assert [ch.index for ch in resp.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        for j in range(2):
            alone = c.completions.create(model=MODEL, prompt=p, max_tokens=4, seed=3 + j).choices[0].text
            assert resp.choices[i * 2 + j].text == alone


def test_best_of_keeps_the_most_likely(cluster):
    rurl, _ = cluster
    c = client(rurl)
    resp = c.completions.create(model=MODEL, prompt="best of", max_tokens=4, n=1, best_of=3, seed=9)
    assert len(resp.choices) == 1 and resp.choices[0].index == 0 and resp.choices[0].logprobs is None
    scored = []
    for j in range(3):
        ch = c.completions.create(model=MODEL, prompt="best of", max_tokens=4, seed=9 + j, logprobs=0).choices[0]
        scored.append((sum(ch.logprobs.token_logprobs), ch.text))
    assert resp.choices[0].text == max(scored)[1]


def test_echo(cluster):
    rurl, _ = cluster
    c = client(rurl)
    text = c.completions.create(model=MODEL, prompt="echo me", max_tokens=3, temperature=0, echo=True).choices[0].text
    plain = c.completions.create(model=MODEL, prompt="echo me", max_tokens=3, temperature=0).choices[0].text
    assert text == "echo me" + plain


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_unsupported_chat_fields_rejected_before_any_engine_call(cluster, extra, param):
    rurl, urls = cluster
    before = engines_requests(urls)
    with pytest.raises(openai.BadRequestError) as info:
        client(rurl).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **extra)
    err = info.value.body
    assert err["code"] == "unsupported_parameter" and err["param"] == param
    assert engines_requests(urls) == before


def test_suffix_rejected_and_plain_defaults_accepted(cluster):
    rurl, urls = cluster
    before = engines_requests(urls)
    with pytest.raises(openai.BadRequestError) as info:
        client(rurl).completions.create(model=MODEL, prompt="x", suffix="tail", max_tokens=2)
    assert info.value.body["param"] == "suffix"
    assert engines_requests(urls) == before
    # values that ask for nothing are not rejected
    r = client(rurl).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, tool_choice="none",
                                             response_format={"type": "text"})
    assert r.choices[0].message.content is not None


def test_models_retrieve(cluster):
    rurl, _ = cluster
    c = client(rurl)
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_n_client_disconnect_frees_everything(cluster):
    rurl, urls = cluster
    before = engines_requests(urls)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{rurl}/v1/completions",
                         json={"model": MODEL, "prompt": "a long one", "max_tokens": 400, "n": 4,
                               "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for _ in r.iter_raw():
                break  # the first bytes, then the client goes away
    deadline = time.monotonic() + 20
    while True:
        running = sum(engine_metric(u, "distserve_engine_requests_running", AUTH) for u in urls.values())
        preserved = sum(engine_metric(u, "distserve_engine_preserved_blocks", AUTH) for u in urls.values())
        sessions = sum(engine_metric(u, "distserve_engine_preserved_sessions", AUTH) for u in urls.values())
        if running == 0 and preserved == 0 and sessions == 0:
            break
        assert time.monotonic() < deadline, (running, preserved, sessions)
        time.sleep(0.1)
    assert engines_requests(urls)["p0"] - before["p0"] == 1  # the four choices came from one prefill
    assert router_metric(rurl, "distserve_router_client_disconnects_total") >= 1
