"""A live distserve cluster of real OS processes, and the faults the chaos suite injects into it.

- etcd: `discovery.embedded` (1 member, or 3 members wired as one cluster), fsync off (shared CI disks);
- engines: `distserve engine --role R --model-config tiny` (the CPU reference engine with a tiny model, so a
  64-token answer takes ~0.2 s) or `--null`; the agent runs in the engine's process (`--etcd`), or as a
  sidecar process (`distserve agent --engine-url ...`) where a fault must freeze the engine but not its agent;
- routers: `distserve router`, any number, each with its own id.

Engine ids are the spec names (p0, d1, ...), so records, links and router logs read naturally.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from discovery.embedded import EmbeddedEtcd, EmbeddedEtcdCluster
from distserve.testing.ports import free_port
from distserve.testing.procs import Proc
from distserve.testing.metrics import samples

# A tiny model: 2 layers, hidden 64. Real torch forward passes and real DLSlime KV migration, but a
# 64-token answer in ~0.2 s on one core and ~260 MB per engine process.
TINY_MODEL = {"name": "chaos-tiny", "num_layers": 2, "hidden_size": 64, "num_heads": 2, "num_kv_heads": 2,
              "intermediate_size": 128, "block_size": 16, "num_blocks": 256, "max_model_len": 2048}
MODEL = TINY_MODEL["name"]


@dataclass
class EngineSpec:
    name: str  # engine id in etcd
    role: str  # prefill | decode | hybrid
    null: bool = False  # null mode: instant answers, real handshakes and KV bookkeeping, no torch
    sidecar: bool = False  # agent as its own process (else inside the engine's process)


@dataclass
class ClusterSpec:
    engines: list[EngineSpec]
    etcd_members: int = 1
    routers: int = 2
    ttl: int = 5  # agents' lease TTL (seconds)
    engine_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)

    @classmethod
    def pd(cls, prefills: int = 2, decodes: int = 2, **kw) -> ClusterSpec:
        engines = [EngineSpec(f"p{i}", "prefill") for i in range(prefills)]
        engines += [EngineSpec(f"d{i}", "decode") for i in range(decodes)]
        return cls(engines=engines, **kw)

    def describe(self) -> dict:
        return {"etcd_members": self.etcd_members, "routers": self.routers, "ttl_s": self.ttl,
                "engines": [{"id": e.name, "role": e.role, "kind": "null" if e.null else "reference-tiny",
                             "agent": "sidecar" if e.sidecar else "in-process"} for e in self.engines]}


class Engine:
    def __init__(self, spec: EngineSpec, cluster: Cluster) -> None:
        self.spec = spec
        self.name = spec.name
        self.role = spec.role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        c = cluster
        args = ["engine", "--role", spec.role, "--host", "127.0.0.1", "--port", str(self.port),
                "--model-config", str(c.model_config), "--log-level", "INFO", *c.spec.engine_args]
        if spec.null:
            args.append("--null")
        if not spec.sidecar:
            args += ["--etcd", c.etcd_endpoints, "--engine-id", spec.name, "--ttl", str(c.spec.ttl)]
        self.proc = Proc.distserve(args, f"engine-{spec.name}", log_dir=c.log_dir, start=False)
        self.agent: Proc | None = None
        if spec.sidecar:
            self.agent = Proc.distserve(
                ["agent", "--engine-url", self.url, "--role", spec.role, "--etcd", c.etcd_endpoints,
                 "--engine-id", spec.name, "--ttl", str(c.spec.ttl), "--log-level", "INFO"],
                f"agent-{spec.name}", log_dir=c.log_dir, start=False)
        self.killed = False

    def processes(self) -> list[Proc]:
        return [p for p in (self.proc, self.agent) if p is not None]


class Router:
    def __init__(self, name: str, cluster: Cluster) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc.distserve(
            ["router", "--host", "127.0.0.1", "--port", str(self.port), "--etcd", cluster.etcd_endpoints,
             "--router-id", name, "--log-level", "INFO", *cluster.spec.router_args],
            f"router-{name}", log_dir=cluster.log_dir, start=False)
        self.killed = False


class Cluster:
    """Start with `await cluster.start()`; always `await cluster.stop()` (also on failure)."""

    def __init__(self, spec: ClusterSpec, run_dir: Path | None = None) -> None:
        self.spec = spec
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="distserve-chaos-"))
        self.log_dir = self.run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.model_config = self.run_dir / "tiny-model.json"
        self.model_config.write_text(json.dumps(TINY_MODEL))
        if spec.etcd_members == 1:
            self.etcd: EmbeddedEtcd | EmbeddedEtcdCluster = EmbeddedEtcd(unsafe_no_fsync=True)
            self.etcd_members = [self.etcd]
        else:
            self.etcd = EmbeddedEtcdCluster(size=spec.etcd_members, unsafe_no_fsync=True)
            self.etcd_members = list(self.etcd.members)
        self.etcd_endpoints = ",".join(m.client_url for m in self.etcd_members)
        self.engines: dict[str, Engine] = {e.name: Engine(e, self) for e in spec.engines}
        self.routers: list[Router] = [Router(f"r{i}", self) for i in range(spec.routers)]
        self._router_seq = spec.routers
        self.http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, timeout: float = 120.0) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        await asyncio.to_thread(self.etcd.start)
        for engine in self.engines.values():
            engine.proc.start()
        for engine in self.engines.values():
            await self.wait_http(f"{engine.url}/health", timeout, engine.proc)
            if engine.agent is not None:
                engine.agent.start()
        for router in self.routers:
            router.proc.start()
        await self.wait_routable(timeout=timeout)

    async def stop(self) -> None:
        procs = [r.proc for r in self.routers] + [p for e in self.engines.values() for p in e.processes()]
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs), return_exceptions=True)
        for member in self.etcd_members:
            member.resume()
        await asyncio.to_thread(self.etcd.stop)
        if self.http is not None:
            await self.http.close()

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ waiting
    async def wait_http(self, url: str, timeout: float, proc: Proc | None = None, status: int = 200) -> float:
        """Seconds until GET url answers `status`."""
        t0 = time.monotonic()
        last: object = None
        while time.monotonic() - t0 < timeout:
            if proc is not None and not proc.alive() and proc.popen is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            try:
                async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:  # type: ignore[union-attr]
                    await resp.read()
                    if resp.status == status:
                        return time.monotonic() - t0
                    last = resp.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                last = exc
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{url} did not answer {status} within {timeout:.0f}s (last: {last!r})")

    def expected_counts(self) -> dict[str, int]:
        """Routable engines by role once every live engine is registered and linked."""
        live = [e for e in self.engines.values() if not e.killed]
        prefills = [e for e in live if e.role == "prefill"]
        decodes = [e for e in live if e.role == "decode"]
        hybrids = [e for e in live if e.role == "hybrid"]
        return {"prefill": len(prefills) if decodes else 0, "decode": len(decodes) if prefills else 0,
                "hybrid": len(hybrids)}

    async def ready_counts(self, router: Router) -> dict | None:
        try:
            async with self.http.get(f"{router.url}/health/ready",  # type: ignore[union-attr]
                                     timeout=aiohttp.ClientTimeout(total=1)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    return {"status": resp.status, "prefill": 0, "decode": 0, "hybrid": 0}
                return {"status": 200, **{k: body.get(k, 0) for k in ("prefill", "decode", "hybrid")}}
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None

    async def wait_routable(self, expected: dict[str, int] | None = None, timeout: float = 60.0,
                            routers: list[Router] | None = None) -> float:
        """Seconds until every live router reports `expected` routable engines (default: every live one)."""
        t0 = time.monotonic()
        last: dict = {}
        while time.monotonic() - t0 < timeout:
            want = expected or self.expected_counts()
            ok = True
            for router in routers or self.live_routers():
                if not router.proc.alive():
                    raise RuntimeError(f"router {router.name} exited:\n{router.proc.tail()}")
                counts = await self.ready_counts(router)
                last[router.name] = counts
                if counts is None or counts["status"] != 200 or any(counts[k] != v for k, v in want.items()):
                    ok = False
            if ok:
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise TimeoutError(f"routers did not reach {expected or self.expected_counts()} within {timeout:.0f}s: {last}")

    def live_routers(self) -> list[Router]:
        return [r for r in self.routers if not r.killed]

    # ------------------------------------------------------------------ faults and repairs
    async def kill_engine(self, name: str) -> tuple[float, float]:
        """SIGKILL the engine (and its sidecar agent); returns (signal sent, process gone) times: a request
        that started between the two may still have reached it."""
        engine = self.engines[name]
        t = time.time()
        for proc in engine.processes():
            await asyncio.to_thread(proc.kill)
        engine.killed = True
        return t, time.time()

    async def restart_engine(self, name: str, timeout: float = 60.0) -> float:
        """Start a killed engine again on the same port (a new process: a new incarnation)."""
        engine = self.engines[name]
        t = time.time()
        engine.proc.start()
        await self.wait_http(f"{engine.url}/health", timeout, engine.proc)
        if engine.agent is not None:
            engine.agent.start()
        engine.killed = False
        return t

    def pause_engine(self, name: str) -> float:
        """SIGSTOP the engine process only (its sidecar agent, if any, keeps running)."""
        t = time.time()
        self.engines[name].proc.pause()
        return t

    def resume_engine(self, name: str) -> float:
        t = time.time()
        self.engines[name].proc.resume()
        return t

    async def kill_router(self, router: Router) -> tuple[float, float]:
        """As kill_engine: (signal sent, process gone)."""
        t = time.time()
        await asyncio.to_thread(router.proc.kill)
        router.killed = True
        return t, time.time()

    def add_router(self) -> Router:
        router = Router(f"r{self._router_seq}", self)
        self._router_seq += 1
        self.routers.append(router)
        router.proc.start()
        return router

    def leader_index(self, timeout: float = 10.0) -> int:
        if isinstance(self.etcd, EmbeddedEtcdCluster):
            return self.etcd.leader_index(timeout)
        return 0

    # ------------------------------------------------------------------ engine metrics
    async def engine_metric(self, engine: Engine, name: str) -> float | None:
        try:
            async with self.http.get(f"{engine.url}/metrics",  # type: ignore[union-attr]
                                     timeout=aiohttp.ClientTimeout(total=2)) as resp:
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        return next((v for n, _, v in samples(text) if n == name), None)

    async def metric_by_engine(self, name: str, roles: tuple[str, ...] = ("prefill", "decode", "hybrid")
                               ) -> dict[str, float | None]:
        live = [e for e in self.engines.values() if not e.killed and e.role in roles]
        values = await asyncio.gather(*(self.engine_metric(e, name) for e in live))
        return {e.name: v for e, v in zip(live, values)}
