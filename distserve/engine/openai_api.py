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


# What this engine honours (engine_info `capabilities`, copied into its record by the agent): a router
# rejects a request that uses anything else before calling an engine (docs/reference-engine.md).
CAPABILITIES = ("completion_logprobs", "echo", "frequency_penalty", "logit_bias", "logprobs", "min_p",
                "presence_penalty", "repetition_penalty", "seed", "shared_prefill", "top_k", "top_logprobs")
NULL_CAPABILITIES = ("echo", "seed")  # the null mode answers one fixed text: it samples nothing
MAX_N = 128  # choices of one shared prefill (router: docs/router.md "n > 1")
MAX_TOP_LOGPROBS = 20


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # n > 1 only on a router's prefill leg (preserve_cache): one prefill, n first tokens, n pulls.
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # Known OpenAI/lmdeploy fields this engine does not implement: a non-default value is a 400, never
    # silently ignored (`_unsupported`).
    min_tokens: int | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool | None = None
    best_of: int | None = None
    # The first token's logprobs computed by the prefill ([logprob, [[token id, logprob], ...]]), sent by a
    # router with migration_request: the decode emits them with the first token.
    remote_logprobs: list | None = None
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
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None


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
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


def _unsupported(kind: str, req: Any) -> str | None:
    """The first field set to something this engine does not implement, else None."""
    checks = [
        ("min_tokens", bool(req.min_tokens)),
        ("min_new_tokens", bool(req.min_new_tokens)),
        ("skip_special_tokens", req.skip_special_tokens is False),
        ("best_of", req.best_of not in (None, 1)),
    ]
    if kind == "completion":
        checks += [("suffix", bool(req.suffix)),
                   ("echo", bool(req.echo) and req.logprobs is not None)]  # prompt logprobs: not computed
    else:
        checks += [("tools", bool(req.tools)),
                   ("tool_choice", req.tool_choice not in (None, "none")),
                   ("response_format", req.response_format is not None
                    and req.response_format.get("type", "text") != "text")]
    return next((name for name, bad in checks if bad), None)


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
    # Sampling knobs (None / 0: off), applied to the raw logits in this order: logit_bias, repetition,
    # presence and frequency penalties (over generated tokens; repetition over prompt + generated), then
    # temperature, top_k, min_p, top_p.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    # Logprobs of each sampled token (log-softmax of the raw logits, before any knob) and its `logprobs`
    # most likely alternatives; None: not computed.
    logprobs: int | None = None
    first_logprobs: list | None = None  # a migrated first token's, from the prefill (remote_logprobs)
    n: int = 1  # choices sampled from this prefill's logits (prefill leg of a shared prefill only)


def _needs(kind: str, req: Any) -> list[tuple[str, str]]:
    """(field, capability) for each capability-gated field the request uses (the router's twin:
    distserve.router.capabilities.required)."""
    out = []
    if req.seed is not None:
        out.append(("seed", "seed"))
    for name in ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(req, name):
            out.append((name, name))
    if kind == "completion":
        if req.logprobs is not None:
            out.append(("logprobs", "completion_logprobs"))
        if req.echo:
            out.append(("echo", "echo"))
    else:
        if req.logprobs:
            out.append(("logprobs", "logprobs"))
        if req.top_logprobs:
            out.append(("top_logprobs", "top_logprobs"))
    if req.n > 1:
        out.append(("n", "shared_prefill"))
    return out


def parse_request(kind: str, body: Any, served_model: str, max_model_len: int,
                  tok: Any = None, capabilities: tuple[str, ...] = CAPABILITIES) -> tuple[Any, SamplingRequest]:
    """Validate an OpenAI body; ApiError(400/404) on anything wrong. `tok`: the engine's tokenizer (bytes);
    `capabilities`: what this engine honours (anything else used is a 400, never ignored)."""
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
    bad = _unsupported(kind, req) or next((f for f, cap in _needs(kind, req) if cap not in capabilities), None)
    if bad is not None:
        raise ApiError(400, f"'{bad}' is not supported by this engine", "unsupported_parameter", param=bad)
    if req.n > 1 and not req.preserve_cache:
        # a router fans n out; only its prefill leg samples n first tokens from one prefill
        raise ApiError(400, "n > 1 is served through a distserve router; this engine generates one choice per "
                       "request", "unsupported_parameter", param="n")
    if kind == "completion":
        logprobs = req.logprobs
    else:
        if req.top_logprobs and not req.logprobs:  # as OpenAI
            raise ApiError(400, "'top_logprobs' requires 'logprobs' to be true", "invalid_value",
                           param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    bias = None
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            if not key.isdigit() or not 0 <= int(key) < tok.vocab_size or not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: keys must be token ids in [0, {tok.vocab_size}) and values "
                               "in [-100, 100]", "invalid_value", param="logit_bias")
            bias[int(key)] = float(value)
    first_logprobs = None
    if req.remote_logprobs is not None:
        if req.migration_request is None or not _is_logprob_entry(req.remote_logprobs):
            raise ApiError(400, "remote_logprobs needs migration_request and the form [logprob, [[id, logprob]]]",
                           "invalid_migration_request", param="remote_logprobs")
        first_logprobs = req.remote_logprobs
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
        top_k=req.top_k if req.top_k and req.top_k > 0 else None,
        min_p=req.min_p or None,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty not in (None, 1.0) else None,
        presence_penalty=req.presence_penalty or None,
        frequency_penalty=req.frequency_penalty or None,
        logit_bias=bias,
        logprobs=logprobs,
        first_logprobs=first_logprobs,
        n=req.n,
    )
    return req, sampling


def _is_logprob_entry(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 2 and isinstance(v[0], (int, float)) and isinstance(v[1], list)
            and len(v[1]) <= MAX_TOP_LOGPROBS
            and all(isinstance(t, list) and len(t) == 2 and type(t[0]) is int and isinstance(t[1], (int, float))
                    for t in v[1]))


def token_bytes(tok: Any, token_id: int) -> bytes:
    """The bytes one token stands for (the engine's tokenizer; b"" for special tokens)."""
    hf = getattr(tok, "tok", None)
    if hf is not None:
        return hf.decode([token_id], skip_special_tokens=True, clean_up_tokenization_spaces=False).encode()
    return bytes([token_id]) if 0 <= token_id < 256 else b""


def logprobs_body(kind: str, tok: Any, entries: list, k: int, offset: int = 0) -> dict:
    """OpenAI's logprobs object for `entries` ([logprob, [[id, logprob], ...]] per token, the sampled token's
    id first in a parallel list: see Step.logprobs). Chat: {"content": [...]}; completions: the legacy form
    (tokens, token_logprobs, top_logprobs, text_offset from `offset`)."""
    if kind == "chat":
        content = []
        for token_id, (lp, top) in entries:
            raw = token_bytes(tok, token_id)
            content.append({"token": raw.decode(errors="replace"), "logprob": lp, "bytes": list(raw),
                            "top_logprobs": [{"token": (b := token_bytes(tok, t)).decode(errors="replace"),
                                              "logprob": v, "bytes": list(b)} for t, v in top[:k]]})
        return {"content": content}
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, (lp, top) in entries:
        text = token_bytes(tok, token_id).decode(errors="replace")
        tokens.append(text)
        token_logprobs.append(lp)
        top_map: dict[str, float] = {}
        for t, v in top[:k]:
            top_map.setdefault(token_bytes(tok, t).decode(errors="replace"), v)
        tops.append(top_map)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, rid: str, model: str, created: int, text: str, finish: str | None,
                    prompt_tokens: int, completion_tokens: int, logprobs: dict | None = None) -> dict:
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(kind: str, rid: str, model: str, created: int, text: str | None, finish: str | None,
               first: bool = False, logprobs: dict | None = None) -> dict:
    if kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    else:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
