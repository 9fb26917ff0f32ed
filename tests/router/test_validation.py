"""Client body validation as a pure function: every malformed request is a 400 with the field named."""

from __future__ import annotations

import orjson
import pytest

from distserve.router.errors import ApiError
from distserve.router.orchestrator import splice_field
from distserve.router.validation import (
    CHAT,
    COMPLETIONS,
    check_context,
    parse_json_object,
    prompt_prefix,
    requested_max_tokens,
    validate_request,
)

OK_COMPLETION = {"model": "m", "prompt": "hi"}
OK_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def err(kind: str, body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate_request(kind, body)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]", b'"text"', b"null", b"{'a': 1}", b"\xff\xfe"])
def test_not_a_json_object(raw):
    with pytest.raises(ApiError) as info:
        parse_json_object(raw)
    assert info.value.status == 400 and info.value.code == "invalid_json"


@pytest.mark.parametrize(
    "field",
    ["migration_request", "with_cache", "preserve_cache", "session_id", "remote_kv_staging", "decode_max_tokens"],
)
@pytest.mark.parametrize("kind,base", [(COMPLETIONS, OK_COMPLETION), (CHAT, OK_CHAT)])
def test_internal_fields_are_rejected(kind, base, field):
    e = err(kind, {**base, field: {"protocol": 1} if field == "migration_request" else True})
    assert e.code == "internal_field" and e.param == field


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x"}, "model"),
        ({"model": 3, "prompt": "x"}, "model"),
        ({"model": ""}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": [1, -2]}, "prompt"),
        ({"model": "m", "prompt": [1, True]}, "prompt"),
        ({"model": "m", "prompt": ["a", ""]}, "prompt"),  # a batch (issue 19: fanned out) with an empty one
        ({"model": "m", "prompt": ["a", [1]]}, "prompt"),  # a batch mixing texts and token ids
        ({"model": "m", "prompt": ["a"] * 129}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"], "n": 100}, "n"),  # 200 choices > 128
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 129}, "n"),
        ({"model": "m", "prompt": "x", "n": 3, "best_of": 2}, "best_of"),
        ({"model": "m", "prompt": "x", "best_of": 2, "stream": True}, "best_of"),
        ({"model": "m", "prompt": "x", "stop": 3}, "stop"),
        ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "x", "stream_options": []}, "stream_options"),
        ({"model": "m", "prompt": "x", "seed": 1 << 70}, "seed"),
        ({"model": "m", "prompt": "x", "logprobs": 50}, "logprobs"),
    ],
)
def test_completions_bad_fields(body, param):
    assert err(COMPLETIONS, body).param == param


# a bad value of each checked common field, in _COMMON_CHECKS' order
_BAD_COMMON = [
    ("max_tokens", 0), ("max_completion_tokens", 0), ("temperature", 3), ("top_p", 0), ("top_k", -2),
    ("min_p", 2), ("presence_penalty", 3), ("frequency_penalty", -3), ("repetition_penalty", 0), ("n", 0),
    ("seed", 1 << 64), ("min_new_tokens", -1), ("min_tokens", -1), ("ignore_eos", 1),
    ("skip_special_tokens", "yes"), ("user", 1), ("logit_bias", []),
]


@pytest.mark.parametrize("first", range(len(_BAD_COMMON)))
def test_the_first_bad_common_field_named_whatever_the_key_order(first):
    """Only the fields a body has are checked, in one fixed order: two bad fields in either key order name
    the same one, the earlier in that order (what a client fixing its request one error at a time relies on)."""
    for second in range(first + 1, len(_BAD_COMMON)):
        a, b = _BAD_COMMON[first], _BAD_COMMON[second]
        for pair in ((a, b), (b, a)):
            body = {"model": "m", "prompt": "hi", "stream": False, **dict(pair)}
            assert err(COMPLETIONS, body).param == a[0], pair
    name, value = _BAD_COMMON[first]  # alone, with good common fields around it
    assert err(CHAT, {**OK_CHAT, "max_tokens": 5, name: value, "temperature": 1.0, "stop": "x"}
               if name not in ("max_tokens", "temperature") else {**OK_CHAT, name: value}).param == name


@pytest.mark.parametrize(
    "messages",
    [
        None,
        "hi",
        [],
        [1],
        [{"content": "x"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"text": "no type"}]}],
    ],
)
def test_chat_bad_messages(messages):
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    assert err(CHAT, body).param.startswith("messages")


def test_good_bodies_pass_and_unknown_fields_travel():
    assert validate_request(COMPLETIONS, {**OK_COMPLETION, "vendor_extension": {"x": 1}, "top_k": 40}) == "m"
    assert (
        validate_request(
            COMPLETIONS,
            {"model": "m", "prompt": [[1, 2, 3]], "stream": True, "stream_options": {"include_usage": True}},
        )
        == "m"
    )
    assert (
        validate_request(
            CHAT,
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                    {"role": "assistant", "content": None, "tool_calls": []},
                ],
                "max_completion_tokens": 3,
            },
        )
        == "m"
    )


def test_splice_keeps_the_client_bytes_and_adds_the_field():
    raw = b'{"model": "m", "prompt": "x\\u00e9 }", "stream": true}  \n'
    out = orjson.loads(splice_field(raw, b"migration_request", orjson.dumps({"remote_session_id": 7})))
    assert out == {
        "model": "m",
        "prompt": "x\u00e9 }",
        "stream": True,
        "migration_request": {"remote_session_id": 7},
    }


def test_prompt_prefix_is_stable_and_bounded():
    a = prompt_prefix(CHAT, {"messages": [{"role": "system", "content": "s" * 1000}]}, 64)
    assert len(a) == 64 and a == prompt_prefix(
        CHAT, {"messages": [{"role": "system", "content": "s" * 999}]}, 64
    )
    assert prompt_prefix(COMPLETIONS, {"prompt": "abc"}, 2) == b"ab"
    assert prompt_prefix(COMPLETIONS, {"prompt": [[5, 6, 7]]}, 8) == b"[5,6]"


@pytest.mark.parametrize("kind,base", [(COMPLETIONS, OK_COMPLETION), (CHAT, OK_CHAT)])
@pytest.mark.parametrize("stream", [False, None, "absent"])
def test_stream_options_need_stream_true(kind, base, stream):
    body = {**base, "stream_options": {"include_usage": True}}
    if stream != "absent":
        body["stream"] = stream
    e = err(kind, body)
    assert e.param == "stream_options" and e.code == "invalid_value"
    assert "only allowed when 'stream' is enabled" in e.message
    # null stream_options is no stream_options; with stream: true they are fine
    assert validate_request(kind, {**base, "stream_options": None, "stream": False}) == "m"
    assert validate_request(kind, {**base, "stream_options": {}, "stream": True}) == "m"


def test_requested_max_tokens_is_what_engines_reserve():
    assert requested_max_tokens(COMPLETIONS, {"prompt": "x"}) == 16  # OpenAI's default for completions
    assert requested_max_tokens(COMPLETIONS, {"prompt": "x", "max_tokens": None}) == 16
    assert requested_max_tokens(COMPLETIONS, {"prompt": "x", "max_tokens": 7}) == 7
    assert requested_max_tokens(CHAT, OK_CHAT) is None  # engines give a chat the rest of the context
    assert requested_max_tokens(CHAT, {**OK_CHAT, "max_tokens": 9}) == 9
    assert requested_max_tokens(CHAT, {**OK_CHAT, "max_tokens": 9, "max_completion_tokens": 4}) == 4


def ctx_err(kind: str, body: dict, limit: int, max_token_bytes: int | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        check_context(kind, body, limit, max_token_bytes)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert str(limit) in info.value.message
    return info.value


def test_check_context_rejects_only_what_is_certain():
    ids = {"model": "m", "prompt": [1] * 100}
    check_context(COMPLETIONS, {**ids, "max_tokens": 28}, 128)  # exactly the context
    assert ctx_err(COMPLETIONS, {**ids, "max_tokens": 29}, 128).param == "prompt"
    assert ctx_err(COMPLETIONS, {"model": "m", "prompt": [[1] * 100], "max_tokens": 29}, 128).param == "prompt"
    check_context(COMPLETIONS, ids, 116)  # + the default 16
    assert ctx_err(COMPLETIONS, ids, 115).param == "prompt"
    # text: a token may cover many bytes, so only max_tokens alone (plus the one token any prompt has) decides
    text = {"model": "m", "prompt": "x" * 10_000}
    check_context(COMPLETIONS, {**text, "max_tokens": 127}, 128)
    assert ctx_err(COMPLETIONS, {**text, "max_tokens": 128}, 128).param == "max_tokens"
    check_context(CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}, 128)
    check_context(CHAT, {**OK_CHAT, "max_tokens": 127}, 128)
    assert ctx_err(CHAT, {**OK_CHAT, "max_tokens": 500}, 128).param == "max_tokens"
    assert ctx_err(CHAT, {**OK_CHAT, "max_completion_tokens": 500}, 128).param == "max_completion_tokens"


def test_check_context_bounds_text_by_the_tokenizers_longest_token():
    """Engines that publish max_token_bytes let the router count a text prompt's tokens from below."""
    text = {"model": "m", "prompt": "é" * 100, "max_tokens": 10}  # 200 UTF-8 bytes
    check_context(COMPLETIONS, text, 128, None)  # unknown tokenizer: nothing certain
    err = ctx_err(COMPLETIONS, text, 128, 1)  # byte-level: at least 200 tokens
    assert err.param == "prompt" and "at least 210" in err.message
    check_context(COMPLETIONS, text, 128, 2)  # at least 100 + 10
    assert ctx_err(COMPLETIONS, text, 109, 2).param == "prompt"
    chat = {**OK_CHAT, "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 300}]}
    assert ctx_err(CHAT, chat, 128, 1).param == "messages"
    check_context(CHAT, chat, 128, 4)  # at least 75 + 10
    parts = {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 300}]}]}
    assert ctx_err(CHAT, parts, 128, 1).param == "messages"
    # only the last user message is certain to be rendered: earlier turns may be dropped by a template
    older = {**chat, "messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]}
    check_context(CHAT, older, 128, 1)
