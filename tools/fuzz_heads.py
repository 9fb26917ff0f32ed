#!/usr/bin/env python3
"""Fuzz the router's C head parsers (distserve/router/_heads.c) against their Python specification
(distserve/router/heads.py): random heads made of the pieces the parsers treat specially and of odd bytes; both
must give the same answer or raise the same error, and `request_head` must be safe for any `end` in its buffer.

`--sanitize` builds the C module afresh with AddressSanitizer and UndefinedBehaviorSanitizer (gcc) into a
temporary directory and runs the fuzzing under it (its runtime preloaded): a read past a buffer, a leak of a
reference that crashes later, or undefined arithmetic stops the run with the sanitizer's report.

    .venv/bin/python tools/fuzz_heads.py [--iterations 300000] [--seed 7] [--sanitize]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sanitized import ROOT, fuzz_main  # noqa: E402
PIECES = [b"\r\n", b":", b" ", b"\t", b"HTTP/1.1 ", b"HTTP/1.0 ", b"200", b"204", b"101", b"content-length",
          b"Content-Length: ", b"1", b"0", b"9", b"transfer-encoding: chunked", b"connection: close",
          b"Connection: Upgrade", b"x-request-id", b"Authorization: ", b"POST ", b"GET ", b"/v1/completions",
          b"/v1/chat/completions", b" HTTP/1.1", b"\r", b"\n", b"a", b"\x00", b"\xff", b"expect", b"99999999999999999999"]


def fuzz(module, iterations: int, seed: int) -> int:
    sys.path.insert(0, str(ROOT))
    from distserve.router import heads

    rnd = random.Random(seed)

    def head() -> bytes:
        return b"".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, 30)))

    def outcome(fn, *args):
        try:
            return "ok", fn(*args)
        except ValueError as exc:
            return "ValueError", str(exc)

    for _ in range(iterations):
        h = head()
        if outcome(module.answer_head, h) != outcome(heads.answer_head_py, h):
            print(f"fuzz_heads: answer_head differs on {h!r}", file=sys.stderr)
            return 1
        buf = h + b"\r\n\r\n" + head()
        end, limit = buf.find(b"\r\n\r\n"), rnd.choice([0, 3, 100, 1 << 40])
        if module.request_head(buf, end, limit) != heads.request_head_py(buf, end, limit):
            print(f"fuzz_heads: request_head differs on {buf!r} (end {end}, limit {limit})", file=sys.stderr)
            return 1
        module.request_head(buf, rnd.randint(0, len(buf)), limit)  # any end in the buffer is safe
    print(f"fuzz_heads: {iterations} heads of each kind, C and Python alike")
    return 0


def main() -> int:
    return fuzz_main(__file__, __doc__, "_heads", fuzz, 300_000)


if __name__ == "__main__":
    sys.exit(main())
