"""Helpers for the agent suites: real etcd, null-mode reference engines and agents as separate OS processes.

A `Fleet` starts engines (`distserve engine --null`) and their sidecar agents (`distserve agent`), or engines
with their agent in-process (`distserve engine --null --count N --etcd ...`), and reads etcd the way a
router does (one list, then distserve.cluster.topology).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.agent.engine_client import Metrics
from distserve.cluster.keys import ENGINES, LINKS, LOAD, STATE, Keys
from distserve.cluster.records import EngineRecord, LinkRecord, LoadRecord, OperatorFlags
from distserve.cluster.topology import Topology, compute_topology
from tests.util import Proc, free_port, free_port_range, wait_http

MODEL = "distserve-reference"


def engine_id(port: int) -> str:
    return f"127.0.0.1-{port}"


@dataclass
class Node:
    role: str
    port: int
    engine: Proc | None = None
    agent: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def id(self) -> str:
        return engine_id(self.port)


@dataclass
class View:
    """What etcd holds for one cluster, read at one revision."""

    engines: dict[str, EngineRecord] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)  # engine id -> lease of its record
    links: dict[tuple[str, str], LinkRecord] = field(default_factory=dict)
    load: dict[str, LoadRecord] = field(default_factory=dict)
    flags: dict[str, OperatorFlags] = field(default_factory=dict)
    revision: int = 0

    def topology(self) -> Topology:
        return compute_topology(self.engines, self.links, self.flags)

    def established(self) -> set[tuple[str, str]]:
        return {pair for pair, link in self.links.items() if link.state == "established"}

    def usable_links(self) -> set[tuple[str, str]]:
        topo = self.topology()
        return {(p, d) for p, ds in topo.decodes_of_prefill.items() for d in ds}


async def read_view(client: EtcdClient, cluster: str = "default") -> View:
    keys = Keys(cluster)
    kvs, revision = await client.get_prefix(keys.root)
    view = View(revision=revision)
    for kv in kvs:
        parsed = keys.parse(kv.key)
        if parsed is None:
            continue
        if parsed.kind == ENGINES:
            view.engines[parsed.ids[0]] = EngineRecord.decode(kv.value)
            view.leases[parsed.ids[0]] = kv.lease
        elif parsed.kind == LINKS:
            view.links[(parsed.ids[0], parsed.ids[1])] = LinkRecord.decode(kv.value)
        elif parsed.kind == LOAD:
            view.load[parsed.ids[0]] = LoadRecord.decode(kv.value)
        elif parsed.kind == STATE:
            view.flags[parsed.ids[0]] = OperatorFlags.decode(kv.value)
    return view


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.05) -> float:
    """Poll `check` until it is true; returns the seconds it took (raises AssertionError on timeout)."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - etcd briefly unavailable during fault tests
            last = exc
        else:
            last = None
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}" + (f" (last error: {last})" if last else ""))
        await asyncio.sleep(interval)


def engine_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return Metrics.parse(resp.read().decode()).values


def handshakes(url: str) -> int:
    return int(engine_metrics(url)["distserve_engine_handshakes_total"])


def post_json(url: str, body: dict, timeout: float = 10.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def pd_request(prefill_url: str, decode_url: str, prompt: str = "hello from the agent tests") -> str:
    """One PD completion straight against the engines (prefill, then decode pulling the KV over the link)."""
    status, first = post_json(f"{prefill_url}/v1/completions", {
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "with_cache": True, "preserve_cache": True})
    assert status == 200, first
    status, answer = post_json(f"{decode_url}/v1/completions", {
        "model": MODEL, "prompt": prompt, "max_tokens": 8,
        "migration_request": {"protocol": 1, "remote_engine_id": prefill_url,
                              "remote_session_id": first["remote_session_id"],
                              "remote_token_id": first["remote_token_ids"][0],
                              "remote_block_ids": first["cache_block_ids"]}})
    assert status == 200, answer
    return answer["choices"][0]["text"]


class Fleet:
    """Null engines and agents as OS processes around one etcd (endpoints given)."""

    def __init__(self, endpoints: list[str], ttl: int = 5) -> None:
        self.endpoints = endpoints
        self.ttl = ttl
        self.nodes: list[Node] = []
        self.procs: list[Proc] = []

    def etcd_config(self) -> EtcdConfig:
        return EtcdConfig(endpoints=self.endpoints, timeout=3.0)

    def start_engine(self, node: Node) -> None:
        node.engine = Proc.python(["distserve", "engine", "--role", node.role, "--null", "--host", "127.0.0.1",
                                   "--port", str(node.port)], name=f"engine-{node.id}")
        self.procs.append(node.engine)

    def start_agent(self, node: Node, *extra: str) -> None:
        node.agent = Proc.python(["distserve", "agent", "--engine-url", node.url, "--role", node.role,
                                  "--etcd", ",".join(self.endpoints), "--ttl", str(self.ttl), *extra],
                                 name=f"agent-{node.id}")
        self.procs.append(node.agent)

    def add(self, role: str) -> Node:
        node = Node(role, free_port())
        self.nodes.append(node)
        self.start_engine(node)
        return node

    def wait_engines(self) -> None:
        for node in self.nodes:
            try:
                wait_http(f"{node.url}/health", timeout=60)
            except TimeoutError:
                raise RuntimeError(f"engine {node.id} did not start:\n{node.engine.output()[-2000:]}") from None

    def start_in_process(self, role: str, count: int, *extra: str) -> list[Node]:
        """`distserve engine --null --count N --etcd ...`: N engines and their agents in one process."""
        base = free_port_range(count)
        nodes = [Node(role, base + i) for i in range(count)]
        proc = Proc.python(["distserve", "engine", "--role", role, "--null", "--count", str(count),
                            "--host", "127.0.0.1", "--port", str(base), "--etcd", ",".join(self.endpoints),
                            "--ttl", str(self.ttl), *extra], name=f"engines-{role}-{base}")
        self.procs.append(proc)
        for node in nodes:
            node.engine = node.agent = proc
        self.nodes.extend(nodes)
        return nodes

    @property
    def prefills(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "prefill"]

    @property
    def decodes(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "decode"]

    def all_pairs(self) -> set[tuple[str, str]]:
        return {(p.id, d.id) for p in self.prefills for d in self.decodes}

    def handshake_counts(self) -> dict[str, int]:
        return {node.id: handshakes(node.url) for node in self.nodes}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=5)


async def wait_full(client: EtcdClient, fleet: Fleet, timeout: float) -> View:
    """Until every engine is ready and routable and every prefill-decode pair has a usable link."""
    view: View | None = None
    pairs = fleet.all_pairs()

    async def check() -> bool:
        nonlocal view
        view = await read_view(client)
        ready = all(view.engines.get(n.id) is not None and view.engines[n.id].state == "ready" for n in fleet.nodes)
        return ready and view.usable_links() == pairs

    try:
        await wait_until(check, timeout, "every engine ready and every pair linked")
    except AssertionError:
        state = {k: (v.state, v.incarnation) for k, v in view.engines.items()} if view else None
        links = {k: (v.state, v.prefill_incarnation, v.decode_incarnation) for k, v in view.links.items()} if view else None
        raise AssertionError(f"cluster not full within {timeout}s: engines {state}, links {links}\n"
                             f"{fleet.logs()}") from None
    assert view is not None
    return view


class TcpProxy:
    """A loopback TCP relay in front of etcd, to cut the agents off while etcd keeps running (a partition:
    leases expire for real, unlike a restart, which re-arms them)."""

    def __init__(self, target: str) -> None:
        host_port = target.split("://", 1)[-1]
        self.target_host, port = host_port.rsplit(":", 1)
        self.target_port = int(port)
        self.port = free_port()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), 3)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)), asyncio.create_task(self._pipe(up_reader, writer))]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)
        self._tasks.difference_update(pipes)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()
