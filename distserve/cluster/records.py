"""Typed etcd values of the key schema (see distserve.cluster.keys and docs/keys.md).

All times are Unix epoch seconds (float). Every record carries `schema_version` (VersionedRecord); readers
accept unknown extra fields, so adding an optional field does not bump the version.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from discovery.record import MalformedRecord, VersionedRecord

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


class CacheEventsInfo(BaseModel):
    """An engine's cache-state stream (engine_info's `cache_events`; docs/keys.md): routers follow it to
    learn which prefix keys the engine holds cached (distserve.cluster.prefix_keys)."""

    model_config = ConfigDict(extra="ignore")

    path: str = Field(pattern=r"^/[A-Za-z0-9_./-]{1,200}$")
    version: int = Field(ge=1, le=1000)
    chunk_bytes: int = Field(ge=1, le=1 << 20)  # text prompts' key chunk (prefix_keys.CHUNK_BYTES)
    block_size: int = Field(ge=1, le=1 << 16)


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
    # Context length in tokens (engine_info's `max_model_len`), None when the engine does not say: routers
    # reject a request that fits no engine before calling any (docs/router.md "Context length").
    max_model_len: int | None = Field(None, ge=1)
    # The most UTF-8 bytes one token of the engine's tokenizer covers (1 for a byte-level one), None when not
    # said: routers bound a text prompt's token count from below by its bytes / this.
    max_token_bytes: int | None = Field(None, ge=1, le=1024)
    # What the engine honours of the OpenAI API beyond the basics (distserve.cluster.capabilities): reported by
    # the engine (engine_info `capabilities`) or, for lmdeploy, filled by the agent from a per-version table.
    # None: an agent older than capabilities (routers then assume capabilities.legacy()).
    capabilities: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=64)
    # The engine's cache-state stream, None when it has none (prefix caching off, lmdeploy, older records).
    cache_events: CacheEventsInfo | None = None

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


StrategyName = Literal["random", "round_robin", "min_expected_latency", "power_of_two", "prefix_affinity",
                       "kv_aware"]

# Hard bounds of the routing config (docs/router.md "Routing config"). distserve-ctl refuses a value outside
# them; a router that reads one keeps its last good config. They bound what one bad value can cost a router:
# a weight scales its engine's share of the prefix_affinity ring, vnodes its ring's size.
MAX_WEIGHT = 100.0
MAX_WEIGHTS = 10_000  # engines with a weight
MAX_VNODES = 1024  # ring points per engine of weight 1 (the ring itself is capped too, see strategies.py)
MAX_PREFIX_CHARS = 16_384
MAX_LOAD_FACTOR = 100.0
MAX_KV_WEIGHT = 1000.0
MAX_MATCH_TOKENS = 1 << 20


class StrategyParams(BaseModel):
    """A strategy's knobs: typed, bounded, strict (no "1.5" for 1.5, no true for 1); unknown names refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(StrategyParams):
    """random, round_robin, min_expected_latency and power_of_two take no params."""


class PrefixAffinityParams(StrategyParams):
    # Characters of the prompt hashed onto the ring (chat: the messages' roles and texts).
    prefix_chars: int = Field(256, ge=1, le=MAX_PREFIX_CHARS)
    # An engine above load_factor x the average load is passed over for the next one on the ring.
    load_factor: float = Field(1.25, ge=1.0, le=MAX_LOAD_FACTOR, allow_inf_nan=False)
    # Ring points per engine, times its weight.
    vnodes: int = Field(64, ge=1, le=MAX_VNODES)


class KvAwareParams(StrategyParams):
    """kv_aware: cost(engine) = load_weight x unfinished / weight - cache_weight x matched tokens / 1024; the
    lowest cost wins (docs/router.md "kv_aware")."""

    # Cost of 1,024 prompt tokens the engine holds cached (prefill work it would not redo), in queued requests.
    cache_weight: float = Field(1.0, ge=0.0, le=MAX_KV_WEIGHT, allow_inf_nan=False)
    # Cost of one unfinished request on the engine.
    load_weight: float = Field(1.0, ge=0.0, le=MAX_KV_WEIGHT, allow_inf_nan=False)
    # A cached prefix shorter than this many tokens counts as no match.
    min_match_tokens: int = Field(0, ge=0, le=MAX_MATCH_TOKENS)
    # Engines without a cache stream are placed by prefix_affinity's hash with these knobs.
    prefix_chars: int = Field(256, ge=1, le=MAX_PREFIX_CHARS)
    load_factor: float = Field(1.25, ge=1.0, le=MAX_LOAD_FACTOR, allow_inf_nan=False)
    vnodes: int = Field(64, ge=1, le=MAX_VNODES)


STRATEGY_PARAMS: dict[str, type[StrategyParams]] = {
    "random": NoParams,
    "round_robin": NoParams,
    "min_expected_latency": NoParams,
    "power_of_two": NoParams,
    "prefix_affinity": PrefixAffinityParams,
    "kv_aware": KvAwareParams,
}

Weight = Annotated[float, Field(gt=0.0, le=MAX_WEIGHT, allow_inf_nan=False, strict=True)]


class RoutingConfig(VersionedRecord):
    """config/routing: hot-reloaded by every router; the one schema distserve-ctl writes and routers read."""

    strategy: StrategyName = "min_expected_latency"
    # Per-engine weights (engine id -> 0 < weight <= MAX_WEIGHT); engines not listed weigh 1.0.
    weights: dict[str, Weight] = Field(default_factory=dict, max_length=MAX_WEIGHTS)
    # The strategy's knobs (STRATEGY_PARAMS[strategy]), e.g. {"prefix_chars": 256, "load_factor": 1.25} for
    # prefix_affinity; only the ones set are stored, the others take their defaults.
    params: dict[str, Any] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=now)

    @model_validator(mode="after")
    def _typed_params(self) -> "RoutingConfig":
        model = STRATEGY_PARAMS[self.strategy]
        unknown = sorted(set(self.params) - set(model.model_fields))
        if unknown:
            known = ", ".join(model.model_fields) or "none"
            raise ValueError(f"params.{unknown[0]} is not a parameter of strategy {self.strategy} "
                             f"(its parameters: {known})")
        try:
            typed = model.model_validate(self.params)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"params.{where}: {err['msg']} (got {err.get('input')!r:.60})") from None
        self.params = typed.model_dump(exclude_unset=True)
        return self

    def strategy_params(self) -> StrategyParams:
        """The typed params of this config's strategy, defaults filled in."""
        return STRATEGY_PARAMS[self.strategy].model_validate(self.params)

    @classmethod
    def decode(cls, raw: bytes | str) -> "RoutingConfig":
        try:
            return super().decode(raw)
        except MalformedRecord:
            try:  # again, for a message that names the bad key and value in one short line
                cls.model_validate_json(raw)
            except ValidationError as exc:
                raise MalformedRecord(f"RoutingConfig: {explain(exc)}") from None
            except ValueError:
                pass
            raise


def explain(exc: ValidationError, limit: int = 3) -> str:
    """One line naming each bad field and value, e.g. `weights.P1: Input should be greater than 0 (got 0)`."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":  # our own validator: its message names the field and value
            parts.append(msg.removeprefix("Value error, "))
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            parts.append(f"{where or 'value'}: {msg} (got {shown})")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
