"""n = N choices from one prefill vs N separate requests (issue 19): prefill work and KV bytes pulled.

Real reference engines as processes (one prefill, one or two decodes, registered by their agents in an
embedded etcd) and one router; the same ~1000-token prompt asked as one request with `n: N` (one shared
prefill, N decodes) and as N separate requests (seeds seed + j, the documented derivation, so the answers
are the same), sequential and concurrent. Counted from the engines' /metrics, per case:
  prefill_requests        distserve_engine_requests_total on the prefill
  prefill_tokens          distserve_engine_prefill_computed_tokens_total on the prefill (tokens computed)
  prefill_seconds         distserve_engine_prefill_seconds_total on the prefill (forward-pass time)
  kv_bytes_pulled         distserve_engine_migration_bytes_total summed over the decodes
  wall_s                  the client's wall time
Each cluster runs with `--prefix-caching off` (the issue's comparison) and `on` (the default: N sequential
separate requests then hit the prefill's cache after the first, and a decode's cache after its first pull).
Every repeat uses a new prompt (no cache carry-over between repeats). Medians of --repeats; JSON on stdout.

    .venv/bin/python tools/bench_n.py [--n 8] [--decodes 2] [--repeats 3] [--prompt-tokens 1000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discovery.embedded import EmbeddedEtcd  # noqa: E402
from distserve.testing.cluster import engine_argv, start_router  # noqa: E402
from distserve.testing.ports import HOST, free_port  # noqa: E402
from distserve.testing.procs import Proc, wait_http  # noqa: E402
from distserve.testing.metrics import scrape, value as metric_value  # noqa: E402

MODEL = "distserve-reference"
METRICS = {
    "prefill_requests": "distserve_engine_requests_total",
    "prefill_tokens": "distserve_engine_prefill_computed_tokens_total",
    "prefill_seconds": "distserve_engine_prefill_seconds_total",
}
PULLED = "distserve_engine_migration_bytes_total"


def metric(url: str, name: str) -> float:
    return metric_value(scrape(url, timeout=10), name)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


class Cluster:
    def __init__(self, decodes: int, caching: str) -> None:
        self.etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
        name = f"bn{uuid.uuid4().hex[:6]}"
        self.procs: list[Proc] = []
        self.prefill = ""
        self.decodes: list[str] = []
        try:
            for role in ["prefill"] + ["decode"] * decodes:
                port = free_port()
                argv = engine_argv(role, port, "--etcd", ",".join(self.etcd.endpoints), "--cluster", name,
                                   "--ttl", "3", "--prefix-caching", caching, log_level="WARNING")
                self.procs.append(Proc.distserve(argv, name=f"bench-n-{role}-{port}"))
                url = f"http://{HOST}:{port}"
                if role == "prefill":
                    self.prefill = url
                else:
                    self.decodes.append(url)
            for url in [self.prefill, *self.decodes]:
                wait_http(f"{url}/health", timeout=120)
            router, self.router = start_router(self.etcd.endpoints, "--cluster", name, log_level="WARNING")
            self.procs.append(router)
            deadline = time.monotonic() + 60
            while metric(self.router, "distserve_router_links_usable") < decodes:
                if time.monotonic() > deadline:
                    raise RuntimeError("the prefill's links to its decodes were not established")
                time.sleep(0.2)
        except BaseException:
            self.close()
            raise

    def snapshot(self) -> dict:
        out = {key: metric(self.prefill, name) for key, name in METRICS.items()}
        out["kv_bytes_pulled"] = sum(metric(d, PULLED) for d in self.decodes)
        return out

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        self.etcd.stop()


def prompt(tokens: int, tag: str) -> str:
    # the reference engine's byte tokenizer: one token per byte; the tag first, so repeats share nothing
    text = f"[{tag}] " + "The quick brown fox jumps over the lazy dog. " * (tokens // 45 + 1)
    return text[:tokens]


def run_case(cl: Cluster, case: str, n: int, text: str, max_tokens: int, seed: int) -> dict:
    body = {"model": MODEL, "prompt": text, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
    before = cl.snapshot()
    t0 = time.perf_counter()
    if case == "n_in_one_request":
        answers = [c["text"] for c in sorted(post(cl.router, {**body, "n": n, "seed": seed})["choices"],
                                               key=lambda c: c["index"])]
    elif case == "separate_sequential":
        answers = [post(cl.router, {**body, "seed": seed + j})["choices"][0]["text"] for j in range(n)]
    else:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            answers = [a["choices"][0]["text"] for a in
                       pool.map(lambda j: post(cl.router, {**body, "seed": seed + j}), range(n))]
    wall = time.perf_counter() - t0
    time.sleep(0.3)  # the decodes' counters are bumped as their pulls complete
    after = cl.snapshot()
    out = {key: after[key] - before[key] for key in after}
    out["wall_s"] = wall
    out["answers"] = answers
    return out


CASES = ("n_in_one_request", "separate_sequential", "separate_concurrent")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--decodes", type=int, default=2, choices=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--caching", choices=["off", "on", "both"], default="both")
    args = ap.parse_args()
    if not 1 < args.n <= 128 or args.repeats < 1 or not 16 <= args.prompt_tokens <= 3000 or args.max_tokens < 1:
        print("bench_n: need 1 < --n <= 128, --repeats >= 1, 16 <= --prompt-tokens <= 3000, --max-tokens >= 1",
              file=sys.stderr)
        return 2
    results: dict = {"n": args.n, "decodes": args.decodes, "prompt_tokens": args.prompt_tokens,
                     "max_tokens": args.max_tokens, "repeats": args.repeats,
                     "command": " ".join(["tools/bench_n.py", *sys.argv[1:]]), "prefix_caching": {}}
    for caching in (["off", "on"] if args.caching == "both" else [args.caching]):
        cl = Cluster(args.decodes, caching)
        try:
            post(cl.router, {"model": MODEL, "prompt": "warm up", "max_tokens": 2, "n": 2})  # handshakes, links
            runs: dict[str, list[dict]] = {c: [] for c in CASES}
            same = True
            for r in range(args.repeats):
                per = {}
                for case in CASES:
                    per[case] = run_case(cl, case, args.n, prompt(args.prompt_tokens, f"{case}-{r}"),
                                         args.max_tokens, 1000 + r)
                    runs[case].append(per[case])
                # one prefill or N, the same seeded answers (prompts differ by case: compare the two separate
                # cases with each other, and the shared case with a rerun below)
                same &= per["separate_sequential"]["answers"] == run_case(
                    cl, "n_in_one_request", args.n, prompt(args.prompt_tokens, f"separate_sequential-{r}"),
                    args.max_tokens, 1000 + r)["answers"]
            summary = {}
            for case, rs in runs.items():
                summary[case] = {k: statistics.median(x[k] for x in rs)
                                 for k in ("prefill_requests", "prefill_tokens", "prefill_seconds",
                                           "kv_bytes_pulled", "wall_s")}
            base = summary["n_in_one_request"]
            for case in CASES[1:]:
                s = summary[case]
                s["prefill_tokens_vs_n"] = s["prefill_tokens"] / base["prefill_tokens"] if base["prefill_tokens"] else None
                s["kv_bytes_vs_n"] = s["kv_bytes_pulled"] / base["kv_bytes_pulled"] if base["kv_bytes_pulled"] else None
            summary["seeded_answers_equal"] = same
            results["prefix_caching"][caching] = summary
        finally:
            cl.close()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
