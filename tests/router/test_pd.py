"""PD end to end: real etcd, reference engines (torch model, DLSlime TCP migration) registered by their real
agents (`distserve engine ... --etcd`), two router replicas, the official `openai` client.

The tests share one cluster and run in file order: the destructive ones (router SIGKILL, decode SIGKILL
mid-stream, prefill SIGKILL) come last. Engines require the cluster token (`--api-keys`), so every call
the routers make must carry it.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from discovery.embedded import EmbeddedEtcd
from tests.router.cluster import MODEL, engine_metric, http_json, router_metric, start_router, wait_links_usable
from tests.util import Proc, free_port, wait_http

TOKEN = "cluster-secret-for-tests"
ENGINE_AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {"DISTSERVE_CLUSTER_TOKEN": TOKEN}

CASES = [
    ("completions", False),
    ("completions", True),
    ("chat", False),
    ("chat", True),
]


class Cluster:
    def __init__(self) -> None:
        self.etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
        self.name = f"pd{uuid.uuid4().hex[:6]}"
        self.engines: dict[str, tuple[Proc, str]] = {}
        self.routers: list[tuple[Proc, str]] = []

    def start_engine(self, name: str, role: str, register: bool = True) -> None:
        port = free_port()
        args = [
            "distserve",
            "engine",
            "--role",
            role,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-keys",
            TOKEN,
            "--log-level",
            "WARNING",
        ]
        if register:
            args += ["--etcd", ",".join(self.etcd.endpoints), "--cluster", self.name, "--ttl", "3"]
        self.engines[name] = (Proc.python(args, name=f"engine-{name}", env=ENV), f"http://127.0.0.1:{port}")

    def url(self, name: str) -> str:
        return self.engines[name][1]

    def start_router(self, *extra: str) -> tuple[Proc, str]:
        router = start_router(self.etcd.endpoints, "--cluster", self.name, *extra, env=ENV)
        self.routers.append(router)
        return router

    def handshakes(self) -> dict[str, float]:
        return {
            name: engine_metric(url, "distserve_engine_handshakes_total", ENGINE_AUTH)
            for name, (proc, url) in self.engines.items()
            if proc.alive()
        }

    def stop(self) -> None:
        for proc, _ in [*self.routers, *self.engines.values()]:
            proc.kill()
        self.etcd.stop()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        for name, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
            c.start_engine(name, role)
        c.start_engine("hybrid", "hybrid", register=False)  # the reference answer, called directly
        for name, (proc, url) in c.engines.items():
            try:
                wait_http(f"{url}/health", timeout=90)
            except TimeoutError:
                pytest.fail(f"engine {name} did not start:\n{proc.output()[-3000:]}")
        c.start_router(
            "--cluster-token", TOKEN
        )  # one replica gets the token as a flag, the other from the env
        c.start_router()
        deadline = time.monotonic() + 60
        for _, router in c.routers:  # links pre-established by the decode agents, before any request
            wait_links_usable(router, 4, log=c.engines["d0"][0], deadline=deadline)
        yield c
    finally:
        c.stop()


def ask_sync(
    base_url: str, kind: str, stream: bool, prompt: str, max_tokens: int = 12, api_key: str = "unused"
) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
    if kind == "completions":
        if stream:
            return "".join(
                c.choices[0].text
                for c in client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
                )
                if c.choices
            )
        return (
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
            .choices[0]
            .text
        )
    messages = [{"role": "user", "content": prompt}]
    if stream:
        return "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
            )
            if c.choices
        )
    return (
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
        .choices[0]
        .message.content
    )


async def ask_async(base_url: str, kind: str, stream: bool, prompt: str, max_tokens: int = 12) -> str:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    try:
        if kind == "completions":
            if stream:
                out = []
                async for c in await client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
                ):
                    out.extend(ch.text for ch in c.choices)
                return "".join(out)
            r = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0
            )
            return r.choices[0].text
        messages = [{"role": "user", "content": prompt}]
        if stream:
            out = []
            async for c in await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
            ):
                out.extend(ch.delta.content or "" for ch in c.choices)
            return "".join(out)
        r = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0
        )
        return r.choices[0].message.content
    finally:
        await client.close()


def migrations(cluster: Cluster) -> float:
    return sum(
        engine_metric(cluster.url(d), "distserve_engine_migrations_total", ENGINE_AUTH) for d in ("d0", "d1")
    )


def test_openai_client_gets_the_hybrid_engines_greedy_text_through_either_router(cluster):
    hybrid = cluster.url("hybrid")
    before = migrations(cluster)
    n = 0
    for i, (kind, stream) in enumerate(CASES):
        prompt = f"The {i}th router test says"
        expected = ask_sync(hybrid, kind, False, prompt, api_key=TOKEN)
        assert expected  # the reference engine always produces text for these prompts
        for _, router in cluster.routers:
            assert ask_sync(router, kind, stream, prompt) == expected, (kind, stream, router)
            n += 1

    async def async_cases():
        outs = []
        for i, (kind, stream) in enumerate(CASES):
            prompt = f"The {i}th router test says"
            outs.append(
                (
                    kind,
                    stream,
                    await asyncio.gather(*(ask_async(r, kind, stream, prompt) for _, r in cluster.routers)),
                )
            )
        return outs

    for i, (kind, stream, texts) in enumerate(asyncio.run(async_cases())):
        expected = ask_sync(hybrid, kind, False, f"The {i}th router test says", api_key=TOKEN)
        assert texts == [expected, expected], (kind, stream)
        n += 2
    assert migrations(cluster) - before == n, "every answer went prefill -> KV migration -> decode"
    for name in ("p0", "p1"):
        assert engine_metric(cluster.url(name), "distserve_engine_preserved_blocks", ENGINE_AUTH) == 0


def test_usage_and_errors_pass_through_pd(cluster):
    _, router = cluster.routers[0]
    r = http_json(f"{router}/v1/completions", {"model": MODEL, "prompt": "count the tokens", "max_tokens": 5})
    assert r["usage"]["completion_tokens"] == 5 and r["usage"]["prompt_tokens"] > 0
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:  # the engine's own 400, passed on (not a 5xx)
        client.completions.create(model=MODEL, prompt="x" * 20000, max_tokens=4)
    assert info.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    for name in ("p0", "p1"):
        assert engine_metric(cluster.url(name), "distserve_engine_preserved_blocks", ENGINE_AUTH) == 0


def decodes_running(cluster: Cluster) -> float:
    return sum(
        engine_metric(cluster.url(d), "distserve_engine_requests_running", ENGINE_AUTH)
        for d in ("d0", "d1")
        if cluster.engines[d][0].alive()
    )


def preserved(cluster: Cluster) -> float:
    return sum(
        engine_metric(cluster.url(p), "distserve_engine_preserved_blocks", ENGINE_AUTH)
        for p in ("p0", "p1")
        if cluster.engines[p][0].alive()
    )


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


LONG = {
    "model": MODEL,
    "prompt": "a very long story",
    "max_tokens": 3500,
    "ignore_eos": True,
    "temperature": 0,
}


def test_client_disconnect_cancels_the_decode_and_leaves_nothing_preserved(cluster):
    _, router = cluster.routers[0]
    with httpx.Client(base_url=router, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            chunks = r.iter_bytes()
            next(chunks)
            next(chunks)
            assert decodes_running(cluster) == 1
    # 3500 tokens would take many seconds: the decode stops because the router dropped its connection
    wait_for(lambda: decodes_running(cluster) == 0, 5, "the decode kept generating for a gone client")
    wait_for(lambda: preserved(cluster) == 0, 5, "prefill blocks left preserved")
    assert router_metric(router, "distserve_router_client_disconnects_total") >= 1


def test_max_in_flight_answers_429(cluster):
    proc, router = start_router(
        cluster.etcd.endpoints, "--cluster", cluster.name, "--max-in-flight", "1", env=ENV
    )
    try:
        with httpx.Client(base_url=router, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                chunks = r.iter_bytes()  # keep a reference: a collected iterator closes the stream
                assert r.status_code == 200 and next(chunks)
                busy = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
                assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
                assert busy.json()["error"]["code"] == "rate_limited"
            wait_for(lambda: decodes_running(cluster) == 0, 5, "decode still running")
            ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200
    finally:
        proc.stop()


def test_sigkilled_router_replaced_first_pd_completion_needs_no_handshake(cluster):
    before = cluster.handshakes()
    proc, _ = cluster.routers.pop(0)
    proc.kill()
    started = time.monotonic()
    _, router = cluster.start_router("--strategy", "round_robin")
    text = ask_sync(router, "completions", False, "right after a router restart")
    elapsed = time.monotonic() - started
    assert text
    assert cluster.handshakes() == before, "a new router replica must not trigger any handshake"
    assert elapsed < 30


def test_phase_timeouts_answer_504_and_free_the_prefill(cluster):
    """Both decodes frozen (SIGSTOP, briefly: their leases must not expire): the decode phase times out."""
    proc, router = start_router(
        cluster.etcd.endpoints,
        "--cluster",
        cluster.name,
        "--decode-first-byte-timeout",
        "0.7",
        "--request-timeout",
        "0.9",
        env=ENV,
    )
    frozen = [cluster.engines[d][0] for d in ("d0", "d1")]
    try:
        with httpx.Client(base_url=router, timeout=30) as http:
            for p in frozen:
                p.signal(signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(2) as pool:
                    streamed = pool.submit(http.post, "/v1/completions", json={**LONG, "stream": True})
                    unary = pool.submit(
                        http.post,
                        "/v1/chat/completions",
                        json={
                            "model": MODEL,
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 5,
                        },
                    )
                    streamed, unary = streamed.result(), unary.result()
            finally:
                for p in frozen:
                    p.signal(signal.SIGCONT)
        assert streamed.status_code == 504 and streamed.json()["error"]["code"] == "decode_timeout"
        assert unary.status_code == 504 and unary.json()["error"]["code"] == "decode_timeout"
        # the decodes never pulled the KV: the router gave it back to the prefill
        wait_for(lambda: preserved(cluster) == 0, 5, "prefill blocks left preserved after a decode timeout")
        assert router_metric(router, "distserve_router_free_cache_total", {"result": "ok"}) == 2
    finally:
        proc.stop()
    wait_for(lambda: decodes_running(cluster) == 0, 10, "decode still running")


def test_sigkilled_decode_mid_stream_gives_an_error_event_and_frees_the_prefill(cluster):
    _, router = cluster.routers[-1]
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(
        model=MODEL,
        prompt="a very long story",
        max_tokens=3500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    running = {
        d: engine_metric(cluster.url(d), "distserve_engine_requests_running", ENGINE_AUTH)
        for d in ("d0", "d1")
    }
    victim = max(running, key=running.get)
    assert running[victim] == 1
    cluster.engines[victim][0].kill()
    with pytest.raises(openai.APIError) as info:
        for _ in chunks:
            pass
    assert "decode failed mid-stream" in str(info.value.message)
    deadline = time.monotonic() + 10
    while True:
        preserved = sum(
            engine_metric(cluster.url(p), "distserve_engine_preserved_blocks", ENGINE_AUTH)
            for p in ("p0", "p1")
        )
        if preserved == 0:
            break
        assert time.monotonic() < deadline, f"prefill engines still preserve {preserved} blocks"
        time.sleep(0.1)
    # the cluster goes on with the other decode, at once (before the dead engine's lease expires): round
    # robin sends one of the next two requests to the dead decode, which refuses; retried on the other one
    for i in range(4):
        assert ask_sync(router, "chat", i % 2 == 0, f"after the decode died {i}")
    assert router_metric(router, "distserve_router_retries_total", {"phase": "decode"}) == 1
    assert (
        router_metric(
            router, "distserve_router_upstream_errors_total", {"phase": "decode", "kind": "connect"}
        )
        == 1
    )


def test_sigkilled_prefill_following_requests_succeed_on_the_other(cluster):
    cluster.engines["p0"][0].kill()
    survivor = cluster.url("p1")
    before = engine_metric(survivor, "distserve_engine_requests_total", ENGINE_AUTH)
    for _, router in cluster.routers:
        for i in range(6):
            assert ask_sync(router, "completions", i % 2 == 1, f"after the prefill died {i}")
    assert engine_metric(survivor, "distserve_engine_requests_total", ENGINE_AUTH) - before == 12
