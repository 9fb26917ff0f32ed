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
this load generator) to CPU 0. Reported: added latency p50/p99 (mode minus direct) at concurrency 1, 16
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
--decode URL ...` over the same null engines (it dispatches prefill and decode in parallel: SGLang's
bootstrap protocol; the null engines answer it as they are). `--skip-sglang` leaves it out.

Workers (`--router-workers 2 4 8`): `distserve-wN` is `distserve router --workers N` pinned to N CPUs
(1..N); CPU per request counts the supervisor and all its workers. With the largest N, the engines and
load generators get the CPUs that are left (the table says where they saturate).

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
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if (REPO / ".bench" / "device" / "site").is_dir():  # the device bundle's wheels: the imports below need them
    sys.path.insert(0, str(REPO / ".bench" / "device" / "site"))

from distserve.testing.cluster import engine_argv, wait_links_established  # noqa: E402
from distserve.testing.ports import free_port, free_port_range  # noqa: E402
from distserve.testing.procs import Proc, answers  # noqa: E402
from distserve.testing.procs import wait_http as _wait_http  # noqa: E402
from distserve.testing.metrics import scrape, value as metric_value  # noqa: E402

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
ROUTER_CPUS = "1"
OTHER_CPUS = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != 1) or "0"


def set_router_cpus(max_workers: int) -> None:
    global OTHER_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    taken = set(cpus[1 : 1 + max_workers])
    OTHER_CPUS = ",".join(str(c) for c in cpus if c not in taken) or str(cpus[0])


def worker_cpus(n: int) -> str:
    cpus = sorted(os.sched_getaffinity(0))
    return ",".join(str(c) for c in cpus[1 : 1 + n]) or ROUTER_CPUS


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and every live descendant (a `--workers` supervisor and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total
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
        self, count: int, etcd: list[str] | None, cluster: str, tag: str, split: bool = False
    ) -> None:
        self.count = count
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
            proc = bench_proc([PY, __file__, "--engine-process", *args], OTHER_CPUS, name)
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

    def stop(self) -> None:
        for p in self.procs:
            p.kill()


async def wait_links(etcd: list[str], cluster: str, n: int, timeout: float = 120.0) -> None:
    await wait_links_established(etcd, cluster, n, timeout=timeout, poll=0.1)


# ------------------------------------------------------------------------------------------ front ends
def start_router(
    etcd: list[str], cluster: str, tag: str, env: dict | None = None, tree: Path | None = None,
    workers: int = 1,
) -> tuple[Proc, str]:
    """`tree`: run the router of that source tree (a baseline checkout) instead of this one."""
    port = free_port()
    extra = ["--workers", str(workers), "--router-id", f"{tag}-router"] if workers > 1 else []
    if tree is not None:
        env = {**(env or {}), "PYTHONPATH": str(tree)}
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
            *extra,
        ],
        worker_cpus(workers) if workers > 1 else ROUTER_CPUS,
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
    BENCH.mkdir(exist_ok=True)
    base_python = os.path.realpath(PY)
    pip = [str(LMD_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    torch_wheels = sorted(
        Path("/opt/wheels").glob(f"torch-*+cpu-cp{sys.version_info[0]}{sys.version_info[1]}-*.whl")
    )
    steps = [
        [base_python, "-m", "venv", str(LMD_VENV)],
        [*pip, "--no-deps", f"lmdeploy=={LMD_VERSION}"],
        [*pip, "--no-deps", str(torch_wheels[-1]) if torch_wheels else "torch"]
        + ([] if torch_wheels else ["--index-url", "https://download.pytorch.org/whl/cpu"]),
        [*pip, *LMD_PROXY_DEPS],
    ]
    for step in steps:
        print("[bench] " + " ".join(step), file=sys.stderr)
        r = subprocess.run(step, capture_output=True, text=True)
        if r.returncode != 0:
            return f"{' '.join(step[:6])} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return lmdeploy_available()


def sglang_command() -> list[str] | None:
    """How to run `sglang-router` here: .bench's venv, or the device bundle's copy (in its site dir)."""
    if (SGL_VENV / "bin" / "sglang-router").exists():
        return [str(SGL_VENV / "bin" / "sglang-router")]
    if (DEVICE / "site" / "sglang_router").is_dir():
        return [PY, "-c", "import sys; from sglang_router.cli import main; sys.argv[0] = 'sglang-router'; "
                "sys.exit(main())"]
    return None


def install_sglang() -> str | None:
    """sglang-router==SGL_VERSION in .bench/sglang-venv (it needs no GPU and no torch); None when runnable."""
    if sglang_command() is None and not (DEVICE / "site").is_dir():
        BENCH.mkdir(exist_ok=True)
        pip = [str(SGL_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for step in ([os.path.realpath(PY), "-m", "venv", str(SGL_VENV)], [*pip, f"sglang-router=={SGL_VERSION}"]):
            print("[bench] " + " ".join(step), file=sys.stderr)
            r = subprocess.run(step, capture_output=True, text=True)
            if r.returncode != 0:
                return f"{' '.join(step[:6])} failed: {(r.stderr.strip().splitlines() or [r.returncode])[-1]}"
    cmd = sglang_command()
    if cmd is None:
        return "not installed"
    r = subprocess.run([*cmd, "launch", "--help"], capture_output=True, text=True, env=bench_env())
    return None if r.returncode == 0 and "--pd-disaggregation" in r.stdout else (
        (r.stderr.strip().splitlines() or ["sglang-router launch --help failed"])[-1])


def start_sglang(tag: str, engines: "Engines") -> tuple[Proc, str]:
    port = free_port()
    argv = [*sglang_command(), "launch", "--pd-disaggregation", "--host", "127.0.0.1", "--port", str(port),
            "--policy", "round_robin", "--log-level", "warn"]
    for url in engines.prefills:
        argv += ["--prefill", url]
    for url in engines.decodes:
        argv += ["--decode", url]
    return bench_proc(argv, ROUTER_CPUS, f"{tag}-sglang"), f"http://127.0.0.1:{port}"


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
    return 0


# ------------------------------------------------------------------------------------------ load
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
        if mode == "direct":
            self.prefills, self.decodes = target
            pre = {**self.body, "max_tokens": 1, "stream": False, "with_cache": True, "preserve_cache": True}
            self.prefill_raw = orjson.dumps(pre)
            self.i = 0
        else:
            self.url = f"{target}/v1/completions"

    async def one(self) -> None:
        s = self.session
        if self.mode != "direct":
            async with s.post(self.url, data=self.raw, headers={"Content-Type": "application/json"}) as r:
                data = await r.read()
            ok = r.status == 200 and (
                data.rstrip().endswith(b"[DONE]") if self.stream else b'"choices"' in data
            )
            if not ok or b'"error' in data:
                raise RuntimeError(f"{self.mode}: HTTP {r.status} {data[:200]!r}")
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

    async def run() -> list[float]:
        async with new_session() as session:
            client = Client(session, spec["mode"], target, spec["stream"])
            await burst(client, spec["concurrency"])  # open the connections before the clock starts
            await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
            return await closed_loop(client, spec["concurrency"], spec["duration"])

    print(json.dumps(_run(run())))
    return 0


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def measure(
    session,
    mode: str,
    target,
    stream: bool,
    concurrency: int,
    duration: float,
    clients: int,
    proc: Proc | None,
) -> tuple[list[float], float, float]:
    """Closed loop at `concurrency`: (latencies, wall seconds, CPU seconds of `proc`)."""
    if clients <= 1 or concurrency < clients:
        client = Client(session, mode, target, stream)
        cpu0 = tree_cpu_seconds(proc.pid) if proc else 0.0
        t0 = time.perf_counter()
        lat = await closed_loop(client, concurrency, duration)
        return lat, time.perf_counter() - t0, (tree_cpu_seconds(proc.pid) - cpu0) if proc else 0.0
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
            cmd = ["taskset", "-c", OTHER_CPUS, *cmd]
        workers.append(await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, env=bench_env()))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = tree_cpu_seconds(proc.pid) if proc else 0.0
    outs = await asyncio.gather(*(w.communicate() for w in workers))
    cpu = (tree_cpu_seconds(proc.pid) - cpu0) if proc else 0.0
    if any(w.returncode for w in workers):
        raise RuntimeError(f"a load worker failed ({mode}, stream={stream}, c={concurrency})")
    lat = [x for out, _ in outs for x in json.loads(out)]
    return lat, duration, cpu


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
        fronts = {"direct": ((engines.prefills, engines.decodes), None), "distserve": (router_url, router)}
        for n in args.router_workers:
            if n > 1:
                wproc, wurl = start_router(etcd, cluster, f"steady-w{n}", untraced_env(), workers=n)
                extra.append(wproc)
                wait_http(f"{wurl}/health/ready")
                fronts[f"distserve-w{n}"] = (wurl, wproc)
        if sglang_ok:
            sgl, sgl_url = start_sglang("steady", engines)
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
                        for mode, (target, proc) in fronts.items():
                            lat, wall, cpu = await measure(
                                session, mode, target, stream, concurrency, args.duration, args.clients, proc
                            )
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
                                }
                            )
                            print(
                                f"[bench] rep {rep} c={concurrency} stream={stream} {mode}: "
                                f"{rows[-1]['rps']:.0f} req/s p50 {rows[-1]['p50'] * 1e3:.2f} ms "
                                f"p99 {rows[-1]['p99'] * 1e3:.2f} ms cpu {rows[-1]['cpu_ms_per_req']:.2f} ms/req",
                                file=sys.stderr,
                            )
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


# ------------------------------------------------------------------------------------------ report
def _ms(seconds: float) -> str:
    return "never" if seconds == FAILED else f"{seconds * 1e3:.1f} ms"


def report(results: dict) -> str:
    out = []
    steady = results.get("steady", [])
    if steady:
        out.append(
            "| stream | concurrency | mode | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | "
            "router CPU-ms/req | router CPU use |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        keys = sorted({(r["stream"], r["concurrency"]) for r in steady})
        for stream, conc in keys:
            med = {}
            modes = ["direct", "distserve", *sorted({r["mode"] for r in steady if r["mode"].startswith("distserve-w")},
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
                added = (
                    ("-", "-")
                    if mode == "direct"
                    else (
                        f"{(m['p50'] - med['direct']['p50']) * 1e3:.2f}",
                        f"{(m['p99'] - med['direct']['p99']) * 1e3:.2f}",
                    )
                )
                cpu = (
                    ("-", "-")
                    if mode == "direct"
                    else (f"{m['cpu_ms_per_req']:.2f}", f"{m['cpu_util'] * 100:.0f}%")
                )
                failed = sum(r.get("failed", 0) for r in steady
                             if r["stream"] == stream and r["concurrency"] == conc and r["mode"] == mode)
                label = f"{mode} ({failed} failed)" if failed else mode
                out.append(
                    f"| {'yes' if stream else 'no'} | {conc} | {label} | {m['rps']:.0f} | {m['p50'] * 1e3:.2f} | "
                    f"{m['p99'] * 1e3:.2f} | {added[0]} | {added[1]} | {cpu[0]} | {cpu[1]} |"
                )
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
    return "\n".join(out)


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
    set_router_cpus(max(args.router_workers))
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    others = {int(c) for c in OTHER_CPUS.split(",")}
    os.sched_setaffinity(etcd.pid, others)
    os.sched_setaffinity(0, others)
    results: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "lmdeploy": LMD_VERSION if proxy_ok else f"not run: {why}",
        "sglang_router": SGL_VERSION if sglang_ok else f"not run: {sgl_why or 'skipped'}",
        "router_cpus": {"distserve": ROUTER_CPUS, "others": OTHER_CPUS,
                        **{f"distserve-w{n}": worker_cpus(n) for n in args.router_workers if n > 1}},
        "args": vars(args),
    }
    failed = False
    try:
        for name, scenario in (("steady", steady_state), ("cold", cold_start)):
            if name in args.scenarios:
                try:
                    if name == "steady":
                        await scenario(args, etcd.endpoints, results, proxy_ok, sglang_ok)
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
    p.add_argument("--scenarios", nargs="+", default=["steady", "cold"], choices=["steady", "cold"])
    p.add_argument("--skip-lmdeploy", action="store_true", help="do not install or run LMDeploy's proxy")
    p.add_argument("--skip-sglang", action="store_true", help="do not install or run SGLang's Rust gateway")
    p.add_argument("--router-workers", type=int, nargs="+", default=[1], metavar="N",
                   help="steady: also `distserve router --workers N` on N CPUs, for each N > 1 (e.g. 2 4 8)")
    p.add_argument("--json", type=Path, help="also write the results here (default: .bench/bench_router.json only)")
    p.add_argument("--quick", action="store_true", help="one short repeat (smoke run)")
    p.add_argument("--tracing", action="store_true",
                   help="steady: also a router with OpenTelemetry on (100%% sampling, OTLP/HTTP to a local sink)")
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
    if args.quick:
        args.duration, args.repeats = 1.0, 1
    return _run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
