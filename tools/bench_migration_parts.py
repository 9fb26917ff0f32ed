#!/usr/bin/env python3
"""Where the time of a small KV pull goes: raw DLSlime reads vs distserve's transport and manager.

Same processes as tools/bench_migration.py (its socket and DLSlime children), 1 MiB and 4 MiB, 80 rounds:
A a socket copy; B raw `TcpEndpoint.read` of the 4 per-layer ranges a contiguous pull makes, waited with a
spinning `wait()`; B2 the same bytes as one range; B3 the 4 ranges, polled from the event loop;
C `DlslimeTcpTransport.read`; D `MigrationManager.pull` (contiguous blocks); E D right after a scattered
direct pull; F D right after a staged pull; G a staged pull (scattered blocks, packed by the prefill side);
H the decode's unpack alone (a landed slot copied into scattered blocks); I `DlslimeTcpTransport.read` of
one range.
Medians, and each one's ratio to A.

Usage: .venv/bin/python tools/bench_migration_parts.py
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_migration as bm  # noqa: E402

from distserve.migration.geometry import plan_reads  # noqa: E402
from distserve.protocol import KvStagingRange  # noqa: E402


async def _spin(fut) -> None:
    while fut.wait_for(0) is None:
        await asyncio.sleep(0)


async def main() -> None:
    import torch

    torch.set_num_threads(1)
    slime, sock = bm.SlimeClient(64 << 20), bm.SocketClient(64 << 20)
    await slime.connect()
    geo = slime.geo
    ep = slime.transport.endpoint
    lh, rh = slime.transport.local_handles["kv"], slime.transport.remote_handles["kv"]
    peer = slime.direct.peers["prefill"]
    try:
        for n in (8, 32):
            size = n * bm.LAYERS * bm.BLOCK_BYTES
            cont = plan_reads(geo, geo, list(range(n)), list(range(n)))
            res: dict[str, list[float]] = {}

            def rec(key: str, started: float, res: dict = res) -> None:
                res.setdefault(key, []).append(time.perf_counter() - started)

            for i in range(80):
                res.setdefault("A socket", []).append(sock.copy(size))
                t = time.perf_counter()
                ep.read([(lh, rh, r, l, ln) for r, l, ln in cont]).wait()
                rec("B raw, 4 ranges, spin", t)
                t = time.perf_counter()
                ep.read([(lh, rh, 0, 0, size)]).wait()
                rec("B2 raw, one range, spin", t)
                t = time.perf_counter()
                await _spin(ep.read([(lh, rh, r, l, ln) for r, l, ln in cont]))
                rec("B3 raw, 4 ranges, loop poll", t)
                t = time.perf_counter()
                await slime.transport.read(cont, time.monotonic() + 10)
                rec("C transport.read", t)
                t = time.perf_counter()
                await slime.direct.pull(peer, list(range(n)), list(range(n)))
                rec("D manager.pull", t)
                remote = random.sample(range(geo.num_entries), n)
                local = random.sample(range(geo.num_entries), n)
                if i % 2:
                    await slime.direct.pull(peer, remote, local)
                    t = time.perf_counter()
                    await slime.direct.pull(peer, list(range(n)), list(range(n)))
                    rec("E D after a scattered direct pull", t)
                else:
                    packed = slime.command({"pack": remote})
                    t = time.perf_counter()
                    await slime.staged.pull(slime.staged.peers["prefill"], remote, local,
                                            remote_staging=KvStagingRange(offset=packed["offset"],
                                                                          length=packed["length"]))
                    rec("G staged pull", t)
                    slime.command({"free": [packed["unit"], packed["count"]]})
                    t = time.perf_counter()
                    await slime.direct.pull(peer, list(range(n)), list(range(n)))
                    rec("F D after a staged pull", t)
                    # The decode's copy alone: a landed slot unpacked into scattered blocks.
                    slot = slime.arena.allocate(n)
                    t = time.perf_counter()
                    slime.arena.unpack_rows(slot, 0, n * bm.LAYERS, local)
                    rec("H unpack alone (landed slot -> scattered blocks)", t)
                    slime.arena.release(slot)
                    t = time.perf_counter()
                    await slime.transport.read([(0, 0, size)], time.monotonic() + 10)
                    rec("I transport.read, one range", t)
            base = statistics.median(res["A socket"])
            for key, values in sorted(res.items()):
                med = statistics.median(values)
                print(f"{size >> 20} MiB {key}: {med * 1e3:.3f} ms, ratio {base / med:.2f}")
    finally:
        slime.close()
        sock.close()


if __name__ == "__main__":
    asyncio.run(main())
