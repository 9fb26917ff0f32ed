"""Typed etcd values of the key schema (see distserve.keys and docs/keys.md).

All times are Unix epoch seconds (float). Every record carries `schema_version` (VersionedRecord); readers
accept unknown extra fields, so adding an optional field does not bump the version.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from discovery.record import VersionedRecord

Role = Literal["prefill", "decode", "hybrid"]
EngineState = Literal["starting", "ready", "draining", "unhealthy"]
TransferProtocol = Literal["rdma", "nvlink", "tcp"]
LinkState = Literal["establishing", "established", "failed"]


def now() -> float:
    return time.time()


class EngineGeometry(BaseModel):
    """What /distserve/engine_info reports, plus a fingerprint of the KV layout.

    Prefill and decode engines can be linked only when tp_size, block_size and kv_layout agree.
    """

    model_config = ConfigDict(extra="allow")

    tp_size: int = 1
    ep_size: int = 1
    dp_size: int = 1
    pp_size: int | None = 1
    dp_rank: int = 0
    block_size: int
    num_cpu_blocks: int = 0
    num_gpu_blocks: int
    # Stable description of the KV pool (cache_pools shapes and dtypes, or layers x heads x dim x dtype);
    # None when the engine does not expose it (then only tp_size and block_size are compared).
    kv_layout: str | None = None

    def compatible_with(self, other: "EngineGeometry") -> str | None:
        """None when a prefill with this geometry can migrate KV to `other`, else the reason why not."""
        if self.tp_size != other.tp_size:
            return f"tp_size {self.tp_size} != {other.tp_size}"
        if self.block_size != other.block_size:
            return f"block_size {self.block_size} != {other.block_size}"
        if self.kv_layout and other.kv_layout and self.kv_layout != other.kv_layout:
            return f"kv_layout {self.kv_layout} != {other.kv_layout}"
        return None


class TransferRank(BaseModel):
    """Per-TP-rank transfer facts peers need (no secrets, no raw memory addresses)."""

    model_config = ConfigDict(extra="allow")

    rank: int = 0
    host: str | None = None  # interface the transfer endpoint binds to (private network)
    nics: list[str] = Field(default_factory=list)  # RDMA device names, if any
    device: str | None = None  # e.g. "cpu", "cuda:0"


class TransferInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    backend: Literal["dlslime"] = "dlslime"
    protocol: TransferProtocol = "tcp"
    ranks: list[TransferRank] = Field(default_factory=list)


class EngineRecord(VersionedRecord):
    """engines/<engine_id>: one registered engine, under its agent's lease."""

    id: str
    # New whenever the engine process or the agent's lease is new; links name both incarnations.
    incarnation: str
    # The engine process's identity (survives agent restarts and new leases; docs/agent.md "Incarnations").
    instance: str | None = None
    role: Role
    # The URL peers and routers use (never 0.0.0.0); also the engine id used in the lmdeploy handshake.
    url: str
    models: list[str]
    engine_info: EngineGeometry
    transfer: TransferInfo = Field(default_factory=TransferInfo)
    state: EngineState = "starting"
    engine_kind: Literal["reference", "lmdeploy", "null"] = "reference"
    software_version: str = ""  # engine software (lmdeploy x.y.z or distserve-reference x.y.z)
    agent_version: str = ""
    started_at: float = Field(default_factory=now)
    registered_at: float = Field(default_factory=now)
    state_reason: str | None = None

    @property
    def handshake_id(self) -> str:
        """The engine id lmdeploy's protocol uses (remote_engine_id): the engine's URL."""
        return self.url


class LinkRecord(VersionedRecord):
    """links/<prefill_id>/<decode_id>: a pre-established KV-transfer link, under the decode agent's lease."""

    prefill_id: str
    decode_id: str
    prefill_incarnation: str
    decode_incarnation: str
    # The engine processes the link was made with; an agent adopts a link only while both are unchanged.
    prefill_instance: str | None = None
    decode_instance: str | None = None
    state: LinkState
    protocol: TransferProtocol = "tcp"
    handshake_ms: float | None = None
    established_at: float | None = None
    updated_at: float = Field(default_factory=now)
    error: str | None = None


class LoadRecord(VersionedRecord):
    """load/<engine_id>: published by the agent at most every 0.5 s and only on change."""

    engine_id: str
    running: int = 0
    waiting: int = 0
    kv_blocks_free: int | None = None
    kv_blocks_total: int | None = None
    prefill_tokens_pending: int | None = None
    preserved_blocks: int | None = None
    updated_at: float = Field(default_factory=now)

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting


class OperatorFlags(VersionedRecord):
    """state/<engine_id>: operator intent (written by distserve-ctl, no lease: it survives restarts)."""

    drain: bool = False
    cordon: bool = False
    reason: str | None = None
    updated_by: str | None = None
    updated_at: float = Field(default_factory=now)


class RouterRecord(VersionedRecord):
    """routers/<router_id>: a router replica, under its own lease (visibility only)."""

    id: str
    url: str
    version: str = ""
    strategy: str = ""
    started_at: float = Field(default_factory=now)
    hostname: str = ""
    pid: int = 0
    view_revision: int = 0
    requests_total: int = 0
    in_flight: int = 0
    updated_at: float = Field(default_factory=now)


StrategyName = Literal["random", "round_robin", "min_expected_latency", "power_of_two", "prefix_affinity"]


class RoutingConfig(VersionedRecord):
    """config/routing: hot-reloaded by every router."""

    strategy: StrategyName = "min_expected_latency"
    # Per-engine weights (engine id -> weight > 0); engines not listed weigh 1.0.
    weights: dict[str, float] = Field(default_factory=dict)
    # Strategy knobs, e.g. {"prefix_chars": 256, "load_factor": 1.25} for prefix_affinity.
    params: dict[str, Any] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=now)
