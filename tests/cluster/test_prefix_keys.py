"""distserve.cluster.prefix_keys: the tokenizer-free keys engines and routers both compute."""

from __future__ import annotations

import hashlib

import pytest

from distserve.cluster import prefix_keys as P


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def test_chat_chain_matches_the_design():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "bob"}]
    k0 = _h(b"msg-v1")
    k1 = _h(k0.to_bytes(8, "big") + b"system\x00be brief\x00")
    k2 = _h(k1.to_bytes(8, "big") + b"user\x00hi\x00bob")
    assert P.chat_keys(msgs) == [k1, k2]
    assert P.request_keys({"messages": msgs}) == [k1, k2]


def test_chat_prefix_property_and_parts():
    a = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}]
    b = [*a, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    ka, kb = P.chat_keys(a), P.chat_keys(b)
    assert kb[: len(ka)] == ka  # a conversation's later turn shares its earlier keys
    assert P.chat_keys([{"role": "user", "content": "q2"}]) != kb[3:]  # a key names the whole prefix
    parts = [{"role": "system", "content": [{"type": "text", "text": "S"}]}]
    assert P.chat_keys(parts) == ka[:1]
    # role and content are separated: ("ab","c") and ("a","bc") differ
    assert P.chat_keys([{"role": "ab", "content": "c"}]) != P.chat_keys([{"role": "a", "content": "bc"}])


def test_chat_stops_at_a_malformed_message():
    msgs = [{"role": "user", "content": "x"}, "junk", {"role": "user", "content": "y"}]
    assert len(P.chat_keys(msgs)) == 1
    assert P.chat_keys("not a list") == []
    assert P.chat_keys([{"role": "user", "content": 5}]) == []


def test_text_chunks():
    text = "é" + "x" * 200  # 202 bytes: 3 whole chunks of 64
    keys = P.text_keys(text)
    assert len(keys) == 3
    data = text.encode()
    k = _h(b"txt-v1")
    for j in range(3):
        k = _h(k.to_bytes(8, "big") + data[64 * j: 64 * (j + 1)])
        assert keys[j] == k
    assert P.text_keys("x" * 63) == []
    assert P.text_keys(text + "tail")[:3] == keys  # the same prefix, the same keys
    assert P.request_keys({"prompt": text}) == keys
    assert P.request_keys({"prompt": [text]}) == keys
    assert P.text_keys(text, chunk_bytes=100) != keys[:2]
    with pytest.raises(ValueError):
        P.text_keys("x", chunk_bytes=0)


def test_ids_chunks_and_kinds_never_collide():
    ids = list(range(40))
    keys = P.ids_keys(ids)
    assert len(keys) == 2
    k1 = _h(_h(b"ids-v1").to_bytes(8, "big") + b"".join(i.to_bytes(8, "little") for i in range(16)))
    assert keys[0] == k1
    assert P.request_keys({"prompt": ids}) == keys
    assert P.request_keys({"prompt": [ids]}) == keys
    assert P.request_keys({"prompt": ["a", "b"]}) == []  # a batch has no keys
    assert P.request_keys({"prompt": [True] * 20}) == []
    assert P.request_keys(None) == []
    assert set(P.text_keys("a" * 64)).isdisjoint(P.chat_keys([{"role": "a", "content": "a" * 60}]))


def test_hex_round_trip_and_longest_match():
    keys = P.chat_keys([{"role": "user", "content": str(i)} for i in range(4)])
    for k in keys:
        assert P.parse_key_hex(P.key_hex(k)) == k
        assert len(P.key_hex(k)) == 16
    for bad in ("", "z" * 4, "1" * 17, None):
        with pytest.raises((ValueError, TypeError)):
            P.parse_key_hex(bad)
    assert P.longest_match(keys, {keys[0]: 10, keys[2]: 30}) == (3, 30)
    assert P.longest_match(keys, set()) == (0, 0)
    assert P.longest_match(keys, {keys[1]}) == (2, 0)
