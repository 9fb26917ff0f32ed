"""Helpers for the router suites: engines and routers as OS processes, records in a real etcd.

`publish_engine` / `publish_link` write EngineRecord / LinkRecord the way an agent would (used by the
routing tests, which need exact control over states and flags); `handshake` performs the lmdeploy
handshake between two live engines over HTTP. The PD end-to-end suites use the real agent instead.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid

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
