#!/usr/bin/env python3
"""What the router's per-request primitives cost, one by one (the measured reasons behind issue 22's cuts).

Each row times N iterations of one primitive on a uvloop event loop in this process and prints the CPU
microseconds per iteration (process time, median of --repeats): the "before" and "after" forms of each
change side by side. The whole-request figures are tools/bench_router.py's; this only says where they come
from. No network: the timers and tasks are the loop's own.

    .venv/bin/python tools/bench_primitives.py [--iterations 100000] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discovery.backoff import Backoff, retry  # noqa: E402 - after the path tweak


async def _op(_attempt: int = 1) -> int:
    return 1


async def timeout_block() -> None:
    """before: each engine call inside `asyncio.timeout(...)`."""
    async with asyncio.timeout(60):
        await _op()


async def deadline_timer() -> None:
    """after: one loop timer per engine call, cancelled when the answer is complete (http1's deadline)."""
    loop = asyncio.get_running_loop()
    handle = loop.call_at(loop.time() + 60, _noop)
    await _op()
    handle.cancel()


def _noop() -> None:
    pass


async def shielded_task() -> None:
    """before: the prefill call as its own task behind asyncio.shield."""
    await asyncio.shield(asyncio.ensure_future(_op()))


async def plain_await() -> None:
    """after: awaited in the request's task (the answer is adopted by a background task only on cancel)."""
    await _op()


async def via_retry() -> None:
    """retry-or-fail through discovery.backoff.retry (kept: the first attempt costs this much more)."""
    await retry(_op, attempts=3, backoff=Backoff(0.001, 0.01, jitter=1.0), retry_if=lambda exc: True)


async def timer_per_piece() -> None:
    """before: each wait for a stream's next piece armed (and cancelled) its own idle timer."""
    asyncio.get_running_loop().call_later(30, _noop).cancel()


async def clock_per_piece() -> None:
    """after: each wait only notes when it began; one timer per idle period checks it."""
    asyncio.get_running_loop().time()


async def aiohttp_response() -> None:
    """before: a unary answer as aiohttp's web.Response (then aiohttp's writer serialises it)."""
    resp = web.Response(body=b'{"a": 1}', status=200, content_type="application/json",
                        headers={"X-Request-Id": "abc"})
    resp.headers.items()


async def fast_send_bytes() -> None:
    """after (fast path): the same answer serialised into one bytes object for one transport.write."""
    body = b'{"a": 1}'
    b"".join((b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: abc\r\n",
              b"Content-Length: %d\r\n\r\n" % len(body), body))


ROWS = [
    ("engine call timeout", timeout_block, deadline_timer),
    ("prefill call", shielded_task, plain_await),
    ("retry executor (first attempt)", via_retry, plain_await),
    ("unary answer object", aiohttp_response, fast_send_bytes),
    ("stream piece idle timer", timer_per_piece, clock_per_piece),
]


async def _time(fn, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        await fn()
    return (time.process_time() - start) / n * 1e6


async def run(iterations: int, repeats: int) -> list[dict]:
    out = []
    for name, before, after in ROWS:
        b, a = [], []
        for _ in range(repeats):  # interleaved: drift hits both
            b.append(await _time(before, iterations))
            a.append(await _time(after, iterations))
        out.append({"primitive": name, "before": before.__name__, "after": after.__name__,
                    "before_us": round(statistics.median(b), 2), "after_us": round(statistics.median(a), 2)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.iterations < 1 or args.repeats < 1:
        print("bench_primitives: --iterations and --repeats must be >= 1", file=sys.stderr)
        return 2
    rows = uvloop.run(run(args.iterations, args.repeats))
    print("| primitive | before | µs | after | µs | saved µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['primitive']} | {r['before']} | {r['before_us']} | {r['after']} | {r['after_us']} | "
              f"{r['before_us'] - r['after_us']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
