"""The LMDeploy DistServe engine protocol on the wire (lmdeploy 0.17/0.18 field names, integer enums).

Shared by the reference engine (server side), the agent (handshakes) and the router (PD requests).
Importing this module must stay cheap: no torch, no lmdeploy.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from distserve.cluster.records import EngineGeometry


class EngineRole(enum.IntEnum):
    Hybrid = 1
    Prefill = 2
    Decode = 3


class MigrationProtocol(enum.IntEnum):
    TCP = 1
    RDMA = 2
    NVLINK = 3


class RDMALinkType(enum.IntEnum):
    IB = 1
    RoCE = 2


class ConnectionStatus(enum.IntEnum):
    SUCCESS = 1
    FAIL = 2


ROLE_NAMES = {EngineRole.Hybrid: "hybrid", EngineRole.Prefill: "prefill", EngineRole.Decode: "decode"}
PROTOCOL_NAMES = {MigrationProtocol.TCP: "tcp", MigrationProtocol.RDMA: "rdma", MigrationProtocol.NVLINK: "nvlink"}
PROTOCOL_BY_NAME = {v: k for k, v in PROTOCOL_NAMES.items()}

# Request fields that only a router may send to an engine; a client sending any of them gets a 400.
INTERNAL_REQUEST_FIELDS = frozenset({"migration_request", "with_cache", "preserve_cache"})

# Engine routes that must never be reachable through a router.
ENGINE_CONTROL_PREFIX = "/distserve/"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", use_enum_values=False)


class DistServeEngineConfig(_Wire):
    tp_size: int
    ep_size: int = 1
    dp_size: int = 1
    pp_size: int | None = 1
    dp_rank: int = 0
    block_size: int
    num_cpu_blocks: int = 0
    num_gpu_blocks: int

    @model_serializer(mode="wrap")
    def _keep_pp_size(self, handler: Any) -> Any:
        # lmdeploy declares pp_size Optional but without a default: the key must be sent even when null,
        # also by callers that dump with exclude_none.
        data = handler(self)
        if isinstance(data, dict):
            data.setdefault("pp_size", self.pp_size)
        return data


class RDMAConfig(_Wire):
    with_gdr: bool = True
    link_type: RDMALinkType = RDMALinkType.RoCE


class InitRequest(_Wire):
    """POST /distserve/p2p_initialize."""

    local_engine_id: str
    local_engine_config: DistServeEngineConfig
    remote_engine_id: str
    remote_engine_config: DistServeEngineConfig
    protocol: MigrationProtocol
    rank: int | None = None
    tcp_config: dict[str, Any] | None = None
    rdma_config: RDMAConfig | None = None
    nvlink_config: dict[str, Any] | None = None


class EngineEndpointInfo(_Wire):
    zmq_address: str = ""


class CachePool(_Wire):
    shape: list[int]
    dtype: str
    element_size: int
    entry_axis: int = 0


class KVTransferEndpointInfo(_Wire):
    protocol: MigrationProtocol
    endpoint_info: str  # transport JSON, as a string (lmdeploy's convention)
    cache_pools: list[CachePool] | None = None


class InitResponse(_Wire):
    status: ConnectionStatus
    engine_endpoint_info: EngineEndpointInfo
    kvtransfer_endpoint_info: list[KVTransferEndpointInfo]


class ConnectRequest(_Wire):
    """POST /distserve/p2p_connect."""

    protocol: MigrationProtocol
    remote_engine_id: str
    remote_engine_endpoint_info: EngineEndpointInfo
    remote_kvtransfer_endpoint_info: list[KVTransferEndpointInfo]


class ConnectResponse(_Wire):
    status: ConnectionStatus


class DropConnectRequest(_Wire):
    """POST /distserve/p2p_drop_connect."""

    engine_id: str
    remote_engine_id: str


class CacheFreeRequest(_Wire):
    """POST /distserve/free_cache."""

    remote_engine_id: str
    remote_session_id: int


class KvStagingRange(_Wire):
    """A prefill's packed copy of a session's blocks: a byte range of its staging region (distserve only;
    a prefill answers it as `remote_kv_staging`, the router passes it on, lmdeploy engines never see it)."""

    model_config = ConfigDict(extra="forbid")

    offset: int = Field(ge=0, lt=1 << 48)
    length: int = Field(gt=0, lt=1 << 48)


class MigrationRequest(_Wire):
    """The `migration_request` field of a decode request."""

    model_config = ConfigDict(extra="forbid")

    protocol: MigrationProtocol
    remote_engine_id: str
    remote_session_id: int
    remote_token_id: int
    remote_block_ids: list[int] = Field(max_length=1 << 20)
    is_dummy_prefill: bool = False
    remote_kv_staging: KvStagingRange | None = None


def parse_engine_info(body: Any) -> DistServeEngineConfig:
    """GET /distserve/engine_info answers a JSON *string* holding the object (double-encoded); accept both."""
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    if isinstance(body, str):
        body = json.loads(body)
    return DistServeEngineConfig.model_validate(body)


def kv_layout_fingerprint(cache_pools: list[CachePool] | None) -> str | None:
    """A stable text describing the KV pools, compared between prefill and decode before linking."""
    if not cache_pools:
        return None
    # The entry axis counts the engine's own KV blocks, which differ between engines; lmdeploy compares
    # the payload shape without it, and so does this fingerprint ("*" in its place).
    return ";".join(
        f"{'x'.join('*' if i == p.entry_axis else str(d) for i, d in enumerate(p.shape))}:{p.dtype}:{p.entry_axis}"
        for p in cache_pools)


def geometry(info: DistServeEngineConfig, cache_pools: list[CachePool] | None = None) -> EngineGeometry:
    return EngineGeometry(
        tp_size=info.tp_size,
        ep_size=info.ep_size,
        dp_size=info.dp_size,
        pp_size=info.pp_size,
        dp_rank=info.dp_rank,
        block_size=info.block_size,
        num_cpu_blocks=info.num_cpu_blocks,
        num_gpu_blocks=info.num_gpu_blocks,
        kv_layout=kv_layout_fingerprint(cache_pools),
    )
