"""A byte-level tokenizer (no downloads) and a simple chat template.

Token ids 0-255 are the bytes of the UTF-8 text; 256 is BOS, 257 EOS, 258 PAD.
"""

from __future__ import annotations

import codecs

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259


def encode(text: str, add_bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS, *ids] if add_bos else ids


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Turns a stream of byte tokens into text, holding back incomplete UTF-8 sequences."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return self._decoder.decode(bytes([token_id]))
        return ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def render_chat(messages: list[dict]) -> str:
    """`<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n` to prompt the answer."""
    parts = []
    for message in messages:
        parts.append(f"<|{message['role']}|>\n{message['content']}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)
