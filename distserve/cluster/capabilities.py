"""What an engine honours of the OpenAI API beyond the basics, as capability names (docs/router.md
"Capabilities"). Shared by the engine's agent (which writes them into the record) and the router (which
rejects a request that no routable path honours before calling any engine).

Names: `logprobs`, `top_logprobs` (chat), `completion_logprobs` (completions `logprobs: k`), `echo`,
`suffix` (completions), `tools` (chat `tools` / `tool_choice`), `response_format` (chat, other than text),
`seed`, the sampling knobs `top_k`, `min_p`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`,
`logit_bias`, `min_tokens` and `skip_special_tokens` (false), and `shared_prefill` (a prefill that samples
the first token of n choices and keeps the prompt's KV for n decodes).
"""

from __future__ import annotations

# lmdeploy's api_server (PyTorch backend), 0.17 and 0.18 alike, read from its serve/openai code: chat
# logprobs/top_logprobs, tools, response_format, logit_bias; seed, top_k, min_p, repetition_penalty,
# min_new_tokens and skip_special_tokens on both routes. Not honoured there: completions logprobs (dropped
# unary, the stream cut), echo and suffix (accepted and ignored), presence/frequency penalties (ignored).
# Chat logprobs are not claimed for a decode. Measured on a GPU with 0.18.0 (docs/gpu.md, "Logprobs of
# lmdeploy engines"): its first (migrated) token has none, and its unary answer pairs each token with the
# NEXT position's top-k (token "", logprob 0.0): wrong values that no router can repair, so a PD path of
# lmdeploy engines answers 400. The prefill's answer does carry the first token's, equal to a hybrid's.
_LMDEPLOY_COMMON = ("min_p", "min_tokens", "repetition_penalty", "response_format", "seed",
                    "skip_special_tokens", "tools", "top_k", "logit_bias")
LMDEPLOY = {
    "0.17": _LMDEPLOY_COMMON + ("logprobs", "top_logprobs"),
    "0.18": _LMDEPLOY_COMMON + ("logprobs", "top_logprobs"),
}
LMDEPLOY_DECODE_EXCLUDED = frozenset({"logprobs", "top_logprobs"})
# What every engine kind honoured before capabilities were reported (an old agent's record: None).
LEGACY = ("seed",)


def lmdeploy_capabilities(version: str, role: str) -> list[str]:
    """The table's row for an lmdeploy version ("0.18.0", "lmdeploy 0.18.1"...); an unknown version gets
    the newest row at or below it, else the oldest (conservative: only what 0.17 honours)."""
    digits = "".join(c if c.isdigit() or c == "." else " " for c in version).split()
    want = digits[0].split(".")[:2] if digits else []
    key = ".".join(want)
    rows = sorted(LMDEPLOY, key=lambda k: tuple(int(x) for x in k.split(".")))
    row = rows[0]
    try:
        wanted = tuple(int(x) for x in want)
        for k in rows:
            if tuple(int(x) for x in k.split(".")) <= wanted:
                row = k
    except ValueError:
        pass
    caps = set(LMDEPLOY.get(key, LMDEPLOY[row]))
    if role == "decode":
        caps -= LMDEPLOY_DECODE_EXCLUDED
    return sorted(caps)


def effective(record) -> frozenset[str]:
    """A record's capabilities; for an old agent's record (None) the lmdeploy table or LEGACY."""
    caps = record.capabilities
    if caps is not None:
        return frozenset(caps)
    if record.engine_kind == "lmdeploy":
        return frozenset(lmdeploy_capabilities(record.software_version or "", record.role))
    return frozenset(LEGACY)
