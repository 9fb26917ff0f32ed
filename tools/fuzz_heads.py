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

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sanitized import ROOT, load_build, run_sanitized  # noqa: E402
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sanitize", action="store_true", help="build with ASan and UBSan (gcc) and run under them")
    p.add_argument("--module", help=argparse.SUPPRESS)  # the sanitized build, in the child run
    args = p.parse_args()
    if args.iterations < 1:
        print("fuzz_heads: --iterations must be >= 1", file=sys.stderr)
        return 2
    if args.sanitize:
        return run_sanitized("distserve/router/_heads.c", "distserve.router._heads", __file__,
                             ["--iterations", str(args.iterations), "--seed", str(args.seed)])
    if args.module:
        module = load_build("distserve.router._heads", args.module)
    else:
        sys.path.insert(0, str(ROOT))
        from distserve.router import heads

        if heads._c is None:
            print("fuzz_heads: the C module is not built here (tools/setup builds it)", file=sys.stderr)
            return 2
        module = heads._c
    return fuzz(module, args.iterations, args.seed)


if __name__ == "__main__":
    sys.exit(main())
