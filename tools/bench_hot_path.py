#!/usr/bin/env python3
"""The router's own CPU per PD request, measured inside one process: the real Router (its fast path,
orchestrator, engine client, view from a real etcd) serving real null engines over loopback, with the
client side replaced by in-process connections (a fake client transport, named so: it only collects the
router's answers and sends the next request). No load generator shares the CPU and no client socket is
read or written, so two trees compare within a percent or two even on a busy 2-core machine: the tool for
A/B-ing cuts to the hot path. tools/bench_router.py stays the judge (real clients, the gateway beside it).

Each tree runs in its own process (PYTHONPATH = the tree), interleaved, `--repeats` times; a cell is the
router thread's CPU time (time.thread_time: the etcd client's gRPC thread excluded) over the requests
answered in `--seconds`, at `--concurrency` connections each sending its next request as soon as its
answer is out.

    .venv/bin/python tools/bench_hot_path.py [--trees DIR ...] [--concurrency 1 8 64] [--stream]
        [--seconds 3] [--repeats 3] [--profile FILE]
    .venv/bin/python tools/bench_hot_path.py --callgrind --concurrency 16 --seconds 9 --repeats 1 [--trees ...]
    .venv/bin/python tools/bench_hot_path.py --bytecodes --concurrency 16 --seconds 2 [--trees ...] [--top 25]

`--bytecodes`: the Python bytecodes the router's thread runs per request, in all and per function, counted while
measuring (sys.monitoring's instruction events on 3.12+, the opcode trace before; no CPU time is reported): the Python work per request, free
of the machine's noise (two runs of one tree agree within the requests in flight at the edges). A cut that
removes bytecodes without a measurable CPU change is still a cut; one that adds them is not (docs/benchmarks.md,
"Sixteenth pass").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "distserve-reference"
CLUSTER = "hotpath"


class FakeClientTransport:
    """Fake (in-process) client side of one router connection: the router writes its answer here; once the
    answer is complete the next request goes in, as a keep-alive client would send it."""

    def __init__(self, bench: "Clients", request: bytes) -> None:
        self.bench, self.request, self.conn = bench, request, None
        self.closing = False

    def write(self, data: bytes) -> None:
        if data[:5] == b"HTTP/" and not data.startswith(b"HTTP/1.1 200"):  # a head, not a stream's chunk
            raise RuntimeError(f"router answered {data[:200]!r}")
        done = data.endswith(b"0\r\n\r\n") if self.bench.stream else True
        if done:
            self.bench.answered += 1
            if self.bench.running:
                self.bench.loop.call_soon(self.conn.data_received, self.request)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Clients:
    def __init__(self, loop, stream: bool) -> None:
        self.loop, self.stream = loop, stream
        self.answered = 0
        self.running = False


def request_bytes(stream: bool) -> bytes:
    body = json.dumps({"model": MODEL, "prompt": "hello " * 30, "max_tokens": 16, "stream": stream}).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


class BytecodeCounter:
    """Counts the bytecodes each function runs on this thread while enabled: sys.monitoring's instruction events
    where the interpreter has them (3.12+: its opcode tracing no longer reports them), else sys.settrace's opcode
    events."""

    TOOL = 4  # a sys.monitoring tool id no profiler or debugger of ours uses

    def __init__(self) -> None:
        self.counts: dict = {}
        self.thread = threading.get_ident()

    def _global(self, frame, event, _arg):
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame, event, _arg):
        if event == "opcode":
            code = frame.f_code
            self.counts[code] = self.counts.get(code, 0) + 1
        return self._local

    def _instruction(self, code, _offset):
        if threading.get_ident() == self.thread:
            self.counts[code] = self.counts.get(code, 0) + 1

    def enable(self) -> None:
        monitoring = getattr(sys, "monitoring", None)
        if monitoring is None:
            sys.settrace(self._global)
            return
        monitoring.use_tool_id(self.TOOL, "bench_hot_path")
        monitoring.register_callback(self.TOOL, monitoring.events.INSTRUCTION, self._instruction)
        monitoring.set_events(self.TOOL, monitoring.events.INSTRUCTION)

    def disable(self) -> None:
        monitoring = getattr(sys, "monitoring", None)
        if monitoring is None:
            sys.settrace(None)
            return
        monitoring.set_events(self.TOOL, 0)
        monitoring.free_tool_id(self.TOOL)

    def by_function(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for code, n in self.counts.items():
            name = f"{code.co_qualname} ({Path(code.co_filename).name})"
            out[name] = out.get(name, 0) + n
        return out


async def serve_and_measure(etcd: list[str], concurrencies: list[int], stream: bool, seconds: float,
                            profile: str | None, answered_only: bool = False,
                            bytecodes: dict | None = None) -> dict[int, float]:
    """`bytecodes`: a dict to fill with {concurrency: {"requests": n, "functions": {name: bytecodes}}} instead of
    measuring CPU time (the caller writes it out, off the loop)."""
    from discovery.client import EtcdClient
    from discovery.config import EtcdConfig
    from distserve.router.app import Router
    from distserve.router.fastpath import FastConnection, FastDoor
    from distserve.router.settings import RouterSettings

    client = EtcdClient(EtcdConfig(endpoints=etcd))
    await client.connect()
    router = Router(RouterSettings(cluster=CLUSTER, port=0, host="127.0.0.1"), client)
    await router.start()
    loop = asyncio.get_running_loop()
    gc.collect()  # as distserve/router/replica.py does once the router is up
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    try:
        deadline = time.monotonic() + 30
        while not router.view.table().entries.get(MODEL):
            if time.monotonic() > deadline:
                raise RuntimeError("the router found no route")
            await asyncio.sleep(0.05)
        s = router.settings
        # the router's task-less handler where the tree has one (the unary lane), as its listener sets it
        now = {"serve_now": router.serve_now} if hasattr(router, "serve_now") else {}
        door = FastDoor(router.serve_fast, lambda: None, s.max_body_bytes, s.header_read_timeout,
                        s.body_read_timeout, lambda _phase: None, **now)
        request = request_bytes(stream)
        results: dict[int, float] = {}
        profiler = None
        for concurrency in concurrencies:
            clients = Clients(loop, stream)
            conns = []
            for _ in range(concurrency):
                transport = FakeClientTransport(clients, request)
                conn = FastConnection(door)
                transport.conn = conn
                conn.connection_made(transport)
                conns.append(conn)
            for phase, length in (("warm-up", min(1.0, seconds)), ("measure", seconds)):
                clients.running = True
                if phase == "measure" and profile:
                    import cProfile

                    profiler = cProfile.Profile(time.thread_time)
                    profiler.enable()
                if phase == "measure" and bytecodes is not None:
                    profiler = BytecodeCounter()
                    profiler.enable()
                before, cpu0 = clients.answered, time.thread_time()
                for conn in conns:
                    conn.data_received(request)
                await asyncio.sleep(length)
                clients.running = False
                while any(c.task is not None for c in conns):
                    await asyncio.sleep(0.01)
                cpu = time.thread_time() - cpu0
                n = clients.answered - before
                if profiler is not None:
                    profiler.disable()
                    if bytecodes is not None:
                        bytecodes[concurrency] = {"requests": n, "functions": profiler.by_function()}
                    else:
                        profiler.dump_stats(f"{profile}.c{concurrency}")
                    profiler = None
            results[concurrency] = n if answered_only else cpu * 1000 / max(1, n)
            for conn in conns:
                conn.connection_lost(None)
        return results
    finally:
        await router.stop()
        await client.close()


def child(args: argparse.Namespace) -> int:
    import uvloop

    counted: dict | None = {} if args.bytecodes_file else None
    results = uvloop.run(serve_and_measure(args.etcd, args.concurrency, args.stream, args.seconds, args.profile,
                                           args.answered, counted))
    for concurrency, found in (counted or {}).items():
        with open(f"{args.bytecodes_file}.c{concurrency}", "w") as f:
            json.dump(found, f)
    print(json.dumps(results))
    return 0


def _run_child(tree: str, etcd: list[str], seconds: float, concurrencies: list[int], stream: bool, *extra: str,
               wrapper: tuple[str, ...] = (), timeout: float = 300) -> dict:
    """One measuring child on `tree` (its own process, PYTHONPATH = the tree; `wrapper`: a command it runs under);
    returns the per-concurrency results it prints, raising with its stderr when it fails."""
    argv = [*wrapper, sys.executable, str(Path(__file__).resolve()), "--child", "--etcd", *etcd,
            "--seconds", str(seconds), "--concurrency", *map(str, concurrencies), *extra]
    if stream:
        argv.append("--stream")
    run = subprocess.run(argv, cwd=tree, env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"{tree}: {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _instructions(tree: str, etcd: list[str], concurrency: int, seconds: float, stream: bool) -> tuple[int, int]:
    """(instructions of the router's thread, requests answered) for one child run under callgrind."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "callgrind.out")
        wrapper = ("valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}")
        found = _run_child(tree, etcd, seconds, [concurrency], stream, "--answered", wrapper=wrapper, timeout=1200)
        answered = int(found[str(concurrency)])
        with open(out + "-01") as f:  # the main thread (the router's loop): callgrind numbers threads from 1
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1]), answered
    raise RuntimeError(f"{tree}: no instruction total in callgrind's output")


def callgrind(args: argparse.Namespace, null_pd_cluster) -> int:
    concurrency = args.concurrency[0]
    print(f"| tree | c{concurrency} k instructions/req (callgrind, router thread) |")
    print("| --- | --- |")
    with null_pd_cluster(CLUSTER) as (etcd, _urls, _procs):
        for tree in args.trees:
            per_request = []
            for _ in range(args.repeats):
                short, long = (_instructions(tree, etcd, concurrency, s, args.stream) for s in (3.0, 3.0 + args.seconds))
                per_request.append((long[0] - short[0]) / max(1, long[1] - short[1]) / 1000)
            print(f"| {tree} | {' / '.join(f'{x:.1f}' for x in per_request)} |", flush=True)
    return 0


def bytecodes(args: argparse.Namespace, null_pd_cluster) -> int:
    """Bytecodes per request per tree, one run each, and the functions that run the most in the last tree."""
    import tempfile

    concurrency = args.concurrency[0]
    per_tree: list[tuple[str, dict[str, float]]] = []  # in --trees order (a tree may come twice: a repeat)
    with null_pd_cluster(CLUSTER) as (etcd, _urls, _procs), tempfile.TemporaryDirectory() as scratch:
        for i, tree in enumerate(args.trees):
            out = os.path.join(scratch, f"tree{i}")
            _run_child(tree, etcd, args.seconds, [concurrency], args.stream, "--bytecodes-file", out, timeout=600)
            with open(f"{out}.c{concurrency}") as f:
                found = json.load(f)
            n = max(1, found["requests"])
            per_tree.append((tree, {name: count / n for name, count in found["functions"].items()}))
    base_funcs, (last, last_funcs) = per_tree[0][1], per_tree[-1]
    base_total = sum(base_funcs.values())
    print(f"| tree | c{concurrency} bytecodes/req ({sys.implementation.cache_tag}) |")
    print("| --- | --- |")
    for i, (tree, funcs) in enumerate(per_tree):
        total = sum(funcs.values())
        print(f"| {tree} | {total:.0f}{f' ({total - base_total:+.0f})' if i else ''} |")
    several = len(per_tree) > 1
    print(f"\n| function ({last}) | bytecodes/req |" + (" against the first tree |" if several else ""))
    print("| --- | --- |" + (" --- |" if several else ""))
    for name, count in sorted(last_funcs.items(), key=lambda kv: -kv[1])[: args.top]:
        delta = f" {count - base_funcs.get(name, 0.0):+.1f} |" if several else ""
        print(f"| {name} | {count:.1f} |{delta}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs="+", default=[str(ROOT)], help="source trees to compare (default: this one)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--stream", action="store_true")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", help="cProfile (thread CPU time) of the last tree's last repeat: FILE.c<N>")
    p.add_argument("--callgrind", action="store_true",
                   help="instead of CPU time: the router thread's instructions per request under valgrind's "
                        "callgrind (two run lengths, 3 s and 3 + --seconds, differenced so set-up and warm-up "
                        "cancel; one concurrency; needs valgrind): the work, nearly free of the machine's noise")
    p.add_argument("--bytecodes", action="store_true",
                   help="instead of CPU time: the Python bytecodes the router's thread runs per request, in all and "
                        "per function (one run per tree, the first --concurrency; see the docstring)")
    p.add_argument("--top", type=int, default=25, help="--bytecodes: how many functions to list (default 25)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bytecodes-file", help=argparse.SUPPRESS)
    p.add_argument("--answered", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--etcd", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.seconds <= 0 or args.repeats < 1 or min(args.concurrency) < 1 or args.top < 1:
        print("bench_hot_path: --seconds must be > 0, --repeats, --concurrency and --top >= 1", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from distserve.testing.cluster import null_pd_cluster

    if args.callgrind:
        return callgrind(args, null_pd_cluster)
    if args.bytecodes:
        return bytecodes(args, null_pd_cluster)

    cells: dict[str, dict[int, list[float]]] = {t: {c: [] for c in args.concurrency} for t in args.trees}
    with null_pd_cluster(CLUSTER) as (etcd, _urls, _procs):
        for repeat in range(args.repeats):
            for i, tree in enumerate(args.trees):
                last = args.profile and repeat == args.repeats - 1 and i == len(args.trees) - 1
                extra = ("--profile", args.profile) if last else ()
                for c, v in _run_child(tree, etcd, args.seconds, args.concurrency, args.stream, *extra).items():
                    cells[tree][int(c)].append(v)
    base = args.trees[0]
    print(f"| tree | {' | '.join(f'c{c} CPU-ms/req' for c in args.concurrency)} |")
    print(f"| --- | {' | '.join('---' for _ in args.concurrency)} |")
    for tree in args.trees:
        row = []
        for c in args.concurrency:
            m = statistics.median(cells[tree][c])
            rel = "" if tree == base else f" ({m / statistics.median(cells[base][c]) - 1:+.0%})"
            row.append(f"{m:.4f}{rel}")
        print(f"| {tree} | {' | '.join(row)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
