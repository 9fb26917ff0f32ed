"""Helpers for the router suites: engines and routers as OS processes, records in a real etcd.

`publish_engine` / `publish_link` write EngineRecord / LinkRecord the way an agent would (used by the
routing tests, which need exact control over states and flags); `handshake` performs the lmdeploy
handshake between two live engines over HTTP. The PD end-to-end suites use the real agent instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from discovery.embedded import EmbeddedEtcd
from distserve.cluster.keys import Keys
from distserve.protocol import ConnectRequest, InitRequest, InitResponse, MigrationProtocol, parse_engine_info
from distserve.cluster.records import EngineGeometry, EngineRecord, LinkRecord, OperatorFlags, RoutingConfig
from distserve.testing import cluster as testing_cluster
from distserve.testing.cluster import start_null_engines
from distserve.testing.metrics import scrape, value as metric_value
from tests.util import Proc, spawn_engine

MODEL = "distserve-reference"


def http_json(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def engine_metric(url: str, name: str, headers: dict | None = None) -> float:
    """Sum of a Prometheus metric's samples on an engine's /metrics."""
    return metric_value(scrape(url, headers), name)


def router_metric(url: str, name: str, labels: dict | None = None, headers: dict | None = None) -> float:
    """Sum of a metric's samples on a router's /metrics whose labels include `labels`."""
    return metric_value(scrape(url, headers), name, labels)


def geometry_of(url: str, headers: dict | None = None) -> EngineGeometry:
    info = parse_engine_info(http_json(f"{url}/distserve/engine_info", headers=headers))
    return EngineGeometry(**info.model_dump())


def engine_record(
    engine_id: str,
    url: str,
    role: str,
    *,
    models: tuple[str, ...] = (MODEL,),
    state: str = "ready",
    incarnation: str | None = None,
    geometry: EngineGeometry | None = None,
) -> EngineRecord:
    return EngineRecord(
        id=engine_id,
        incarnation=incarnation or uuid.uuid4().hex[:12],
        role=role,
        url=url,
        models=list(models),
        state=state,
        engine_kind="null",
        engine_info=geometry or EngineGeometry(block_size=16, num_gpu_blocks=512),
    )


def link_record(prefill: EngineRecord, decode: EngineRecord, state: str = "established") -> LinkRecord:
    return LinkRecord(
        prefill_id=prefill.id,
        decode_id=decode.id,
        prefill_incarnation=prefill.incarnation,
        decode_incarnation=decode.incarnation,
        state=state,
        protocol="tcp",
        established_at=time.time(),
    )


async def publish_engine(client, keys: Keys, record: EngineRecord) -> None:
    await client.put(keys.engine(record.id), record.encode())


async def publish_link(client, keys: Keys, link: LinkRecord) -> None:
    await client.put(keys.link(link.prefill_id, link.decode_id), link.encode())


async def set_flags(client, keys: Keys, engine_id: str, drain: bool = False, cordon: bool = False) -> None:
    await client.put(
        keys.state(engine_id), OperatorFlags(drain=drain, cordon=cordon, updated_by="test").encode()
    )


async def set_routing(client, keys: Keys, strategy: str, **params) -> None:
    await client.put(keys.config(), RoutingConfig(strategy=strategy, params=params).encode())


def handshake(prefill_url: str, decode_url: str, headers: dict | None = None) -> None:
    """The lmdeploy handshake between two live engines (what a decode agent does), over HTTP."""
    p_info = parse_engine_info(http_json(f"{prefill_url}/distserve/engine_info", headers=headers))
    d_info = parse_engine_info(http_json(f"{decode_url}/distserve/engine_info", headers=headers))

    def init(local, local_cfg, remote, remote_cfg) -> InitResponse:
        req = InitRequest(
            local_engine_id=local,
            local_engine_config=local_cfg,
            remote_engine_id=remote,
            remote_engine_config=remote_cfg,
            protocol=MigrationProtocol.TCP,
            rank=0,
        )
        return InitResponse.model_validate(
            http_json(f"{local}/distserve/p2p_initialize", req.model_dump(mode="json"), headers)
        )

    p_resp = init(prefill_url, p_info, decode_url, d_info)
    d_resp = init(decode_url, d_info, prefill_url, p_info)
    for local, remote, resp in ((prefill_url, decode_url, d_resp), (decode_url, prefill_url, p_resp)):
        req = ConnectRequest(
            protocol=MigrationProtocol.TCP,
            remote_engine_id=remote,
            remote_engine_endpoint_info=resp.engine_endpoint_info,
            remote_kvtransfer_endpoint_info=resp.kvtransfer_endpoint_info,
        )
        http_json(f"{local}/distserve/p2p_connect", req.model_dump(mode="json"), headers)


def start_router(
    etcd_endpoints: list[str],
    *extra: str,
    port: int | None = None,
    env: dict | None = None,
    wait_ready: bool = True,
) -> tuple[Proc, str]:
    """The harness's router, at the log level ROUTER_LOG_LEVEL names (INFO by default) for debugging a suite."""
    return testing_cluster.start_router(etcd_endpoints, *extra, port=port, env=env, wait_ready=wait_ready,
                                        log_level=os.environ.get("ROUTER_LOG_LEVEL", "INFO"))


__all__ = [
    "MODEL",
    "engine_metric",
    "engine_record",
    "geometry_of",
    "handshake",
    "http_json",
    "link_record",
    "publish_engine",
    "publish_link",
    "router_metric",
    "set_flags",
    "set_routing",
    "spawn_engine",
    "start_null_engines",
    "start_router",
]


@contextlib.contextmanager
def null_farm(prefills: int = 1, decodes: int = 1, hybrids: int = 0) -> Iterator[dict]:
    """One etcd and null engines (one process per role), every prefill handshaken with every decode:
    {"etcd", "prefills", "decodes", "hybrids", "geometry"}."""
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    procs: list[Proc] = []
    try:
        farm: dict = {"etcd": etcd}
        for role, count in (("prefill", prefills), ("decode", decodes), ("hybrid", hybrids)):
            urls: list[str] = []
            if count:
                proc, urls = start_null_engines(role, count)
                procs.append(proc)
            farm[f"{role}s"] = urls
        for p in farm["prefills"]:
            for d in farm["decodes"]:
                handshake(p, d)
        farm["geometry"] = geometry_of(farm["prefills"][0])
        yield farm
    finally:
        for proc in procs:
            proc.kill()
        etcd.stop()


class DetachedCache:
    """The cluster-cache surface KvIndex subscribes to, with nothing behind it: tests follow and feed engines'
    stream states to the index by hand."""

    def __init__(self) -> None:
        self.engines: dict = {}
        self.synced = asyncio.Event()

    def on_engines(self, handler):
        return lambda: None

    def on_synced(self, handler):
        pass


@contextlib.contextmanager
def hybrid_behind_router(name: str, *router_args: str) -> Iterator[dict]:
    """One etcd, one reference hybrid engine (its own process) published as `h0`, and a router reading them:
    {"router": url, "proc": the router's Proc, "engine": the engine's Proc}."""
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    engine, engine_url = spawn_engine("hybrid", name=name)
    keys = Keys(f"hr{uuid.uuid4().hex[:6]}")

    async def publish() -> None:
        async with etcd_client(etcd.endpoints) as client:
            await publish_engine(
                client, keys, engine_record("h0", engine_url, "hybrid", geometry=geometry_of(engine_url))
            )

    router = None
    try:
        asyncio.run(publish())
        router, url = start_router(etcd.endpoints, "--cluster", keys.cluster, *router_args)
        yield {"router": url, "proc": router, "engine": engine}
    finally:
        if router is not None:
            router.stop()
        engine.kill()
        etcd.stop()


@contextlib.asynccontextmanager
async def etcd_client(endpoints: list[str]) -> AsyncIterator[EtcdClient]:
    client = EtcdClient(EtcdConfig(endpoints=endpoints, timeout=5.0))
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def publish_pd(client, keys: Keys, farm: dict, prefills: list[str] | None = None,
                     decodes: list[str] | None = None, **states: str) -> dict[str, EngineRecord]:
    """Engine records p0.., d0.. (ready unless `states` says otherwise) plus established links for every
    prefill->decode pair; `farm` gives the URLs (unless `prefills`/`decodes` do) and the geometry."""
    geometry = farm["geometry"]
    recs = {}
    for i, url in enumerate(prefills if prefills is not None else farm["prefills"]):
        recs[f"p{i}"] = engine_record(f"p{i}", url, "prefill", state=states.get(f"p{i}", "ready"), geometry=geometry)
    for i, url in enumerate(decodes if decodes is not None else farm["decodes"]):
        recs[f"d{i}"] = engine_record(f"d{i}", url, "decode", state=states.get(f"d{i}", "ready"), geometry=geometry)
    for r in recs.values():
        await publish_engine(client, keys, r)
    for p in (r for r in recs.values() if r.role == "prefill"):
        for d in (r for r in recs.values() if r.role == "decode"):
            await publish_link(client, keys, link_record(p, d))
    return recs


def wait_links_usable(router: str, count: int = 1, timeout: float = 60.0, log: Proc | None = None,
                      deadline: float | None = None) -> None:
    """Until the router reports `count` usable prefill->decode links (its links_usable gauge); on timeout the
    assertion carries the tail of `log` (the agent that makes the links). `deadline` (monotonic) overrides
    `timeout`, for several routers sharing one."""
    deadline = deadline if deadline is not None else time.monotonic() + timeout
    while router_metric(router, "distserve_router_links_usable") < count:
        assert time.monotonic() < deadline, "no usable link" + (f":\n{log.output()[-3000:]}" if log else "")
        time.sleep(0.1)
