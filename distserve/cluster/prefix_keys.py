"""Tokenizer-free prefix keys: "this prefix of the request is cached" (pure, no torch, no tokenizer).

Engines and routers both compute them from the request body alone (the router stays model-agnostic):
- chat: a hash chain over whole messages; key i names "the first i messages";
- text prompt: a hash chain over whole CHUNK_BYTES-byte chunks of its UTF-8 bytes; key j names "the first
  j*CHUNK_BYTES bytes";
- token-id prompt: a hash chain over whole chunks of CHUNK_IDS ids.

H = blake2b(digest_size=8) as a 64-bit int; k_i = H(k_{i-1} as 8 big-endian bytes || item_i). The seed
k_0 differs per kind, so a chat key never equals a text key. Keys are per model (compare them only between
engines serving the same model). The engine marks a key cached while every token of that prefix lying in a
full KV block is cached (docs/architecture.md: the approximation).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

CHUNK_BYTES = 64  # text prompts: bytes per chunk (published in the engine record: it may change)
CHUNK_IDS = 16  # token-id prompts: ids per chunk
VERSION = 1

_SEED_CHAT = b"msg-v1"
_SEED_TEXT = b"txt-v1"
_SEED_IDS = b"ids-v1"


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _chain(seed: bytes, items: Iterable[bytes]) -> list[int]:
    key = _h(seed)
    out = []
    for item in items:
        key = _h(key.to_bytes(8, "big") + item)
        out.append(key)
    return out


def key_hex(key: int) -> str:
    return f"{key:016x}"


def parse_key_hex(text: str) -> int:
    """The key of a hex string from the stream; ValueError for anything but 1-16 hex digits."""
    if not isinstance(text, str) or not 0 < len(text) <= 16:
        raise ValueError(f"bad prefix key {text!r}")
    return int(text, 16)


def message_text(content: Any) -> str | None:
    """A message's text: the content string, or the `text` of its text parts concatenated; None if neither."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                return None
            text = part.get("text")
            if isinstance(text, str):
                parts.append(text)
        return "".join(parts)
    return None


def canon_message(message: Any) -> bytes | None:
    """role + NUL + text + NUL + name (or empty), UTF-8; None for a message that is not a chat message."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return None
    text = message_text(message.get("content"))
    if text is None:
        return None
    name = message.get("name")
    name = name if isinstance(name, str) else ""
    return f"{message['role']}\x00{text}\x00{name}".encode("utf-8", "surrogatepass")


def chat_keys(messages: Any) -> list[int]:
    """[k_1..k_n]: k_i names the first i messages (stops before the first message that is not one)."""
    if not isinstance(messages, list):
        return []
    items = []
    for message in messages:
        canon = canon_message(message)
        if canon is None:
            break
        items.append(canon)
    return _chain(_SEED_CHAT, items)


def text_keys(prompt: str, chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """[k_1..k_m], m = floor(len(utf8) / chunk_bytes): k_j names the first j*chunk_bytes bytes."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    data = prompt.encode("utf-8", "surrogatepass")
    return _chain(_SEED_TEXT, (data[i: i + chunk_bytes] for i in range(0, len(data) - chunk_bytes + 1, chunk_bytes)))


def ids_keys(ids: list[int], chunk_ids: int = CHUNK_IDS) -> list[int]:
    """[k_1..k_m], m = floor(len(ids) / chunk_ids), each id as 8 little-endian bytes (two's complement)."""
    def chunk(i: int) -> bytes:
        return b"".join((t & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for t in ids[i: i + chunk_ids])

    return _chain(_SEED_IDS, (chunk(i) for i in range(0, len(ids) - chunk_ids + 1, chunk_ids)))


def request_keys(body: Any, chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """The keys of an OpenAI request body: chat `messages`, or a completions `prompt` (a string or a list of
    token ids). Anything else (a batch of prompts, a malformed body) has no keys: []."""
    if not isinstance(body, dict):
        return []
    if "messages" in body:
        return chat_keys(body["messages"])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return text_keys(prompt, chunk_bytes)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return ids_keys(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return request_keys({"prompt": prompt[0]}, chunk_bytes)  # a batch of one
    return []


def longest_match(keys: list[int], cached: "dict[int, int] | set[int]") -> tuple[int, int]:
    """(i, tokens): the longest prefix i (1-based, 0 = none) whose key is in `cached`; tokens is its value
    when `cached` is a dict {key: tokens}, else 0. Scans from the longest (the chain makes a hit on k_i
    imply the request shares the first i items)."""
    for i in range(len(keys), 0, -1):
        if keys[i - 1] in cached:
            return i, (cached[keys[i - 1]] if isinstance(cached, dict) else 0)
    return 0, 0
