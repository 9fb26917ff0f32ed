"""Cheap but complete validation of client bodies for /v1/completions and /v1/chat/completions.

One orjson parse and a few isinstance checks per field (no pydantic on the hot path). Everything an
engine would reject with a 4xx is rejected here first, so a bad request never costs an upstream call and
never reaches an engine as a 5xx. Unknown fields pass through (engines may accept extensions), but the
router's own fields never do: a client sending any of them gets a 400.
"""

from __future__ import annotations

from typing import Any

import orjson

from distserve.protocol import INTERNAL_REQUEST_FIELDS
from distserve.router.errors import ApiError

COMPLETIONS = "completions"
CHAT = "chat"

# The prefill leg's copy of the client's completion budget (the prefill itself runs with max_tokens=1):
# an engine that knows it rejects a prompt + max_tokens over its context before computing anything.
DECODE_MAX_TOKENS = "decode_max_tokens"
# OpenAI's default max_tokens for /v1/completions (lmdeploy's and the reference engine's too).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Fields only the router may set. `session_id` is lmdeploy's: in PD mode the router owns the prefill
# session, so a client-chosen one could make two requests share (and free) one prefill session.
FORBIDDEN_FIELDS = frozenset(
    INTERNAL_REQUEST_FIELDS
    | {"session_id", "remote_session_id", "cache_block_ids", "remote_token_ids", "is_dummy_prefill",
       "remote_kv_staging", DECODE_MAX_TOKENS, "remote_logprobs", "remote_session_ids"}
)
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
MAX_STOP = 4
MAX_MODEL_NAME = 512
# n (and best_of) choices per prompt, prompts per /v1/completions request, and choices in all: each choice
# is one decode (one whole request on a hybrid), so one client request is bounded (docs/router.md "n > 1").
MAX_N = 128
MAX_PROMPTS = 128
MAX_CHOICES = 128


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass: excluded on purpose


def _is_num(v: Any) -> bool:
    t = type(v)
    return t is int or t is float


def _opt_int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_int(v):
        raise _bad(f"'{name}' must be an integer", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(f"'{name}' must be {_range(lo, hi)}, got {v}", name)


def _opt_num(
    body: dict, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_num(v):
        raise _bad(f"'{name}' must be a number", name, "invalid_type")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise _bad(f"'{name}' must be {_range(lo, hi, lo_open)}, got {v}", name)


def _opt_bool(body: dict, name: str) -> None:
    v = body.get(name)
    if v is not None and type(v) is not bool:
        raise _bad(f"'{name}' must be a boolean", name, "invalid_type")


def _opt_str(body: dict, name: str) -> None:
    v = body.get(name)
    if v is not None and type(v) is not str:
        raise _bad(f"'{name}' must be a string", name, "invalid_type")


def _opt_obj(body: dict, name: str) -> None:
    v = body.get(name)
    if v is not None and type(v) is not dict:
        raise _bad(f"'{name}' must be an object", name, "invalid_type")


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{'>' if lo_open else '>='} {lo} and <= {hi}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"<= {hi}"


_COMMON_CHECKS = (
    ("max_tokens", _opt_int, (1,)),
    ("max_completion_tokens", _opt_int, (1,)),
    ("temperature", _opt_num, (0, 2)),
    ("top_p", _opt_num, (0, 1, True)),
    ("top_k", _opt_int, (-1,)),
    ("min_p", _opt_num, (0, 1)),
    ("presence_penalty", _opt_num, (-2, 2)),
    ("frequency_penalty", _opt_num, (-2, 2)),
    ("repetition_penalty", _opt_num, (0, None, True)),
    ("n", _opt_int, (1, MAX_N)),
    ("seed", _opt_int, (-(1 << 63), (1 << 64) - 1)),
    ("min_new_tokens", _opt_int, (0,)),
    ("min_tokens", _opt_int, (0,)),
    ("ignore_eos", _opt_bool, ()),
    ("skip_special_tokens", _opt_bool, ()),
    ("user", _opt_str, ()),
    ("logit_bias", _opt_obj, ()),
)
_COMMON_FIELDS = frozenset({"stream", "stream_options", "stop", *(name for name, _, _ in _COMMON_CHECKS)})
# field -> (its place in _COMMON_CHECKS, name, check, bounds): a body's present fields checked in that order
_CHECK_OF = {name: (i, name, check, bounds) for i, (name, check, bounds) in enumerate(_COMMON_CHECKS)}


def parse_json_object(raw: bytes) -> dict:
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, f"request body is not valid JSON: {str(exc).splitlines()[0][:200]}", "invalid_json"
        ) from None
    if type(body) is not dict:
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    return body


def validate_request(kind: str, body: dict) -> str:
    """Check a parsed body; returns the model name. Raises ApiError(400) on anything wrong."""
    forbidden = FORBIDDEN_FIELDS.intersection(body)
    if forbidden:
        name = sorted(forbidden)[0]
        raise ApiError(
            400, f"'{name}' is an internal field and cannot be set by clients", "internal_field", name
        )
    model = body.get("model")
    if model is None:
        raise _bad("missing required field 'model'", "model", "missing_field")
    if type(model) is not str:
        raise _bad("'model' must be a string", "model", "invalid_type")
    if not model or len(model) > MAX_MODEL_NAME:
        raise _bad(f"'model' must be 1-{MAX_MODEL_NAME} characters", "model")
    if kind == COMPLETIONS:
        _check_prompt(body)
        if not _COMPLETIONS_ONLY.isdisjoint(body):  # the usual body has none of them
            _check_completions_only(body)
    else:
        _check_messages(body)
        _opt_bool(body, "logprobs")
        _opt_int(body, "top_logprobs", 0, 20)
        if body.get("top_logprobs") and body.get("logprobs") is not True:  # as OpenAI
            raise _bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        v = body.get("tools")
        if v is not None and (type(v) is not list or not all(type(t) is dict for t in v)):
            raise _bad("'tools' must be an array of objects", "tools", "invalid_type")
        v = body.get("tool_choice")
        if v is not None and type(v) not in (str, dict):
            raise _bad("'tool_choice' must be a string or an object", "tool_choice", "invalid_type")
        _opt_obj(body, "response_format")
    _check_common(body)
    if kind == COMPLETIONS:
        choices = prompt_count(body) * max(body.get("n") or 1, body.get("best_of") or 1)
        if choices > MAX_CHOICES:
            raise _bad(f"at most {MAX_CHOICES} choices per request (prompts x n, or x best_of), got {choices}",
                       "n")
    return model


_COMPLETIONS_ONLY = frozenset({"logprobs", "echo", "suffix", "best_of"})


def _check_completions_only(body: dict) -> None:
    v = body.get("logprobs")
    if v is not None and not (_is_int(v) and 0 <= v <= 20):
        raise _bad("'logprobs' must be an integer between 0 and 20", "logprobs", "invalid_type")
    _opt_bool(body, "echo")
    _opt_str(body, "suffix")
    _opt_int(body, "best_of", 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None:
        if best_of < (body.get("n") if _is_int(body.get("n")) else 1):
            raise _bad("'best_of' must be greater than or equal to 'n'", "best_of")
        if best_of > 1 and body.get("stream") is True:  # as OpenAI
            raise _bad("'best_of' cannot be used with 'stream'", "best_of")


def _check_common(body: dict) -> None:
    present = _COMMON_FIELDS.intersection(body)
    if not present:
        return
    _opt_bool(body, "stream")
    v = body.get("stream_options")
    if v is not None:
        if type(v) is not dict:
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if v.get("include_usage") is not None and type(v.get("include_usage")) is not bool:
            raise _bad("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
        if body.get("stream") is not True:  # OpenAI answers 400 here too
            raise _bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       "stream_options")
    # only the fields the body has (a request sets a few of ~20; a walk over all of them was 5 % of the
    # router's bytecodes per request): in _COMMON_CHECKS' order, so the first bad field named is the same
    # whatever the body's key order
    checks = [_CHECK_OF[name] for name in present if name in _CHECK_OF]
    if len(checks) > 1:
        checks.sort()
    for _place, name, check, bounds in checks:
        check(body, name, *bounds)
    stop = body.get("stop")
    if stop is not None:
        if type(stop) is str:
            items = [stop]
        elif type(stop) is list:
            items = stop
        else:
            raise _bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
        if len(items) > MAX_STOP:
            raise _bad(f"'stop' accepts at most {MAX_STOP} sequences", "stop")
        for s in items:
            if type(s) is not str or not s:
                raise _bad("'stop' sequences must be non-empty strings", "stop", "invalid_type")


def _check_prompt(body: dict) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("missing required field 'prompt'", "prompt", "missing_field")
    if type(prompt) is str:
        if not prompt:
            raise _bad("'prompt' must not be empty", "prompt")
        return
    if type(prompt) is not list:
        raise _bad(
            "'prompt' must be a string, an array of strings or an array of token ids",
            "prompt",
            "invalid_type",
        )
    if not prompt:
        raise _bad("'prompt' must not be empty", "prompt")
    first = prompt[0]
    if type(first) in (str, list):
        # A batch of prompts: fanned out by the router, one request per prompt (distserve.router.fanout).
        if len(prompt) > MAX_PROMPTS:
            raise _bad(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        for item in prompt:
            if type(item) is not type(first):
                raise _bad("a batch of prompts must be all strings or all arrays of token ids", "prompt",
                           "invalid_type")
            if not item:
                raise _bad("'prompt' must not be empty", "prompt")
            if type(item) is list:
                _check_ids(item)
        return
    _check_ids(prompt)


def _check_ids(prompt: list) -> None:
    for t in prompt:
        if not _is_int(t) or t < 0:
            raise _bad("'prompt' token ids must be non-negative integers", "prompt", "invalid_type")


def prompt_count(body: dict) -> int:
    """How many prompts a validated body holds (a batch in /v1/completions; else 1)."""
    prompt = body.get("prompt")
    if type(prompt) is list and prompt and type(prompt[0]) in (str, list):
        return len(prompt)
    return 1


def _check_messages(body: dict) -> None:
    messages = body.get("messages")
    if messages is None:
        raise _bad("missing required field 'messages'", "messages", "missing_field")
    if type(messages) is not list:
        raise _bad("'messages' must be an array", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must not be empty", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if type(m) is not dict:
            raise _bad(f"'{where}' must be an object", where, "invalid_type")
        role = m.get("role")
        if role is None:
            raise _bad(f"missing required field '{where}.role'", where, "missing_field")
        if type(role) is not str or role not in CHAT_ROLES:
            raise _bad(f"'{where}.role' must be one of {', '.join(sorted(CHAT_ROLES))}", where)
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise _bad(f"missing required field '{where}.content'", where, "missing_field")
        elif type(content) is list:
            for j, part in enumerate(content):
                if type(part) is not dict or type(part.get("type")) is not str:
                    raise _bad(
                        f"'{where}.content[{j}]' must be an object with a string 'type'",
                        where,
                        "invalid_type",
                    )
        elif type(content) is not str:
            raise _bad(
                f"'{where}.content' must be a string or an array of content parts", where, "invalid_type"
            )
        name = m.get("name")
        if name is not None and type(name) is not str:
            raise _bad(f"'{where}.name' must be a string", where, "invalid_type")


def requested_max_tokens(kind: str, body: dict) -> int | None:
    """The completion budget engines will reserve for a validated body: the client's limit (chat:
    max_completion_tokens first, as engines read it), else OpenAI's default for completions; None for a
    chat without one (engines give it the rest of the context)."""
    if kind == CHAT:
        return body.get("max_completion_tokens") or body.get("max_tokens")
    v = body.get("max_tokens")
    return COMPLETIONS_DEFAULT_MAX_TOKENS if v is None else v


def check_context(kind: str, body: dict, limit: int, max_token_bytes: int | None = None) -> None:
    """400 `context_length_exceeded` when a validated request certainly cannot fit `limit` tokens (the largest
    context any engine able to serve it has). Only what is certain is counted: a prompt given as token ids
    is exact; a text prompt is at least its UTF-8 byte count / `max_token_bytes` tokens (the most bytes one
    token of the engines' tokenizer covers, from their records: 1 for a byte-level tokenizer), else 1 token
    when the engines do not say, so max_tokens alone rejects it. For a chat only the last user message counts
    (every chat template renders it; some drop or rewrite earlier turns). The prefill engine checks the rest
    before computing anything (`decode_max_tokens`)."""
    max_tokens = requested_max_tokens(kind, body)
    ids = _token_ids(body) if kind == COMPLETIONS else None
    if ids is not None:
        prompt, where = len(ids), "prompt"
    else:
        prompt = 1  # every generation needs one token of prompt
        if max_token_bytes:
            size = _text_bytes(kind, body)
            prompt = max(prompt, -(-size // max_token_bytes))
        where = "prompt" if kind == COMPLETIONS else "messages"
    need = prompt + (max_tokens or 1)
    if need <= limit:
        return
    if ids is not None or (max_tokens or 1) < limit:  # else max_tokens alone leaves no room: name it
        bound = "" if ids is not None else "at least "
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested {bound}{need} "
            f"tokens ({bound}{prompt} in the prompt, {need - prompt} for the completion). Please reduce "
            "the length of the prompt or of the completion.",
            "context_length_exceeded",
            where,
        )
    name = "max_completion_tokens" if kind == CHAT and body.get("max_completion_tokens") else "max_tokens"
    raise ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, '{name}' is {max_tokens}, "
        "which leaves no room for the prompt. Please reduce it.",
        "context_length_exceeded",
        name,
    )


def _text_bytes(kind: str, body: dict) -> int:
    """UTF-8 bytes of the text the engine certainly tokenizes: a completions prompt; a chat's last message
    when it is the user's."""
    if kind == COMPLETIONS:
        prompt = body.get("prompt")
        if type(prompt) is list and prompt and type(prompt[0]) is str:
            prompt = prompt[0]
        return len(prompt.encode()) if type(prompt) is str else 0
    messages = body.get("messages") or ()
    last = messages[-1] if messages else None
    if type(last) is not dict or last.get("role") != "user":
        return 0
    content = last.get("content")
    if type(content) is list:
        return sum(len(p["text"].encode()) for p in content if type(p.get("text")) is str)
    return len(content.encode()) if type(content) is str else 0


def _token_ids(body: dict) -> list | None:
    """The prompt's token ids when it is given as ids (validated), else None."""
    prompt = body.get("prompt")
    if type(prompt) is list and prompt and type(prompt[0]) is list:
        prompt = prompt[0]
    if type(prompt) is list and prompt and type(prompt[0]) is int:
        return prompt
    return None


def prompt_prefix(kind: str, body: dict, max_chars: int) -> bytes:
    """The start of the prompt, for prefix affinity: texts (or token ids) up to max_chars."""
    if kind == COMPLETIONS:
        prompt = body.get("prompt")
        if type(prompt) is list and prompt and type(prompt[0]) in (str, list):
            prompt = prompt[0]
        if type(prompt) is str:
            return prompt[:max_chars].encode()
        # token ids: ~4 characters per token
        return orjson.dumps(prompt[: max(1, max_chars // 4)])
    out: list[str] = []
    size = 0
    for m in body.get("messages") or ():
        content = m.get("content")
        if type(content) is list:
            content = "".join(p.get("text", "") for p in content if type(p.get("text")) is str)
        text = f"{m.get('role')}\x00{content or ''}\x01"
        out.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(out)[:max_chars].encode()
