"""Tokenizers: the built-in byte-level one (no downloads) and a checkpoint's own (Hugging Face fast tokenizer).

Byte-level: token ids 0-255 are the bytes of the UTF-8 text; 256 is BOS, 257 EOS, 258 PAD.

Both offer the same interface: `encode(text)` (a completions prompt, special tokens as the model adds them),
`chat(messages)` (the chat template, ready to generate), `decoder()` (streaming detokenization that never
splits a UTF-8 character), `eos_ids` and `vocab_size` (valid prompt token ids).
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


class ByteTokenizer:
    """The built-in model's tokenizer."""

    vocab_size = VOCAB_SIZE
    eos_ids = frozenset({EOS})
    max_token_bytes = 1  # one byte a token: a text's byte count is its token count (less BOS)

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def chat(self, messages: list[dict]) -> list[int]:
        return encode(render_chat(messages))

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder()


BYTE_TOKENIZER = ByteTokenizer()


class HFDecoder:
    """Streaming detokenization with a checkpoint's tokenizer.

    Decodes a short window of ids and emits the text past what the window's older ids already produced,
    holding the text back while it ends in an incomplete character (U+FFFD), so a multi-byte character
    split over several tokens is emitted whole. EOS ids and special tokens produce no text.
    """

    def __init__(self, tok, skip: frozenset[int]) -> None:
        self._tok = tok
        self._skip = skip
        self._ids: list[int] = []
        self._prefix = 0  # ids before this one have been emitted and leave the window
        self._read = 0  # ids before this one produced the text emitted so far

    def _text(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        done = self._text(self._ids[self._prefix: self._read])
        now = self._text(self._ids[self._prefix:])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(done):]
        return ""

    def flush(self) -> str:
        done = self._text(self._ids[self._prefix: self._read])
        now = self._text(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(done):]


class HFTokenizer:
    """A checkpoint's fast tokenizer and chat template (transformers, local files only)."""

    def __init__(self, model_dir: str, vocab_size: int, eos_ids: list[int]) -> None:
        try:
            from transformers import AutoTokenizer  # noqa: PLC0415 - optional `hf` extra, only with --model
        except ImportError:
            raise ValueError("--model needs the `hf` extra: pip install 'distserve[hf]' (transformers)") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, use_fast=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one line for the CLI
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{model_dir}: cannot load the tokenizer: {first}") from None
        self.vocab_size = vocab_size
        own = self.tok.eos_token_id
        self.eos_ids = frozenset([*eos_ids, *([own] if own is not None else [])])

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def chat(self, messages: list[dict]) -> list[int]:
        if not self.tok.chat_template:
            raise ValueError("this model has no chat template (use /v1/completions)")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template may raise for messages it refuses
            raise ValueError(f"the chat template refused the messages: {exc}") from None
        # The template writes the special tokens itself (BOS included): tokenize it as transformers does.
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decoder(self) -> HFDecoder:
        return HFDecoder(self.tok, self.eos_ids)
