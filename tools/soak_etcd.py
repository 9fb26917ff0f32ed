#!/usr/bin/env python3
"""Soak two embedded etcds side by side, one without auto-compaction and one with it, under the write pattern
of a distserve cluster (load records rewritten many times a second), and report how their memory and
database grow (issue 16, defect 11).

    .venv/bin/python tools/soak_etcd.py --duration 240 --compaction periodic:30s --json docs/bench/soak-etcd.json

Traffic goes to loopback only. The retention is short so that a few minutes show what a week would: without
compaction etcd keeps every revision of every rewritten key (memory and database grow with the number of writes);
with it, old revisions are dropped once per retention period and both level off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discovery.client import EtcdClient  # noqa: E402
from discovery.config import EtcdConfig  # noqa: E402
from discovery.embedded import AutoCompaction, EmbeddedEtcd  # noqa: E402


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def writer(client: EtcdClient, prefix: str, keys: int, rate: float, stop: float, counter: list[int]) -> None:
    """`rate` writes a second spread over `keys` keys, each a ~400-byte JSON value like a load record."""
    value = json.dumps({"engine_id": "x" * 16, "running": 0, "waiting": 0, "kv_blocks_free": 512,
                        "kv_blocks_total": 512, "pad": "p" * 300}).encode()
    interval = 1.0 / rate
    i = 0
    next_at = time.monotonic()
    while time.monotonic() < stop:
        await client.put(f"{prefix}{i % keys:04d}", value + str(i).encode())
        counter[0] += 1
        i += 1
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def soak(args: argparse.Namespace) -> dict:
    setups = {"off": None, args.compaction: AutoCompaction.parse(args.compaction)}
    etcds = {name: EmbeddedEtcd(unsafe_no_fsync=True, auto_compaction=ac).start() for name, ac in setups.items()}
    clients = {}
    try:
        for name, etcd in etcds.items():
            clients[name] = EtcdClient(EtcdConfig(endpoints=etcd.endpoints, timeout=5.0))
            await clients[name].connect()
        stop = time.monotonic() + args.duration
        counters = {name: [0] for name in etcds}
        tasks = [asyncio.create_task(writer(clients[n], "/soak/load/", args.keys, args.rate, stop, counters[n]))
                 for n in etcds]
        samples: list[dict] = []
        started = time.monotonic()
        try:
            while time.monotonic() < stop:
                await asyncio.sleep(min(args.sample, max(0.0, stop - time.monotonic())))
                row = {"t": round(time.monotonic() - started, 1)}
                for name, etcd in etcds.items():
                    status = await clients[name].status()
                    row[name] = {"rss_mib": round(rss_mib(etcd.pid), 1), "writes": counters[name][0],
                                 "revision": status.revision,
                                 "db_bytes": max((m.db_size for m in status.members), default=0)}
                samples.append(row)
                print(json.dumps(row), flush=True)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        first, last = samples[0], samples[-1]
        summary = {name: {"rss_first_mib": first[name]["rss_mib"], "rss_last_mib": last[name]["rss_mib"],
                          "rss_max_mib": max(s[name]["rss_mib"] for s in samples),
                          "db_last_bytes": last[name]["db_bytes"], "writes": last[name]["writes"]}
                   for name in etcds}
        return {"duration_s": args.duration, "rate_per_s": args.rate, "keys": args.keys,
                "compaction": args.compaction, "samples": samples, "summary": summary}
    finally:
        for client in clients.values():
            await client.close()
        for etcd in etcds.values():
            etcd.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of writes (default 240)")
    parser.add_argument("--rate", type=float, default=300.0, help="writes per second to each etcd (default 300)")
    parser.add_argument("--keys", type=int, default=64, help="distinct keys rewritten (default 64)")
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between samples (default 15)")
    parser.add_argument("--compaction", default="periodic:30s", help="the compacting etcd's setting")
    parser.add_argument("--json", type=Path, default=None, help="write the samples and summary here")
    args = parser.parse_args()
    if not (args.duration > 0 and args.rate > 0 and args.keys > 0 and args.sample > 0):
        parser.error("--duration, --rate, --keys and --sample must be > 0")
    try:
        AutoCompaction.parse(args.compaction)
    except ValueError as exc:
        parser.error(f"--compaction: {exc}")
    result = asyncio.run(soak(args))
    for name, s in result["summary"].items():
        print(f"{name:>16}: RSS {s['rss_first_mib']:.1f} -> {s['rss_last_mib']:.1f} MiB "
              f"(max {s['rss_max_mib']:.1f}), database {s['db_last_bytes'] / 2**20:.1f} MiB after {s['writes']} writes")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.exit(main())
