#!/usr/bin/env python3
"""Fuzz the router's C head parsers and chunk reader (distserve/router/_heads.c) against their Python specification
(distserve/router/heads.py): random heads and chunked pieces made of what the parsers treat specially and of odd
bytes; both must give the same answer or raise the same error, and `request_head` must be safe for any `end` in
its buffer.

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


# a chunked body's pieces
CHUNKS = [b"3\r\nabc\r\n", b"a\r\n0123456789\r\n", b"0\r\n\r\n", b"1;e=1\r\nx\r\n", b"F \r\n", b"-1\r\n",
          b"0x2\r\nab\r\n", b"fffffffffffffff\r\n", b"1000000000000000\r\n", b"3\r\nabcXY", b"\r\n", b"2\r\n"]


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
        body = b"".join(rnd.choice(CHUNKS) if rnd.random() < 0.7 else rnd.choice(PIECES) for _ in range(rnd.randint(0, 12)))
        body = body[: rnd.randint(0, len(body))] if rnd.random() < 0.5 else body
        if outcome(module.whole_chunks, body) != outcome(heads.whole_chunks_py, body):
            print(f"fuzz_heads: whole_chunks differs on {body!r}", file=sys.stderr)
            return 1
    print(f"fuzz_heads: {iterations} heads of each kind, C and Python alike, and as many chunked pieces")
    return 0


def main() -> int:
    return fuzz_main(__file__, __doc__, "_heads", fuzz, 300_000)


if __name__ == "__main__":
    sys.exit(main())
