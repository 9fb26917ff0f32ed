#!/usr/bin/env python3
"""KV migration bandwidth: DLSlime TCP through distserve.migration vs a plain loopback TCP socket copy.

Both run in the same invocation, each between two OS processes on loopback, interleaved:
  * baseline: one persistent socket, the server sendall()s N bytes, the client recv_into()s them;
  * migration: the prefill-side process registers a KV pool (the engine's layout: layers x blocks x block
    bytes) and a staging arena with a DlslimeTcpTransport; the decode side pulls with
    MigrationManager.pull, the engine's own code (read planning, <= 31 reads per call, bounded calls in
    flight, staging), for blocks that are
      - contiguous on both sides (what a first-fit allocator gives on a fresh pool),
      - scattered on both sides, staged: the prefill packs them into its arena (timed apart: it runs when
        the prefill finishes), the decode reads the packed range into its arena and unpacks it,
      - scattered on both sides, read block by block (no staging: the path before staging existed; in
        a loop of its own after the others, its ratio against the interleaved socket copies).
Then, with real engines (default model, blocks first-fit and scattered), the migration time of a
1,000-token prompt (prefill engine -> decode engine), the decode-side pull time from the engine's own
metrics, against a socket copy of the same bytes.

Usage: .venv/bin/python tools/bench_migration.py [--sizes-mib 1,4,16,64,256] [--repeat 5] [--no-engine]
       [--json docs/bench/migration.json]
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
    """The prefill side: a KV pool and a staging arena registered with a DlslimeTcpTransport. Commands on
    stdin, one JSON line each: {"pack": [block ids]} -> {"offset", "length", "unit", "count", "pack_s"},
    {"free": [unit, count]} -> {}; end of input ends it."""
    import torch

    from distserve.migration.staging import Slot, StagingArena
    from distserve.migration.transport import DlslimeTcpTransport

    torch.set_num_threads(1)  # as the engine (--threads 1): idle OpenMP workers spin and starve the transfer
    geo = _geometry(max_bytes)
    pool = torch.randn(geo.shape)
    arena = StagingArena(pool, geo.num_entries)
    transport = DlslimeTcpTransport("127.0.0.1", pool.data_ptr(), geo.total_bytes, staging_ptr=arena.ptr,
                                    staging_bytes=arena.nbytes)
    print(json.dumps(transport.endpoint_info()), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "pack" in cmd:
            start = time.perf_counter()
            slot = arena.pack(cmd["pack"])
            took = time.perf_counter() - start
            print(json.dumps({"offset": slot.offset, "length": slot.length, "unit": slot.unit,
                              "count": slot.count, "pack_s": took}), flush=True)
        elif "free" in cmd:
            arena.release(Slot(cmd["free"][0], cmd["free"][1], arena.unit_bytes))
            print("{}", flush=True)
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
    """The decode side: distserve.migration's MigrationManager.pull, the engine's own code path (read
    planning, staging, unpacking), with one manager using the staging arena and one reading blocks only."""

    def __init__(self, max_bytes: int) -> None:
        import torch

        from distserve.migration.manager import MigrationManager, Peer
        from distserve.migration.staging import StagingArena
        from distserve.migration.transport import DlslimeTcpTransport
        from distserve.protocol import DistServeEngineConfig, MigrationProtocol

        torch.set_num_threads(1)  # as the engine (--threads 1), see serve_dlslime
        self.child = _child("dlslime", max_bytes)
        self.info = json.loads(self.child.stdout.readline())
        self.geo = _geometry(max_bytes)
        self.pool = torch.zeros(self.geo.shape)
        self.arena = StagingArena(self.pool, self.geo.num_entries)
        self.transport = DlslimeTcpTransport("127.0.0.1", self.pool.data_ptr(), self.geo.total_bytes,
                                             staging_ptr=self.arena.ptr, staging_bytes=self.arena.nbytes)
        config = DistServeEngineConfig(tp_size=1, block_size=BLOCK_TOKENS, num_gpu_blocks=self.geo.num_entries)

        def manager(staging):
            m = MigrationManager(self.geo, config, MigrationProtocol.TCP, "127.0.0.1", self.pool.data_ptr(),
                                 deadline_s=120, staging=staging)
            m.peers["prefill"] = Peer("prefill", "decode", self.transport, config, self.geo, connected=True)
            return m

        self.staged, self.direct = manager(self.arena), manager(None)

    async def connect(self) -> None:
        await self.transport.connect(self.info, self.geo.total_bytes)

    def command(self, cmd: dict) -> dict:
        self.child.stdin.write(json.dumps(cmd) + "\n")
        self.child.stdin.flush()
        return json.loads(self.child.stdout.readline())

    async def pull(self, manager, remote_ids: list[int], local_ids: list[int], staging=None) -> tuple[float, int]:
        """(seconds, reads) of one pull."""
        reads = manager.stats.reads_total
        start = time.perf_counter()
        await manager.pull(manager.peers["prefill"], remote_ids, local_ids, remote_staging=staging)
        return time.perf_counter() - start, manager.stats.reads_total - reads

    def close(self) -> None:
        self.transport.close()
        self.child.stdin.close()
        self.child.wait(10)


MODES = ("socket", "contiguous", "scattered_staged", "scattered_direct")


async def bench_copies(sizes: list[int], repeat: int) -> dict:
    """Socket copy, contiguous blocks, scattered blocks through the staging arena (packed by the prefill,
    landed and unpacked by the decode) and scattered blocks read directly, interleaved, so load changes
    hit all of them alike. Returns {mode: {size: [seconds...]}} plus reads per pull and pack times."""
    from distserve.protocol import KvStagingRange

    sock, slime = SocketClient(max(sizes)), SlimeClient(max(sizes))
    out: dict = {m: {} for m in MODES}
    out.update(pack_s={}, reads={m: {} for m in MODES[1:]})
    try:
        await slime.connect()
        geo = slime.geo
        rng = random.Random(0)
        for size in sizes:
            n = max(1, size // (LAYERS * BLOCK_BYTES))
            runs = repeat * (4 if size <= (4 << 20) else 1)
            for m in MODES:
                out[m][size] = []
            out["pack_s"][size] = []
            for i in range(runs + 1):  # the first round warms up
                remote = rng.sample(range(geo.num_entries), n)
                local = rng.sample(range(geo.num_entries), n)
                t_sock = sock.copy(size)
                t_cont, r_cont = await slime.pull(slime.direct, list(range(n)), list(range(n)))
                packed = slime.command({"pack": remote})
                staging = KvStagingRange(offset=packed["offset"], length=packed["length"])
                t_staged, r_staged = await slime.pull(slime.staged, remote, local, staging)
                slime.command({"free": [packed["unit"], packed["count"]]})
                if i:
                    out["socket"][size].append(t_sock)
                    out["contiguous"][size].append(t_cont)
                    out["scattered_staged"][size].append(t_staged)
                    out["pack_s"][size].append(packed["pack_s"])
                out["reads"]["contiguous"][size] = r_cont
                out["reads"]["scattered_staged"][size] = r_staged
            # The path without staging, for reference, in a loop of its own: its thousands of short-lived
            # TCP connections would slow whatever ran right after them.
            for i in range(runs + 1):
                remote = rng.sample(range(geo.num_entries), n)
                local = rng.sample(range(geo.num_entries), n)
                t_scat, r_scat = await slime.pull(slime.direct, remote, local)
                if i:
                    out["scattered_direct"][size].append(t_scat)
                out["reads"]["scattered_direct"][size] = r_scat
    finally:
        sock.close()
        slime.close()
    return out


async def bench_engines(repeat: int, allocation: str) -> dict:
    """A 1,000-token prompt through real engines (prefill -> decode), with blocks allocated first-fit or
    scattered; the pull time from the decode engine's own metric, a socket copy of the same bytes
    interleaved with every pull."""
    import aiohttp
    import psutil

    from distserve.testing import pd
    from distserve.testing.cluster import spawn_engine

    model = "distserve-reference"
    procs = []
    sock = None
    try:
        p, p_url = spawn_engine("prefill", None, "--kv-allocation", allocation, name="bench-prefill")
        procs.append(p)
        d, d_url = spawn_engine("decode", None, "--kv-allocation", allocation, name="bench-decode")
        procs.append(d)
        result: dict = {"allocation": allocation}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await pd.handshake(http, p_url, d_url)
            rng = random.Random(1)
            pulls, pds, copies, reads = [], [], [], []
            for i in range(4 * repeat + 1):
                prompt = "".join(rng.choice("abcdefghij ") for _ in range(999))  # + BOS = 1,000 tokens
                body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                before = await pd.metrics(http, d_url)
                pre = await pd.prefill(http, p_url, "completions", body)
                mid = time.perf_counter()
                await pd.generate(http, d_url, "completions",
                                  {**body, "migration_request": pd.migration_request(p_url, pre)})
                end = time.perf_counter()
                after = await pd.metrics(http, d_url)
                moved = int(after["distserve_engine_migration_bytes_total"]
                            - before["distserve_engine_migration_bytes_total"])
                if sock is None:
                    sock = SocketClient(moved)
                copy = sock.copy(moved)
                if i:
                    pulls.append(after["distserve_engine_migration_seconds_total"]
                                 - before["distserve_engine_migration_seconds_total"])
                    reads.append(after["distserve_engine_migration_reads_total"]
                                 - before["distserve_engine_migration_reads_total"])
                    pds.append(end - mid)
                    copies.append(copy)
                    result["bytes"] = moved
                    result["blocks"] = len(pre["cache_block_ids"])
                    result["packed"] = pre.get("remote_kv_staging") is not None
            result.update(pull_s=statistics.median(pulls), decode_call_s=statistics.median(pds),
                          socket_s=statistics.median(copies), reads_per_pull=statistics.median(reads))
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
        if sock is not None:
            sock.close()
        for proc in procs:
            proc.stop()


def _gib_s(size: int, seconds: float) -> float:
    return size / seconds / (1 << 30)


def summarise(res: dict, sizes: list[int]) -> list[dict]:
    """One row per size: medians in GiB/s and each mode's ratio to the socket copy of the same run."""
    rows = []
    for size in sizes:
        base = statistics.median(res["socket"][size])
        pack = statistics.median(res["pack_s"][size])
        row = {"size_mib": size / (1 << 20), "socket_gib_s": _gib_s(size, base), "pack_ms": pack * 1e3}
        for mode in MODES[1:]:
            t = statistics.median(res[mode][size])
            row[f"{mode}_gib_s"] = _gib_s(size, t)
            row[f"{mode}_ratio"] = base / t
            row[f"{mode}_reads"] = res["reads"][mode][size]
        # Staged, counting the prefill's pack too (it runs when the prefill finishes, before its answer).
        total = statistics.median([a + b for a, b in zip(res["scattered_staged"][size], res["pack_s"][size])])
        row["scattered_staged_with_pack_ratio"] = base / total
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1,4,16,64,256")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--json", type=Path, help="write every figure (and the raw timings) here")
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
    rows = summarise(res, sizes)
    print(f"KV migration bandwidth, loopback, {os.cpu_count()} CPUs, median of {args.repeat} (x4 up to 4 MiB) "
          f"interleaved runs (block = {BLOCK_BYTES // 1024} KiB per layer, {LAYERS} layers)\n")
    print("| KV size | socket GiB/s | contiguous GiB/s | ratio | scattered, staged GiB/s | ratio | ratio with "
          "P's pack | scattered, direct GiB/s | ratio | reads: contiguous / staged / direct |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['size_mib']:g} MiB | {r['socket_gib_s']:.2f} | {r['contiguous_gib_s']:.2f} | "
              f"{r['contiguous_ratio']:.2f} | {r['scattered_staged_gib_s']:.2f} | {r['scattered_staged_ratio']:.2f} | "
              f"{r['scattered_staged_with_pack_ratio']:.2f} | {r['scattered_direct_gib_s']:.2f} | "
              f"{r['scattered_direct_ratio']:.2f} | {r['contiguous_reads']} / {r['scattered_staged_reads']} / "
              f"{r['scattered_direct_reads']} |")
    print("\nP's pack (median ms): " + ", ".join(f"{r['size_mib']:g} MiB {r['pack_ms']:.2f}" for r in rows))
    engines = []
    if not args.no_engine:
        for allocation in ("first-fit", "scattered"):
            eng = asyncio.run(bench_engines(args.repeat, allocation))
            engines.append(eng)
            print(f"\n1,000-token prompt, {allocation} blocks, prefill -> decode engine ({eng['blocks']} blocks, "
                  f"{eng['bytes'] / (1 << 20):.2f} MiB, packed by P: {eng['packed']}, {eng['reads_per_pull']:g} "
                  f"reads): pull {eng['pull_s'] * 1e3:.2f} ms ({_gib_s(eng['bytes'], eng['pull_s']):.2f} GiB/s); "
                  f"socket copy of the same bytes {eng['socket_s'] * 1e3:.2f} ms: ratio "
                  f"{eng['socket_s'] / eng['pull_s']:.2f}; whole decode call (validate + allocate + pull + first "
                  f"token) {eng['decode_call_s'] * 1e3:.1f} ms")
            print(f"64-token greedy completion on one engine: {eng['completion64_s'] * 1e3:.0f} ms; "
                  f"engine RSS {eng['rss_mib']:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw = {m: {str(k): v for k, v in res[m].items()} for m in (*MODES, "pack_s")}
        args.json.write_text(json.dumps({
            "cpus": os.cpu_count(), "repeat": args.repeat, "layers": LAYERS, "block_bytes": BLOCK_BYTES,
            "python": sys.version.split()[0], "rows": rows, "engines": engines, "raw_seconds": raw,
        }, indent=1))
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
