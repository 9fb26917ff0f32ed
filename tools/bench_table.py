#!/usr/bin/env python3
"""The router's routing table at scale: what one engine or link change costs, and what one pick costs.

    python tools/bench_table.py                                  # this tree, 1,000 engines / 10,000 links
    python tools/bench_table.py --baseline-tree /tmp/base22      # also a baseline tree, in the same run
    python tools/bench_table.py --only kv_aware --rounds 6 --baseline-tree /tmp/a /tmp/b  # medians, order rotated
    python tools/bench_table.py --json out.json
    python tools/bench_table.py --only kv_aware --changes 1      # one strategy's pick rows (and a token change)
    python tools/bench_table.py --only kv_aware --profile p.out  # cProfile of this tree's timed picks (pstats)
    python tools/bench_table.py --new-lists                     # every pick given a new list (a retry's)
    python tools/bench_table.py --gc python                     # the interpreter's collector settings

The collector runs as `distserve router` sets it once up (distserve/router/replica.py: what was built frozen,
thresholds 10,000 / 50 / 100); the JSON counts the collections made while measuring.

No etcd and no network: a real `distserve.router.view.ClusterView` is fed records through its cache's own
listeners (the code path of a watch event: decode, typed map, handlers), with `--prefills` prefills and as
many decodes, each prefill linked to `--links-per-prefill` decodes, all ready. Measured per change, as CPU
time of this process (time.thread_time): the event handling plus the first `view.table()` after it (the
work the first request after a change pays). Changes alternate: an engine drained and undrained (a state
change), a link failed and re-established, an operator cordon set and cleared. Picks: every strategy of
`distserve.router.strategies` over the table's candidates for the model (all prefills: the table's own list,
as the orchestrator's first attempt hands it; `--new-lists`: a new list per pick, as a retry's), without and
with weights (every fourth prefill weight 2), over 100 prompts, with loads moving between picks as under
traffic (each pick starts a request, the oldest of 64 in flight ends, one agent load record arrives; those
load-tracker calls are timed on their own), and the first pick after the candidate set changes (one prefill
leaves the set: a new set; then returns: a set seen before; 20 times each, CPU time: what a topology change
costs a strategy's per-set state), also for new sets of 496 and 497 prefills in turn (20: where int(16384 / n)
steps; until the eighth pass every ring share above 256 prefills was rounded down, so each of these moved one
point of every engine).
kv_aware's rows use a real `distserve.router.kv_index.KvIndex` of the tree under test, fed the engines'
cache-stream messages through its own `apply` (a snapshot of 200 prefix keys per prefill: 100 chat
conversations of 12 messages under 5 shared system prompts, each conversation cached to some depth on 3
prefills, the rest other keys, listed before them as the least recently stored; between picks one prefill
streams a stored or removed event: a new key, or its least recent), and requests of those 100 conversations
(12 prefix keys each, computed once per request as the router does, not timed; the prompt prefix computed
from the body at each call, as the orchestrator's is).

Each tree runs in its own child process (`--tree`), so the baseline imports its own code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(values_s: list[float]) -> dict:
    us = [v * 1e6 for v in values_s]
    return {"n": len(us), "mean_us": round(statistics.fmean(us), 1), "p50_us": round(_pct(us, 0.5), 1),
            "p99_us": round(_pct(us, 0.99), 1), "max_us": round(max(us), 1)}


def sets_one_left(candidates: list[str]) -> list[list[str]]:
    """A prefill leaves the set, then the whole set returns (20 times, a different prefill each): a new set, then a
    set seen before, in turn."""
    out = []
    for k in range(20):
        out += [candidates[:k * 7] + candidates[k * 7 + 1:], candidates]
    return out


def sets_across_a_step(candidates: list[str]) -> list[list[str]]:
    """New sets of 496 and 497 prefills in turn (of 500; 20): where int(16384 / n) steps (33 points each at 496, 32
    at 497), so before the eighth pass (every share rounded down) a change moved a point of every engine; now
    the shares are rounded down or up and a change moves about two shares' worth."""
    out = []
    for k in range(10):
        small = [c for i, c in enumerate(candidates) if not 20 * k <= i < 20 * k + 4]  # 496
        out += [small, small + [candidates[20 * k]]]  # then 497
    return out


def measure(prefills: int, links_per_prefill: int, changes: int, picks: int, only: list[str] | None = None,
            profile: Path | None = None, new_lists: bool = False, gc_mode: str = "router") -> dict:
    """Runs inside the tree under test (its distserve on sys.path)."""
    import asyncio
    import gc

    from distserve.cluster.keys import Keys
    from distserve.cluster.prefix_keys import request_keys
    from distserve.cluster.records import EngineGeometry, EngineRecord, LinkRecord, LoadRecord, OperatorFlags
    from distserve.router import strategies as S
    from distserve.router.breaker import CircuitBreakers
    from distserve.router.load import LoadTracker
    from distserve.router.metrics import RouterMetrics
    from distserve.router.validation import prompt_prefix
    from distserve.router.view import ClusterView

    rng = random.Random(22)
    keys = Keys("bench")
    model = "m"

    async def run() -> dict:
        load = LoadTracker()
        breakers = CircuitBreakers(lambda: None, b"", 0.5, 5.0)
        view = ClusterView(None, keys, breakers, load, RouterMetrics(), lambda *a: None)
        cache = view.cache
        listeners = {kind: cache._listener(kind) for kind in ("engines", "links", "state", "load")}

        def put(kind: str, key: str, record) -> None:
            listeners[kind]("put", key, None, cache.codec.decode(key, record.encode()))

        geometry = EngineGeometry(block_size=16, num_gpu_blocks=512)
        engines: dict[str, EngineRecord] = {}
        for role, n in (("prefill", prefills), ("decode", prefills)):
            for i in range(n):
                rec = EngineRecord(id=f"{role[0]}{i:04d}", incarnation=f"inc{i}", role=role,
                                   url=f"http://127.0.0.1:{10000 + i}", models=[model], state="ready",
                                   engine_kind="null", engine_info=geometry)
                engines[rec.id] = rec
        t0 = time.perf_counter()
        for rec in engines.values():
            put("engines", keys.engine(rec.id), rec)
        links: dict[tuple[str, str], LinkRecord] = {}
        for i in range(prefills):
            p = engines[f"p{i:04d}"]
            for j in range(links_per_prefill):
                d = engines[f"d{(i + j * 7) % prefills:04d}"]
                link = LinkRecord(prefill_id=p.id, decode_id=d.id, prefill_incarnation=p.incarnation,
                                  decode_incarnation=d.incarnation, state="established", protocol="tcp",
                                  established_at=time.time())
                links[(p.id, d.id)] = link
                put("links", keys.link(p.id, d.id), link)
        for rec in engines.values():
            put("load", keys.load(rec.id), LoadRecord(engine_id=rec.id, running=rng.randint(0, 8),
                                                      waiting=rng.randint(0, 4)))
        cache.synced.set()
        view.invalidate()
        table = view.table()
        initial = time.perf_counter() - t0
        assert len(table.entries[model]) == prefills, len(table.entries[model])

        if gc_mode == "router":
            # as distserve/router/replica.py does once the router is up: what was built so far (the table, the
            # records) frozen out of the collector's scans, the young generation collected every 10,000
            # allocations; "python" keeps the interpreter's defaults (700, 10, 10: the eighth pass and before)
            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, 50, 100)
        collections_before = [g["collections"] for g in gc.get_stats()]
        ids = list(engines)
        link_ids = list(links)
        per_kind: dict[str, list[float]] = {"engine_state": [], "link_state": [], "operator_flag": []}
        for n in range(changes):
            kind = ("engine_state", "link_state", "operator_flag")[n % 3]
            if kind == "engine_state":
                rec = engines[rng.choice(ids)]
                down = rec.model_copy(update={"state": "draining"})
                steps = [("engines", keys.engine(rec.id), down), ("engines", keys.engine(rec.id), rec)]
            elif kind == "link_state":
                link = links[rng.choice(link_ids)]
                bad = link.model_copy(update={"state": "failed"})
                steps = [("links", keys.link(*link_key(link)), bad), ("links", keys.link(*link_key(link)), link)]
            else:
                engine_id = rng.choice(ids)
                steps = [("state", keys.state(engine_id), OperatorFlags(cordon=True, updated_by="bench")),
                         ("state", keys.state(engine_id), OperatorFlags(cordon=False, updated_by="bench"))]
            for step_kind, key, record in steps:
                decoded = cache.codec.decode(key, record.encode())  # the watch's decode: not the router's
                c0 = time.thread_time()
                listeners[step_kind]("put", key, None, decoded)
                view.table()
                per_kind[kind].append(time.thread_time() - c0)
        table = view.table()
        assert len(table.entries[model]) == prefills

        candidates = table.entries[model]  # the table's own list, as the orchestrator hands it
        # uneven speeds: every fourth prefill has weight 2 (the "weighted" rows)
        weight_sets = {"": {}, ", weighted": {c: 2.0 for c in candidates[::4]}}
        decisions: dict[str, dict] = {}
        first_picks: dict[str, dict] = {}
        load_changes: list[float] = []
        profiler = None
        if profile is not None:
            import cProfile

            profiler = cProfile.Profile()
        for name in sorted(S.STRATEGIES):
            if only and name not in only:
                continue
            for label, weights in weight_sets.items():
                strategy = S.make_strategy(name)
                stream = None
                if getattr(strategy, "needs_kv", False):
                    index, bodies, stream = kv_index(view.cache, candidates)
                    # the prompt's prefix and keys as the orchestrator hands them: the prefix computed from the
                    # body at each call (timed: a tie reads it), the keys once per request (not timed)
                    contexts = [S.PickContext(load=load, weights=weights, params={},
                                              prefix=lambda n, b=b: prompt_prefix("chat", b, n), kv=index,
                                              keys=lambda chunk, k=request_keys(b): k)
                                for b in bodies]
                else:
                    prompts = [f"prompt {k}: ".encode() * 8 for k in range(100)]
                    contexts = [S.PickContext(load=load, weights=weights, params={}, prefix=lambda n, p=p: p[:n])
                                for p in prompts]
                for i in range(50):  # warm caches (prefix_affinity's ring, the indexes)
                    strategy.pick(candidates, contexts[i % 100])
                times = []
                inflight: list[str] = []
                for i in range(picks):
                    # the orchestrator's first attempt (nearly every pick) hands the table's own list, the same
                    # object until the table changes; --new-lists: a new list each pick, as a retry's is
                    given = list(candidates) if new_lists else candidates
                    if profiler is not None:
                        profiler.enable()
                    c0 = time.perf_counter()
                    chosen = strategy.pick(given, contexts[i % 100])
                    times.append(time.perf_counter() - c0)
                    if profiler is not None:
                        profiler.disable()
                    # loads move between picks as under traffic (not timed with the pick, timed alone): the
                    # request starts, the oldest of 64 in flight ends, one agent's load record arrives
                    engine_id = candidates[(i * 7919) % len(candidates)]
                    record = LoadRecord(engine_id=engine_id, running=rng.randint(0, 8), waiting=rng.randint(0, 4))
                    ended = inflight.pop(0) if len(inflight) >= 64 else None
                    c0 = time.perf_counter()
                    load.begin(chosen)
                    if ended is not None:
                        load.end(ended)
                    load.on_load(engine_id, record)
                    load_changes.append((time.perf_counter() - c0) / (2 if ended is None else 3))
                    inflight.append(chosen)
                    if stream is not None:
                        stream(i)  # one prefill's cache changes (not timed)
                for engine_id in inflight:
                    load.end(engine_id)
                decisions[name + label] = _summary(times)
                # the first pick after the candidate set changes (a prefill leaves the set, then comes back):
                # what a topology change costs a strategy that keeps state per set, as CPU time of this process
                leaves, returns = [], []
                for j, given in enumerate(sets_one_left(candidates)):
                    c0 = time.thread_time()
                    strategy.pick(given, contexts[j // 2])
                    (returns if j % 2 else leaves).append(time.thread_time() - c0)
                steps = []  # new sets across what was a point-count step
                for j, given in enumerate(sets_across_a_step(candidates)):
                    c0 = time.thread_time()
                    strategy.pick(given, contexts[j // 2])
                    steps.append(time.thread_time() - c0)
                first_picks[name + label] = {"new_set": _summary(leaves), "set_seen_before": _summary(returns),
                                             "new_set_across_a_step": _summary(steps)}
        if profiler is not None:
            profiler.dump_stats(str(profile))
        try:  # which of the router's compiled parts this tree ran (a tree from before them: its head parsers only)
            from distserve.router import compiled

            parts = compiled.summary()
        except ImportError:
            parts = "python (no compiled strategy parts)"
        return {
            "engines": len(engines), "links": len(links), "candidates": len(candidates),
            "compiled": parts, "initial_build_s": round(initial, 3),
            "change_cpu": {k: _summary(v) for k, v in per_kind.items() if v},
            "change_cpu_all": _summary([x for v in per_kind.values() for x in v]),
            "pick": decisions,
            "first_pick_after_set_change": first_picks,
            "load_change": _summary(load_changes),
            "gc": {"mode": gc_mode, "thresholds": list(gc.get_threshold()),
                   "collections_per_generation": [g["collections"] - b for g, b in
                                                  zip(gc.get_stats(), collections_before)]},
        }

    def kv_index(cache, candidates: list[str]):
        """A KvIndex following every prefill (its stream tasks cancelled: fed here through apply)."""
        from types import SimpleNamespace

        import orjson

        from distserve.cluster.prefix_keys import key_hex
        from distserve.router.kv_index import KvIndex

        index = KvIndex(cache)
        kv_rng = random.Random(18)
        systems = [{"role": "system", "content": f"app {a} system prompt " * 40} for a in range(5)]
        bodies = []
        for k in range(100):
            msgs = [systems[k % 5]]
            for t in range(11):
                msgs.append({"role": "user" if t % 2 == 0 else "assistant", "content": f"conv {k} turn {t}"})
            bodies.append({"messages": msgs})
        conversations: dict[str, dict[int, int]] = {c: {} for c in candidates}
        for b in bodies:
            keys = request_keys(b)
            for c in kv_rng.sample(candidates, 3):
                for d in range(kv_rng.randint(1, len(keys) - 1)):
                    conversations[c][keys[d]] = 1000 + 30 * d
        held: dict[str, dict[int, int]] = {}
        for c in candidates:
            # a snapshot lists keys least recently stored first, as an engine's LRU holds them: the other keys,
            # then those of the conversations being served (an engine touches a prefix at each of its turns, so
            # a removal takes the others first; listed the other way round, 3,000 removals wiped the
            # conversations from half the fleet during the run: docs/benchmarks.md, "Sixth pass")
            held[c] = {}
            while len(held[c]) + len(conversations[c]) < 200:
                held[c][kv_rng.getrandbits(63)] = kv_rng.randint(16, 4000)
            held[c].update(conversations[c])
            index._follow(c, SimpleNamespace(url=f"http://127.0.0.1:1/{c}", instance=c,
                                             cache_events={"path": "/x", "version": 1, "chunk_bytes": 64}))
            state = index.engines[c]
            state.task.cancel()  # nothing to connect to
            index.apply(state, orjson.dumps({"type": "snapshot", "seq": 0, "incarnation": c,
                                             "keys": [[key_hex(k), t] for k, t in held[c].items()]}))

        def stream(i: int) -> None:
            state = index.engines[candidates[(i * 104729) % len(candidates)]]
            key = kv_rng.getrandbits(63)
            kind = "stored" if i % 2 == 0 else "removed"
            keys = [[key_hex(key), 64]] if kind == "stored" else [key_hex(next(iter(state.keys)))]
            index.apply(state, orjson.dumps({"type": kind, "seq": state.seq + 1, "incarnation": state.incarnation,
                                             "keys": keys}))

        return index, bodies, stream

    def link_key(link) -> tuple[str, str]:
        return link.prefill_id, link.decode_id

    return asyncio.run(run())


def run_tree(tree: Path, args: argparse.Namespace, profile: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--prefills", str(args.prefills),
           "--links-per-prefill", str(args.links_per_prefill), "--changes", str(args.changes),
           "--picks", str(args.picks)]
    if args.only:
        cmd += ["--only", *args.only]
    if profile is not None:
        cmd += ["--profile", str(profile.resolve())]
    if args.new_lists:
        cmd.append("--new-lists")
    cmd += ["--gc", args.gc]
    out = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"bench_table: the run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefills", type=int, default=500, help="prefills, and as many decodes (default 500)")
    p.add_argument("--links-per-prefill", type=int, default=20, help="default 20 (10,000 links at 500)")
    p.add_argument("--changes", type=int, default=300, help="changes measured (each = two events)")
    p.add_argument("--picks", type=int, default=3000, help="picks measured per strategy")
    p.add_argument("--baseline-tree", type=Path, nargs="+", metavar="TREE",
                   help="also measure these source trees (git worktree add ..., git archive ...)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every tree this many times, the order rotated each round, and print the medians of "
                        "the pick rows (default 1)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--only", nargs="+", metavar="STRATEGY", help="pick rows of these strategies only (default all)")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="cProfile the timed picks of this tree (pstats file; the timings include its overhead)")
    p.add_argument("--new-lists", action="store_true",
                   help="hand every pick a new candidate list (as a retry does) instead of the table's own")
    p.add_argument("--gc", choices=("router", "python"), default="router",
                   help="the collector's settings while measuring: the router's (distserve/router/replica.py: "
                        "frozen after start-up, 10,000 / 50 / 100; default) or the interpreter's (700 / 10 / 10)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not (1 <= args.links_per_prefill <= args.prefills and args.prefills >= 2 and args.changes >= 1
            and args.picks >= 1 and 1 <= args.rounds <= 100):
        print("bench_table: need --prefills >= 2, 1 <= --links-per-prefill <= --prefills, --changes and --picks "
              ">= 1, 1 <= --rounds <= 100", file=sys.stderr)
        return 2
    if args.only and not args.child:  # the parent checks against this tree (a child imports its own tree only)
        sys.path.insert(0, str(REPO))
        from distserve.router.strategies import STRATEGIES

        unknown = sorted(set(args.only) - set(STRATEGIES))
        if unknown:
            print(f"bench_table: unknown strategy {', '.join(unknown)} (choose from {', '.join(STRATEGIES)})",
                  file=sys.stderr)
            return 2
    if args.child:
        print(json.dumps(measure(args.prefills, args.links_per_prefill, args.changes, args.picks, args.only,
                                 args.profile, args.new_lists, args.gc)))
        return 0
    trees: dict[str, Path] = {}
    for i, tree in enumerate(args.baseline_tree or ()):
        if not (tree / "distserve").is_dir():
            print(f"bench_table: {tree} has no distserve/ (a source tree is needed)", file=sys.stderr)
            return 2
        trees["baseline" if i == 0 else f"baseline{i + 1}"] = tree.resolve()
    trees["this"] = REPO
    names = list(trees)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for n in range(args.rounds):  # each round in another order: no tree always runs first (or last)
        for name in names[n % len(names):] + names[: n % len(names)]:
            profile = args.profile if name == "this" and n == 0 else None
            rounds[name].append(run_tree(trees[name], args, profile))
            if args.rounds > 1:
                picks = rounds[name][-1]["pick"]
                print(f"round {n + 1} {name}: " + ", ".join(f"{k} {v['p50_us']}/{v['p99_us']}" for k, v in picks.items()),
                      flush=True)
    results = {name: runs[0] for name, runs in rounds.items()}
    for name, r in results.items():
        print(f"== {name} ({trees[name]}): {r['engines']} engines, {r['links']} links, initial build "
              f"{r['initial_build_s']} s, compiled parts {r.get('compiled', '?')}")
        for kind, s in {**r["change_cpu"], "all changes": r["change_cpu_all"]}.items():
            print(f"   change {kind:14s} CPU per event: mean {s['mean_us']:>9.1f} us  p50 {s['p50_us']:>9.1f}  "
                  f"p99 {s['p99_us']:>9.1f}  max {s['max_us']:>9.1f}")
        for strategy, s in r["pick"].items():
            print(f"   pick {strategy:32s} over {r['candidates']}: p50 {s['p50_us']:>7.1f} us  p99 "
                  f"{s['p99_us']:>7.1f}  mean {s['mean_us']:>7.1f}")
        for strategy, kinds in r.get("first_pick_after_set_change", {}).items():
            new, seen = kinds["new_set"], kinds["set_seen_before"]
            print(f"   first pick after a set change, {strategy:20s} CPU: a new set mean {new['mean_us'] / 1000:>5.2f} "
                  f"ms, max {new['max_us'] / 1000:>5.2f}; back to a set seen before mean {seen['mean_us'] / 1000:>5.2f}")
            step = kinds.get("new_set_across_a_step")
            if step is not None:
                print(f"   first pick after a set change, {strategy:20s} CPU: a new set of 496 <-> 497 prefills "
                      f"(a point-count step until the eighth pass) mean {step['mean_us'] / 1000:>5.2f} ms, max {step['max_us'] / 1000:>5.2f}")
        if "load_change" in r:
            s = r["load_change"]
            print(f"   load change (begin/end/record), per call: p50 {s['p50_us']:>5.2f} us  p99 {s['p99_us']:>5.2f}")
    if args.rounds > 1:
        print(f"== medians over {args.rounds} rounds, p50 / p99 us per pick")
        for name, runs in rounds.items():
            for strategy in runs[0]["pick"]:
                p50 = statistics.median(r["pick"][strategy]["p50_us"] for r in runs)
                p99 = statistics.median(r["pick"][strategy]["p99_us"] for r in runs)
                print(f"   {name:10s} {strategy:32s} p50 {p50:>7.2f}  p99 {p99:>7.2f}")
        print(f"== the first pick after a set change over {args.rounds} rounds, CPU ms: each round's mean of 20 (range), "
              "then its worst of 20 (median of the rounds, range)")
        for name, runs in rounds.items():
            for strategy in runs[0]["first_pick_after_set_change"]:
                for kind, label in (("new_set", "a new set"), ("new_set_across_a_step", "496 <-> 497")):
                    means = [r["first_pick_after_set_change"][strategy][kind]["mean_us"] / 1000 for r in runs]
                    worst = [r["first_pick_after_set_change"][strategy][kind]["max_us"] / 1000 for r in runs]
                    if max(worst) < 0.05:  # the strategies that keep no per-set state
                        continue
                    print(f"   {name:10s} {strategy:32s} {label:11s} mean {min(means):.2f}-{max(means):.2f}  worst "
                          f"{statistics.median(worst):.2f} ({min(worst):.2f}-{max(worst):.2f})")
            changes = [r["change_cpu_all"] for r in runs]
            print(f"   {name:10s} an engine or link change: p99 {max(c['p99_us'] for c in changes) / 1000:.2f} ms, "
                  f"max {max(c['max_us'] for c in changes) / 1000:.2f} (the largest over the rounds)")
    if args.json:
        args.json.write_text(json.dumps(results if args.rounds == 1 else rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
