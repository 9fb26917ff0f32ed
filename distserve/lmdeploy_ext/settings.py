"""Every environment variable distserve's lmdeploy integration reads is read here, typed and bounded
(docs/configuration.md documents each once), plus who this process is (its instance id, lmdeploy's
version): install.py and server_patches.py both import this module, not each other.

The launcher (`serve.main`) checks everything with `load()` before lmdeploy starts: a bad value is one line
on stderr and exit 2. lmdeploy's spawned engine process reads the same environment; there a bad value (which
the launcher already refused) falls back to the default with a warning, never an exception in the engine.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Mapping

logger = logging.getLogger("distserve.lmdeploy_ext")

ENV_ENABLE = "DISTSERVE_LMDEPLOY_EXT"  # "1": install in spawned engine processes too
ENV_PROTOCOL = "DISTSERVE_LMDEPLOY_MIGRATION_PROTOCOL"  # reported to agents: tcp | rdma | nvlink
ENV_LOG_LEVEL = "DISTSERVE_LOG_LEVEL"
ENV_STAGING_MB = "DISTSERVE_LMDEPLOY_STAGING_MB"
ENV_CHUNK_KB = "DISTSERVE_LMDEPLOY_CHUNK_KB"
ENV_DEADLINE_S = "DISTSERVE_LMDEPLOY_MIGRATION_DEADLINE_S"
ENV_CONTROL_TIMEOUT_S = "DISTSERVE_LMDEPLOY_CONTROL_TIMEOUT_S"
ENV_TRANSFER_HOST = "DISTSERVE_LMDEPLOY_TRANSFER_HOST"

PROTOCOLS = ("tcp", "rdma", "nvlink")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# New per process: agents tell an api_server restart from a blip by it.
INSTANCE_ID = f"lmd-{uuid.uuid4().hex[:16]}"


class SettingsError(ValueError):
    """An environment variable with a value out of its type or bounds (the message names it)."""


def lmdeploy_version() -> str:
    """The installed lmdeploy's version, read from its metadata (no torch import); raises ImportError."""
    try:
        return version("lmdeploy")
    except PackageNotFoundError:
        raise ImportError("No module named 'lmdeploy'") from None


@dataclass(frozen=True)
class StagedTcpSettings:
    """Staged-TCP migration tunables (staged_tcp.py); `from_env` reads DISTSERVE_LMDEPLOY_*."""

    staging_bytes: int = 64 << 20  # per link, per side that uses it (pinned host memory)
    chunk_bytes: int = 4 << 20  # one DLSlime assignment
    deadline_s: float = 60.0  # whole migration
    control_timeout_s: float = 20.0  # one control round trip (includes the prefill's staging copy)
    host: str | None = None  # interface to bind; default: the engine URL's host

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "StagedTcpSettings":
        """Raises SettingsError naming the variable at fault."""
        env = os.environ if environ is None else environ
        return cls(
            staging_bytes=int(_number(env, ENV_STAGING_MB, 64, 1 << 16) * (1 << 20)),  # at most 64 GiB
            chunk_bytes=int(_number(env, ENV_CHUNK_KB, 4096, 1 << 20) * 1024),  # at most 1 GiB
            deadline_s=_number(env, ENV_DEADLINE_S, 60.0, 86400),
            control_timeout_s=_number(env, ENV_CONTROL_TIMEOUT_S, 20.0, 3600),
            host=_host(env),
        )

    @classmethod
    def from_env_or_default(cls) -> "StagedTcpSettings":
        """For the engine process: a bad value is logged and the defaults used (the launcher refused it)."""
        try:
            return cls.from_env()
        except SettingsError as e:
            logger.warning("%s; staged TCP uses its defaults", e)
            return cls()


@dataclass(frozen=True)
class LmdeploySettings:
    enabled: bool  # DISTSERVE_LMDEPLOY_EXT=1
    protocol: str | None  # DISTSERVE_LMDEPLOY_MIGRATION_PROTOCOL (wins over --migration-protocol)
    log_level: str
    staged_tcp: StagedTcpSettings


def load(environ: Mapping[str, str] | None = None) -> LmdeploySettings:
    """Every variable of this component, checked; raises SettingsError naming the one at fault."""
    env = os.environ if environ is None else environ
    return LmdeploySettings(
        enabled=env.get(ENV_ENABLE) == "1",
        protocol=protocol_override(env),
        log_level=log_level(env),
        staged_tcp=StagedTcpSettings.from_env(env),
    )


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENV_ENABLE) == "1"


def protocol_override(environ: Mapping[str, str] | None = None) -> str | None:
    """DISTSERVE_LMDEPLOY_MIGRATION_PROTOCOL (auto, tcp, rdma or nvlink), None when unset."""
    raw = ((os.environ if environ is None else environ).get(ENV_PROTOCOL) or "").strip().lower()
    if not raw:
        return None
    if raw not in ("auto", *PROTOCOLS):
        raise SettingsError(f"{ENV_PROTOCOL} must be auto, tcp, rdma or nvlink, not {raw!r}")
    return raw


def reported_protocol() -> str:
    """The protocol /distserve/engine_info reports (install() resolved it); a bad value reads as tcp."""
    try:
        value = protocol_override()
    except SettingsError as e:
        logger.warning("%s; reporting tcp", e)
        return "tcp"
    return value if value in PROTOCOLS else "tcp"


def set_enabled_and_protocol(protocol: str) -> None:
    """Mark the environment so lmdeploy's spawned engine process installs too and reports `protocol`."""
    os.environ[ENV_ENABLE] = "1"
    os.environ[ENV_PROTOCOL] = protocol


def log_level(environ: Mapping[str, str] | None = None) -> str:
    """DISTSERVE_LOG_LEVEL: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case); INFO when unset."""
    raw = ((os.environ if environ is None else environ).get(ENV_LOG_LEVEL) or "INFO").strip().upper()
    if raw not in LOG_LEVELS:
        raise SettingsError(f"{ENV_LOG_LEVEL} must be one of {', '.join(LOG_LEVELS)}, not {raw!r}")
    return raw


def log_level_or_default() -> str:
    try:
        return log_level()
    except SettingsError:
        return "INFO"  # the engine process: the launcher already refused a bad level


def _number(env: Mapping[str, str], name: str, default: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not 0 < value <= high:  # also refuses nan and inf
        raise SettingsError(f"{name} must be > 0 and at most {high:g}, got {raw!r}")
    return value


def _host(env: Mapping[str, str]) -> str | None:
    raw = (env.get(ENV_TRANSFER_HOST) or "").strip()
    if not raw:
        return None
    if any(c.isspace() for c in raw) or "/" in raw or len(raw) > 253:
        raise SettingsError(f"{ENV_TRANSFER_HOST} must be a host name or address, got {raw!r}")
    return raw
