"""Prefix caching with a Hugging Face checkpoint (tiny, built locally): greedy output with cached prefixes
equals transformers' own generate, and the chat/text prefix keys use the checkpoint's tokenizer."""

from __future__ import annotations

import aiohttp
import pytest

from distserve.cluster import prefix_keys as PK
from distserve.engine.prefix_cache import key_plan
from distserve.engine.tokenizer import HFTokenizer
from distserve.testing import pd
from tests.engine import hf_models as H
from tests.engine.conftest import start_engines

pytest.importorskip("transformers")

SYSTEM = "You answer questions about KV caches, prefill and decode engines. " * 3
PREFIX = " ".join(H.CORPUS) + " "
PROMPTS = [PREFIX + "First question?", PREFIX + "Second question!"]
CHATS = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What moves?"}],
         [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What moves?"},
          {"role": "assistant", "content": "The KV cache."}, {"role": "user", "content": "And then?"}]]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = H.build("qwen2", tmp_path_factory.mktemp("hf-prefix"))
    refs = H.reference_generate(path, PROMPTS, CHATS)
    engines = start_engines({"prefill": ("prefill", "--model", str(path), "--threads", "1"),
                             "hybrid": ("hybrid", "--model", str(path), "--threads", "1")})
    yield path, refs, engines
    for proc in engines.procs.values():
        proc.stop()


async def test_hf_cached_prefixes_equal_transformers(qwen):
    path, refs, engines = qwen
    p_url, h_url = engines["prefill"], engines["hybrid"]
    base = {"model": "tiny-qwen2", "max_tokens": H.MAX_TOKENS, "temperature": 0}
    items = [("completions", {**base, "prompt": p}) for p in PROMPTS]
    items += [("chat/completions", {**base, "messages": m}) for m in CHATS]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await pd.handshake(http, p_url, h_url)
        for stream in (False, True):  # in order: every request after the first reuses a cached prefix
            for (route, body), (_, _, text, stopped) in zip(items, refs):
                want = (text, "stop" if stopped else "length")
                got = await pd.generate(http, h_url, route, {**body, "stream": stream})
                assert got[:2] == want, (route, stream, "hybrid")
                got = await pd.pd_generate(http, p_url, h_url, route, {**body, "stream": stream})
                assert got[:2] == want, (route, stream, "pd")
        m_h, m_p = await pd.metrics(http, h_url), await pd.metrics(http, p_url)
    assert m_h["distserve_engine_prefix_cache_hit_tokens_total"] > 0.5 * m_h["distserve_engine_prompt_tokens_total"]
    assert m_p["distserve_engine_prefix_cache_hit_tokens_total"] > 0
    assert m_h["distserve_engine_migration_blocks_reused_total"] > 0


def test_hf_key_plan_uses_the_checkpoints_tokenizer(qwen):
    path, refs, _ = qwen
    tok = HFTokenizer(str(path), vocab_size=10 ** 6, eos_ids=[])
    # chat: the template over the first i messages (no generation prompt) is a prefix of the prompt
    ids = tok.chat(CHATS[1])
    plan = dict(key_plan("chat", {"messages": CHATS[1]}, ids, tok, 16))
    keys = PK.chat_keys(CHATS[1])
    sys_len = len(tok.tok(tok.tok.apply_chat_template(CHATS[1][:1], tokenize=False), add_special_tokens=False)
                  ["input_ids"])
    assert plan[keys[0]] == sys_len // 16 * 16 > 0
    assert list(plan) == keys[: len(plan)] and len(plan) >= 3
    # text: tokens wholly inside the first j*64 bytes, via the fast tokenizer's offsets
    text = PROMPTS[0]
    ids = tok.encode(text)
    plan = key_plan("completion", {"prompt": text}, ids, tok, 16)
    enc = tok.tok(text, return_offsets_mapping=True)
    for j, (key, tokens) in enumerate(plan):
        assert key == PK.text_keys(text)[j]
        limit_chars = len(text.encode()[: 64 * (j + 1)].decode("utf-8", "ignore"))
        inside = sum(1 for _, end in enc["offset_mapping"] if end <= limit_chars)
        assert tokens == min(inside, len(ids)) // 16 * 16
