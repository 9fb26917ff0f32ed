"""argparse types for distserve-ctl's options: a bad value is refused while parsing, so it reads as one
line (`distserve-ctl watch: error: argument --limit: ...`) and exits 2 before etcd is contacted."""

from __future__ import annotations

import argparse
import math

from distserve.cluster.keys import validate_id

# etcd revisions are int64; a larger number cannot even be sent
MAX_REVISION = 2**63 - 1
MIN_REFRESH_S = 0.1
MAX_REASON_CHARS = 500


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, not {text!r}")
    return value


def refresh_seconds(text: str) -> float:
    """A redraw period: >= 0.1 s (a smaller one only burns the CPU it is measuring)."""
    value = _number(text)
    if not (math.isfinite(value) and value >= MIN_REFRESH_S):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= {MIN_REFRESH_S:g}, not {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds >= 0."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}") from None
    if not 1 <= value <= MAX_REVISION:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def reason(text: str) -> str:
    """An operator's note on a flag: shown on one line by describe, watch and the engines' logs."""
    if len(text) > MAX_REASON_CHARS or any(c in text for c in "\r\n"):
        raise argparse.ArgumentTypeError(f"expected one line of at most {MAX_REASON_CHARS} characters")
    return text


def engine_id(text: str) -> str:
    return _ident(text, "engine id")


def router_id(text: str) -> str:
    return _ident(text, "router id")


def _ident(text: str, what: str) -> str:
    try:
        return validate_id(text, what)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
