#!/usr/bin/env python
"""Scale benchmark: a router over 1,000 engine records and 10,000 link records in etcd (records only).

Side by side in one run, against the same etcd: cluster `big` (N engines: half prefill, half decode, each
prefill linked to L/(N/2) decodes, plus a load record per engine) and cluster `small` (1 prefill, 1 decode,
1 link: the baseline). Measured:

- cold start: `distserve router` process start -> `/health/ready` 200 with the whole view (every engine
  routable), median of --repeat runs; and the router's RSS once ready (psutil);
- routing decision: the router's own selection path (ClusterView fed by a real list-and-watch of etcd,
  the routing table, the strategy's entry pick and the linked-decode pick, as Orchestrator.generate does
  it) timed per request, p50/p99 per strategy; and the routing table's rebuild after a change;
- watch propagation with 3 routers watching: a prefill record flipped ready -> draining -> ready (each
  write changes the routable count every router reports), time from the write to each router reporting
  the new count (so it includes etcd's commit, the watch, decoding and the table rebuild), p50/p99; and
  load-record updates (the most frequent write), time until each router's view revision reaches the
  write's revision.

    python tools/bench_scale.py                          # 1,000 engines, 10,000 links (docs/benchmarks.md)
    python tools/bench_scale.py --engines 200 --links 2000 --repeat 2 --updates 40   # a quick look

Writes JSON (default docs/bench/scale.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp
import psutil

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from discovery.embedded import EmbeddedEtcd
from distserve.cluster.keys import Keys
from distserve.cluster.records import EngineGeometry, EngineRecord, LinkRecord, LoadRecord, TransferInfo
from distserve.testing.cluster import router_argv
from distserve.testing.ports import free_port
from distserve.testing.procs import Proc

MODEL = "bench-model"
STRATEGIES = ["random", "round_robin", "min_expected_latency", "power_of_two", "prefix_affinity"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---------------------------------------------------------------------------------------------- records
def make_records(n_engines: int, n_links: int) -> tuple[list[EngineRecord], list[LinkRecord]]:
    half = n_engines // 2
    geometry = EngineGeometry(block_size=64, num_gpu_blocks=4096, kv_layout="bench")
    engines = []
    for role, prefix in (("prefill", "p"), ("decode", "d")):
        for i in range(half):
            # records only: nothing listens at these addresses, and no request is ever sent to them
            engines.append(EngineRecord(
                id=f"{prefix}{i:04d}", incarnation=f"inst{i}.{prefix}", role=role,
                url=f"http://10.{i // 250}.{i % 250}.{1 if role == 'prefill' else 2}:23333", models=[MODEL],
                engine_info=geometry, transfer=TransferInfo(protocol="rdma"), state="ready",
                engine_kind="lmdeploy"))
    per_prefill = max(1, n_links // half)
    links = []
    for i in range(half):
        for k in range(per_prefill):
            j = (i * per_prefill + k) % half
            links.append(LinkRecord(prefill_id=f"p{i:04d}", decode_id=f"d{j:04d}", prefill_incarnation=f"inst{i}.p",
                                    decode_incarnation=f"inst{j}.d", state="established", protocol="rdma",
                                    handshake_ms=12.0, established_at=time.time()))
    return engines, links


async def seed(client: EtcdClient, keys: Keys, engines, links, concurrency: int = 64) -> float:
    items = [(keys.engine(e.id), e.encode()) for e in engines]
    items += [(keys.link(lk.prefill_id, lk.decode_id), lk.encode()) for lk in links]
    items += [(keys.load(e.id), LoadRecord(engine_id=e.id, running=i % 7, waiting=i % 3, kv_blocks_free=2048,
                                           kv_blocks_total=4096).encode()) for i, e in enumerate(engines)]
    t0 = time.monotonic()
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            key, value = queue.pop()
            await client.put(key, value, timeout=30)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- routers
class RouterProc:
    """A router process (the shared harness's Proc) and how long it took to answer ready."""

    def __init__(self, endpoints: str, cluster: str, log_dir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc.distserve(
            router_argv(self.port, [endpoints], "--cluster", cluster, "--router-id", name, log_level="WARNING"),
            f"router-{name}", log_dir=log_dir)
        self.started = self.proc.started

    async def wait_ready(self, http: aiohttp.ClientSession, expect: dict, timeout: float = 120) -> float:
        while time.perf_counter() - self.started < timeout:
            if not self.proc.alive():
                raise RuntimeError(f"router exited {self.proc.returncode}")
            try:
                async with http.get(f"{self.url}/health/ready") as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 200 and all(body.get(k) == v for k, v in expect.items()):
                        return time.perf_counter() - self.started
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.005)
        raise TimeoutError("router not ready")

    def rss_mib(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20

    def stop(self) -> None:
        self.proc.stop()


async def cold_starts(endpoints: str, http, log_dir: Path, cluster: str, expect: dict, repeat: int) -> dict:
    starts, rss = [], []
    for i in range(repeat):
        router = RouterProc(endpoints, cluster, log_dir, f"cold-{cluster}-{i}")
        try:
            starts.append(await router.wait_ready(http, expect))
            await asyncio.sleep(1.0)  # settle: load records and the lazily built table are in memory
            rss.append(router.rss_mib())
        finally:
            router.stop()
    return {"cold_start_s": {"median": statistics.median(starts), "runs": starts},
            "rss_mib": {"median": statistics.median(rss), "runs": rss}}


# ---------------------------------------------------------------------------------------------- decisions
async def decisions(endpoints: list[str], cluster: str, iterations: int) -> dict:
    """The router's selection path, in this process, over a ClusterView fed by etcd."""
    from distserve.router.breaker import CircuitBreakers
    from distserve.router.load import LoadTracker
    from distserve.router.metrics import RouterMetrics
    from distserve.router.strategies import PickContext, make_strategy
    from distserve.router.validation import COMPLETIONS, prompt_prefix
    from distserve.router.view import ClusterView

    client = EtcdClient(EtcdConfig(endpoints=endpoints, timeout=30))
    await client.connect()
    breakers = CircuitBreakers(lambda: None, {})
    view = ClusterView(client, Keys(cluster), breakers, LoadTracker(), RouterMetrics(), lambda config: None)
    out: dict = {}
    try:
        t0 = time.perf_counter()
        await view.start()
        assert await view.wait_synced(120), "view not synced"
        out["view_sync_s"] = time.perf_counter() - t0
        rebuild = []
        for _ in range(30):
            view.invalidate()
            t = time.perf_counter()
            view.table()
            rebuild.append(time.perf_counter() - t)
        out["table_rebuild_ms"] = {"p50": pct(rebuild, 50) * 1e3, "p99": pct(rebuild, 99) * 1e3}
        bodies = [{"model": MODEL, "prompt": f"user {i % 97} asks about topic {i % 13}: " + "lorem ipsum " * 8}
                  for i in range(256)]
        for name in STRATEGIES:
            entry = make_strategy(name)
            decode = make_strategy("min_expected_latency" if name == "prefix_affinity" else name)
            samples = []
            for i in range(iterations):
                body = bodies[i % len(bodies)]
                t = time.perf_counter_ns()
                # as Orchestrator.generate and Orchestrator._decode select (first attempt, nothing tried yet)
                ctx = PickContext(load=view.load, weights={}, params={},
                                  prefix=lambda n, body=body: prompt_prefix(COMPLETIONS, body, n))
                tried: set[str] = set()
                entries = view.table().entries.get(MODEL) or ()
                candidates = [e for e in entries if e not in tried]
                engine_id = entry.pick(candidates, ctx)
                engine = view.engines.get(engine_id)
                decodes = view.table().decodes.get((engine_id, MODEL)) or ()
                decode_candidates = [d for d in decodes if d not in tried]
                decode_id = decode.pick(decode_candidates, ctx)
                link = view.links.get((engine_id, decode_id))
                samples.append(time.perf_counter_ns() - t)
                assert engine is not None and link is not None
            out[name] = {"p50_us": pct(samples, 50) / 1e3, "p99_us": pct(samples, 99) / 1e3}
    finally:
        await view.stop()
        await client.close()
    return out


# ---------------------------------------------------------------------------------------------- propagation
async def propagation(client: EtcdClient, keys: Keys, http, routers: list[RouterProc], engines, updates: int) -> dict:
    prefills = [e for e in engines if e.role == "prefill"]
    full = len(prefills)
    state_lat, put_lat = [], []

    async def wait_count(router: RouterProc, want: int, t0: float, out: list) -> None:
        while True:
            try:
                async with http.get(f"{router.url}/health/ready") as resp:
                    body = await resp.json(content_type=None)
                    # no routable prefill left: 503 "no_route"
                    count = body.get("prefill") if resp.status == 200 else 0
                    if count == want:
                        out.append(time.perf_counter() - t0)
                        return
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.001)

    for i in range(updates):
        engine = prefills[(i * 37) % full]
        for state, want in (("draining", full - 1), ("ready", full)):
            record = engine.model_copy(update={"state": state})
            t0 = time.perf_counter()
            await client.put(keys.engine(engine.id), record.encode())
            put_lat.append(time.perf_counter() - t0)
            got: list[float] = []
            await asyncio.wait_for(asyncio.gather(*(wait_count(r, want, t0, got) for r in routers)), 30)
            state_lat.extend(got)

    load_lat = []

    async def wait_revision(router: RouterProc, revision: int, t0: float, out: list) -> None:
        while True:
            try:
                async with http.get(f"{router.url}/health/ready") as resp:
                    body = await resp.json(content_type=None)
                    if body.get("revision", 0) >= revision:
                        out.append(time.perf_counter() - t0)
                        return
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.001)

    for i in range(updates * 2):
        engine = engines[(i * 53) % len(engines)]
        t0 = time.perf_counter()
        revision = await client.put(keys.load(engine.id), LoadRecord(engine_id=engine.id, running=i % 11,
                                                                      kv_blocks_free=1000 + i).encode())
        got = []
        await asyncio.wait_for(asyncio.gather(*(wait_revision(r, revision, t0, got) for r in routers)), 30)
        load_lat.extend(got)
    ms = lambda v, q: pct(v, q) * 1e3
    return {"engine_state": {"p50_ms": ms(state_lat, 50), "p99_ms": ms(state_lat, 99), "max_ms": max(state_lat) * 1e3,
                             "samples": len(state_lat)},
            "etcd_put": {"p50_ms": ms(put_lat, 50), "p99_ms": ms(put_lat, 99)},
            "load_record": {"p50_ms": ms(load_lat, 50), "p99_ms": ms(load_lat, 99), "max_ms": max(load_lat) * 1e3,
                            "samples": len(load_lat)}}


# ---------------------------------------------------------------------------------------------- main
async def main_async(args: argparse.Namespace) -> dict:
    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="distserve-bench-scale-"))
    etcd = EmbeddedEtcd(unsafe_no_fsync=not args.fsync, extra_args=["--quota-backend-bytes", str(4 << 30)]).start()
    result: dict = {"command": "python tools/bench_scale.py " + " ".join(sys.argv[1:]),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()},
                    "params": {"engines": args.engines, "links": args.links, "repeat": args.repeat,
                               "routers_watching": args.routers, "updates": args.updates,
                               "decision_iterations": args.iterations, "etcd_fsync": args.fsync},
                    "started_at": time.time()}
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    client = EtcdClient(EtcdConfig(endpoints=etcd.endpoints, timeout=30))
    await client.connect()
    routers: list[RouterProc] = []
    try:
        big, small = Keys("big"), Keys("small")
        engines, links = make_records(args.engines, args.links)
        s_engines, s_links = make_records(2, 1)
        result["seed_s"] = await seed(client, big, engines, links)
        await seed(client, small, s_engines, s_links)
        result["records"] = {"engines": len(engines), "links": len(links), "load": len(engines)}
        half = len(engines) // 2
        print(f"seeded {len(engines)} engines, {len(links)} links, {len(engines)} load records "
              f"in {result['seed_s']:.1f}s", flush=True)
        expect_big = {"prefill": half, "decode": half}
        result["small"] = await cold_starts(etcd.client_url, http, log_dir, "small", {"prefill": 1, "decode": 1},
                                            args.repeat)
        result["big"] = await cold_starts(etcd.client_url, http, log_dir, "big", expect_big, args.repeat)
        print(f"cold start: small {result['small']['cold_start_s']['median']:.2f}s, "
              f"big {result['big']['cold_start_s']['median']:.2f}s", flush=True)
        result["small"]["decision"] = await decisions(etcd.endpoints, "small", args.iterations)
        result["big"]["decision"] = await decisions(etcd.endpoints, "big", args.iterations)
        print("decisions measured", flush=True)
        for i in range(args.routers):
            routers.append(RouterProc(etcd.client_url, "big", log_dir, f"watch-{i}"))
        for router in routers:
            await router.wait_ready(http, expect_big)
        result["big"]["propagation"] = await propagation(client, big, http, routers, engines, args.updates)
        result["big"]["watching_rss_mib"] = [r.rss_mib() for r in routers]
        for router in routers:
            router.stop()
        routers = []
        small_routers = [RouterProc(etcd.client_url, "small", log_dir, f"watch-small-{i}") for i in range(args.routers)]
        routers = small_routers
        for router in routers:
            await router.wait_ready(http, {"prefill": 1, "decode": 1})
        result["small"]["propagation"] = await propagation(client, small, http, routers, s_engines,
                                                           max(10, args.updates // 2))
    finally:
        for router in routers:
            router.stop()
        await http.close()
        await client.close()
        etcd.stop()
    result["duration_s"] = time.time() - result["started_at"]
    return result


def markdown(r: dict) -> str:
    b, s = r["big"], r["small"]
    p = r["params"]
    rows = [
        ("router cold start (process start -> ready, whole view), median",
         f"{s['cold_start_s']['median']:.2f} s", f"{b['cold_start_s']['median']:.2f} s"),
        ("router RSS once ready, median", f"{s['rss_mib']['median']:.0f} MiB", f"{b['rss_mib']['median']:.0f} MiB"),
        ("view list + sync (in-process ClusterView)", f"{s['decision']['view_sync_s'] * 1e3:.0f} ms",
         f"{b['decision']['view_sync_s'] * 1e3:.0f} ms"),
        ("routing table rebuild after a change p50 / p99",
         f"{s['decision']['table_rebuild_ms']['p50']:.2f} / {s['decision']['table_rebuild_ms']['p99']:.2f} ms",
         f"{b['decision']['table_rebuild_ms']['p50']:.2f} / {b['decision']['table_rebuild_ms']['p99']:.2f} ms"),
    ]
    for name in STRATEGIES:
        rows.append((f"routing decision `{name}` p50 / p99",
                     f"{s['decision'][name]['p50_us']:.1f} / {s['decision'][name]['p99_us']:.1f} µs",
                     f"{b['decision'][name]['p50_us']:.1f} / {b['decision'][name]['p99_us']:.1f} µs"))
    for key, label in (("engine_state", "watch propagation, engine record -> routable count"),
                       ("load_record", "watch propagation, load record -> view revision")):
        rows.append((f"{label} ({p['routers_watching']} routers) p50 / p99",
                     f"{s['propagation'][key]['p50_ms']:.1f} / {s['propagation'][key]['p99_ms']:.1f} ms",
                     f"{b['propagation'][key]['p50_ms']:.1f} / {b['propagation'][key]['p99_ms']:.1f} ms"))
    rows.append(("etcd put (the write itself) p50 / p99",
                 f"{s['propagation']['etcd_put']['p50_ms']:.1f} / {s['propagation']['etcd_put']['p99_ms']:.1f} ms",
                 f"{b['propagation']['etcd_put']['p50_ms']:.1f} / {b['propagation']['etcd_put']['p99_ms']:.1f} ms"))
    head = (f"| measure | baseline: 2 engines, 1 link | {r['records']['engines']:,} engines, "
            f"{r['records']['links']:,} links |\n| --- | --- | --- |\n")
    return head + "\n".join(f"| {a} | {b_} | {c} |" for a, b_, c in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench_scale.py", description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=1000)
    parser.add_argument("--links", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=5, help="cold starts per cluster (median reported)")
    parser.add_argument("--routers", type=int, default=3, help="routers watching during the propagation test")
    parser.add_argument("--updates", type=int, default=100, help="engine-state flips (x2 writes); load writes x2")
    parser.add_argument("--iterations", type=int, default=20000, help="routing decisions timed per strategy")
    parser.add_argument("--fsync", action="store_true", help="etcd with fsync (default off: shared CI disks)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "scale.json")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
