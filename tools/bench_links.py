#!/usr/bin/env python3
"""Link establishment at scale: P prefill x D decode null engines, every pair linked by the agents.

Per run: a fresh embedded etcd, the engines as two OS processes (`distserve engine --null --count N`, no
agent inside), and one agent per engine started all at once in this process (real etcd leases, real HTTP
handshakes; the decode agents each bound their handshakes to --concurrency). Measured: time from the agents'
start to every engine registered and every link recorded "established" in etcd; handshakes served by the
engines (exactly 2 per pair when nothing is retried); most handshakes in flight in one agent and in the
whole fleet; most handshakes one prefill engine served at the same time (pile-up).

Baseline, side by side in the same run: lmdeploy's proxy-style warmup (POST /distserve/connection_warmup:
every pair at once, no bound, no registry) on a fresh pair of engine processes.

    .venv/bin/python tools/bench_links.py --prefills 16 --decodes 16 --concurrency 8 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from discovery.client import EtcdClient  # noqa: E402
from discovery.config import EtcdConfig  # noqa: E402
from discovery.embedded import EmbeddedEtcd  # noqa: E402
from distserve.agent.agent import Agent  # noqa: E402
from distserve.agent.config import AgentConfig  # noqa: E402
from distserve.agent.engine_client import EngineClient, Metrics  # noqa: E402
from distserve.cluster.keys import Keys  # noqa: E402
from distserve.protocol import ConnectRequest, InitRequest, MigrationProtocol  # noqa: E402
from distserve.cluster.records import LinkRecord  # noqa: E402
from distserve.testing.cluster import start_null_engines as start_engines  # noqa: E402
from distserve.testing.procs import Proc  # noqa: E402


def handshakes_served(urls: list[str]) -> int:
    total = 0
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            total += int(Metrics.parse(resp.read().decode()).values["distserve_engine_handshakes_total"])
    return total


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def per_engine_peak(intervals: dict[str, list[tuple[float, float]]]) -> int:
    return max((max_overlap(v) for v in intervals.values()), default=0)


def _dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack (to diagnose a stuck run)."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)


async def run_agents(prefills: int, decodes: int, concurrency: int, ttl: int, decodes_join_later: bool = False) -> dict:
    import signal

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    procs: list[Proc] = []
    agents: list[Agent] = []
    try:
        p_proc, p_urls = start_engines("prefill", prefills)
        d_proc, d_urls = start_engines("decode", decodes)
        procs += [p_proc, d_proc]
        etcd_config = EtcdConfig(endpoints=etcd.endpoints, timeout=5.0)
        for role, urls in (("prefill", p_urls), ("decode", d_urls)):
            for url in urls:
                config = AgentConfig(engine_url=url, role=role, ttl=ttl, handshake_concurrency=concurrency)
                agents.append(Agent(config, etcd_config))
        keys = Keys()
        want = prefills * decodes
        async with EtcdClient(etcd_config) as client:
            started = time.perf_counter()
            if decodes_join_later:  # the prefills are registered first; then every decode joins at once
                await asyncio.gather(*(a.start() for a in agents if a.config.role == "prefill"))
                await asyncio.gather(*(a.wait_registered(60) for a in agents if a.config.role == "prefill"))
                started = time.perf_counter()
                await asyncio.gather(*(a.start() for a in agents if a.config.role == "decode"))
            else:  # everything joins at once
                await asyncio.gather(*(agent.start() for agent in agents))
            registered_at = None
            while True:
                kvs, _ = await client.get_prefix(keys.root)
                engines = sum(1 for kv in kvs if kv.key.startswith(keys.prefix("engines")))
                links = [LinkRecord.decode(kv.value) for kv in kvs if kv.key.startswith(keys.prefix("links"))]
                if registered_at is None and engines == prefills + decodes:
                    registered_at = time.perf_counter() - started
                if sum(1 for link in links if link.state == "established") == want:
                    linked_at = time.perf_counter() - started
                    break
                if time.perf_counter() - started > 300:
                    raise RuntimeError(f"only {len(links)} of {want} links after 300 s")
                await asyncio.sleep(0.02)
        decode_agents = [a for a in agents if a.config.role == "decode"]
        stats = [a.links.stats for a in decode_agents if a.links is not None]
        timeline = [t for s in stats for t in s.timeline]
        by_prefill: dict[str, list[tuple[float, float]]] = {}
        for start, end, prefill_id in timeline:
            by_prefill.setdefault(prefill_id, []).append((start, end))
        ms = sorted(x for s in stats for x in s.handshake_ms)
        served = handshakes_served(p_urls + d_urls)
        return {
            "registered_s": registered_at,
            "all_links_s": linked_at,
            "links": want,
            "handshakes_served": served,
            "handshake_attempts": sum(s.handshakes_started for s in stats),
            "handshake_failures": sum(s.handshakes_failed for s in stats),
            "max_in_flight_per_agent": max(s.max_in_flight for s in stats),
            "max_in_flight_fleet": max_overlap([(a, b) for a, b, _ in timeline]),
            "max_concurrent_per_prefill": per_engine_peak(by_prefill),
            "handshake_ms_p50": statistics.median(ms),
            "handshake_ms_p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        }
    finally:
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)
        for proc in procs:
            proc.stop(timeout=5)
        etcd.stop()


async def run_baseline(prefills: int, decodes: int) -> dict:
    """Every pair at once, unbounded, like lmdeploy's proxy warmup (no etcd, nothing recorded)."""
    procs: list[Proc] = []
    try:
        p_proc, p_urls = start_engines("prefill", prefills)
        d_proc, d_urls = start_engines("decode", decodes)
        procs += [p_proc, d_proc]
        intervals: dict[str, list[tuple[float, float]]] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            clients = {u: EngineClient(http, u, timeout=60) for u in p_urls + d_urls}

            async def pair(p: str, d: str) -> None:
                t0 = time.perf_counter()
                p_info, d_info = await asyncio.gather(clients[p].engine_info(), clients[d].engine_info())
                p_cfg, d_cfg = p_info[0], d_info[0]
                p_init, d_init = await asyncio.gather(
                    clients[p].p2p_initialize(InitRequest(local_engine_id=p, local_engine_config=p_cfg,
                                                          remote_engine_id=d, remote_engine_config=d_cfg,
                                                          protocol=MigrationProtocol.TCP)),
                    clients[d].p2p_initialize(InitRequest(local_engine_id=d, local_engine_config=d_cfg,
                                                          remote_engine_id=p, remote_engine_config=p_cfg,
                                                          protocol=MigrationProtocol.TCP)))
                await asyncio.gather(
                    clients[p].p2p_connect(ConnectRequest(protocol=MigrationProtocol.TCP, remote_engine_id=d,
                                                          remote_engine_endpoint_info=d_init.engine_endpoint_info,
                                                          remote_kvtransfer_endpoint_info=d_init.kvtransfer_endpoint_info)),
                    clients[d].p2p_connect(ConnectRequest(protocol=MigrationProtocol.TCP, remote_engine_id=p,
                                                          remote_engine_endpoint_info=p_init.engine_endpoint_info,
                                                          remote_kvtransfer_endpoint_info=p_init.kvtransfer_endpoint_info)))
                intervals.setdefault(p, []).append((t0, time.perf_counter()))

            started = time.perf_counter()
            await asyncio.gather(*(pair(p, d) for p in p_urls for d in d_urls))
            took = time.perf_counter() - started
        return {"all_links_s": took, "handshakes_served": handshakes_served(p_urls + d_urls),
                "max_in_flight_fleet": max_overlap([i for v in intervals.values() for i in v]),
                "max_concurrent_per_prefill": per_engine_peak(intervals)}
    finally:
        for proc in procs:
            proc.stop(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefills", type=int, default=16)
    parser.add_argument("--decodes", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8, help="handshakes in flight per decode agent")
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--decodes-join-later", action="store_true",
                        help="register the prefills first, then start every decode agent at once")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the engines and etcd are stopped
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs, baselines = [], []
    for i in range(args.repeat):
        runs.append(asyncio.run(run_agents(args.prefills, args.decodes, args.concurrency, args.ttl,
                                           args.decodes_join_later)))
        baselines.append(asyncio.run(run_baseline(args.prefills, args.decodes)))
        print(f"run {i + 1}: agents {json.dumps(runs[-1])}\n       baseline {json.dumps(baselines[-1])}", flush=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    pairs = args.prefills * args.decodes
    joined = "prefills registered first, then all decodes at once" if args.decodes_join_later else "all at once"
    print(f"\n{args.prefills} prefill x {args.decodes} decode null engines, {pairs} links, agents joining {joined}, "
          f"median of {args.repeat} runs, host {os.uname().nodename} ({os.cpu_count()} CPUs)")
    print("| | agents (etcd, bounded) | unbounded warmup (lmdeploy proxy style) |")
    print("| --- | --- | --- |")
    print(f"| all engines registered in etcd | {med(runs, 'registered_s'):.2f} s | - |")
    print(f"| all links established (and recorded) | {med(runs, 'all_links_s'):.2f} s | "
          f"{med(baselines, 'all_links_s'):.2f} s (not recorded anywhere) |")
    print(f"| p2p_initialize calls served by the engines | {med(runs, 'handshakes_served'):.0f} (= 2 x {pairs}) | "
          f"{med(baselines, 'handshakes_served'):.0f} |")
    print(f"| most handshakes in flight, one agent | {max(r['max_in_flight_per_agent'] for r in runs)} "
          f"(bound {args.concurrency}) | - |")
    print(f"| most handshakes in flight, whole fleet | {max(r['max_in_flight_fleet'] for r in runs)} | "
          f"{max(r['max_in_flight_fleet'] for r in baselines)} |")
    print(f"| most handshakes one prefill engine served at once | {max(r['max_concurrent_per_prefill'] for r in runs)} | "
          f"{max(r['max_concurrent_per_prefill'] for r in baselines)} |")
    print(f"| handshake duration p50 / p99 | {med(runs, 'handshake_ms_p50'):.1f} / {med(runs, 'handshake_ms_p99'):.1f} ms | - |")
    print(f"| retried handshakes | {sum(r['handshake_attempts'] - r['links'] for r in runs)} | - |")
    if args.json:
        Path(args.json).write_text(json.dumps({"agents": runs, "baseline": baselines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
