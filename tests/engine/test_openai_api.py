"""The engine's OpenAI API through the official openai client: sampling, stop strings, usage, streaming."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.engine.conftest import start_engines

MODEL = "distserve-reference"


@pytest.fixture
def client(pd_engines):
    c = openai.AsyncOpenAI(base_url=f"{pd_engines['hybrid']}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c


async def test_models_and_greedy_determinism(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    a = await client.completions.create(model=MODEL, prompt="The reference engine", max_tokens=64, temperature=0)
    b = await client.completions.create(model=MODEL, prompt="The reference engine", max_tokens=64, temperature=0)
    c = await client.completions.create(model=MODEL, prompt="Another prompt here", max_tokens=64, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text != c.choices[0].text
    assert a.usage.prompt_tokens == len("The reference engine") + 1  # bytes + BOS
    assert a.usage.completion_tokens <= 64
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.choices[0].finish_reason in ("length", "stop")


async def test_max_tokens_and_length_finish(client):
    out = await client.completions.create(model=MODEL, prompt="count", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    assert len(out.choices[0].text) == 5  # printable single-byte tokens


async def test_seeded_sampling(client):
    kw = dict(model=MODEL, prompt="sample me", max_tokens=24, temperature=1.0, top_p=0.95,
              extra_body={"ignore_eos": True})
    a = await client.completions.create(seed=7, **kw)
    b = await client.completions.create(seed=7, **kw)
    others = {(await client.completions.create(seed=s, **kw)).choices[0].text for s in (8, 9, 10)}
    greedy = await client.completions.create(**{**kw, "temperature": 0})
    assert a.choices[0].text == b.choices[0].text
    assert len(others | {a.choices[0].text}) >= 3 and greedy.choices[0].text not in others
    narrow = await client.completions.create(seed=7, **{**kw, "top_p": 1e-6})  # top_p -> the argmax token
    assert narrow.choices[0].text == greedy.choices[0].text


async def test_stop_strings(client):
    full = await client.completions.create(model=MODEL, prompt="stop test", max_tokens=40, temperature=0,
                                           extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[10:12]
    cut = text[: text.index(stop)]
    for stream in (False, True):
        if stream:
            parts, finish = [], None
            async for chunk in await client.completions.create(model=MODEL, prompt="stop test", max_tokens=40,
                                                               temperature=0, stop=[stop, "\x00never"], stream=True,
                                                               extra_body={"ignore_eos": True}):
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            got = "".join(parts)
        else:
            out = await client.completions.create(model=MODEL, prompt="stop test", max_tokens=40, temperature=0,
                                                  stop=stop, extra_body={"ignore_eos": True})
            got, finish = out.choices[0].text, out.choices[0].finish_reason
        assert got == cut and finish == "stop"


async def test_chat_stream_with_usage(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    parts, usage, roles = [], None, []
    async for chunk in await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                            temperature=0, stream=True,
                                                            stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            roles.append(choice.delta.role)
    assert "".join(parts) == whole.choices[0].message.content
    assert roles[0] == "assistant"
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens > len("hello there")


async def test_client_errors(client):
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=7)
    assert "temperature" in str(exc.value)


async def test_back_pressure_and_preemption_small_pool():
    """A pool far too small for the load: requests wait or are preempted and recomputed; all finish."""
    engines = start_engines({"tiny": ("hybrid", "--num-blocks", "24", "--max-batch-size", "8")})
    try:
        c = openai.AsyncOpenAI(base_url=f"{engines['tiny']}/v1", api_key="x", max_retries=0, timeout=120)
        outs = await asyncio.gather(*(c.completions.create(model=MODEL, prompt=f"request {i} " * 6, max_tokens=60,
                                                           temperature=0, extra_body={"ignore_eos": True})
                                      for i in range(8)))
        assert all(o.usage.completion_tokens == 60 for o in outs)
        import aiohttp

        from distserve.testing import pd

        async with aiohttp.ClientSession() as http:
            m = await pd.metrics(http, engines["tiny"])
        assert m["distserve_engine_preemptions_total"] >= 1
        assert m["distserve_engine_kv_blocks_used"] == 0 and m["distserve_engine_requests_waiting"] == 0
    finally:
        for proc in engines.procs.values():
            proc.stop()


async def test_safetensors_weights_load(tmp_path, pd_engines):
    """Weights saved to a safetensors file and loaded by an engine give the same answers as the seed."""
    import json

    from distserve.engine.config import ModelConfig
    from distserve.engine.model import save_weights

    weights = tmp_path / "model.safetensors"
    save_weights(ModelConfig(), str(weights))
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"weights": str(weights), "printable_only": True, "name": "from-file"}))
    engines = start_engines({"loaded": ("hybrid", "--model-config", str(config))})
    try:
        loaded = openai.AsyncOpenAI(base_url=f"{engines['loaded']}/v1", api_key="x", max_retries=0, timeout=60)
        seeded = openai.AsyncOpenAI(base_url=f"{pd_engines['hybrid']}/v1", api_key="x", max_retries=0, timeout=60)
        a = await loaded.completions.create(model="from-file", prompt="weights", max_tokens=32, temperature=0)
        b = await seeded.completions.create(model=MODEL, prompt="weights", max_tokens=32, temperature=0)
        assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    finally:
        for proc in engines.procs.values():
            proc.stop()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weights": str(weights), "hidden_size": 128}))
    import subprocess
    import sys

    # a blocking run is fine here: the CLI exits at once
    out = subprocess.run([sys.executable, "-m", "distserve", "engine", "--port", "0", "--model-config", str(bad)],  # noqa: ASYNC221
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "shape" in out.stderr and "Traceback" not in out.stderr, out.stderr


async def test_client_disconnect_aborts_the_sequence(pd_engines):
    import time

    import aiohttp

    from distserve.testing import pd

    url = pd_engines["hybrid"]
    body = {"model": MODEL, "prompt": "endless", "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{url}/v1/completions", json=body)
        chunks = 0
        async for line in resp.content:
            chunks += line.startswith(b"data: ")
            if chunks >= 3:
                break
        assert (await pd.metrics(http, url))["distserve_engine_requests_running"] >= 1
        resp.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = await pd.metrics(http, url)
            if m["distserve_engine_requests_running"] == 0 and m["distserve_engine_kv_blocks_used"] == 0:
                break
            await asyncio.sleep(0.1)
        assert m["distserve_engine_requests_running"] == 0 and m["distserve_engine_kv_blocks_used"] == 0
