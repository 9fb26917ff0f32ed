"""OpenAI request validation and answer bodies for the engine (no torch).

Requests are parsed into `SamplingRequest`, a transport-free description of one generation; the server
turns generated token ids into OpenAI answers (stream chunks or one body).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distserve.engine import tokenizer
from distserve.protocol import MigrationRequest


class ApiError(Exception):
    """An error answered as OpenAI JSON `{"error": {"message", "type", "code"}}`."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", type_: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False
    # Internal fields (a router sets them; the engine trusts whoever holds its API key).
    with_cache: bool = False
    preserve_cache: bool = False
    migration_request: MigrationRequest | None = None
    # A router's prefill leg runs with max_tokens=1; this is the client's budget its decode will run with,
    # checked against the context here so an over-long request costs no prefill.
    decode_max_tokens: int | None = Field(None, ge=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _none_default(cls, v: Any, info: Any) -> Any:
        if v is None:
            return 1.0
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        chunks = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            chunks.append(part["text"])
        return "".join(chunks)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass
class SamplingRequest:
    """One generation, as the backends see it."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    preserve_cache: bool = False
    migration: MigrationRequest | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def parse_request(kind: str, body: Any, served_model: str, max_model_len: int,
                  tok: Any = None) -> tuple[Any, SamplingRequest]:
    """Validate an OpenAI body; ApiError(400/404) on anything wrong. `tok`: the engine's tokenizer (bytes)."""
    tok = tok if tok is not None else tokenizer.BYTE_TOKENIZER
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    try:
        req = cls.model_validate(body)
    except ValidationError as exc:
        code = "invalid_migration_request" if any(
            e.get("loc", ("",))[0] == "migration_request" for e in exc.errors()) else "invalid_request"
        raise ApiError(400, validation_message(exc), code) from None
    if req.model != served_model:
        raise ApiError(404, f"The model `{req.model}` does not exist (served: {served_model})", "model_not_found")
    if req.stream_options is not None and not req.stream:  # as OpenAI
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       "invalid_value", param="stream_options")
    if kind == "completion":
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", "invalid_prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
            if not ids:  # a tokenizer that adds no BOS
                raise ApiError(400, "prompt must not be empty", "invalid_prompt")
        else:
            ids = list(prompt)
            if not ids:
                raise ApiError(400, "prompt must not be empty", "invalid_prompt")
            if any(not (0 <= t < tok.vocab_size) for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {tok.vocab_size})", "invalid_prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
    else:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = tok.chat(messages)  # ValueError: a chat template that refuses the messages
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, max_model_len - len(ids))
    prompt_param = "prompt" if kind == "completion" else "messages"
    if len(ids) >= max_model_len:
        raise ApiError(400, f"prompt has {len(ids)} tokens; the maximum context length is {max_model_len}",
                       "context_length_exceeded", param=prompt_param)
    # the decode's budget counts, not this leg's max_tokens=1: checked before anything is computed
    budget = max(max_tokens, req.decode_max_tokens or 0)
    if len(ids) + budget > max_model_len:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({budget}) exceeds the maximum context "
                       f"length {max_model_len}", "context_length_exceeded", param=prompt_param)
    if req.migration_request is not None and req.preserve_cache:
        raise ApiError(400, "migration_request and preserve_cache are exclusive", "invalid_migration_request")
    if req.seed is not None and not (-(1 << 63) <= req.seed < (1 << 64)):
        raise ApiError(400, "seed out of range", "invalid_request")
    sampling = SamplingRequest(
        prompt_ids=ids,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
        preserve_cache=req.preserve_cache,
        migration=req.migration_request,
    )
    return req, sampling


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, rid: str, model: str, created: int, text: str, finish: str | None,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(kind: str, rid: str, model: str, created: int, text: str | None, finish: str | None,
               first: bool = False) -> dict:
    if kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
