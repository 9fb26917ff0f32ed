#!/usr/bin/env python3
"""Cache-aware PD routing (issue 18, section 4): round_robin vs prefix_affinity vs kv_aware on shared-prefix chat.

Each strategy gets a fresh cluster of real processes on loopback: an embedded etcd, reference engines with
prefix caching (`--prefill` prefills, `--decode` decodes, each with its in-process agent) and `--routers`
router replicas, conversations spread over the routers (conversation i talks to router i mod R).

Workload (seeded, the same trace for every strategy): `--systems` system prompts of `--system-tokens` bytes
(the built-in model is byte-level: one token a byte), `--conversations` conversations of `--turns` turns,
each turn appending the previous answer (`--answer-tokens` tokens, greedy, ignore_eos) and a new question.
Conversations arrive open-loop (Poisson, at rate/turns conversations a second, so the offered request rate
is `rate`); the turns of one conversation follow each other with no think time (a turn needs the answer).

Phases:
1. ramp: on a fresh round_robin cluster (the cache-blind baseline), closed loop at rising concurrency on a
   disjoint trace; saturation = the highest completed requests/s. Skipped with `--rate`.
2. per strategy and run, a fresh cluster: `low` at `--low` x saturation, `high` at `--high` (0.8) x
   saturation (a second trace, disjoint system prompts), then on the last one a sequential probe (`--probe`
   conversations, one request at a time) that measures what each turn migrates.
3. restart (kv_aware, its own fresh cluster, `--restart-run` rate): SIGKILL one router and one prefill
   mid-run, restart both on the same ports and ids after `--restart-delay` s; failures and, per `--window`
   s (default 5, the TTL), the prefills' hit rate against the omniscient one of the requests started then.

What the client does on errors: a connection refused (the router is down) moves the request to the next
router, at most once per router with 0.1-0.3 s jittered sleeps; anything else (a reset mid-request, an
HTTP error, an error event in the stream) is a failed request and ends its conversation.

Reported per run: TTFT and end-to-end p50/p99, prompt tokens computed vs served from the prefill engines'
caches (distserve_engine_prompt_tokens_total, ..._prefix_cache_hit_tokens_total), the omniscient hit rate
(the run's prompts, in the order they were sent, replayed through one LRU prefix cache of all prefills'
blocks, with the engine's rules: full blocks, the last prompt token always computed), per-engine load
max/mean (prefill requests), router CPU per request (psutil, both replicas), and from the probe the KV
blocks/bytes each turn migrated vs the blocks that were new since the previous turn. `placements` (per run and
in the restart phase): where each request was prefilled, read off the prefills' own cache-state streams (a
turn's whole-prompt key is new and stored where it ran), where each family's root was first announced, and
every later turn that ran on another prefill than the turn before it (a moved conversation).

    .venv/bin/python tools/bench_prefix.py                       # full run, docs/bench/prefix-2core.{json,png}
    .venv/bin/python tools/bench_prefix.py --quick --out /tmp/q.json   # smoke (~1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distserve.testing.cluster import engine_argv, router_argv, wait_links_established  # noqa: E402
from distserve.testing.ports import HOST, free_port  # noqa: E402
from distserve.testing.procs import Proc, wait_http  # noqa: E402

MODEL = "distserve-reference"
BOS = 256
STRATEGIES = ("round_robin", "prefix_affinity", "kv_aware")
WORDS = ("model cache token block router engine prefix decode prefill latency memory request answer system "
         "cluster replica stream index lease watch batch queue kernel tensor layer weight").split()


# ------------------------------------------------------------------------------------------ trace
def make_trace(seed: int, systems: int, system_tokens: int, conversations: int, turns: int) -> dict:
    rng = random.Random(seed)

    def text(n: int, tag: str) -> str:
        out = tag
        while len(out) < n:
            out += " " + rng.choice(WORDS)
        return out[:n]

    # A distinct head per prompt: no two system prompts (or two traces) share a first KV block.
    sys_prompts = [text(system_tokens, f"[{seed}:{s}] You are assistant {s}.") for s in range(systems)]
    convs = []
    for c in range(conversations):
        qs = [text(rng.randint(40, 80), f"Q{c}.{t}: ") + "?" for t in range(turns)]
        convs.append({"system": c % systems, "questions": qs})
    return {"seed": seed, "systems": sys_prompts, "conversations": convs}


def prompt_ids(messages: list[dict]) -> list[int]:
    """The reference engine's chat template over the byte tokenizer (distserve/engine/tokenizer.py)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return [BOS, *text.encode()]


def block_keys(ids: list[int], block: int = 16, limit: int | None = None) -> list[tuple]:
    """The chained keys of the full blocks of `ids` (at most `limit`), as the omniscient cache names them."""
    keys, parent = [], ()
    n = len(ids) // block if limit is None else min(limit, len(ids) // block)
    for j in range(n):
        parent = (hash(parent), tuple(ids[j * block:(j + 1) * block]))
        keys.append(parent)
    return keys


def omniscient_hits(prompts: list[list[int]], capacity_blocks: int, block: int = 16,
                    each: list[int] | None = None, loss: tuple[int, set] | None = None) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of one LRU prefix cache of `capacity_blocks` seeing every prompt in order
    (`each`: filled with every prompt's hit tokens). `loss` = (i, blocks): before prompt i the cache loses
    those blocks (a prefill killed: the same loss the engines suffered, so the comparison stays fair)."""
    lru: OrderedDict[tuple, None] = OrderedDict()
    hits = total = 0
    for i, ids in enumerate(prompts):
        if loss is not None and i == loss[0]:
            for key in loss[1]:
                lru.pop(key, None)
        total += len(ids)
        keys = block_keys(ids, block)
        reusable = (len(ids) - 1) // block
        k = 0
        while k < reusable and keys[k] in lru:
            k += 1
        hits += k * block
        if each is not None:
            each.append(k * block)
        for key in reversed(keys):  # leaves older than their parents: LRU evicts leaves first
            lru[key] = None
            lru.move_to_end(key)
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return hits, total


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# ------------------------------------------------------------------------------------------ cluster
class Cluster:
    """Engines with their agents and routers for one strategy, on a fresh cluster name in the shared etcd."""

    def __init__(self, args, etcd: list[str], strategy: str, tag: str) -> None:
        self.args, self.etcd, self.strategy, self.name = args, etcd, strategy, f"bp-{tag}"
        self.log_dir = Path(args.log_dir) / tag if args.log_dir else None
        self.prefills: list[tuple[Proc, str]] = []
        self.decodes: list[tuple[Proc, str]] = []
        self.routers: list[tuple[Proc, str]] = []

    def _engine(self, role: str, i: int) -> tuple[Proc, str]:
        port = free_port()
        a = self.args
        argv = engine_argv(role, port, "--etcd", ",".join(self.etcd), "--cluster", self.name,
                           "--engine-id", f"{role}-{i}", "--ttl", str(a.ttl), "--num-blocks", str(a.num_blocks),
                           "--max-model-len", str(a.max_model_len), log_level="WARNING")
        return Proc.distserve(argv, name=f"{self.name}-{role}-{i}", log_dir=self.log_dir), f"http://{HOST}:{port}"

    def start(self) -> float:
        t0 = time.perf_counter()
        a = self.args
        self.prefills = [self._engine("prefill", i) for i in range(a.prefill)]
        self.decodes = [self._engine("decode", i) for i in range(a.decode)]
        for proc, url in self.prefills + self.decodes:
            wait_http(f"{url}/health", timeout=120, proc=proc)
        asyncio.run(wait_links(self.etcd, self.name, a.prefill * a.decode))
        for i in range(a.routers):
            port = free_port()
            argv = router_argv(port, self.etcd, "--cluster", self.name, "--strategy", self.strategy,
                               "--router-id", f"router-{i}", log_level="WARNING")
            self.routers.append((Proc.distserve(argv, name=f"{self.name}-router-{i}", log_dir=self.log_dir),
                                 f"http://{HOST}:{port}"))
        for proc, url in self.routers:
            wait_http(f"{url}/health/ready", timeout=120, proc=proc)
        return time.perf_counter() - t0

    def router_cpu(self) -> float:
        import psutil

        total = 0.0
        for proc, _ in self.routers:
            try:
                t = psutil.Process(proc.pid).cpu_times()
                total += t.user + t.system
            except (psutil.NoSuchProcess, TypeError):
                pass
        return total

    def stop(self) -> None:
        for proc, _ in self.routers + self.prefills + self.decodes:
            proc.kill()


async def wait_links(etcd: list[str], cluster: str, n: int, timeout: float = 180.0) -> None:
    await wait_links_established(etcd, cluster, n, timeout=timeout, poll=0.2)


# ------------------------------------------------------------------------------------------ metrics
async def scrape(http, url: str) -> dict[str, float] | None:
    import aiohttp

    try:
        async with http.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            text = await resp.text()
    except Exception:  # noqa: BLE001 - an engine down (the restart phase) has no metrics
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("distserve_engine_") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


PROMPT, HIT, REQS = ("distserve_engine_prompt_tokens_total", "distserve_engine_prefix_cache_hit_tokens_total",
                     "distserve_engine_requests_total")
MIG_BYTES, MIG_REUSED = "distserve_engine_migration_bytes_total", "distserve_engine_migration_blocks_reused_total"


class Counters:
    """Counter deltas per engine, summed over restarts (a counter that goes down is a new process)."""

    def __init__(self) -> None:
        self.last: dict[str, dict[str, float]] = {}
        self.total: dict[str, dict[str, float]] = {}

    def add(self, engine: str, snap: dict[str, float] | None) -> dict[str, float]:
        if snap is None:
            return {}
        prev = self.last.get(engine)
        delta = {}
        for name, value in snap.items():
            old = prev.get(name, 0.0) if prev else None
            if old is None:
                continue  # first sample: the baseline
            delta[name] = value - old if value >= old else value
        self.last[engine] = snap
        tot = self.total.setdefault(engine, {})
        for name, d in delta.items():
            tot[name] = tot.get(name, 0.0) + d
        return delta


# ------------------------------------------------------------------------------------------ load
class Load:
    def __init__(self, routers: list[str], answer_tokens: int, t0: float) -> None:
        self.routers = routers
        self.answer_tokens = answer_tokens
        self.t0 = t0
        self.records: list[dict] = []
        self.sent: list[list[int]] = []  # prompt token ids in the order sent (the omniscient replay)
        self.sent_messages: list[list[dict]] = []  # their messages (engine prefix keys -> blocks)

    async def request(self, http, conv: int, turn: int, messages: list[dict]) -> tuple[dict, str]:
        import aiohttp

        body = {"model": MODEL, "messages": messages, "max_tokens": self.answer_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        rec = {"conv": conv, "turn": turn, "start": time.perf_counter() - self.t0, "ttft": None, "e2e": None,
               "outcome": "ok", "router": None, "error": None, "prompt_tokens": None, "tried": 0}
        ids = prompt_ids(messages)
        first = conv % len(self.routers)
        text: list[str] = []
        sent = False
        for attempt in range(len(self.routers)):
            r = (first + attempt) % len(self.routers)
            rec["router"], rec["tried"] = r, attempt + 1
            rec["outcome"], rec["error"] = "ok", None  # an earlier attempt's refusal is not this one's outcome
            t = time.perf_counter()
            try:
                async with http.post(f"{self.routers[r]}/v1/chat/completions", json=body) as resp:
                    if not sent:  # a router took it: it reaches a prefill (the omniscient replay's order)
                        rec["sent_index"] = len(self.sent)
                        self.sent.append(ids)
                        self.sent_messages.append(messages)
                        sent = True
                    if resp.status != 200:
                        rec["outcome"], rec["error"] = f"http_{resp.status}", (await resp.text())[:300]
                        break
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            rec["outcome"], rec["error"] = "error_event", json.dumps(chunk["error"])[:300]
                            break
                        for choice in chunk.get("choices") or []:
                            piece = (choice.get("delta") or {}).get("content")
                            if piece:
                                if rec["ttft"] is None:
                                    rec["ttft"] = time.perf_counter() - t
                                text.append(piece)
                        if chunk.get("usage"):
                            rec["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                    rec["e2e"] = time.perf_counter() - t
                    break
            except aiohttp.ClientConnectorError as exc:  # refused: this router is down, try the next one
                rec["outcome"], rec["error"] = "refused", str(exc)[:200]
                await asyncio.sleep(random.uniform(0.1, 0.3))
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                rec["outcome"], rec["error"] = "disconnected", f"{type(exc).__name__}: {exc}"[:300]
                break
        if rec["outcome"] == "ok" and rec["prompt_tokens"] not in (None, len(ids)):
            rec["outcome"], rec["error"] = "bad_answer", f"prompt_tokens {rec['prompt_tokens']} != {len(ids)}"
        rec["end"] = time.perf_counter() - self.t0
        self.records.append(rec)
        return rec, "".join(text)

    async def conversation(self, http, trace: dict, c: int, prompts: list | None = None) -> None:
        spec = trace["conversations"][c]
        messages = [{"role": "system", "content": trace["systems"][spec["system"]]}]
        for turn, q in enumerate(spec["questions"]):
            messages = [*messages, {"role": "user", "content": q}]
            rec, answer = await self.request(http, c, turn, messages)
            if prompts is not None:
                prompts.append((rec, prompt_ids(messages)))
            if rec["outcome"] != "ok":
                return
            messages = [*messages, {"role": "assistant", "content": answer}]


def session():
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=300, sock_connect=2),
    )


async def sampler(cluster: Cluster, counters: Counters, samples: list, t0: float, period: float,
                  stop: asyncio.Event) -> None:
    async with session() as http:
        while True:
            urls = [(f"prefill-{i}", u) for i, (_, u) in enumerate(cluster.prefills)]
            urls += [(f"decode-{i}", u) for i, (_, u) in enumerate(cluster.decodes)]
            snaps = await asyncio.gather(*(scrape(http, u) for _, u in urls))
            t = time.perf_counter() - t0
            row = {"t": t, "engines": {}}
            for (name, _), snap in zip(urls, snaps):
                d = counters.add(name, snap)
                row["engines"][name] = {k: d.get(k, 0.0) for k in (PROMPT, HIT, REQS, MIG_BYTES)}
                row["engines"][name]["up"] = snap is not None
            samples.append(row)
            if stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(), period)
            except asyncio.TimeoutError:
                pass


async def follow_placements(cluster: Cluster, t0: float, stop: asyncio.Event, out: list[dict]) -> None:
    """Follow every prefill's cache-state stream (reconnecting across a restart) and record, with the time, the
    keys each stores and the roots it announces as pending: a request's last prefix key (its whole prompt) is
    new and stored by the prefill that served it, so `placements` can tell where every turn ran."""
    import aiohttp

    async def one(name: str, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                try:
                    async with http.get(f"{url}/distserve/cache/events") as resp:
                        async for raw in resp.content:
                            msg = json.loads(raw)
                            if msg.get("type") in ("snapshot", "stored"):
                                out.append({"t": time.perf_counter() - t0, "engine": name,
                                            "keys": [k for k, _ in msg.get("keys", [])],
                                            "pending": msg.get("pending", [])})
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass  # down (the restart phase) or a line too long: again
                await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(one(f"prefill-{i}", u)) for i, (_, u) in enumerate(cluster.prefills)]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def placements(load: Load, stream: list[dict], systems: int) -> dict:
    """Where each request was prefilled (the prefill whose stream first stored its last prefix key after it
    started), where each system prompt (family) was first announced, and every later turn that ran on
    another prefill than the turn before it (a conversation moved: its prefix computed again)."""
    from distserve.cluster.prefix_keys import chat_keys, key_hex

    stored: dict[str, list[tuple[float, str]]] = {}
    first_pending: dict[str, tuple[float, str]] = {}
    for ev in stream:
        for k in ev["keys"]:
            stored.setdefault(k, []).append((ev["t"], ev["engine"]))
        for k in ev["pending"]:
            first_pending.setdefault(k, (ev["t"], ev["engine"]))
    where: dict[tuple[int, int], str] = {}
    for rec in load.records:
        if "sent_index" not in rec:
            continue
        last = key_hex(chat_keys(load.sent_messages[rec["sent_index"]])[-1])
        hits = [e for t, e in stored.get(last, ()) if t >= rec["start"] - 0.05]
        if hits:
            rec["prefill"] = where[(rec["conv"], rec["turn"])] = hits[0]
    families = {}
    for rec in sorted(load.records, key=lambda r: r["start"]):
        if rec["turn"] == 0 and "sent_index" in rec:
            root = key_hex(chat_keys(load.sent_messages[rec["sent_index"]][:1])[0])
            fam = families.setdefault(str(rec["conv"] % systems), {"first_conv": rec["conv"],
                                                                   "router": rec["router"], "engines": []})
            if first_pending.get(root) and not fam.get("announced_on"):
                fam["announced_on"], fam["announced_at"] = first_pending[root][1], round(first_pending[root][0], 3)
            if rec.get("prefill") and rec["prefill"] not in fam["engines"]:
                fam["engines"].append(rec["prefill"])
    moved = []
    for rec in load.records:
        prev = where.get((rec["conv"], rec["turn"] - 1))
        if rec["turn"] > 0 and prev and rec.get("prefill") and rec["prefill"] != prev:
            moved.append({"conv": rec["conv"], "turn": rec["turn"], "from": prev, "to": rec["prefill"],
                          "start": round(rec["start"], 3), "router": rec["router"]})
    return {"placed": len(where), "requests": len(load.records), "families": families,
            "moved_turns": sorted(moved, key=lambda m: m["start"])}


async def open_loop(cluster: Cluster, trace: dict, rate: float, args, events=None) -> dict:
    """Conversations arrive Poisson at rate/turns a second; returns the run's records and engine deltas."""
    turns = len(trace["conversations"][0]["questions"])
    rng = random.Random(trace["seed"] + 1)
    t0 = time.perf_counter()
    load = Load([u for _, u in cluster.routers], args.answer_tokens, t0)
    counters, samples, stop = Counters(), [], asyncio.Event()
    cpu0 = cluster.router_cpu()
    # the restart phase samples finely: its recovery is placed to a fraction of a second, not a window
    period = min(args.window, 0.25) if events else args.window
    samp = asyncio.create_task(sampler(cluster, counters, samples, t0, period, stop))
    stream: list[dict] = []
    follow = asyncio.create_task(follow_placements(cluster, t0, stop, stream))
    await asyncio.sleep(0.3)  # the sampler's baseline
    t0b = time.perf_counter()
    tasks = []
    ev_task = asyncio.create_task(events(t0, load)) if events else None  # faults run alongside the arrivals
    async with session() as http:
        at = 0.0
        for c in range(len(trace["conversations"])):
            delay = t0b + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(load.conversation(http, trace, c)))
            at += rng.expovariate(rate / turns)
        await asyncio.gather(*tasks)
        ev_results = await ev_task if ev_task else None
    wall = time.perf_counter() - t0b
    cpu = cluster.router_cpu() - cpu0
    await asyncio.sleep(0.3)  # the last turns' keys reach the placement stream
    stop.set()
    await samp
    await follow
    return {"load": load, "counters": counters, "samples": samples, "wall": wall, "router_cpu": cpu,
            "events": ev_results, "placements": placements(load, stream, len(trace["systems"]))}


def summarize(run: dict, args, capacity_blocks: int, rate: float) -> dict:
    load: Load = run["load"]
    recs = load.records
    ok = [r for r in recs if r["outcome"] == "ok"]
    tot = run["counters"].total
    pre = {e: v for e, v in tot.items() if e.startswith("prefill")}
    prompt = sum(v.get(PROMPT, 0) for v in pre.values())
    hit = sum(v.get(HIT, 0) for v in pre.values())
    o_hit, o_total = omniscient_hits(load.sent, capacity_blocks, args.block_size)
    per_req = [v.get(REQS, 0) for v in pre.values()]
    per_tok = [v.get(PROMPT, 0) - v.get(HIT, 0) for v in pre.values()]
    mean_req = statistics.mean(per_req) if per_req else 0
    mean_tok = statistics.mean(per_tok) if per_tok else 0
    failures: dict[str, int] = {}
    for r in recs:
        if r["outcome"] != "ok":
            failures[r["outcome"]] = failures.get(r["outcome"], 0) + 1
    by_turn = {}
    for t in sorted({r["turn"] for r in ok}):
        tt = [r["ttft"] for r in ok if r["turn"] == t and r["ttft"] is not None]
        by_turn[str(t + 1)] = {"n": len(tt), "ttft_p50_ms": _ms(pct(tt, 50))}
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    e2e = [r["e2e"] for r in ok]
    return {
        "rate_offered_rps": round(rate, 3),
        "rate_achieved_rps": round(len(ok) / run["wall"], 3) if run["wall"] else None,
        "requests": len(recs), "ok": len(ok), "failures": failures, "wall_s": round(run["wall"], 1),
        "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
        "e2e_p50_ms": _ms(pct(e2e, 50)), "e2e_p99_ms": _ms(pct(e2e, 99)),
        "ttft_by_turn": by_turn,
        "prompt_tokens": int(prompt), "cached_tokens": int(hit), "computed_tokens": int(prompt - hit),
        "hit_rate": round(hit / prompt, 4) if prompt else None,
        "omniscient_hit_rate": round(o_hit / o_total, 4) if o_total else None,
        "omniscient_capacity_blocks": capacity_blocks,
        "prefill_requests": {e: int(v.get(REQS, 0)) for e, v in sorted(pre.items())},
        "load_max_over_mean": round(max(per_req) / mean_req, 3) if mean_req else None,
        "computed_tokens_max_over_mean": round(max(per_tok) / mean_tok, 3) if mean_tok else None,
        "router_cpu_ms_per_request": round(1000 * run["router_cpu"] / len(recs), 3) if recs else None,
        "decode_migration_bytes": int(sum(v.get(MIG_BYTES, 0) for e, v in tot.items() if e.startswith("decode"))),
        "placements": run["placements"],
    }


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


# ------------------------------------------------------------------------------------------ phases
async def ramp(cluster: Cluster, trace: dict, args) -> dict:
    """Closed loop: `level` conversations at a time (each a new one when one ends) for `ramp_seconds`."""
    steps = []
    nconv = len(trace["conversations"])
    next_conv = 0
    t0 = time.perf_counter()
    load = Load([u for _, u in cluster.routers], args.answer_tokens, t0)
    async with session() as http:
        for level in args.ramp_levels:
            n0 = len([r for r in load.records if r["outcome"] == "ok"])
            start = time.perf_counter()
            deadline = start + args.ramp_seconds

            async def worker(deadline: float = deadline) -> None:
                nonlocal next_conv
                while time.perf_counter() < deadline:
                    c, next_conv = next_conv % nconv, next_conv + 1
                    await load.conversation(http, trace, c)

            await asyncio.gather(*(worker() for _ in range(level)))
            done = len([r for r in load.records if r["outcome"] == "ok"]) - n0
            rps = done / (time.perf_counter() - start)
            lat = [r["e2e"] for r in load.records[n0:] if r["outcome"] == "ok"]
            steps.append({"concurrency": level, "rps": round(rps, 3), "e2e_p50_ms": _ms(pct(lat, 50))})
            print(f"  ramp: {level} conversations -> {rps:.2f} req/s, e2e p50 {_ms(pct(lat, 50))} ms", flush=True)
    return {"steps": steps, "saturation_rps": max(s["rps"] for s in steps)}


async def probe(cluster: Cluster, trace: dict, args) -> list[dict]:
    """Conversations one request at a time through router 0: what each turn made the decodes pull."""
    out = []
    load = Load([cluster.routers[0][1]], args.answer_tokens, time.perf_counter())
    async with session() as http:
        decodes = [u for _, u in cluster.decodes]
        for c in range(len(trace["conversations"])):
            spec = trace["conversations"][c]
            messages = [{"role": "system", "content": trace["systems"][spec["system"]]}]
            prev_cached = 0
            for turn, q in enumerate(spec["questions"]):
                messages = [*messages, {"role": "user", "content": q}]
                before = await asyncio.gather(*(scrape(http, u) for u in decodes))
                rec, answer = await load.request(http, c, turn, messages)
                await asyncio.sleep(0.2)  # the decode's counters are updated when its pull ends
                after = await asyncio.gather(*(scrape(http, u) for u in decodes))
                if rec["outcome"] != "ok":
                    out.append({"conv": c, "turn": turn + 1, "outcome": rec["outcome"]})
                    break
                p = rec["prompt_tokens"]
                blocks = math.ceil(p / args.block_size)
                d_bytes = sum(a[MIG_BYTES] - b[MIG_BYTES] for a, b in zip(after, before))
                reused = sum(a.get(MIG_REUSED, 0) - b.get(MIG_REUSED, 0) for a, b in zip(after, before))
                new = blocks - prev_cached  # blocks not in the previous turn's prompt + answer
                out.append({"conv": c, "turn": turn + 1, "prompt_tokens": p, "prompt_blocks": blocks,
                            "new_blocks": new, "migrated_blocks": int(blocks - reused),
                            "migrated_bytes": int(d_bytes)})
                # what a decode that ran this turn caches: full blocks of prompt + answer (the last token's
                # KV is never computed)
                prev_cached = (p + args.answer_tokens - 1) // args.block_size
                messages = [*messages, {"role": "assistant", "content": answer}]
    return out


def probe_summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "migrated_blocks" in r]
    by_turn = {}
    for t in sorted({r["turn"] for r in ok}):
        rs = [r for r in ok if r["turn"] == t]
        by_turn[str(t)] = {
            "n": len(rs),
            "prompt_blocks": round(statistics.mean(r["prompt_blocks"] for r in rs), 1),
            "new_blocks": round(statistics.mean(r["new_blocks"] for r in rs), 1),
            "migrated_blocks": round(statistics.mean(r["migrated_blocks"] for r in rs), 1),
            "migrated_kib": round(statistics.mean(r["migrated_bytes"] for r in rs) / 1024, 1),
        }
    later = [r for r in ok if r["turn"] > 1]
    within = sum(r["migrated_blocks"] <= r["new_blocks"] + 1 for r in later)
    return {"by_turn": by_turn, "later_turns": len(later), "later_turns_within_new_plus_1": within}


async def cache_snapshot(http, url: str) -> dict | None:
    """The first line (the snapshot) of an engine's cache-state stream; None if it does not answer."""
    import aiohttp

    try:
        async with http.get(f"{url}/distserve/cache/events", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return None
            return json.loads(await resp.content.readline())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def router_index(http, url: str) -> dict[str, float] | None:
    """distserve_router_kv_index_keys per engine, as a router reports it."""
    import aiohttp

    try:
        async with http.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("distserve_router_kv_index_keys{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('engine="', 1)[1].split('"', 1)[0]] = float(value)
    return out


async def poll_up(url: str, t0: float, proc: Proc, timeout: float = 120.0, interval: float = 0.01) -> dict:
    """Poll GET url every `interval` s: when the process first answered at all (listening) and when it answered
    200 (ready), in s since t0."""
    import aiohttp

    out: dict = {"listening_at": None, "ready_at": None}
    deadline = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as http:
        while time.perf_counter() < deadline and proc.alive():
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    now = time.perf_counter() - t0
                    if out["listening_at"] is None:
                        out["listening_at"] = now
                    if resp.status == 200:
                        out["ready_at"] = now
                        return out
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(interval)
    return out


async def restart_events(cluster: Cluster, t0: float, at: float, delay: float, load: Load) -> dict:
    """SIGKILL router 1 and prefill 0 at `at` s, restart both (same ports, ids) `delay` s later. Just before
    the kill every prefill's cache snapshot is read (what the killed one alone held is the loss the fair
    omniscient reference suffers too); after it, the restarted router's readiness is polled every 10 ms and
    its index compared with the other router's."""
    await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
    router, prefill = cluster.routers[1 % len(cluster.routers)][0], cluster.prefills[0][0]
    url_r = cluster.routers[1 % len(cluster.routers)][1]
    url_p = cluster.prefills[0][1]
    async with session() as http:
        snaps = await asyncio.gather(*(cache_snapshot(http, u) for _, u in cluster.prefills))
    sent_at_kill = len(load.sent)
    t_kill = time.perf_counter() - t0
    router.kill()
    prefill.kill()
    print(f"  restart: killed router-1 and prefill-0 at {t_kill:.1f} s", flush=True)
    await asyncio.sleep(delay)
    t_restart = time.perf_counter() - t0
    router.start()
    prefill.start()
    r_up, p_up = await asyncio.gather(poll_up(f"{url_r}/health/ready", t0, router),
                                      poll_up(f"{url_p}/health", t0, prefill))
    index: dict = {}
    if r_up["ready_at"] is not None:  # at once: what the restarted replica holds when it says ready
        async with session() as http:
            mine, other = await asyncio.gather(router_index(http, url_r), router_index(http, cluster.routers[0][1]))
        index = {"restarted": mine, "other": other}
    errors = [f"{name} did not come back" for name, up in (("router-1", r_up), ("prefill-0", p_up))
              if up["ready_at"] is None]
    up = {"prefill_up_at": p_up["ready_at"], "prefill_listening_at": p_up["listening_at"],
          "router_ready_at": r_up["ready_at"], "router_listening_at": r_up["listening_at"]}
    print(f"  restart: prefill up at {up['prefill_up_at']} s, router listening at {up['router_listening_at']} s, "
          f"ready at {up['router_ready_at']} s {errors or ''}", flush=True)
    return {"kill_at": t_kill, "restart_at": t_restart, **up, "restart_errors": errors,
            "sent_at_kill": sent_at_kill, "snapshots": snaps, "router_index_at_ready": index}


def lost_blocks(load: Load, ev: dict, block: int) -> set:
    """The blocks only the killed prefill (prefill-0) held at the kill: its cached prefix keys (chat keys over
    the messages of the prompts sent so far, as the engine counted their tokens) minus those another prefill
    also held, as omniscient block keys."""
    from distserve.cluster.prefix_keys import chat_keys

    snaps = ev.get("snapshots") or []
    if not snaps or snaps[0] is None:
        return set()
    where: dict[int, tuple[int, int]] = {}  # prefix key -> (sent index, message count)
    for i in range(ev["sent_at_kill"]):
        for j, key in enumerate(chat_keys(load.sent_messages[i])):
            where.setdefault(key, (i, j + 1))

    def blocks(snap: dict | None) -> set:
        out: set = set()
        for text, tokens in (snap or {}).get("keys", []):
            hit = where.get(int(text, 16))
            if hit is not None:
                out.update(block_keys(load.sent[hit[0]], block, tokens // block))
        return out

    others: set = set()
    for snap in snaps[1:]:
        others |= blocks(snap)
    return blocks(snaps[0]) - others


def hit_windows(samples: list[dict], width: float) -> list[dict]:
    """Prefill hit rate per `width`-second window (counter deltas of the samples that fall in it)."""
    out: dict[int, list[float]] = {}
    for row in samples:
        w = int(row["t"] // width)
        acc = out.setdefault(w, [0.0, 0.0])
        for name, e in row["engines"].items():
            if name.startswith("prefill"):
                acc[0] += e[PROMPT]
                acc[1] += e[HIT]
    return [{"t": (w + 0.5) * width, "prompt_tokens": int(p), "hit_rate": round(h / p, 4) if p else None}
            for w, (p, h) in sorted(out.items())]


def restart_summary(run: dict, ev: dict, args, capacity: int) -> dict:
    """Per `window`: the prefills' hit rate, and the omniscient one of the requests prefilled in it (the
    workload's mix of first and later turns changes from window to window: the ratio does not).

    The omniscient reference suffers the same cache loss as the cluster (`lost_blocks`: what only the killed
    prefill held is gone from its cache at the kill), or it would count as hits prefixes that no scheduler
    could find anywhere any more. A request counts in the window of its prefill (start + TTFT, where the
    prefills' counters moved), not of its start. The lossless reference is kept for comparison."""
    load = run["load"]
    recs = load.records
    windows = hit_windows(run["samples"], args.window)
    lost = lost_blocks(load, ev, args.block_size)
    each: list[int] = []
    omniscient_hits(load.sent, capacity, args.block_size, each, loss=(ev["sent_at_kill"], lost))
    each_no_loss: list[int] = []
    omniscient_hits(load.sent, capacity, args.block_size, each_no_loss)

    def prefilled_at(r: dict) -> float:
        return r["start"] + r["ttft"] if r["ttft"] is not None else r["end"]

    for w in windows:
        lo, hi = w["t"] - args.window / 2, w["t"] + args.window / 2
        inw = [r for r in recs if "sent_index" in r and lo <= prefilled_at(r) < hi]
        total = sum(len(load.sent[r["sent_index"]]) for r in inw)
        w["omniscient_hit_rate"] = round(sum(each[r["sent_index"]] for r in inw) / total, 4) if total else None
        w["omniscient_no_loss"] = (round(sum(each_no_loss[r["sent_index"]] for r in inw) / total, 4)
                                   if total else None)
        w["ratio"] = (round(w["hit_rate"] / w["omniscient_hit_rate"], 3)
                      if w["hit_rate"] is not None and w["omniscient_hit_rate"] else None)
    before = [w for w in windows if w["hit_rate"] is not None and ev["kill_at"] - 20 <= w["t"] < ev["kill_at"]]
    p = sum(w["prompt_tokens"] for w in before)
    base = sum(w["hit_rate"] * w["prompt_tokens"] for w in before) / p if p else None
    # recovered: from the first window after the kill from which every window's hit rate stays >= 0.9 x the
    # omniscient one; its end is the conservative bound (the goal's), its start the optimistic one
    after = [w for w in windows if w["ratio"] is not None and w["t"] - args.window / 2 >= ev["kill_at"]]
    recovered_at = recovered_from = None
    for i, w in enumerate(after):
        if all(x["ratio"] >= 0.9 for x in after[i:]):
            recovered_from, recovered_at = w["t"] - args.window / 2, w["t"] + args.window / 2
            break
    failures = [{k: r[k] for k in ("conv", "turn", "router", "outcome", "error", "start", "end", "tried")}
                for r in recs if r["outcome"] != "ok"]
    moved = sum(1 for r in recs if r["outcome"] == "ok" and r["tried"] > 1)
    after_kill = [r for r in recs if "sent_index" in r and r["sent_index"] >= ev["sent_at_kill"]]
    tok = sum(len(load.sent[r["sent_index"]]) for r in after_kill)
    idx = ev.get("router_index_at_ready") or {}
    mine, other = idx.get("restarted") or {}, idx.get("other") or {}
    index_gap = {e: other.get(e, 0) - mine.get(e, 0) for e in set(mine) | set(other)
                 if other.get(e, 0) != mine.get(e, 0)}
    ev = {k: v for k, v in ev.items() if k not in ("snapshots", "router_index_at_ready")}
    snap_keys = [len((x or {}).get("keys", [])) for x in (run["events"] or {}).get("snapshots", [])]
    return {
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in ev.items()},
        "prefill_keys_at_kill": snap_keys,
        "omniscient_lost_blocks": len(lost),
        # the whole tail after the kill, against both references (no window resolution involved)
        "omniscient_after_kill": round(sum(each[r["sent_index"]] for r in after_kill) / tok, 4) if tok else None,
        "omniscient_no_loss_after_kill": (round(sum(each_no_loss[r["sent_index"]] for r in after_kill) / tok, 4)
                                          if tok else None),
        # the restarted router: first answer -> ready (its view and kv index complete), and its index then vs
        # the other replica's (keys per engine; a difference is events in flight at that instant)
        "router_index_sync_s": (round(ev["router_ready_at"] - ev["router_listening_at"], 3)
                                if ev.get("router_ready_at") and ev.get("router_listening_at") else None),
        "router_index_at_ready": {"restarted": mine, "other": other, "differs": index_gap},
        "requests_to_router_before_ready": sum(
            1 for r in recs if r["router"] == 1 % len(load.routers) and ev.get("router_listening_at") is not None
            and ev["router_listening_at"] - 0.5 <= r["start"] < (ev.get("router_ready_at") or math.inf)),
        "ttl_s": args.ttl,
        "requests": len(recs), "ok": sum(r["outcome"] == "ok" for r in recs),
        "moved_to_other_router": moved,
        "failures": failures,
        "cache_state_failures": sum(1 for f in failures if f["outcome"] in ("http_400", "http_500", "bad_answer")
                                    or "cache" in (f["error"] or "").lower()),
        "hit_rate_before": round(base, 4) if base else None,
        # the dip: the lowest window from the kill to one TTL after the prefill was back
        "hit_rate_min_after_kill": min((w["hit_rate"] for w in windows if w["hit_rate"] is not None
                                        and ev["kill_at"] <= w["t"] <= (ev["prefill_up_at"] or ev["kill_at"])
                                        + args.ttl), default=None),
        "recovered_at": round(recovered_at, 2) if recovered_at else None,
        "recovery_after_kill_s": round(recovered_at - ev["kill_at"], 2) if recovered_at else None,
        "recovery_after_prefill_up_s_optimistic": (round(max(0.0, recovered_from - ev["prefill_up_at"]), 2)
                                                   if recovered_from is not None and ev["prefill_up_at"] else None),
        "recovery_after_prefill_up_s": (round(max(0.0, recovered_at - ev["prefill_up_at"]), 2)
                                        if recovered_at and ev["prefill_up_at"] else None),
        "windows": windows,
        "placements": run["placements"],
        "requests_timeline": [{"start": round(r["start"], 3), "end": round(r["end"], 3), "outcome": r["outcome"],
                               "ttft": r["ttft"], "router": r["router"], "conv": r["conv"], "turn": r["turn"],
                               "prefill": r.get("prefill"),
                               "hit_tokens": each[r["sent_index"]] if "sent_index" in r else None,
                               "prompt_tokens": len(load.sent[r["sent_index"]]) if "sent_index" in r else None}
                              for r in recs],
    }


# ------------------------------------------------------------------------------------------ main
async def run_strategy(args, etcd, strategy: str, traces: dict, rates: dict, capacity: int) -> dict:
    """One fresh cluster per run (a run's placement must not depend on what the previous one left cached);
    the probe runs on the last one."""
    out: dict = {"startup_s": [], "runs": {}}
    for i, (name, rate) in enumerate(rates.items()):
        cluster = Cluster(args, etcd, strategy, f"{strategy}-{name}-{os.getpid()}")
        print(f"{strategy}/{name}: starting {args.prefill}P+{args.decode}D+{args.routers}R", flush=True)
        try:
            startup = await asyncio.get_running_loop().run_in_executor(None, cluster.start)
            out["startup_s"].append(round(startup, 1))
            run = await open_loop(cluster, traces[name], rate, args)
            s = summarize(run, args, capacity, rate)
            s["timeline"] = hit_windows(run["samples"], args.window)
            out["runs"][name] = s
            print(f"  {name}: {rate:.2f} req/s offered, ttft p50 {s['ttft_p50_ms']} ms p99 {s['ttft_p99_ms']} ms, "
                  f"hit {s['hit_rate']} (omniscient {s['omniscient_hit_rate']}), load max/mean "
                  f"{s['load_max_over_mean']}, router cpu {s['router_cpu_ms_per_request']} ms/req, "
                  f"failures {s['failures']}, prefill requests {s['prefill_requests']}, "
                  f"moved turns {len(s['placements']['moved_turns'])}", flush=True)
            if i == len(rates) - 1:
                rows = await probe(cluster, traces["probe"], args)
                out["probe"] = {**probe_summary(rows), "rows": rows}
                print(f"  probe: {json.dumps(out['probe']['by_turn'])}", flush=True)
        finally:
            cluster.stop()
    return out


def goals(results: dict) -> dict:
    s = results["strategies"]
    out = {}
    if "kv_aware" not in s:
        return out
    kv = s["kv_aware"]
    rr = s.get("round_robin")
    for name in kv["runs"]:
        k = kv["runs"][name]
        g = {}
        if rr and name in rr["runs"] and rr["runs"][name]["ttft_p50_ms"]:
            ratio = k["ttft_p50_ms"] / rr["runs"][name]["ttft_p50_ms"]
            g["ttft_p50_vs_round_robin"] = {"value": round(ratio, 3), "goal": "<= 0.5", "met": ratio <= 0.5}
            cpu = k["router_cpu_ms_per_request"] / rr["runs"][name]["router_cpu_ms_per_request"]
            g["router_cpu_vs_round_robin"] = {"value": round(cpu, 3), "goal": "<= 1.2", "met": cpu <= 1.2}
        if k["omniscient_hit_rate"]:
            ratio = k["hit_rate"] / k["omniscient_hit_rate"]
            g["hit_rate_vs_omniscient"] = {"value": round(ratio, 3), "goal": ">= 0.9", "met": ratio >= 0.9}
        if k["load_max_over_mean"] is not None:
            g["load_max_over_mean"] = {"value": k["load_max_over_mean"], "goal": "<= 1.3",
                                       "met": k["load_max_over_mean"] <= 1.3}
        out[name] = g
    p = kv.get("probe")
    if p and p["later_turns"]:
        out["later_turns_migrate_new_plus_1"] = {
            "value": f"{p['later_turns_within_new_plus_1']}/{p['later_turns']}", "goal": "all",
            "met": p["later_turns_within_new_plus_1"] == p["later_turns"]}
    r = results.get("restart")
    if r:
        out["restart_no_cache_state_failures"] = {"value": r["cache_state_failures"], "goal": "0",
                                                  "met": r["cache_state_failures"] == 0}
        rec = r["recovery_after_prefill_up_s"]
        out["restart_hit_rate_recovers_within_ttl"] = {"value": rec, "goal": f"<= {r['ttl_s']} s",
                                                       "met": rec is not None and rec <= r["ttl_s"]}
    return out


async def amain(args) -> dict:
    from discovery.embedded import EmbeddedEtcd

    etcd_proc = EmbeddedEtcd(unsafe_no_fsync=True).start()
    etcd = etcd_proc.endpoints
    t_start = time.perf_counter()
    turns = args.turns
    results: dict = {
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "strategies": {},
    }
    capacity = args.prefill * args.num_blocks
    try:
        if args.rate:
            sat = args.rate / args.high
            results["ramp"] = {"skipped": True, "saturation_rps": sat}
        else:
            cluster = Cluster(args, etcd, "round_robin", f"ramp-{os.getpid()}")
            print("ramp: starting a round_robin cluster", flush=True)
            try:
                await asyncio.get_running_loop().run_in_executor(None, cluster.start)
                results["ramp"] = await ramp(cluster, make_trace(900, args.systems, args.system_tokens, 64, turns),
                                             args)
            finally:
                cluster.stop()
            sat = results["ramp"]["saturation_rps"]
        rates = {name: getattr(args, name) * sat for name in args.runs}

        def n_conv(rate: float) -> int:
            return args.conversations or max(4, min(64, round(rate * args.target_seconds / turns)))

        traces = {name: make_trace(seed, args.systems, args.system_tokens, n_conv(rates[name]), turns)
                  for name, seed in (("low", 1), ("high", 2)) if name in rates}
        traces["probe"] = make_trace(3, args.probe, args.system_tokens, args.probe, turns)
        results["workload"] = {name: {"conversations": len(traces[name]["conversations"]), "turns": turns,
                                      "rate_rps": round(rates[name], 3)} for name in rates}
        for strategy in args.strategies:
            results["strategies"][strategy] = await run_strategy(args, etcd, strategy, traces, rates, capacity)
            await asyncio.to_thread(save, args.out, results)  # a later phase that fails loses nothing
        if args.restart and args.restart_run in rates:
            cluster = Cluster(args, etcd, "kv_aware", f"restart-{os.getpid()}")
            print("restart: starting a kv_aware cluster", flush=True)
            try:
                await asyncio.get_running_loop().run_in_executor(None, cluster.start)
                rate = rates[args.restart_run]
                trace = make_trace(4, args.systems, args.system_tokens, n_conv(rate), turns)
                duration = len(trace["conversations"]) * turns / rate
                run = await open_loop(cluster, trace, rate, args,
                                      events=lambda t0, load: restart_events(cluster, t0, 0.5 * duration,
                                                                             args.restart_delay, load))
                results["restart"] = restart_summary(run, run["events"], args, capacity)
                r = results["restart"]
                print(f"  restart: {r['ok']}/{r['requests']} ok, failures {[f['outcome'] for f in r['failures']]}, "
                      f"hit before {r['hit_rate_before']}, recovered {r['recovery_after_prefill_up_s']} s after "
                      f"the prefill was up", flush=True)
            finally:
                cluster.stop()
        results["goals"] = goals(results)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
    finally:
        etcd_proc.stop()
    return results


def save(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1) + "\n")


def report(results: dict) -> str:
    lines = ["| strategy | run | req/s | TTFT p50 / p99 ms | e2e p50 / p99 ms | computed / cached tokens | hit rate "
             "(omniscient) | load max/mean | router CPU ms/req | failures |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for strategy, s in results["strategies"].items():
        for name, r in s["runs"].items():
            lines.append(
                f"| {strategy} | {name} | {r['rate_offered_rps']} | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} | "
                f"{r['e2e_p50_ms']} / {r['e2e_p99_ms']} | {r['computed_tokens']} / {r['cached_tokens']} | "
                f"{r['hit_rate']} ({r['omniscient_hit_rate']}) | {r['load_max_over_mean']} | "
                f"{r['router_cpu_ms_per_request']} | {sum(r['failures'].values())} |")
    lines += ["", "| strategy | turn | prompt blocks | new blocks | migrated blocks | migrated KiB |",
              "| --- | --- | --- | --- | --- | --- |"]
    for strategy, s in results["strategies"].items():
        for t, row in (s.get("probe") or {}).get("by_turn", {}).items():
            lines.append(f"| {strategy} | {t} | {row['prompt_blocks']} | {row['new_blocks']} | "
                         f"{row['migrated_blocks']} | {row['migrated_kib']} |")
    lines += ["", "| goal | run | value | target | met |", "| --- | --- | --- | --- | --- |"]
    for run, g in results.get("goals", {}).items():
        if "met" in g:
            lines.append(f"| {run} | | {g['value']} | {g['goal']} | {g['met']} |")
            continue
        for name, v in g.items():
            lines.append(f"| {name} | {run} | {v['value']} | {v['goal']} | {v['met']} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(results["strategies"])
    runs = list(next(iter(results["strategies"].values()))["runs"]) if strategies else []
    fig, axes = plt.subplots(1, 3 if results.get("restart") else 2, figsize=(15, 4.5))
    colors = {"round_robin": "#7f7f7f", "prefix_affinity": "#1f77b4", "kv_aware": "#2ca02c"}
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        xs = [j + i * width for j in range(len(runs))]
        p50 = [results["strategies"][strategy]["runs"][r]["ttft_p50_ms"] or 0 for r in runs]
        p99 = [results["strategies"][strategy]["runs"][r]["ttft_p99_ms"] or 0 for r in runs]
        axes[0].bar(xs, p50, width, color=colors.get(strategy), label=f"{strategy} p50")
        axes[0].scatter(xs, p99, color=colors.get(strategy), marker="_", s=300, label=f"{strategy} p99")
        hit = [results["strategies"][strategy]["runs"][r]["hit_rate"] or 0 for r in runs]
        axes[1].bar(xs, hit, width, color=colors.get(strategy), label=strategy)
    for j, r in enumerate(runs):
        om = results["strategies"][strategies[0]]["runs"][r]["omniscient_hit_rate"] or 0
        axes[1].hlines(om, j - width / 2, j + width * (len(strategies) - 0.5), colors="k", linestyles="--",
                       label="omniscient" if j == 0 else None)
    for ax, title in ((axes[0], "TTFT (ms)"), (axes[1], "prefill prefix-cache hit rate")):
        ax.set_xticks([j + width * (len(strategies) - 1) / 2 for j in range(len(runs))])
        ax.set_xticklabels([f"{r}\n{results['strategies'][strategies[0]]['runs'][r]['rate_offered_rps']} req/s"
                            for r in runs])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    r = results.get("restart")
    if r:
        ax = axes[2]
        ws = [w for w in r["windows"] if w["hit_rate"] is not None]
        ax.plot([w["t"] for w in ws], [w["hit_rate"] for w in ws], "-o", ms=3, color="#2ca02c", label="hit rate")
        om = [w for w in r["windows"] if w.get("omniscient_hit_rate") is not None]
        ax.plot([w["t"] for w in om], [w["omniscient_hit_rate"] for w in om], "--", color="k", lw=1,
                label="omniscient (same requests)")
        fails = [x for x in r["requests_timeline"] if x["outcome"] != "ok"]
        for key, label, color in (("kill_at", "kill", "#d62728"), ("prefill_up_at", "prefill up", "#1f77b4"),
                                  ("router_ready_at", "router ready", "#9467bd")):
            if r.get(key) is not None:
                ax.axvline(r[key], color=color, ls="--", label=label)
        if fails:
            ax.scatter([x["end"] for x in fails], [0.02] * len(fails), marker="x", color="#d62728",
                       label=f"failed ({len(fails)})")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("s")
        ax.set_title("kv_aware: kill + restart router-1 and prefill-0")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"prefix-aware routing, {results['config']['prefill']}P+{results['config']['decode']}D+"
                 f"{results['config']['routers']} routers, reference engines, {results['host']['cpus']} CPUs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke: 2P+1D, small trace, fixed rate, no ramp/restart")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--prefill", type=int, default=4)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--routers", type=int, default=2)
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--conversations", type=int, default=0,
                   help="per run (default: what --target-seconds takes at the run's rate, at most 64)")
    p.add_argument("--target-seconds", type=float, default=60.0)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per engine")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--ttl", type=int, default=5, help="engine lease TTL (s)")
    p.add_argument("--rate", type=float, default=0.0, help="the high run's req/s (skips the ramp)")
    p.add_argument("--low", type=float, default=0.5, help="first run's rate, x saturation")
    p.add_argument("--high", type=float, default=0.8, help="second run's rate, x saturation")
    p.add_argument("--runs", nargs="+", choices=("low", "high"), default=["low", "high"])
    p.add_argument("--ramp-levels", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--ramp-seconds", type=float, default=12.0)
    p.add_argument("--probe", type=int, default=2, help="conversations in the sequential migration probe")
    p.add_argument("--restart", action=argparse.BooleanOptionalAction, default=None,
                   help="the restart phase (default: on, off with --quick)")
    p.add_argument("--restart-delay", type=float, default=1.0)
    p.add_argument("--restart-run", choices=("low", "high"), default="high", help="the restart phase's rate")
    p.add_argument("--window", type=float, default=5.0, help="hit-rate window (s; default: the TTL)")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--out", default=str(REPO / "docs/bench/prefix-2core.json"))
    p.add_argument("--plot", default=None, help="PNG (default: next to --out)")
    args = p.parse_args(argv)
    if args.quick:
        args.prefill, args.decode = min(args.prefill, 2), 1
        args.systems, args.system_tokens, args.turns, args.answer_tokens = 2, 400, 3, 4
        args.conversations = args.conversations or 6
        args.rate = args.rate or 3.0
        args.probe, args.num_blocks, args.runs = 1, 256, ["low"]
    if args.restart is None:
        args.restart = not args.quick
    if args.plot is None:
        args.plot = str(Path(args.out).with_suffix(".png"))
    for name in ("prefill", "decode", "routers", "systems", "system_tokens", "turns", "answer_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = asyncio.run(amain(args))
    save(args.out, results)
    print(report(results))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
