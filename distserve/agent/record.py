"""The engine record: what the agent says about its engine in `engines/<id>` (docs/agent.md, "Records").

Pure functions of what the agent knows (the engine's facts and identity, the operator flags, the lease),
so the registration writes whatever this returns and nothing else decides a field.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from distserve import __version__
from distserve.agent.config import AgentConfig
from distserve.agent.engine_client import EngineFacts
from distserve.cluster.capabilities import lmdeploy_capabilities
from distserve.cluster.records import CacheEventsInfo, EngineRecord, OperatorFlags, TransferInfo, TransferRank
from distserve.protocol import geometry

log = logging.getLogger("distserve.agent")

ENGINE_KINDS = ("reference", "lmdeploy", "null")


@dataclass(frozen=True)
class EngineStatus:
    """The inputs of the record's `state` and `state_reason`."""

    stopping: bool = False
    healthy: bool = True
    health_reason: str | None = None
    flags: OperatorFlags = field(default_factory=OperatorFlags)
    setup_done: bool = False

    def state(self) -> tuple[str, str | None]:
        if self.stopping:
            return "draining", "stopping"
        if not self.healthy:
            return "unhealthy", self.health_reason
        if self.flags.drain:
            return "draining", self.flags.reason or "drain requested"
        return ("ready" if self.setup_done else "starting"), None


def build_engine_record(config: AgentConfig, facts: EngineFacts, *, instance: str, started_at: float,
                        lease_id: int, status: EngineStatus, registered_at: float | None) -> EngineRecord:
    """The record for this engine under `lease_id` (its incarnation is `<instance>.<lease id in hex>`)."""
    extras = facts.extras
    engine_kind = extras.get("engine_kind")
    if engine_kind not in ENGINE_KINDS:
        engine_kind = "lmdeploy"
    info = geometry(facts.config)
    if isinstance(extras.get("kv_layout"), str):
        info.kv_layout = extras["kv_layout"]
    state, reason = status.state()
    software_version = str(extras.get("software_version") or extras.get("version") or config.software_version or "")
    return EngineRecord(
        id=config.id,
        incarnation=f"{instance}.{lease_id:x}",
        instance=instance,
        role=config.role,
        url=config.url,
        models=list(facts.models),
        engine_info=info,
        transfer=transfer_info(config, facts, engine_kind),
        state=state,
        engine_kind=engine_kind,
        software_version=software_version,
        agent_version=f"distserve-agent {__version__}",
        started_at=started_at,
        registered_at=registered_at if registered_at is not None else time.time(),
        state_reason=reason,
        # only a well-formed value: routers reject requests by it
        max_model_len=mml if type(mml := extras.get("max_model_len")) is int and mml > 0 else None,
        max_token_bytes=mtb if type(mtb := extras.get("max_token_bytes")) is int and 0 < mtb <= 1024 else None,
        capabilities=capabilities(extras, engine_kind, software_version, config.role),
        cache_events=cache_events_info(extras.get("cache_events")),
    )


def cache_events_info(raw) -> CacheEventsInfo | None:
    """engine_info's `cache_events` (the cache-state stream routers follow) when well formed, else None."""
    if not isinstance(raw, dict):
        return None
    try:
        return CacheEventsInfo.model_validate(raw)
    except ValueError:  # pydantic's ValidationError: an engine we cannot follow is still routable
        log.warning("engine reports an unreadable cache_events %r; publishing none", str(raw)[:200])
        return None


def capabilities(extras: dict, engine_kind: str, software_version: str, role: str) -> list[str] | None:
    """The engine's own `capabilities` when well formed; for lmdeploy (which reports none) its version's row
    of the table; else None (routers assume the legacy set)."""
    reported = extras.get("capabilities")
    if type(reported) is list and len(reported) <= 64 and all(type(c) is str and 0 < len(c) <= 64 for c in reported):
        return sorted(set(reported))
    if engine_kind == "lmdeploy":
        return lmdeploy_capabilities(software_version, role)
    return None


def transfer_info(config: AgentConfig, facts: EngineFacts, engine_kind: str) -> TransferInfo:
    """What peers need to send KV here: the engine's own report if readable, else the agent's options."""
    reported = facts.extras.get("transfer")
    if isinstance(reported, dict):
        try:
            info = TransferInfo.model_validate(reported)
            return info.model_copy(update={"protocol": config.protocol}) if config.protocol else info
        except Exception:  # noqa: BLE001 - fall back to what the agent knows
            log.warning("engine %s reports unreadable transfer facts; using the agent's", config.engine_url)
    reported_protocol = facts.extras.get("migration_protocol")
    if reported_protocol not in ("tcp", "rdma", "nvlink"):
        reported_protocol = None
    protocol = config.protocol or reported_protocol or ("tcp" if engine_kind in ("reference", "null") else "rdma")
    host = config.url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    devices = config.rdma_devices
    ranks = [TransferRank(rank=r, host=host, nics=[devices[r % len(devices)]] if devices else [])
             for r in range(facts.config.tp_size)]
    return TransferInfo(protocol=protocol, ranks=ranks)


def same_record(a: EngineRecord, b: EngineRecord) -> bool:
    """Equal but for registered_at (a put of an unchanged record is skipped)."""
    skip = {"registered_at"}
    return a.model_dump(exclude=skip) == b.model_dump(exclude=skip)
