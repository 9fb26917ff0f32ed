"""Benchmark: KV migration bandwidth of distserve's staged-TCP path between two processes on one GPU host.

A "prefill" process holds a GPU KV pool shaped like lmdeploy 0.18's ([layers, blocks, bytes per block
and layer], uint8) filled with a known pattern; the "decode" process (this one) pulls a set of blocks
into its own GPU pool through `StagedTcpLink.migrate` (stage on the prefill GPU->pinned host, DLSlime TCP
read, host->GPU scatter) and checks every byte. Side by side, in the same run:
- baseline A, the transport alone: DLSlime TCP reads of the same byte count between pinned host buffers
  (same chunking rules: <=31 assignments a call, <=2 calls in flight);
- baseline B, the staging copies alone: the same ranges GPU->pinned host->GPU inside one process.

    python tools/gpu/bench_staged_tcp.py [--layers 32] [--blocks 2048] [--block-kib 64] [--migrate-blocks 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distserve.lmdeploy_ext.staged_tcp import (  # noqa: E402
    StagedTcpLink,
    StagedTcpSettings,
    Segment,
    _await_future,
    chunk_calls,
    MAX_CALLS_IN_FLIGHT,
)


def pattern(shape, device):
    """The same pseudo-random bytes in every process (seeded generator on the same device)."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(20261125)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)


def serve(conn, shape, staging_mb, device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(0)
    pool = pattern(shape, device)
    link = StagedTcpLink("127.0.0.1", StagedTcpSettings(staging_bytes=staging_mb << 20), name="bench-prefill")
    link.register_region(0, pool.data_ptr(), pool.numel(), device)
    conn.send(link.endpoint_info())
    conn.recv()  # stop
    link.close()


def segments_for(shape, blocks):
    layers, nblocks, per = shape
    segs = []
    for layer in range(layers):
        for dst, src in enumerate(blocks):
            segs.append(Segment(0, (layer * nblocks + src) * per, (layer * nblocks + dst) * per, per))
    return segs


async def raw_tcp(nbytes: int, chunk: int) -> float:
    """Baseline A: DLSlime TCP reads host->host, no staging."""
    import torch
    from dlslime import TcpEndpoint

    a, b = TcpEndpoint(ip="127.0.0.1", port=0), TcpEndpoint(ip="127.0.0.1", port=0)
    pin = torch.cuda.is_available()
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
    dst = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
    a.register_memory_region("src", src.data_ptr(), 0, nbytes)
    hd = b.register_memory_region("dst", dst.data_ptr(), 0, nbytes)
    b.connect(a.endpoint_info())
    hr = b.register_remote_memory_region("src", a.endpoint_info()["mr_info"]["src"])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    in_flight = []
    for call in chunk_calls(nbytes, chunk):
        while len(in_flight) >= MAX_CALLS_IN_FLIGHT:
            await _await_future(in_flight.pop(0), t0 + 120)
        in_flight.append(b.read([(hd, hr, off, off, n) for off, n in call]))
    while in_flight:
        await _await_future(in_flight.pop(0), t0 + 120)
    dt = loop.time() - t0
    ok = bool(dst.all())
    a.shutdown()
    b.shutdown()
    if not ok:
        raise RuntimeError("raw TCP baseline: bytes missing")
    return dt


def staging_copies(pool, segs, nbytes) -> float:
    """Baseline B: the two copies of the staged path (GPU->pinned host, pinned host->GPU), one process."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    flat = pool.view(-1)
    out = torch.empty_like(flat)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        pos = 0
        for s in segs:
            host[pos : pos + s.length].copy_(
                flat[s.remote_offset : s.remote_offset + s.length], non_blocking=True
            )
            pos += s.length
    stream.synchronize()
    with torch.cuda.stream(stream):
        pos = 0
        for s in segs:
            out[s.local_offset : s.local_offset + s.length].copy_(
                host[pos : pos + s.length], non_blocking=True
            )
            pos += s.length
    stream.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=2048)
    ap.add_argument("--block-kib", type=int, default=64, help="bytes per block and layer (K and V), KiB")
    ap.add_argument("--migrate-blocks", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda:0", help="cuda:0, or cpu for a dry run of the script itself")
    a = ap.parse_args()
    import torch

    shape = (a.layers, a.blocks, a.block_kib << 10)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child, shape, 256, a.device), daemon=True)
    server.start()
    info = parent.recv()
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(0)
    local = torch.zeros(shape, dtype=torch.uint8, device=a.device)
    # Blocks in runs of 8 (a paged allocator's usual fragmentation), scattered over the pool.
    blocks = [
        b
        for start in range(0, a.blocks, a.blocks // (a.migrate_blocks // 8))
        for b in range(start, start + 8)
    ]
    blocks = blocks[: a.migrate_blocks]
    segs = segments_for(shape, blocks)
    nbytes = sum(s.length for s in segs)
    remote = pattern(shape, a.device)
    results = {
        "nbytes": nbytes,
        "pool_shape": list(shape),
        "migrate_blocks": len(blocks),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "runs": [],
    }

    def gib_s(seconds):
        return round(nbytes / (1 << 30) / seconds, 3)

    configs = [(64, 1), (64, 4), (64, 16), (256, 4), (256, 16)]
    for staging_mb, chunk_mb in configs:
        link = StagedTcpLink(
            "127.0.0.1",
            StagedTcpSettings(staging_bytes=staging_mb << 20, chunk_bytes=chunk_mb << 20, deadline_s=120),
        )
        link.register_region(0, local.data_ptr(), local.numel(), a.device)
        link.connect(info)
        times, detail = [], None
        for _ in range(a.repeats + 1):
            local.zero_()
            if cuda:
                torch.cuda.synchronize()
            detail = asyncio.run(link.migrate(segs))
            times.append(detail["seconds"])
            flat_l, flat_r = local.view(-1), remote.view(-1)
            for s in segs[:: max(1, len(segs) // 64)]:
                if not torch.equal(
                    flat_l[s.local_offset : s.local_offset + s.length],
                    flat_r[s.remote_offset : s.remote_offset + s.length],
                ):
                    raise RuntimeError("staged TCP migration: wrong bytes")
            ok_total = int(local.view(-1)[[s.local_offset for s in segs]].sum()) == int(
                remote.view(-1)[[s.remote_offset for s in segs]].sum()
            )
            if not ok_total:
                raise RuntimeError("staged TCP migration: wrong bytes")
        times = times[1:]  # first run warms buffers and connections
        link.close()
        med = statistics.median(times)
        results["runs"].append(
            {
                "path": "staged-tcp",
                "staging_mib": staging_mb,
                "chunk_mib": chunk_mb,
                "median_s": round(med, 4),
                "gib_per_s": gib_s(med),
                "rounds": detail["rounds"],
                "stage_s": round(detail["stage_s"], 4),
                "read_s": round(detail["read_s"], 4),
                "scatter_s": round(detail["scatter_s"], 4),
            }
        )
        print(json.dumps(results["runs"][-1]), flush=True)
    for chunk_mb in (4, 16):
        t = statistics.median([asyncio.run(raw_tcp(nbytes, chunk_mb << 20)) for _ in range(a.repeats)])
        results["runs"].append(
            {
                "path": "baseline A: DLSlime TCP host->host",
                "chunk_mib": chunk_mb,
                "median_s": round(t, 4),
                "gib_per_s": gib_s(t),
            }
        )
        print(json.dumps(results["runs"][-1]), flush=True)
    if cuda:
        t = statistics.median([staging_copies(remote, segs, nbytes) for _ in range(a.repeats)])
        results["runs"].append(
            {
                "path": "baseline B: GPU->pinned->GPU copies, one process",
                "median_s": round(t, 4),
                "gib_per_s": gib_s(t),
            }
        )
        print(json.dumps(results["runs"][-1]), flush=True)
    parent.send("stop")
    server.join(10)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
