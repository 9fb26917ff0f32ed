"""Which engine capabilities a client request needs (distserve.cluster.capabilities has the names), and
which routable paths honour them: the router sends a request only along a path that applies every field
it uses, and answers 400 `unsupported_parameter` naming the field when none does (docs/router.md
"Capabilities"). A field at its default (tool_choice "none", response_format text, penalties 0...) needs
nothing.
"""

from __future__ import annotations

from distserve.router.validation import CHAT, COMPLETIONS

SHARED_PREFILL = "shared_prefill"
# Sampling fields named after their capability, with the value that means "off".
_KNOBS = (("top_k", (None, 0, -1)), ("min_p", (None, 0)), ("repetition_penalty", (None, 1)),
          ("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0)), ("logit_bias", (None, {})))


# every field `required` looks at: a body with none of them (the usual one) needs nothing, found by one
# set intersection instead of ~15 lookups per request
_GATED = frozenset({"seed", "min_tokens", "min_new_tokens", "skip_special_tokens", "logprobs", "best_of", "echo",
                    "suffix", "top_logprobs", "tools", "tool_choice", "response_format", *(n for n, _ in _KNOBS)})


def required(kind: str, body: dict) -> tuple[tuple[str, str], ...]:
    """(field, capability) for each gated field a validated body uses, in a fixed order."""
    if _GATED.isdisjoint(body):
        return ()
    out: list[tuple[str, str]] = []
    if body.get("seed") is not None:
        out.append(("seed", "seed"))
    for name, off in _KNOBS:
        if body.get(name) not in off:
            out.append((name, name))
    if body.get("min_tokens") or body.get("min_new_tokens"):
        out.append(("min_tokens" if body.get("min_tokens") else "min_new_tokens", "min_tokens"))
    if body.get("skip_special_tokens") is False:
        out.append(("skip_special_tokens", "skip_special_tokens"))
    if kind == COMPLETIONS:
        if body.get("logprobs") is not None:
            out.append(("logprobs", "completion_logprobs"))
        elif (body.get("best_of") or 1) > (body.get("n") or 1):
            # the router ranks best_of choices by their logprobs
            out.append(("best_of", "completion_logprobs"))
        if body.get("echo") is True:
            out.append(("echo", "echo"))
        if body.get("suffix"):
            out.append(("suffix", "suffix"))
    elif kind == CHAT:
        if body.get("logprobs") is True:
            out.append(("logprobs", "logprobs"))
        if body.get("top_logprobs"):
            out.append(("top_logprobs", "top_logprobs"))
        if body.get("tools"):
            out.append(("tools", "tools"))
        if body.get("tool_choice") not in (None, "none"):
            out.append(("tool_choice", "tools"))
        rf = body.get("response_format")
        if rf is not None and rf.get("type", "text") != "text":
            out.append(("response_format", "response_format"))
    return tuple(out)


def unsupported(needs: tuple[tuple[str, str], ...], paths: list[frozenset[str]]) -> str | None:
    """The field to name when no path honours every need (None when one does): the first field no path
    honours at all, else the first one the path honouring the most lacks."""
    caps = {cap for _, cap in needs}
    if not needs or any(caps <= p for p in paths):
        return None
    for field, cap in needs:
        if not any(cap in p for p in paths):
            return field
    best = max(paths, key=lambda p: len(caps & p), default=frozenset())
    return next(field for field, cap in needs if cap not in best)
