#!/usr/bin/env python3
"""KV migration bandwidth: DLSlime TCP through distserve.migration vs a plain loopback TCP socket copy.

Both run in the same invocation, each between two OS processes on loopback:
  * baseline: one persistent socket, the server sendall()s N bytes, the client recv_into()s them;
  * migration: a serving process registers a KV pool (the engine's layout: layers x blocks x block bytes)
    in a DlslimeTcpTransport; the reading process plans reads with distserve.migration.geometry
    (coalescing, <= 31 assignments per call, bounded calls in flight) and pulls the whole pool, with the
    blocks either contiguous (best case) or in a random order (worst case: one assignment per block).
Then, with real engines (default model), the migration time of a 1,000-token prompt (prefill engine ->
decode engine), the decode-side pull time from the engine's own metrics.

Usage: .venv/bin/python tools/bench_migration.py [--sizes-mib 1,4,16,64,256] [--repeat 5] [--no-engine]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD_DIM = 4, 16, 4, 64  # the default engine's block: 32 KiB per layer
BLOCK_BYTES = 2 * BLOCK_TOKENS * KV_HEADS * HEAD_DIM * 4


def _set_block_tokens(tokens: int) -> None:
    global BLOCK_TOKENS, BLOCK_BYTES
    BLOCK_TOKENS = tokens
    BLOCK_BYTES = 2 * BLOCK_TOKENS * KV_HEADS * HEAD_DIM * 4


def _geometry(total_bytes: int):
    from distserve.migration.geometry import PoolGeometry

    blocks = max(1, total_bytes // (LAYERS * BLOCK_BYTES))
    return PoolGeometry((LAYERS, blocks, 2, BLOCK_TOKENS, KV_HEADS, HEAD_DIM), "float32", 4, 1)


# -- child processes ---------------------------------------------------------------------------------
def serve_socket(max_bytes: int) -> None:
    buf = bytearray(os.urandom(1 << 20)) * ((max_bytes + (1 << 20) - 1) >> 20)
    view = memoryview(buf)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = conn.recv(8)
                if len(head) < 8:
                    return
                conn.sendall(view[: int.from_bytes(head, "little")])


def serve_dlslime(max_bytes: int) -> None:
    import torch

    from distserve.migration.transport import DlslimeTcpTransport

    geo = _geometry(max_bytes)
    pool = torch.randn(geo.shape)
    transport = DlslimeTcpTransport("127.0.0.1", pool.data_ptr(), geo.total_bytes)
    print(json.dumps(transport.endpoint_info()), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    transport.close()


def _child(kind: str, max_bytes: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--serve", kind, "--max-bytes", str(max_bytes),
                             "--block-tokens", str(BLOCK_TOKENS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO))


# -- measurements -----------------------------------------------------------------------------------
class SocketClient:
    def __init__(self, max_bytes: int) -> None:
        self.child = _child("socket", max_bytes)
        port = int(self.child.stdout.readline())
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.view = memoryview(bytearray(max_bytes))

    def copy(self, size: int) -> float:
        start = time.perf_counter()
        self.conn.sendall(size.to_bytes(8, "little"))
        got = 0
        while got < size:
            n = self.conn.recv_into(self.view[got:size])
            if not n:
                raise RuntimeError("socket closed")
            got += n
        return time.perf_counter() - start

    def close(self) -> None:
        self.conn.close()
        self.child.stdin.close()
        self.child.wait(10)


class SlimeClient:
    def __init__(self, max_bytes: int) -> None:
        import torch

        from distserve.migration.transport import DlslimeTcpTransport

        self.child = _child("dlslime", max_bytes)
        self.info = json.loads(self.child.stdout.readline())
        self.geo = _geometry(max_bytes)
        self.pool = torch.zeros(self.geo.shape)
        self.transport = DlslimeTcpTransport("127.0.0.1", self.pool.data_ptr(), self.geo.total_bytes)

    async def connect(self) -> None:
        await self.transport.connect(self.info, self.geo.total_bytes)

    async def copy(self, plan) -> float:
        start = time.perf_counter()
        await self.transport.read(plan, time.monotonic() + 120)
        return time.perf_counter() - start

    def close(self) -> None:
        self.transport.close()
        self.child.stdin.close()
        self.child.wait(10)


async def bench_copies(sizes: list[int], repeat: int) -> dict[str, dict[int, list[float]]]:
    """Socket, contiguous and scattered copies interleaved, so load changes hit all three alike."""
    from distserve.migration.geometry import plan_reads

    sock, slime = SocketClient(max(sizes)), SlimeClient(max(sizes))
    out: dict[str, dict[int, list[float]]] = {"socket": {}, "contiguous": {}, "scattered": {}}
    try:
        await slime.connect()
        geo = slime.geo
        rng = random.Random(0)
        for size in sizes:
            n = max(1, size // (LAYERS * BLOCK_BYTES))
            contiguous = plan_reads(geo, geo, list(range(n)), list(range(n)))
            scattered = plan_reads(geo, geo, rng.sample(range(geo.num_entries), n),
                                   rng.sample(range(geo.num_entries), n))
            runs = repeat * (4 if size <= (4 << 20) else 1)
            for key in out:
                out[key][size] = []
            for i in range(runs + 1):  # the first round warms up
                t_sock = sock.copy(size)
                t_cont = await slime.copy(contiguous)
                t_scat = await slime.copy(scattered)
                if i:
                    out["socket"][size].append(t_sock)
                    out["contiguous"][size].append(t_cont)
                    out["scattered"][size].append(t_scat)
    finally:
        sock.close()
        slime.close()
    return out


async def bench_engines(repeat: int) -> dict:
    import aiohttp
    import psutil

    from tests.engine import pd
    from tests.util import spawn_engine

    model = "distserve-reference"
    procs = []
    try:
        p, p_url = spawn_engine("prefill", None, name="bench-prefill")
        procs.append(p)
        d, d_url = spawn_engine("decode", None, name="bench-decode")
        procs.append(d)
        result: dict = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await pd.handshake(http, p_url, d_url)
            rng = random.Random(1)
            pulls, pds, blocks = [], [], 0
            for i in range(repeat + 1):
                prompt = "".join(rng.choice("abcdefghij ") for _ in range(999))  # + BOS = 1,000 tokens
                body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                before = await pd.metrics(http, d_url)
                start = time.perf_counter()
                pre = await pd.prefill(http, p_url, "completions", body)
                mid = time.perf_counter()
                await pd.generate(http, d_url, "completions",
                                  {**body, "migration_request": pd.migration_request(p_url, pre)})
                end = time.perf_counter()
                after = await pd.metrics(http, d_url)
                if i:
                    pulls.append(after["distserve_engine_migration_seconds_total"]
                                 - before["distserve_engine_migration_seconds_total"])
                    pds.append(end - mid)
                    result["bytes"] = (after["distserve_engine_migration_bytes_total"]
                                       - before["distserve_engine_migration_bytes_total"])
                    blocks = len(pre["cache_block_ids"])
            result.update(pull_s=statistics.median(pulls), decode_call_s=statistics.median(pds), blocks=blocks)
            # The baseline for the same bytes, in the same run.
            sock = SocketClient(int(result["bytes"]))
            try:
                copies = [sock.copy(int(result["bytes"])) for _ in range(4 * repeat + 1)][1:]
            finally:
                sock.close()
            result["socket_s"] = statistics.median(copies)
            # Context: a 64-token greedy completion on one engine, and its memory.
            lat = []
            for i in range(repeat + 1):
                start = time.perf_counter()
                _, _, usage = await pd.generate(http, d_url, "completions",
                                                {"model": model, "prompt": f"latency {i}", "max_tokens": 64,
                                                 "temperature": 0, "ignore_eos": True})
                lat.append(time.perf_counter() - start)
                assert usage["completion_tokens"] == 64
            result["completion64_s"] = statistics.median(lat[1:])
            result["rss_mib"] = max(psutil.Process(x.pid).memory_info().rss for x in procs) / (1 << 20)
        return result
    finally:
        for proc in procs:
            proc.stop()


def _gib_s(size: int, seconds: float) -> float:
    return size / seconds / (1 << 30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1,4,16,64,256")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--block-tokens", type=int, default=16, help="tokens per KV block in the copy part (engine: 16)")
    ap.add_argument("--serve", choices=["socket", "dlslime"], help=argparse.SUPPRESS)
    ap.add_argument("--max-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    _set_block_tokens(args.block_tokens)
    if args.serve == "socket":
        serve_socket(args.max_bytes)
        return 0
    if args.serve == "dlslime":
        serve_dlslime(args.max_bytes)
        return 0
    sizes = [int(float(x) * (1 << 20)) for x in args.sizes_mib.split(",")]
    res = asyncio.run(bench_copies(sizes, args.repeat))
    base, slime = res["socket"], res
    print(f"KV migration bandwidth, loopback, {os.cpu_count()} CPUs, median of {args.repeat} (x4 up to 4 MiB) interleaved runs "
          f"(block = {BLOCK_BYTES // 1024} KiB per layer, {LAYERS} layers)\n")
    print("| KV size | socket copy GiB/s | DLSlime contiguous GiB/s | ratio | DLSlime scattered GiB/s | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        b = _gib_s(size, statistics.median(base[size]))
        c = _gib_s(size, statistics.median(slime["contiguous"][size]))
        s = _gib_s(size, statistics.median(slime["scattered"][size]))
        print(f"| {size / (1 << 20):g} MiB | {b:.2f} | {c:.2f} | {c / b:.2f} | {s:.2f} | {s / b:.2f} |")
    if not args.no_engine:
        eng = asyncio.run(bench_engines(args.repeat))
        print(f"\n1,000-token prompt, prefill -> decode engine (default model, {eng['blocks']} blocks, "
              f"{eng['bytes'] / (1 << 20):.2f} MiB of KV): pull {eng['pull_s'] * 1e3:.1f} ms "
              f"({_gib_s(eng['bytes'], eng['pull_s']):.2f} GiB/s; socket copy of the same bytes "
              f"{eng['socket_s'] * 1e3:.1f} ms, ratio {eng['socket_s'] / eng['pull_s']:.2f}), whole decode call "
              f"(validate + allocate + pull + first token) {eng['decode_call_s'] * 1e3:.1f} ms")
        print(f"64-token greedy completion on one engine: {eng['completion64_s'] * 1e3:.0f} ms; "
              f"engine RSS {eng['rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
