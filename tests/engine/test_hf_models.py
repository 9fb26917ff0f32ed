"""Hugging Face checkpoints on the reference engine: greedy output equals transformers' own `generate`.

Tiny random checkpoints of each supported architecture are built locally (tests/engine/hf_models.py, no
download); each runs on a prefill and a hybrid engine (separate processes). Hybrid requests and PD requests
(prefill -> DLSlime TCP migration -> decode on the hybrid engine), streamed and not, completions and chat,
must give exactly transformers' tokens and text (the chat template applied identically).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest

from tests.engine import hf_models as H
from distserve.testing import pd
from tests.engine.conftest import start_engines

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> (model dir, reference outputs), built once per session."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in H.ARCHS:
        path = H.build(arch, root)
        out[arch] = (path, H.reference_generate(path, H.COMPLETIONS, H.CHATS))
    return out


@pytest.fixture(scope="session")
def hf_engines(checkpoints):
    specs = {}
    for arch, (path, _) in checkpoints.items():
        specs[f"{arch}-prefill"] = ("prefill", "--model", str(path), "--threads", "1")
        specs[f"{arch}-hybrid"] = ("hybrid", "--model", str(path), "--threads", "1")
    engines = start_engines(specs)
    yield engines
    for proc in engines.procs.values():
        proc.stop()


def _requests(arch: str, stream: bool) -> list[tuple[str, dict]]:
    base = {"model": f"tiny-{arch}", "max_tokens": H.MAX_TOKENS, "temperature": 0, "stream": stream}
    items = [("completions", {**base, "prompt": p}) for p in H.COMPLETIONS]
    items += [("chat/completions", {**base, "messages": m}) for m in H.CHATS]
    return items


@pytest.mark.parametrize("arch", H.ARCHS)
async def test_hybrid_and_pd_equal_transformers(checkpoints, hf_engines, arch):
    refs = checkpoints[arch][1]
    p_url, h_url = hf_engines[f"{arch}-prefill"], hf_engines[f"{arch}-hybrid"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await pd.handshake(http, p_url, h_url)
        before = await pd.metrics(http, h_url)
        for stream in (False, True):
            items = _requests(arch, stream)
            # All at once: hybrid requests batch with each other and with the PD decodes.
            hybrid, disagg = await asyncio.gather(
                asyncio.gather(*(pd.generate(http, h_url, r, b) for r, b in items)),
                asyncio.gather(*(pd.pd_generate(http, p_url, h_url, r, b) for r, b in items)))
            for (route, body), ref, h, d in zip(items, refs, hybrid, disagg):
                ids, gen, text, stopped = ref
                want_finish = "stop" if stopped else "length"
                what = f"{arch} {route} stream={stream} {body.get('prompt') or body.get('messages')!r}"
                assert (h[0], h[1]) == (text, want_finish), f"hybrid {what}: {h[:2]!r} != transformers {text!r}"
                assert (d[0], d[1]) == (text, want_finish), f"PD {what}: {d[:2]!r} != transformers {text!r}"
                if not stream:  # the same prompt tokens (template and BOS as transformers) and token count
                    assert h[2] == d[2] == {"prompt_tokens": len(ids), "completion_tokens": len(gen),
                                            "total_tokens": len(ids) + len(gen)}, what
        after = await pd.metrics(http, h_url)
    assert after["distserve_engine_migrations_total"] - before["distserve_engine_migrations_total"] == 12
    # The test can fail: answers are long, differ per prompt, and one stops on a second EOS id.
    texts = [t for _, _, t, _ in refs]
    assert len(set(texts)) == len(texts) and sum(len(t) for t in texts) > 60
    if arch == "qwen2":
        assert refs[0][3] and 3 <= len(refs[0][1]) < H.MAX_TOKENS


async def test_models_route_and_kv_geometry(checkpoints, hf_engines):
    """The served name is the directory's, max_model_len and the KV geometry come from config.json."""
    want = {  # arch: (max_model_len, layers, kv heads, head dim)
        "llama": (1024, 2, 2, 16), "qwen2": (512, 2, 2, 16),
        "mistral": (192, 2, 2, 32),  # capped at the sliding window; head_dim given explicitly
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for arch, (max_len, layers, kv_heads, head_dim) in want.items():
            url = hf_engines[f"{arch}-hybrid"]
            async with http.get(f"{url}/v1/models") as resp:
                models = (await resp.json())["data"]
            assert [(m["id"], m["max_model_len"]) for m in models] == [(f"tiny-{arch}", max_len)]
            info = await pd.engine_info(http, url)
            assert info["kv_layout"] == f"{layers}x*x2x16x{kv_heads}x{head_dim}:float32:1"
            # Over the context: a clear 400 before any compute.
            body = {"model": f"tiny-{arch}", "prompt": "x " * max_len, "max_tokens": 4}
            async with http.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["code"] == "context_length_exceeded"
            # Token ids from the model's vocabulary are accepted, others refused.
            body = {"model": f"tiny-{arch}", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
            async with http.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
            async with http.post(f"{url}/v1/completions", json={**body, "prompt": [5, 10 ** 6]}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_prompt"


def test_streaming_detokenization_never_splits_a_character(checkpoints):
    from transformers import AutoTokenizer

    from distserve.engine.tokenizer import HFTokenizer

    path = checkpoints["llama"][0]
    tok = HFTokenizer(str(path), 500, [1])
    text = "Über naïve 日本語 🎉🚀 ok"
    ids = tok.encode(text)[1:]  # without BOS
    # Meaningful: some character spans several tokens (byte-level pieces of the emoji).
    ref = AutoTokenizer.from_pretrained(path)
    assert any("\ufffd" in ref.decode([t]) for t in ids)
    dec = tok.decoder()
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # EOS ids make no text, even when they are ordinary tokens.
    assert HFTokenizer(str(path), 500, [ids[0]]).decoder().push(ids[0]) == ""
    # The chat template as transformers applies it (the template writes BOS itself: not twice).
    chat = tok.chat(H.CHATS[0])
    assert chat == ref.apply_chat_template(H.CHATS[0], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.count(0) == 1


def test_bfloat16_matches_transformers_bfloat16(checkpoints):
    """--dtype bfloat16: weights, activations and the KV pool in bf16, output as transformers' bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from distserve.engine.config import ModelConfig
    from distserve.engine.model import Model, load_weights

    path, refs = checkpoints["qwen2"]
    cfg = ModelConfig.load(None, {"dtype": "bfloat16", "num_blocks": 16}, hf_dir=str(path))
    assert cfg.element_size == 2 and cfg.block_bytes == 2 * 16 * 2 * 16 * 2
    model = Model(cfg, load_weights(cfg))
    pool = model.new_pool()
    assert pool.dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = refs[1][0]
    x = torch.tensor([ids])
    want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                        pad_token_id=3)[0, len(ids):].tolist()
    blocks = list(range(4))
    logits = model.prefill(pool, [(ids, blocks)])
    with torch.no_grad():
        ref_logits = ref(x).logits[0, -1].float()
    # bf16 rounds every op: the logits agree to bf16 precision, and so does greedy decoding for a while
    # (the fused q/k/v and gate/up matmuls round a little differently from transformers' separate ones).
    assert (logits[0] - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    got = []
    for pos in range(len(ids), len(ids) + len(want)):
        got.append(int(logits[0].argmax()))
        logits = model.decode(pool, [(got[-1], pos, blocks)])
    assert got[:6] == want[:6], (got, want)


def _engine_error(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "distserve", "engine", "--port", "0", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_model_directories(tmp_path, checkpoints):
    good = checkpoints["llama"][0]
    assert "not a directory" in _engine_error("--model", str(tmp_path / "nowhere"))
    assert "config.json: missing" in _engine_error("--model", str(tmp_path))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    line = _engine_error("--model", str(gpt2))
    assert "GPT2LMHeadModel" in line and "not supported" in line
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((good / "config.json").read_text())
    assert "no *.safetensors" in _engine_error("--model", str(bare))
    (bare / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    assert "tokenizer" in _engine_error("--model", str(bare))
    assert "--weights" in _engine_error("--model", str(good), "--seed", "3")
