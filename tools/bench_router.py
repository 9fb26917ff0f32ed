#!/usr/bin/env python3
"""Router overhead, throughput and cold start: direct calls vs distserve's router vs LMDeploy's proxy.

Side by side in one run, against null-mode reference engines (they answer at once, so what is measured
is the routing layer):
- direct: the client itself calls the prefill, then the decode with `migration_request`;
- distserve: `distserve router` reading etcd (engines registered and linked by their agents);
- lmdeploy: LMDeploy 0.18.0's `lmdeploy serve proxy --serving-strategy DistServe`, installed by this
  script in its own virtual environment under .bench/ (lmdeploy pins torch<=2.12.1 and its proxy imports
  torch: the local CPU torch wheel is used, with only the packages the proxy really imports).

The router under test (or the proxy) is pinned to CPU 1 with taskset; everything else (etcd, engines,
this load generator) to the other CPUs but CPU 1's SMT siblings, which stay idle where the host has them
(`--router-sibling shared`: not kept idle). Reported: added latency p50/p99 (mode minus direct) at concurrency 1, 16
and 64, throughput, CPU-ms per PD request of the router process, stream and not; cold start at 1x1 and
8x8 engines (process start -> first successful PD completion, handshake calls made, then a burst of 256
requests: its p99).

The engines answer like an lmdeploy api_server that returns its session id as the completion `id` (the
stock proxy needs that to work at all; `remote_session_id` is what distserve's router reads), and listen
with uvicorn's backlog of 2048 (aiohttp's default of 128 overflows under a cold burst: dropped SYNs are
retried by the kernel after one second, whatever the front end).

    .venv/bin/python tools/bench_router.py            # full run (about 6 minutes), markdown on stdout
    .venv/bin/python tools/bench_router.py --quick    # smoke run

SGLang's Rust gateway (`sglang`): `sglang-router==0.3.2` from PyPI in its own virtual environment under
.bench/ (or from the device bundle), run as `sglang-router launch --pd-disaggregation --prefill URL ...
--decode URL ... --policy round_robin` over the same null engines (it dispatches prefill and decode in parallel:
SGLang's bootstrap protocol; the null engines answer it as they are). `--sglang-policy` picks another policy
(cache_aware is the gateway's own default). `--skip-sglang` leaves it out.

Workers (`--router-workers 2 4 8`): `distserve-wN` is `distserve router --workers N` pinned to N CPUs
(1..N); CPU per request counts the supervisor and all its workers. With the largest N, the engines and
load generators get the CPUs that are left, the same for every mode.

direct-parallel (`--direct-parallel`, on by default when the gateway runs): the client sends the gateway's
body (the request plus bootstrap_host/port/room) to a prefill and a decode at once and waits for both,
SGLang's bootstrap protocol without a router. The gateway's added latency is taken over it, every other
front end's over `direct` (LMDeploy's protocol): latency over the engines, not over round trips.

Worker scaling (`--scenarios scaling`, `--scaling-workers 1 2 4 8`): for each N, `distserve router
--workers N` on CPUs 1..N and everything else on all the other CPUs, with one engine process per prefill
and decode and as many load processes as half those CPUs; concurrency N x --scaling-concurrency. `direct`
on the same engines and CPUs is the ceiling; the table gives per N the req/s, 0.85 x N x one worker's,
that ceiling, the CPU use of router and of engines+load, and a verdict: scales, or engines+load saturate.

Profile (`--profile`): py-spy (installed under .bench/pyspy-venv, or from the device bundle) samples the
distserve router during one extra steady cell; collapsed stacks in .bench/profile-router-*.txt (speedscope
or flamegraph.pl read them), the top self-time frames in the report.

Tracing cost (`--tracing`): the steady-state runs add `distserve-traced`, a second router with
OpenTelemetry on (OTEL_* set, 100 % sampling, OTLP/HTTP to a local sink that accepts and drops), and with
`--baseline-tree DIR` (a checkout of an earlier commit: `git worktree add /tmp/base HEAD`) `distserve-base`,
that tree's router, side by side with `distserve` (tracing off: no OTEL_* variable set).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if (REPO / ".bench" / "device" / "site").is_dir():  # the device bundle's wheels: the imports below need them
    sys.path.insert(0, str(REPO / ".bench" / "device" / "site"))

try:
    from distserve.testing.cluster import engine_argv, wait_links_established  # noqa: E402
    from distserve.testing.ports import free_port, free_port_range  # noqa: E402
    from distserve.testing.procs import Proc, answers  # noqa: E402
    from distserve.testing.procs import wait_http as _wait_http  # noqa: E402
    from distserve.testing.metrics import scrape, value as metric_value  # noqa: E402
except ImportError:
    if sys.argv[1:2] != ["--device-setup"]:  # it unpacks the very wheels these imports need (stdlib only)
        raise

BENCH = REPO / ".bench"
LMD_VENV = BENCH / "lmdeploy-venv"
SGL_VENV = BENCH / "sglang-venv"
SGL_VERSION = "0.3.2"
LMD_VERSION = "0.18.0"
# What `lmdeploy serve proxy` imports (found by importing it), beyond lmdeploy itself and torch.
LMD_PROXY_DEPS = [
    "typing_extensions",
    "tqdm",
    "pydantic",
    "transformers",
    "mmengine-lite",
    "psutil",
    "requests",
    "pybase64",
    "aiohttp",
    "uvicorn",
    "fastapi",
    "shortuuid",
    "numpy",
    "pyyaml",
    "pillow",  # lmdeploy's serve package imports PIL even for the proxy
]
MODEL = "distserve-reference"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
MAX_TOKENS = 16
PY = sys.executable
# The router (or proxy) under test gets CPU 1 alone (workers: CPUs 1..N); everything else shares the CPUs
# no router uses (set_router_cpus, from the largest --router-workers).
# The CPUs this script may use, read once at import: amain then restricts its own affinity to the others,
# so later reads of sched_getaffinity(0) would no longer see the routers' CPUs.
ALL_CPUS = sorted(os.sched_getaffinity(0))


SIBLINGS_IDLE = True  # --router-sibling


def smt_siblings(cpu: int) -> set[int]:
    """The other hardware threads of `cpu`'s core (empty without SMT, or where the kernel does not say)."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
            text = f.read().strip()
    except OSError:
        return set()
    found: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            found.update(range(int(lo), int(hi or lo) + 1))
    return found - {cpu}


def cpu_layout(n: int) -> tuple[str, str]:
    """(router CPUs, everything else's CPUs) for a router of n workers: CPUs 1..n, and all the others but
    the routers' SMT siblings while at least half the CPUs remain for the rest: a sibling busy with engines or
    load generators takes cycles from the router's core, more the busier they are (so more at concurrency 64,
    and unequally between front ends whose engines work differently). Where the machine has no CPU left
    over, both get every CPU (a smoke run; the figures then mean nothing)."""
    router = ALL_CPUS[1 : 1 + n] if len(ALL_CPUS) > n else ALL_CPUS
    others = [c for c in ALL_CPUS if c not in router] or ALL_CPUS
    siblings = set().union(*(smt_siblings(c) for c in router)) - set(router) if SIBLINGS_IDLE else set()
    quiet = [c for c in others if c not in siblings]
    if siblings and len(quiet) >= max(2, len(ALL_CPUS) // 2):
        others = quiet
    return ",".join(map(str, router)), ",".join(map(str, others))


ROUTER_CPUS, OTHER_CPUS = cpu_layout(1)


def set_router_cpus(max_workers: int, siblings_idle: bool = True) -> None:
    global OTHER_CPUS, SIBLINGS_IDLE
    SIBLINGS_IDLE = siblings_idle
    OTHER_CPUS = cpu_layout(max_workers)[1]


def worker_cpus(n: int) -> str:
    return cpu_layout(n)[0] if n > 1 else ROUTER_CPUS


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and every live descendant (a `--workers` supervisor and its workers)."""
    return sum(tree_cpu_split(pid))


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and every live descendant: user and kernel CPU seconds apart (does a
    cell cost more in the router's own code or in the kernel under it)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return user, system


def router_cpu(proc: "Proc | None") -> tuple[float, float]:
    """(user, kernel) CPU seconds of a front end's process tree so far; zeros without one (direct modes)."""
    return tree_cpu_split(proc.pid) if proc else (0.0, 0.0)


def cpu_since(proc: "Proc | None", before: tuple[float, float]) -> tuple[float, float]:
    """(all, kernel) CPU seconds of a front end's process tree since `before` (router_cpu's)."""
    user, system = (now - then for now, then in zip(router_cpu(proc), before))
    return user + system, system


# A copy of what the device machine needs (wheels, etcd, lmdeploy's Python part): --device-bundle builds it.
DEVICE = BENCH / "device"


# ------------------------------------------------------------------------------------------ processes
def wait_http(url: str, timeout: float = 60.0) -> None:
    _wait_http(url, timeout, interval=0.02)


def bench_proc(args: list[str], cpus: str, name: str, env: dict | None = None, cwd=None) -> Proc:
    """A child with its log under .bench/, pinned to `cpus`, with the device bundle's environment."""
    return Proc(args, name, log_dir=BENCH, env={**bench_env(), **(env or {})}, cwd=cwd or REPO, cpus=cpus)


def engine_metric(url: str, name: str) -> float:
    return metric_value(scrape(url), name)


def handshakes(urls: list[str]) -> float:
    return sum(engine_metric(u, "distserve_engine_handshakes_total") for u in urls)


# ------------------------------------------------------------------------------------------ engines
def engine_process_main(argv: list[str]) -> int:
    """Run `distserve engine ARGS` with lmdeploy-style completion ids (the session id, as a string)."""
    import aiohttp.web as real_web

    import distserve.engine.server as server

    class LmdeployIds:
        def __getattr__(self, name):  # everything else is aiohttp.web itself
            return getattr(real_web, name)

        @staticmethod
        def json_response(data=None, **kw):
            if isinstance(data, dict) and "remote_session_id" in data:
                data["id"] = str(data["remote_session_id"])
            return real_web.json_response(data, **kw)

    server.web = LmdeployIds()
    # Listen like lmdeploy's api_server (uvicorn: backlog 2048). aiohttp's default of 128 overflows when a
    # burst opens hundreds of connections at once, and the kernel retries a dropped SYN only after 1 s.
    import functools

    import distserve.engine.cli as engine_cli

    class Web2048:
        def __getattr__(self, name):
            return getattr(real_web, name)

        TCPSite = functools.partial(real_web.TCPSite, backlog=2048)

    engine_cli.web = Web2048()
    from distserve.cli import main

    return main(["engine", *argv])


class Engines:
    """`count` null prefills and `count` null decodes, optionally with agents. `split`: one process per
    engine (steady-state runs: engines must not be the bottleneck); else one process per role (--count)."""

    def __init__(
        self, count: int, etcd: list[str] | None, cluster: str, tag: str, split: bool = False,
        cpus: str | None = None,
    ) -> None:
        self.count = count
        self.cpus = cpus or OTHER_CPUS
        self.procs: list[Proc] = []
        self.prefills: list[str] = []
        self.decodes: list[str] = []
        for role, urls in (("prefill", self.prefills), ("decode", self.decodes)):
            for index, per_proc in enumerate([1] * count if split else [count]):
                urls.extend(self._start(role, per_proc, etcd, cluster, f"{tag}-{role}-{index}"))

    def _start(self, role: str, count: int, etcd: list[str] | None, cluster: str, name: str) -> list[str]:
        for _ in range(5):  # a port found free may be taken by another process before the engine binds it
            port = free_port_range(count)
            # `distserve engine`'s arguments, run by this script's --engine-process (uvicorn's backlog)
            args = engine_argv(role, port, "--count", str(count), "--migration-protocol", "rdma",
                               "--preserve-ttl", "30", null=True, log_level="WARNING")[1:]
            if etcd:
                args += ["--etcd", ",".join(etcd), "--cluster", cluster, "--ttl", "10"]
            proc = bench_proc([PY, __file__, "--engine-process", *args], self.cpus, name)
            urls = [f"http://127.0.0.1:{port + i}" for i in range(count)]
            deadline = time.monotonic() + 60
            while proc.popen.poll() is None and time.monotonic() < deadline:
                if all(answers(f"{u}/health") for u in urls):
                    self.procs.append(proc)
                    return urls
                time.sleep(0.05)
            proc.kill()
        raise RuntimeError(f"engines {name} did not start: see {BENCH / (name + '.log')}")

    @property
    def urls(self) -> list[str]:
        return self.prefills + self.decodes

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in self.procs if p.pid)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()


async def wait_links(etcd: list[str], cluster: str, n: int, timeout: float = 120.0) -> None:
    await wait_links_established(etcd, cluster, n, timeout=timeout, poll=0.1)


# ------------------------------------------------------------------------------------------ front ends
# distserve routers log at this level (--router-log-level): WARNING by default, as the gateway runs with
# `--log-level warn` and the proxy with WARNING; at INFO each request adds its access-log line (~20 µs)
ROUTER_LOG_LEVEL = ["WARNING"]


def start_router(
    etcd: list[str], cluster: str, tag: str, env: dict | None = None, tree: Path | None = None,
    workers: int = 1, cpus: str | None = None,
) -> tuple[Proc, str]:
    """`tree`: run the router of that source tree (a baseline checkout) instead of this one."""
    port = free_port()
    extra = ["--workers", str(workers), "--router-id", f"{tag}-router"] if workers > 1 else []
    if tree is not None:
        env = {**(env or {}), "PYTHONPATH": tree_pythonpath(tree)}
    proc = bench_proc(
        [
            PY,
            "-m",
            "distserve",
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--etcd",
            ",".join(etcd),
            "--cluster",
            cluster,
            "--log-level",
            ROUTER_LOG_LEVEL[0],
            *extra,
        ],
        cpus or worker_cpus(workers),
        f"{tag}-router",
        env,
        cwd=tree,
    )
    return proc, f"http://127.0.0.1:{port}"


def start_otlp_sink(tag: str) -> tuple[Proc, str]:
    """An OTLP/HTTP endpoint that accepts every export and drops it (on the load generator's CPUs)."""
    port = free_port()
    proc = bench_proc([PY, __file__, "--otlp-sink", str(port)], OTHER_CPUS, f"{tag}-otlp-sink")
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}"


def otlp_sink_main(port: str) -> int:
    from aiohttp import web

    count = 0

    async def traces(request):
        nonlocal count
        count += len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def health(request):
        return web.json_response({"bytes": count})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(port), print=None, access_log=None)
    return 0


def untraced_env() -> dict:
    """Tracing off for sure: no OTEL_* variable that could switch it on."""
    return {k: "" for k in os.environ if k.startswith("OTEL_")}


def traced_env(sink: str) -> dict:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
        "OTEL_TRACES_SAMPLER": "always_on",  # 100 % sampling, whatever the client sends
        "OTEL_SERVICE_NAME": "bench-router",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def lmdeploy_command() -> list[str] | None:
    """How to run `lmdeploy` here: the device bundle's copy (system python, its own torch) or .bench's venv."""
    if (DEVICE / "lmdeploy_root" / "lmdeploy").is_dir():
        return [PY, "-c", "import sys; from lmdeploy.cli import run; sys.argv[0] = 'lmdeploy'; run()"]
    if (LMD_VENV / "bin" / "lmdeploy").exists():
        return [str(LMD_VENV / "bin" / "lmdeploy")]
    return None


def lmdeploy_available() -> str | None:
    """None when the proxy can run, else why not."""
    cmd = lmdeploy_command()
    if cmd is None:
        return "not installed"
    py = cmd[0] if cmd[0] == PY else str(LMD_VENV / "bin" / "python")
    r = subprocess.run(
        [py, "-c", "import lmdeploy.serve.proxy.proxy"], capture_output=True, text=True, env=bench_env()
    )
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["import failed"])[-1]


def tree_pythonpath(tree: Path) -> str:
    """The import path of a router run from `tree`: the tree's own distserve first, the device bundle's wheels
    still reachable."""
    paths = [str(tree)] + [p for p in bench_env().get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    return os.pathsep.join(paths)


def bench_env() -> dict:
    """PYTHONPATH for the device bundle (its wheels and lmdeploy copy), when there is one."""
    env = dict(os.environ)
    if (DEVICE / "site").is_dir():
        extra = [str(DEVICE / "site"), str(DEVICE / "lmdeploy_root"), str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join(
            extra + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        etcd = DEVICE / "etcd"
        if etcd.exists():
            env["DISTSERVE_ETCD_BINARY"] = str(etcd)
    return env


def install_lmdeploy() -> str | None:
    """Install lmdeploy==0.18.0 (no deps) + CPU torch + the proxy's imports in .bench/lmdeploy-venv."""
    why = lmdeploy_available()
    if why is None or (DEVICE / "site").is_dir():  # on the device machine nothing can be installed
        return why
    torch_wheels = sorted(
        Path("/opt/wheels").glob(f"torch-*+cpu-cp{sys.version_info[0]}{sys.version_info[1]}-*.whl")
    )
    failed = venv_install(
        LMD_VENV,
        ["--no-deps", f"lmdeploy=={LMD_VERSION}"],
        ["--no-deps", str(torch_wheels[-1]) if torch_wheels else "torch"]
        + ([] if torch_wheels else ["--index-url", "https://download.pytorch.org/whl/cpu"]),
        LMD_PROXY_DEPS,
    )
    if failed:
        return failed
    return lmdeploy_available()


def sglang_command() -> list[str] | None:
    """How to run `sglang-router` here: .bench's venv, or the device bundle's copy (in its site dir)."""
    if (SGL_VENV / "bin" / "sglang-router").exists():
        return [str(SGL_VENV / "bin" / "sglang-router")]
    if (DEVICE / "site" / "sglang_router").is_dir():
        return [PY, "-c", "import sys; from sglang_router.cli import main; sys.argv[0] = 'sglang-router'; "
                "sys.exit(main())"]
    return None


def venv_install(venv: Path, *installs: list[str] | str) -> str | None:
    """A venv under .bench/ and one `pip install` per argument (a requirement, or a list of pip arguments);
    None, or why it failed."""
    BENCH.mkdir(exist_ok=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [[os.path.realpath(PY), "-m", "venv", str(venv)]]
    steps += [[*pip, *([i] if isinstance(i, str) else i)] for i in installs]
    for step in steps:
        print("[bench] " + " ".join(step), file=sys.stderr)
        r = subprocess.run(step, capture_output=True, text=True)
        if r.returncode != 0:
            return f"{' '.join(step[:6])} failed: {(r.stderr.strip().splitlines() or [r.returncode])[-1]}"
    return None


def install_sglang() -> str | None:
    """sglang-router==SGL_VERSION in .bench/sglang-venv (it needs no GPU and no torch); None when runnable."""
    if sglang_command() is None and not (DEVICE / "site").is_dir():
        failed = venv_install(SGL_VENV, f"sglang-router=={SGL_VERSION}")
        if failed:
            return failed
    cmd = sglang_command()
    if cmd is None:
        return "not installed"
    r = subprocess.run([*cmd, "launch", "--help"], capture_output=True, text=True, env=bench_env())
    return None if r.returncode == 0 and "--pd-disaggregation" in r.stdout else (
        (r.stderr.strip().splitlines() or ["sglang-router launch --help failed"])[-1])


def start_sglang(tag: str, engines: "Engines", policy: str = "round_robin") -> tuple[Proc, str]:
    """`policy`: the gateway's --policy for prefill and decode alike (--sglang-policy; round_robin by default)."""
    port = free_port()
    argv = [*sglang_command(), "launch", "--pd-disaggregation", "--host", "127.0.0.1", "--port", str(port),
            "--policy", policy, "--log-level", "warn"]
    for url in engines.prefills:
        argv += ["--prefill", url]
    for url in engines.decodes:
        argv += ["--decode", url]
    return bench_proc(argv, ROUTER_CPUS, f"{tag}-sglang"), f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------------------ profiling
PYSPY_VENV = BENCH / "pyspy-venv"
PYSPY_VERSION = "0.4.3"


def pyspy_command() -> str | None:
    for path in (DEVICE / "site" / "bin" / "py-spy", PYSPY_VENV / "bin" / "py-spy"):
        if path.exists():
            return str(path)
    return None


def install_pyspy() -> tuple[str | None, str | None]:
    """(py-spy's path, None), or (None, why not): py-spy==PYSPY_VERSION in .bench/pyspy-venv (a static
    binary in its wheel), or the device bundle's copy (there nothing can be installed)."""
    if pyspy_command() is None and not (DEVICE / "site").is_dir():
        failed = venv_install(PYSPY_VENV, f"py-spy=={PYSPY_VERSION}")
        if failed:
            return None, failed
    cmd = pyspy_command()
    return (cmd, None) if cmd else (None, "py-spy not installed (device: rebuild the bundle with --device-bundle)")


def _frame_name(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    for marker in ("/site-packages/", "/dist-packages/", f"{REPO}/", "/lib/python3."):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3.":  # the standard library: drop the version directory
                where = where.split("/", 1)[-1]
            break
    return f"{name} ({where}"


def top_frames(collapsed: str, limit: int = 25) -> dict:
    """Self and total samples per frame from py-spy's raw (collapsed) output: `f1;f2;...;fn COUNT` lines.
    Self time goes to each stack's last frame; total counts a frame once per stack it is on."""
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    threads: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_frame_name(f) for f in stack.split(";")]
        if frames[0].startswith("thread (") and len(frames) > 1:  # --threads: `thread (TID): NAME` first
            threads[frames[0]] = threads.get(frames[0], 0) + n
            frames = frames[1:]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            total_n[f] = total_n.get(f, 0) + n

    def top(d: dict[str, int]) -> list[dict]:
        ranked = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        return [{"frame": f, "samples": n, "share": n / max(1, samples),
                 "total_share": total_n[f] / max(1, samples)} for f, n in ranked]

    return {"samples": samples, "self": top(self_n), "total": top(total_n),
            "threads": {t: n / max(1, samples) for t, n in sorted(threads.items(), key=lambda kv: -kv[1])}}


async def profile_cell(session, args, router_url: str, router: Proc, results: dict) -> None:
    """One extra steady cell (not in the tables) with py-spy sampling the distserve router: its collapsed
    stacks under .bench/, the top self-time frames on stderr and in the results."""
    pyspy, why = install_pyspy()
    conc = args.profile_concurrency or max(args.concurrency)
    tag = f"c{conc}-{'stream' if args.profile_stream else 'nostream'}"
    out = BENCH / f"profile-router-{tag}.txt"
    entry: dict = {"concurrency": conc, "stream": args.profile_stream, "duration": args.profile_duration}
    results["profile"] = entry
    if pyspy is None:
        entry["error"] = why
        print(f"[bench] profile not taken: {why}", file=sys.stderr)
        return
    out.unlink(missing_ok=True)
    # py-spy on the load generators' CPUs, not the router's; --function: one frame per function, not per line.
    cmd = [pyspy, "record", "--pid", str(router.pid), "--rate", str(args.profile_rate), "--format", "raw",
           "--function", "--threads", "--full-filenames", "-o", str(out), *(["--native"] if args.profile_native else [])]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", OTHER_CPUS, *cmd]
    spy = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    said = b""
    cell = None
    try:
        await asyncio.sleep(1.0)  # attached and sampling before the load starts
        if spy.returncode is None:
            cell = await measure(session, "distserve", router_url, args.profile_stream, conc,
                                 args.profile_duration, args.clients, router)
    except Exception as exc:  # noqa: BLE001 - a profile that could not be taken must not lose the tables
        entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if spy.returncode is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            said = (await asyncio.wait_for(spy.communicate(), 60))[0]
        except asyncio.TimeoutError:
            spy.kill()
            said = (await spy.communicate())[0]
    if cell is None or not out.exists():
        entry.setdefault("error", "py-spy recorded nothing: " + said.decode(errors="replace").strip()[-400:])
        print(f"[bench] profile failed: {entry['error']}", file=sys.stderr)
        return
    ok = [x for x in cell.lat if x != FAILED]
    entry.update(file=str(out.relative_to(REPO)), rps=len(ok) / cell.wall,
                 cpu_ms_per_req=1000 * cell.cpu / max(1, len(cell.lat)), **top_frames(out.read_text()))
    print(f"[bench] profile of the distserve router, c={conc} stream={args.profile_stream}: {entry['samples']} "
          f"samples, {entry['rps']:.0f} req/s under py-spy, stacks in {out}", file=sys.stderr)
    print(format_profile(entry), file=sys.stderr)


def format_profile(entry: dict, limit: int = 20) -> str:
    lines = []
    if entry.get("threads"):
        lines += ["Samples per thread (non-idle): " + ", ".join(
            f"{t} {share * 100:.0f} %" for t, share in list(entry["threads"].items())[:6]), ""]
    lines += [f"| self % | total % | frame (top {limit} by self time, {entry['samples']} samples) |",
              "| --- | --- | --- |"]
    for t in entry["self"][:limit]:
        lines.append(f"| {t['share'] * 100:.1f} | {t['total_share'] * 100:.1f} | `{t['frame']}` |")
    return "\n".join(lines)


def start_proxy(tag: str) -> tuple[Proc, str]:
    port = free_port()
    proc = bench_proc(
        [
            *lmdeploy_command(),
            "serve",
            "proxy",
            "--server-name",
            "127.0.0.1",
            "--server-port",
            str(port),
            "--serving-strategy",
            "DistServe",
            "--routing-strategy",
            "min_expected_latency",
            "--disable-cache-status",
            "--migration-protocol",
            "RDMA",
            "--log-level",
            "WARNING",
        ],
        ROUTER_CPUS,
        f"{tag}-proxy",
        env=bench_env(),
    )
    return proc, f"http://127.0.0.1:{port}"


async def register_with_proxy(session, proxy: str, engines: Engines) -> None:
    """What `api_server --proxy-url` does at its start-up: POST /nodes/add (role Prefill=2, Decode=3)."""
    for urls, role in ((engines.prefills, 2), (engines.decodes, 3)):
        for url in urls:
            async with session.post(
                f"{proxy}/nodes/add", json={"url": url, "status": {"models": [MODEL], "role": role}}
            ) as r:
                await r.read()


# ------------------------------------------------------------------------------------------ device machine
# A lent machine with many cores runs the benchmark without the noise of a shared 2-core box. It has
# python3 3.12 with torch 2.11 (lmdeploy accepts it), aiohttp, grpcio and protobuf, and no network: the
# rest travels as wheels (same versions as here), with etcd's binary and lmdeploy's Python files (its
# TurboMind extension is not needed by the proxy and is left out).
DEVICE_WHEELS = [
    # router, agents and null engines
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "orjson==3.13.0",
    "uvloop==0.23.0",
    "etcd3aio==0.3.0",
    "tenacity==9.2.1",
    # lmdeploy's proxy
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "annotated-doc==0.0.7",
    "anyio==4.16.0",
    "h11==0.16.0",
    "click==8.5.1",
    "uvicorn==0.54.0",
    "shortuuid==1.0.13",
    "pybase64==1.5.1",
    "mmengine-lite==0.10.7",
    "addict==2.4.0",
    "termcolor==3.3.0",
    "yapf==0.43.0",
    "platformdirs==4.14.8",
    "rich==15.0.0",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "pygments==2.21.0",
    "psutil==7.2.2",
    "pyyaml==6.0.4",
    "requests==2.34.2",
    "urllib3==2.8.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.2",
    "idna==3.20",
    "opentelemetry-api==1.45.2",  # fastapi imports it
    # SGLang's Rust gateway (abi3 wheel) and what its launcher imports beyond the above
    f"sglang-router=={SGL_VERSION}",
    "setproctitle==1.3.8",
    # --profile: py-spy (a static binary in a py2.py3-none manylinux wheel; installed into site/bin)
    f"py-spy=={PYSPY_VERSION}",
]


def device_bundle() -> int:
    """Build .bench/device here (needs the network once): wheels for CPython 3.12, etcd, lmdeploy's Python part."""
    import gzip
    import tarfile
    import zipfile

    wheels = DEVICE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        PY,
        "-m",
        "pip",
        "download",
        "-q",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux_2_17_x86_64",
        "--platform",
        "manylinux2014_x86_64",
        "--platform",
        "any",
        "-d",
        str(wheels),
        *DEVICE_WHEELS,
    ]
    subprocess.run(cmd, check=True)
    from discovery.embedded import etcd_binary

    with open(etcd_binary(), "rb") as src, gzip.open(DEVICE / "etcd.gz", "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    lmd_wheel = sorted((BENCH / "wheels").glob(f"lmdeploy-{LMD_VERSION}-*.whl"))
    if not lmd_wheel:
        subprocess.run(
            [
                PY,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                f"lmdeploy=={LMD_VERSION}",
                "-d",
                str(BENCH / "wheels"),
            ],
            check=True,
        )
        lmd_wheel = sorted((BENCH / "wheels").glob(f"lmdeploy-{LMD_VERSION}-*.whl"))
    with zipfile.ZipFile(lmd_wheel[-1]) as z, tarfile.open(DEVICE / "lmdeploy.tar.gz", "w:gz") as tar:
        for info in z.infolist():
            name = info.filename
            if (
                not name.startswith("lmdeploy/")
                or "/turbomind/" in name
                and (name.endswith(".so") or name.endswith(".a"))
            ):
                continue
            data = z.read(info)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    total = sum(f.stat().st_size for f in DEVICE.rglob("*") if f.is_file())
    print(f"[bench] device bundle: {DEVICE} ({total / 2**20:.1f} MiB)")
    return 0


def parsers_of(tree: Path) -> str:
    """Which compiled parts a router started from `tree` runs (distserve/router/compiled.py; heads.py in trees from
    before it): "c", "python", or each part's."""
    code = ("try:\n from distserve.router import compiled; print(compiled.summary())\nexcept ImportError:\n"
            " from distserve.router import heads; print('heads ' + heads.IMPLEMENTATION)")
    out = subprocess.run([PY, "-c", code], cwd=tree, env={**bench_env(), "PYTHONPATH": tree_pythonpath(tree)},
                         capture_output=True, text=True, timeout=60)
    if out.returncode == 0:
        return out.stdout.strip()
    last = (out.stderr.strip().splitlines() or ["import failed"])[-1]
    return "python (no heads module)" if "heads" in last else f"unknown ({last[:200]})"


def build_heads_in_place() -> str:
    """The router's C modules for this interpreter (distserve/router/compiled.py), built in this tree where they are
    not yet (a C compiler and Python's headers needed; without them the router runs the Python versions), with
    setup.py's flags. Returns the outcome."""
    import sysconfig

    include = sysconfig.get_paths()["include"]
    for source in ("_heads.c", "_shortlist.c", "_ring_ops.c"):
        target = REPO / "distserve" / "router" / f"{source[:-2]}{sysconfig.get_config_var('EXT_SUFFIX')}"
        if target.exists():
            continue
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or not (Path(include) / "Python.h").exists():
            return "python (no C compiler or Python headers here)"
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-ffp-contract=off", f"-I{include}",
                        str(REPO / "distserve" / "router" / source), "-o", str(target)], check=True, timeout=300)
    return parsers_of(REPO)


def device_setup() -> int:
    """On the device machine: unpack the bundle (no network needed)."""
    import gzip
    import tarfile

    site = DEVICE / "site"
    subprocess.run(
        [
            PY,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",
            "--no-deps",
            "--target",
            str(site),
            *sorted(str(w) for w in (DEVICE / "wheels").glob("*.whl")),
        ],
        check=True,
    )
    with gzip.open(DEVICE / "etcd.gz", "rb") as src, open(DEVICE / "etcd", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(DEVICE / "etcd", 0o755)
    with tarfile.open(DEVICE / "lmdeploy.tar.gz") as tar:
        tar.extractall(DEVICE / "lmdeploy_root")
    print("[bench] device set up:", lmdeploy_available() or "lmdeploy proxy importable")
    print("[bench] router compiled parts:", build_heads_in_place())
    return 0


# ------------------------------------------------------------------------------------------ load
DIRECT_MODES = ("direct", "direct-parallel")  # the client calls the engines itself (target: their URLs)


class Client:
    """The load generator: one pooled aiohttp session, pre-encoded bodies."""

    def __init__(self, session, mode: str, target: str | tuple[list[str], list[str]], stream: bool) -> None:
        import orjson

        self.session, self.mode, self.stream = session, mode, stream
        self.body = {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": stream,
        }
        self.raw = orjson.dumps(self.body)
        self.orjson = orjson
        if mode in DIRECT_MODES:
            self.prefills, self.decodes = target
            pre = {**self.body, "max_tokens": 1, "stream": False, "with_cache": True, "preserve_cache": True}
            self.prefill_raw = orjson.dumps(pre)
            self.i = 0
            # direct-parallel: the body SGLang's gateway sends to both engines (seen on the wire from
            # sglang-router 0.3.2): the client's request plus the bootstrap fields, a random room per request.
            # The null engines ignore the fields and answer both calls as plain completions.
            self.bootstrap_head = self.raw[:-1] + b',"bootstrap_host":"127.0.0.1","bootstrap_port":null,'
        else:
            self.url = f"{target}/v1/completions"

    def _check(self, what: str, status: int, data: bytes) -> None:
        ok = status == 200 and (data.rstrip().endswith(b"[DONE]") if self.stream else b'"choices"' in data)
        if not ok or b'"error' in data:
            raise RuntimeError(f"{what}: HTTP {status} {data[:200]!r}")

    async def _post(self, url: str, body: bytes) -> tuple[int, bytes]:
        async with self.session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read()

    async def one(self) -> None:
        s = self.session
        if self.mode not in DIRECT_MODES:
            self._check(self.mode, *await self._post(self.url, self.raw))
            return
        if self.mode == "direct-parallel":  # SGLang's bootstrap protocol: both calls at once, wait for both
            self.i += 1
            p = self.prefills[self.i % len(self.prefills)]
            d = self.decodes[self.i % len(self.decodes)]
            body = self.bootstrap_head + b'"bootstrap_room":%d}' % random.getrandbits(63)
            pre, dec = await asyncio.gather(self._post(f"{p}/v1/completions", body),
                                            self._post(f"{d}/v1/completions", body))
            self._check("direct-parallel prefill", *pre)
            self._check("direct-parallel decode", *dec)
            return
        self.i += 1
        p = self.prefills[self.i % len(self.prefills)]
        d = self.decodes[self.i % len(self.decodes)]
        async with s.post(
            f"{p}/v1/completions", data=self.prefill_raw, headers={"Content-Type": "application/json"}
        ) as r:
            pre = self.orjson.loads(await r.read())
        mig = {
            "protocol": 2,
            "remote_engine_id": p,
            "remote_session_id": pre["remote_session_id"],
            "remote_token_id": pre["remote_token_ids"][0],
            "remote_block_ids": pre["cache_block_ids"],
            "is_dummy_prefill": False,
        }
        body = self.raw[:-1] + b',"migration_request":' + self.orjson.dumps(mig) + b"}"
        async with s.post(
            f"{d}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"direct decode: HTTP {r.status} {data[:200]!r}")


REQUEST_TIMEOUT = 30.0  # a request not answered by then counts as failed (latency +inf)
FAILED = float("inf")


async def _timed(client: Client) -> float:
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(client.one(), REQUEST_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - counted, not fatal: a front end that hangs is a result
        print(f"[bench] {client.mode} request failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return FAILED
    return time.perf_counter() - t0


async def closed_loop(client: Client, concurrency: int, duration: float) -> list[float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            latencies.append(await _timed(client))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def burst(client: Client, n: int) -> list[float]:
    return list(await asyncio.gather(*(_timed(client) for _ in range(n))))


def load_worker_main(spec_json: str) -> int:
    """One load-generating process (big machines run several, so the client is never the bottleneck)."""
    spec = json.loads(spec_json)
    target = spec["target"] if isinstance(spec["target"], str) else tuple(spec["target"])

    async def run() -> dict:
        async with new_session() as session:
            client = Client(session, spec["mode"], target, spec["stream"])
            await burst(client, spec["concurrency"])  # open the connections before the clock starts
            await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
            cpu0 = time.process_time()
            lat = await closed_loop(client, spec["concurrency"], spec["duration"])
            return {"lat": lat, "cpu": time.process_time() - cpu0}  # its own CPU: is the load saturated?

    print(json.dumps(_run(run())))
    return 0


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@dataclass
class Cell:
    """One measurement: latencies, wall seconds, and CPU seconds of the front end's process tree, of the
    load generators and of the engine processes over it."""

    lat: list[float]
    wall: float
    cpu: float
    load_cpu: float = 0.0
    engines_cpu: float = 0.0
    cpu_sys: float = 0.0  # the kernel's part of `cpu`


async def measure(
    session,
    mode: str,
    target,
    stream: bool,
    concurrency: int,
    duration: float,
    clients: int,
    proc: Proc | None,
    cpus: str | None = None,
    engines: Engines | None = None,
) -> Cell:
    """Closed loop at `concurrency` from `clients` processes pinned to `cpus` (default: OTHER_CPUS)."""
    eng0 = engines.cpu_seconds() if engines else 0.0
    if clients <= 1 or concurrency < clients:
        client = Client(session, mode, target, stream)
        split0, load0 = router_cpu(proc), time.process_time()
        t0 = time.perf_counter()
        lat = await closed_loop(client, concurrency, duration)
        cpu, system = cpu_since(proc, split0)
        return Cell(lat, time.perf_counter() - t0, cpu, time.process_time() - load0,
                    (engines.cpu_seconds() - eng0) if engines else 0.0, system)
    start_at = time.time() + 1.0 + 0.3 * clients
    share = [concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)]
    workers = []
    for c in share:
        spec = {
            "mode": mode,
            "target": target,
            "stream": stream,
            "concurrency": c,
            "duration": duration,
            "start_at": start_at,
        }
        cmd = [PY, __file__, "--load-worker", json.dumps(spec)]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", cpus or OTHER_CPUS, *cmd]
        workers.append(await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, env=bench_env()))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    split0 = router_cpu(proc)
    eng0 = engines.cpu_seconds() if engines else 0.0
    outs = await asyncio.gather(*(w.communicate() for w in workers))
    cpu, system = cpu_since(proc, split0)
    eng = (engines.cpu_seconds() - eng0) if engines else 0.0
    if any(w.returncode for w in workers):
        raise RuntimeError(f"a load worker failed ({mode}, stream={stream}, c={concurrency})")
    got = [json.loads(out) for out, _ in outs]
    return Cell([x for g in got for x in g["lat"]], duration, cpu, sum(g["cpu"] for g in got), eng, system)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def new_session():
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=60),
        skip_auto_headers=("User-Agent",),
    )


# ------------------------------------------------------------------------------------------ scenarios
def front_order(fronts: dict, rep: int) -> list:
    """The front ends of repeat `rep`, the routers in a new order each repeat (the direct calls first: the
    baselines). The engines' rate drifts within a repeat (by a third in one host run), and in a fixed order one
    router met the same drift every repeat: its ratio to the others moved with the order, not with its code."""
    direct = [(m, f) for m, f in fronts.items() if m in DIRECT_MODES]
    routers = [(m, f) for m, f in fronts.items() if m not in DIRECT_MODES]
    k = rep % len(routers) if routers else 0
    return direct + routers[k:] + routers[:k]


async def steady_state(args, etcd: list[str], results: dict, proxy_ok: bool, sglang_ok: bool = False) -> None:
    cluster = "bench-steady"
    n = args.steady_engines
    engines = Engines(n, etcd, cluster, "steady", split=n > 1)
    router = proxy = None
    extra: list[Proc] = []
    try:
        await wait_links(etcd, cluster, n * n)
        router, router_url = start_router(etcd, cluster, "steady", untraced_env())
        wait_http(f"{router_url}/health/ready")
        fronts = {"direct": ((engines.prefills, engines.decodes), None)}
        if args.direct_parallel or (args.direct_parallel is None and sglang_ok):
            fronts["direct-parallel"] = ((engines.prefills, engines.decodes), None)
        fronts["distserve"] = (router_url, router)
        for n in args.router_workers:
            if n > 1:
                wproc, wurl = start_router(etcd, cluster, f"steady-w{n}", untraced_env(), workers=n)
                extra.append(wproc)
                wait_http(f"{wurl}/health/ready")
                fronts[f"distserve-w{n}"] = (wurl, wproc)
        if sglang_ok:
            sgl, sgl_url = start_sglang("steady", engines, args.sglang_policy)
            extra.append(sgl)
            wait_http(f"{sgl_url}/health", 120)
            fronts["sglang"] = (sgl_url, sgl)
        if args.baseline_tree:
            base, base_url = start_router(etcd, cluster, "steady-base", untraced_env(), Path(args.baseline_tree))
            extra.append(base)
            wait_http(f"{base_url}/health/ready")
            fronts["distserve-base"] = (base_url, base)
        if args.tracing:
            sink, sink_url = start_otlp_sink("steady")
            extra.append(sink)
            traced, traced_url = start_router(etcd, cluster, "steady-traced", traced_env(sink_url))
            extra.append(traced)
            wait_http(f"{traced_url}/health/ready")
            fronts["distserve-traced"] = (traced_url, traced)
        async with new_session() as session:
            if proxy_ok:
                proxy, proxy_url = start_proxy("steady")
                wait_http(f"{proxy_url}/v1/models", 120)
                await register_with_proxy(session, proxy_url, engines)
                fronts["lmdeploy"] = (proxy_url, proxy)
            # Warm-up. The proxy handshakes each prefill/decode pair lazily on the first request that picks it;
            # sequential requests first, so no two requests race on one pair's handshake (a request that
            # does can hang forever in lmdeploy 0.18: see docs/benchmarks.md).
            if proxy:
                for _ in range(8 * n * n):
                    await _timed(Client(session, "lmdeploy", fronts["lmdeploy"][0], False))
            for mode, (target, _) in fronts.items():
                for stream in (False, True):
                    await burst(Client(session, mode, target, stream), 50)
            rows = results.setdefault("steady", [])
            for rep in range(args.repeats):
                for concurrency in args.concurrency:
                    for stream in (False, True):
                        for mode, (target, proc) in front_order(fronts, rep):
                            cell = await measure(
                                session, mode, target, stream, concurrency, args.duration, args.clients, proc
                            )
                            lat, wall, cpu = cell.lat, cell.wall, cell.cpu
                            rows.append(
                                {
                                    "rep": rep,
                                    "mode": mode,
                                    "stream": stream,
                                    "concurrency": concurrency,
                                    "n": len(lat),
                                    "failed": sum(x == FAILED for x in lat),
                                    "rps": sum(x != FAILED for x in lat) / wall,
                                    "p50": pct(lat, 50),
                                    "p99": pct(lat, 99),
                                    "cpu_ms_per_req": 1000 * cpu / max(1, len(lat)),
                                    "cpu_util": cpu / wall,
                                    "cpu_sys_share": cell.cpu_sys / cpu if cpu else 0.0,
                                }
                            )
                            print(
                                f"[bench] rep {rep} c={concurrency} stream={stream} {mode}: "
                                f"{rows[-1]['rps']:.0f} req/s p50 {rows[-1]['p50'] * 1e3:.2f} ms "
                                f"p99 {rows[-1]['p99'] * 1e3:.2f} ms cpu {rows[-1]['cpu_ms_per_req']:.3f} ms/req "
                                f"({rows[-1]['cpu_sys_share'] * 100:.0f} % kernel)",
                                file=sys.stderr,
                            )
            if args.profile:
                await profile_cell(session, args, router_url, router, results)
    finally:
        for p in (router, proxy, *extra):
            if p:
                p.kill()
        engines.stop()


async def first_success(session, url: str, timeout: float = 60.0) -> float:
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.post(
                f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            ) as r:
                data = await r.read()
                if r.status == 200 and b'"choices"' in data and b"error" not in data:
                    return time.perf_counter()
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no successful completion from {url}")
        await asyncio.sleep(0.005)


async def cold_start(args, etcd: list[str], results: dict, proxy_ok: bool) -> None:
    rows = results.setdefault("cold", [])
    runs = [(rep, size, mode) for rep in range(args.repeats) for size in args.cold_sizes
            for mode in (["distserve", "lmdeploy"] if proxy_ok else ["distserve"])]
    for rep, size, mode in runs:  # repeats interleaved, so load changes hit every size and front end alike
        cluster = f"bench-cold-{size}-{mode}-{rep}"  # fresh per run: no record of an earlier run counts
        engines = Engines(size, etcd if mode == "distserve" else None, cluster, f"cold{size}",
                          split=args.split_engines and size > 1)
        proc = None
        try:
            if mode == "distserve":
                await wait_links(etcd, cluster, size * size)
            before = handshakes(engines.urls)
            async with new_session() as session:
                if mode == "distserve":
                    proc, url = start_router(etcd, cluster, f"cold{size}")
                else:
                    proc, url = start_proxy(f"cold{size}")
                t0 = proc.started
                if (
                    mode == "lmdeploy"
                ):  # engines register themselves when they (re)start: do it as they would
                    while True:
                        try:
                            await register_with_proxy(session, url, engines)
                            break
                        except Exception:  # noqa: BLE001 - proxy not listening yet
                            await asyncio.sleep(0.005)
                t1 = await first_success(session, url)
                at_first = handshakes(engines.urls) - before
                lat = await burst(Client(session, mode, url, False), 256)
                after = handshakes(engines.urls) - before
                # the same burst from a fresh client straight to the engines: what the engines allow
                async with new_session() as direct_session:
                    direct = await burst(Client(direct_session, "direct", (engines.prefills, engines.decodes),
                                                False), 256)
            rows.append(
                {
                    "rep": rep,
                    "size": size,
                    "mode": mode,
                    "first_success_s": t1 - t0,
                    "handshakes_first": at_first,
                    "handshakes_after_burst": after,
                    "burst_p99": pct(lat, 99),
                    "burst_p50": pct(lat, 50),
                    "burst_failed": sum(x == FAILED for x in lat),
                    "direct_burst_p50": pct(direct, 50),
                    "direct_burst_p99": pct(direct, 99),
                }
            )
            print(
                f"[bench] cold {size}x{size} {mode}: first success {t1 - t0:.3f} s, handshakes {at_first:.0f}"
                f" -> {after:.0f} after burst, burst p99 {pct(lat, 99) * 1e3:.1f} ms",
                file=sys.stderr,
            )
        finally:
            if proc:
                proc.kill()
            engines.stop()


async def scaling(args, etcd: list[str], results: dict, etcd_pid: int | None = None) -> None:
    """`--workers N` scaling: for each N, the router's workers on N CPUs and everything else (engines, load
    generators, etcd) on all the other CPUs, with as many engine and load processes as those CPUs can run;
    `direct` (the client straight to the same engines, same CPUs, same concurrency) is the ceiling that the
    engines and load generators allow. Concurrency: --scaling-concurrency per worker."""
    rows = results.setdefault("scaling", [])
    streams = [s == "yes" for s in args.scaling_streams]
    try:
        for n in args.scaling_workers:
            router_cpus, others = cpu_layout(n)
            free = len(others.split(","))
            per_role = args.scaling_engines or max(1, (free + 1) // 2)
            clients = args.scaling_clients or max(1, (free + 1) // 2)
            conc = args.scaling_concurrency * n
            other_set = {int(c) for c in others.split(",")}
            os.sched_setaffinity(0, other_set)  # this process and etcd stay off the routers' CPUs
            if etcd_pid:
                os.sched_setaffinity(etcd_pid, other_set)
            cluster = f"bench-scaling-w{n}"
            layout = {"router_cpus": router_cpus, "other_cpus": others, "engines_per_role": per_role,
                      "clients": clients, "concurrency": conc,
                      "shared": bool(set(router_cpus.split(",")) & set(others.split(",")))}
            results.setdefault("scaling_layout", {})[str(n)] = layout
            print(f"[bench] scaling w{n}: router on CPUs {router_cpus}; {per_role}+{per_role} engines and {clients}"
                  f" load processes on CPUs {others}; concurrency {conc}", file=sys.stderr)
            engines = Engines(per_role, etcd, cluster, f"scale-w{n}", split=True, cpus=others)
            router = None
            try:
                await wait_links(etcd, cluster, per_role * per_role)
                router, url = start_router(etcd, cluster, f"scale-w{n}", untraced_env(), workers=n, cpus=router_cpus)
                wait_http(f"{url}/health/ready")
                fronts = {"direct": ((engines.prefills, engines.decodes), None), "distserve": (url, router)}
                async with new_session() as session:
                    for mode, (target, _) in fronts.items():
                        for stream in streams:
                            await burst(Client(session, mode, target, stream), 50)
                    for rep in range(args.repeats):
                        for stream in streams:
                            for mode, (target, proc) in fronts.items():
                                cell = await measure(session, mode, target, stream, conc, args.duration, clients,
                                                     proc, cpus=others, engines=engines)
                                ok = sum(x != FAILED for x in cell.lat)
                                rows.append({
                                    "rep": rep, "workers": n, "mode": mode, "stream": stream, "concurrency": conc,
                                    "n": len(cell.lat), "failed": len(cell.lat) - ok, "rps": ok / cell.wall,
                                    "p50": pct(cell.lat, 50), "p99": pct(cell.lat, 99),
                                    "cpu_ms_per_req": 1000 * cell.cpu / max(1, len(cell.lat)),
                                    "router_util": cell.cpu / cell.wall / len(router_cpus.split(",")),
                                    "engines_util": cell.engines_cpu / cell.wall / free,
                                    "load_util": cell.load_cpu / cell.wall / free,
                                    "others_util": (cell.engines_cpu + cell.load_cpu) / cell.wall / free,
                                })
                                r = rows[-1]
                                print(f"[bench] scaling rep {rep} w{n} stream={stream} {mode}: {r['rps']:.0f} req/s"
                                      f" p50 {r['p50'] * 1e3:.2f} ms p99 {r['p99'] * 1e3:.2f} ms; router "
                                      f"{r['router_util']:.0%} of {n} CPU(s), engines {r['engines_util']:.0%} + "
                                      f"load {r['load_util']:.0%} of {free}", file=sys.stderr)
            finally:
                if router:
                    router.kill()
                engines.stop()
    finally:
        back = {int(c) for c in OTHER_CPUS.split(",")}
        os.sched_setaffinity(0, back)
        if etcd_pid:
            os.sched_setaffinity(etcd_pid, back)


SCALES = 0.85  # the goal: N workers give at least 0.85 x N x one worker's throughput
SATURATED = 0.9  # engines+load at >= 90 % of their CPUs, or distserve at >= 90 % of direct's ceiling


def scaling_verdict(n: int, rps: float, w1: float, ceiling: float, others_util: float) -> str:
    if n == 1:
        return "one worker (the reference)"
    if rps >= SCALES * n * w1:
        return "scales"
    if rps >= SATURATED * ceiling or others_util >= SATURATED:
        return f"engines+load saturate (direct ceiling {ceiling:.0f} req/s)"
    return (f"missed: {rps / (n * w1):.2f} x N x w1, below the engines' ceiling ({ceiling:.0f} req/s) with "
            f"engines+load at {others_util:.0%} of their CPUs: not the engines")


# ------------------------------------------------------------------------------------------ report
def _ms(seconds: float) -> str:
    return "never" if seconds == FAILED else f"{seconds * 1e3:.1f} ms"


def report(results: dict) -> str:
    out = []
    steady = results.get("steady", [])
    if steady:
        out.append(
            "| stream | concurrency | mode | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | added over | "
            "router CPU-ms/req | router CPU use |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        keys = sorted({(r["stream"], r["concurrency"]) for r in steady})
        for stream, conc in keys:
            med = {}
            modes = ["direct", "direct-parallel", "distserve", *sorted({r["mode"] for r in steady if r["mode"].startswith("distserve-w")},
                                                      key=lambda m: int(m[len("distserve-w"):])),
                     "distserve-base", "distserve-traced", "sglang", "lmdeploy"]
            for mode in modes:
                rs = [
                    r
                    for r in steady
                    if r["stream"] == stream and r["concurrency"] == conc and r["mode"] == mode
                ]
                if rs:
                    med[mode] = {
                        k: statistics.median(r[k] for r in rs)
                        for k in ("rps", "p50", "p99", "cpu_ms_per_req", "cpu_util")
                    }
            for mode, m in med.items():
                base = baseline_of(mode, med)
                added = (
                    ("-", "-")
                    if base is None
                    else (
                        f"{(m['p50'] - med[base]['p50']) * 1e3:.2f}",
                        f"{(m['p99'] - med[base]['p99']) * 1e3:.2f}",
                    )
                )
                cpu = (
                    ("-", "-")
                    if mode in DIRECT_MODES
                    else (f"{m['cpu_ms_per_req']:.2f}", f"{m['cpu_util'] * 100:.0f}%")
                )
                failed = sum(r.get("failed", 0) for r in steady
                             if r["stream"] == stream and r["concurrency"] == conc and r["mode"] == mode)
                label = f"{mode} ({failed} failed)" if failed else mode
                out.append(
                    f"| {'yes' if stream else 'no'} | {conc} | {label} | {m['rps']:.0f} | {m['p50'] * 1e3:.2f} | "
                    f"{m['p99'] * 1e3:.2f} | {added[0]} | {added[1]} | {base or '-'} | {cpu[0]} | {cpu[1]} |"
                )
        out.extend(added_latency_goal(steady))
    cold = results.get("cold", [])
    if cold:
        out.append("")
        out.append(
            "| engines | front end | process start -> first PD success | handshake calls (p2p_initialize) "
            "at first success / after burst | burst of 256: p50 / p99 | same burst, direct: p50 / p99 |"
        )
        out.append("| --- | --- | --- | --- | --- | --- |")
        for r in _cold_medians(cold):
            out.append(
                f"| {r['size']}x{r['size']} | {r['mode']} | {r['first_success_s']:.3f} s | "
                f"{r['handshakes_first']:.0f} / {r['handshakes_after_burst']:.0f} | "
                f"{_ms(r['burst_p50'])} / {_ms(r['burst_p99'])}"
                + (f" ({r['burst_failed']} of 256 unanswered after {REQUEST_TIMEOUT:.0f} s)" if r.get("burst_failed") else "")
                + " | "
                f"{r['direct_burst_p50'] * 1e3:.1f} / {r['direct_burst_p99'] * 1e3:.1f} ms |"
            )
    if results.get("scaling"):
        out.append("")
        out.extend(scaling_table(results["scaling"], results.get("scaling_layout", {})))
    prof = results.get("profile")
    if prof:
        out.append("")
        if prof.get("error"):
            out.append(f"Profile (c={prof['concurrency']}, stream={prof['stream']}): not taken: {prof['error']}")
        else:
            out.append(f"Profile of the distserve router (py-spy, c={prof['concurrency']}, stream={prof['stream']}, "
                       f"{prof['duration']:.0f} s, {prof['rps']:.0f} req/s under the profiler; collapsed stacks: "
                       f"`{prof['file']}`):")
            out.append("")
            out.append(format_profile(prof))
    return "\n".join(out)


def baseline_of(mode: str, present) -> str | None:
    """The direct mode a front end's added latency is taken over: its own protocol's round trips. SGLang's
    gateway calls prefill and decode at once (direct-parallel); distserve and LMDeploy's proxy wait for the
    prefill's answer before the decode call (direct). None for the direct modes themselves."""
    if mode in DIRECT_MODES:
        return None
    if mode == "sglang" and "direct-parallel" in present:
        return "direct-parallel"
    return "direct" if "direct" in present else None


def _steady_medians(steady: list[dict], stream: bool, conc: int) -> dict[str, dict]:
    med = {}
    for mode in dict.fromkeys(r["mode"] for r in steady):
        rs = [r for r in steady if r["stream"] == stream and r["concurrency"] == conc and r["mode"] == mode]
        if rs:
            med[mode] = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
    return med


def added_latency_goal(steady: list[dict]) -> list[str]:
    """Issue 22: distserve's added latency over direct at concurrency 1 <= the gateway's over direct-parallel
    + 0.3 ms (each over its own protocol's round trips to the engines)."""
    lines = []
    for stream in sorted({r["stream"] for r in steady}):
        med = _steady_medians(steady, stream, 1)
        if not {"direct", "direct-parallel", "distserve", "sglang"} <= set(med):
            continue
        ours = {q: med["distserve"][q] - med["direct"][q] for q in ("p50", "p99")}
        theirs = {q: med["sglang"][q] - med["direct-parallel"][q] for q in ("p50", "p99")}
        verdicts = []
        for q in ("p50", "p99"):
            over = (ours[q] - theirs[q] - 0.3e-3) * 1e3
            verdicts.append(f"{q}: distserve +{ours[q] * 1e3:.2f} ms over direct, gateway +{theirs[q] * 1e3:.2f} ms "
                            f"over direct-parallel: " + ("met" if over <= 0 else f"missed by {over:.2f} ms"))
        if not lines:
            lines.append("")
        lines.append(f"Added latency at concurrency 1, {'streamed' if stream else 'not streamed'} (goal: distserve's "
                     f"<= the gateway's + 0.3 ms): " + "; ".join(verdicts))
    return lines


def scaling_table(rows: list[dict], layout: dict) -> list[str]:
    out = ["| stream | workers N | CPUs: router / engines+load | engines, load procs, concurrency | "
           "distserve-wN req/s (p50 / p99 ms) | 0.85 x N x w1 | direct ceiling req/s (p50 / p99 ms) | "
           "router CPU use (of N) | engines+load CPU use: distserve / direct | verdict |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = ("rps", "p50", "p99", "router_util", "others_util")

    def med(n: int, stream: bool, mode: str) -> dict | None:
        rs = [r for r in rows if r["workers"] == n and r["stream"] == stream and r["mode"] == mode]
        return {k: statistics.median(r[k] for r in rs) for k in keys} if rs else None

    for stream in sorted({r["stream"] for r in rows}):
        w1 = med(1, stream, "distserve")
        for n in sorted({r["workers"] for r in rows}):
            ours, direct = med(n, stream, "distserve"), med(n, stream, "direct")
            if ours is None or direct is None:
                continue
            lay = layout.get(str(n), {})
            failed = sum(r["failed"] for r in rows if r["workers"] == n and r["stream"] == stream)
            target = f"{SCALES * n * w1['rps']:.0f}" if w1 else "-"
            verdict = (scaling_verdict(n, ours["rps"], w1["rps"], direct["rps"], ours["others_util"])
                       if w1 else "no one-worker run to compare with")
            if lay.get("shared"):
                verdict += " (router and engines share CPUs here: not a figure)"
            if failed:
                verdict += f" ({failed} requests failed)"
            out.append(
                f"| {'yes' if stream else 'no'} | {n} | {lay.get('router_cpus', '?')} / {lay.get('other_cpus', '?')} | "
                f"{lay.get('engines_per_role', '?')}+{lay.get('engines_per_role', '?')}, {lay.get('clients', '?')}, "
                f"{lay.get('concurrency', '?')} | {ours['rps']:.0f} ({ours['p50'] * 1e3:.1f} / {ours['p99'] * 1e3:.1f}) | "
                f"{target} | {direct['rps']:.0f} ({direct['p50'] * 1e3:.1f} / {direct['p99'] * 1e3:.1f}) | "
                f"{ours['router_util']:.0%} | {ours['others_util']:.0%} / {direct['others_util']:.0%} | {verdict} |"
            )
    return out


def _cold_medians(cold: list[dict]) -> list[dict]:
    """One row per (size, front end): the median of its repeats (unanswered requests summed)."""
    out = []
    for size, mode in dict.fromkeys((r["size"], r["mode"]) for r in cold):
        rs = [r for r in cold if r["size"] == size and r["mode"] == mode]
        row = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("rep", "size", "mode")}
        row.update(size=size, mode=mode, burst_failed=sum(r["burst_failed"] for r in rs), repeats=len(rs))
        out.append(row)
    return out


async def amain(args) -> int:
    from discovery.embedded import EmbeddedEtcd

    BENCH.mkdir(exist_ok=True)
    why = None if args.skip_lmdeploy else install_lmdeploy()
    proxy_ok = not args.skip_lmdeploy and why is None
    if not proxy_ok:
        print(f"[bench] LMDeploy proxy not run: {why or 'skipped'}", file=sys.stderr)
    sgl_why = None if args.skip_sglang else install_sglang()
    sglang_ok = not args.skip_sglang and sgl_why is None
    if not sglang_ok:
        print(f"[bench] SGLang gateway not run: {sgl_why or 'skipped'}", file=sys.stderr)
    set_router_cpus(max(args.router_workers), args.router_sibling == "idle")
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    others = {int(c) for c in OTHER_CPUS.split(",")}
    os.sched_setaffinity(etcd.pid, others)
    os.sched_setaffinity(0, others)
    results: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "lmdeploy": LMD_VERSION if proxy_ok else f"not run: {why}",
        "sglang_router": SGL_VERSION if sglang_ok else f"not run: {sgl_why or 'skipped'}",
        # which compiled parts each router ran: the C modules where built, else the Python versions
        "router_parsers": {"distserve": parsers_of(REPO),
                           **({"distserve-base": parsers_of(Path(args.baseline_tree))} if args.baseline_tree else {})},
        "router_cpus": {"distserve": ROUTER_CPUS, "others": OTHER_CPUS,
                        **{f"distserve-w{n}": worker_cpus(n) for n in args.router_workers if n > 1}},
        "args": vars(args),
    }
    failed = False
    try:
        for name, scenario in (("steady", steady_state), ("cold", cold_start), ("scaling", scaling)):
            if name in args.scenarios:
                try:
                    if name == "steady":
                        await scenario(args, etcd.endpoints, results, proxy_ok, sglang_ok)
                    elif name == "scaling":
                        await scenario(args, etcd.endpoints, results, etcd.pid)
                    else:
                        await scenario(args, etcd.endpoints, results, proxy_ok)
                except Exception as exc:  # noqa: BLE001 - keep what the other scenarios measured
                    failed = True
                    results.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}")
                    print(f"[bench] {name} failed: {exc}", file=sys.stderr)
    finally:
        etcd.stop()
        (BENCH / "bench_router.json").write_text(json.dumps(results, indent=1, default=str))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    print(report(results))
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--engine-process":
        return engine_process_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--otlp-sink":
        return otlp_sink_main(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "--load-worker":
        return load_worker_main(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "--device-bundle":
        return device_bundle()
    if len(sys.argv) > 1 and sys.argv[1] == "--device-setup":
        return device_setup()
    if (DEVICE / "site").is_dir():  # running on the device machine from its bundle
        sys.path[:0] = [str(DEVICE / "site"), str(DEVICE / "lmdeploy_root")]
        os.environ.update(bench_env())
    big = (os.cpu_count() or 1) > 4
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measurement (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="repeats, interleaved; tables show medians")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--cold-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--scenarios", nargs="+", default=["steady", "cold"], choices=["steady", "cold", "scaling"],
                   help="scaling (not by default): `--workers N` scaling, see --scaling-workers")
    p.add_argument("--direct-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="steady: also the client calling prefill and decode at once (SGLang's bootstrap protocol, "
                        "the gateway's added-latency baseline); default: on when the gateway runs")
    p.add_argument("--scaling-workers", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                   help="scaling: router worker counts (1, the reference, is always run)")
    p.add_argument("--scaling-concurrency", type=int, default=64, metavar="C",
                   help="scaling: concurrency per router worker (N workers get N x C; default 64)")
    p.add_argument("--scaling-engines", type=int, default=0, metavar="E",
                   help="scaling: prefills (and as many decodes), one process each (default: half the free CPUs)")
    p.add_argument("--scaling-clients", type=int, default=0, metavar="L",
                   help="scaling: load-generating processes (default: half the free CPUs)")
    p.add_argument("--scaling-streams", nargs="+", default=["no", "yes"], choices=["no", "yes"],
                   help="scaling: streamed, not, or both (default both)")
    p.add_argument("--profile", action="store_true",
                   help="steady: one extra cell with py-spy (installed under .bench/) sampling the distserve "
                        "router; collapsed stacks in .bench/profile-router-*.txt, top self-time frames printed")
    p.add_argument("--profile-concurrency", type=int, metavar="C", help="profile cell's concurrency "
                   "(default: the largest --concurrency)")
    p.add_argument("--profile-stream", action="store_true", help="profile a streamed cell (default: not streamed)")
    p.add_argument("--profile-duration", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native: C frames too (uvloop, parsers)")
    p.add_argument("--router-sibling", choices=["idle", "shared"], default="idle",
                   help="the router CPU's SMT siblings: kept idle (default, where the host has them and enough "
                        "CPUs remain) or shared with engines and load generators, as before 2026-12-06")
    p.add_argument("--skip-lmdeploy", action="store_true", help="do not install or run LMDeploy's proxy")
    p.add_argument("--skip-sglang", action="store_true", help="do not install or run SGLang's Rust gateway")
    p.add_argument("--sglang-policy", default="round_robin",
                   choices=["round_robin", "random", "power_of_two", "cache_aware"],
                   help="the gateway's --policy (default round_robin, as in every pass so far; its own default is "
                        "cache_aware)")
    p.add_argument("--router-workers", type=int, nargs="+", default=[1], metavar="N",
                   help="steady: also `distserve router --workers N` on N CPUs, for each N > 1 (e.g. 2 4 8)")
    p.add_argument("--json", type=Path, help="also write the results here (default: .bench/bench_router.json only)")
    p.add_argument("--quick", action="store_true", help="one short repeat (smoke run)")
    p.add_argument("--tracing", action="store_true",
                   help="steady: also a router with OpenTelemetry on (100%% sampling, OTLP/HTTP to a local sink)")
    p.add_argument("--router-log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"],
                   help="distserve routers' --log-level (default WARNING, like the other front ends; INFO adds "
                        "an access-log line per request)")
    p.add_argument("--baseline-tree", metavar="DIR",
                   help="steady: also the router of this source tree (e.g. `git worktree add /tmp/base HEAD`)")
    p.add_argument("--clients", type=int, default=4 if big else 1, help="load-generating processes")
    p.add_argument(
        "--split-engines",
        action=argparse.BooleanOptionalAction,
        default=big,
        help="cold start: one process per engine (default on machines with more than 4 CPUs)",
    )
    p.add_argument(
        "--steady-engines",
        type=int,
        default=4 if big else 1,
        help="prefills (and as many decodes) in the steady-state runs",
    )
    args = p.parse_args()
    ROUTER_LOG_LEVEL[0] = args.router_log_level
    if args.quick:
        args.duration, args.repeats, args.profile_duration = 1.0, 1, 2.0
    for name in ("scaling_workers", "concurrency", "router_workers", "cold_sizes"):
        if min(getattr(args, name)) < 1:
            p.error(f"--{name.replace('_', '-')} takes positive integers")
    for name in ("scaling_concurrency", "scaling_engines", "scaling_clients", "profile_concurrency", "profile_rate",
                 "clients", "steady_engines", "repeats"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("scaling_engines", "scaling_clients") else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.duration <= 0 or args.profile_duration <= 0:
        p.error("--duration and --profile-duration must be positive")
    if args.profile and "steady" not in args.scenarios:
        p.error("--profile needs the steady scenario (--scenarios steady ...)")
    args.scaling_workers = sorted({1, *args.scaling_workers})
    return _run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
