"""The reference engine's environment: every DISTSERVE_* variable the engine process reads is read here,
typed and bounded (docs/configuration.md documents each once), except the shared DISTSERVE_CLUSTER_TOKEN
(distserve.cluster.settings). It lives in migration/, the engine's lowest layer, because the KV transport
(also used on its own by tools/bench_migration.py) reads its two tuning knobs from it.

`distserve engine` checks everything with `load()` at start-up: a bad value is one line on stderr, exit 2.
Importing the transport never fails on a bad value: it logs it and uses the default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("distserve.migration")

ENV_SPLIT_BYTES = "DISTSERVE_MIGRATION_SPLIT_BYTES"
ENV_SPREAD_BYTES = "DISTSERVE_MIGRATION_SPREAD_BYTES"
ENV_ENGINE_API_KEYS = "DISTSERVE_ENGINE_API_KEYS"

# (default, low, high) in bytes
SPLIT_BYTES = (4 << 20, 4 << 10, 1 << 30)  # 4 MiB; 4 KiB to 1 GiB
SPREAD_BYTES = (16 << 20, 0, 1 << 40)  # 16 MiB; 0 (always spread) to 1 TiB


class SettingsError(ValueError):
    """An environment variable out of its type or bounds (the message names it)."""


@dataclass(frozen=True)
class MigrationTuning:
    split_bytes: int = SPLIT_BYTES[0]  # contiguous ranges are cut into pieces of this size
    spread_bytes: int = SPREAD_BYTES[0]  # migrations this big are spread over every call allowed in flight


@dataclass(frozen=True)
class EngineEnv:
    tuning: MigrationTuning
    api_keys: tuple[str, ...]  # empty: none from the environment


def load(environ: Mapping[str, str] | None = None) -> EngineEnv:
    """Every variable, checked; raises SettingsError naming the one at fault."""
    env = os.environ if environ is None else environ
    return EngineEnv(tuning=migration_tuning(env), api_keys=engine_api_keys(env))


def migration_tuning(environ: Mapping[str, str] | None = None) -> MigrationTuning:
    env = os.environ if environ is None else environ
    return MigrationTuning(
        split_bytes=_bytes(env, ENV_SPLIT_BYTES, *SPLIT_BYTES),
        spread_bytes=_bytes(env, ENV_SPREAD_BYTES, *SPREAD_BYTES),
    )


def migration_tuning_or_default() -> MigrationTuning:
    """For module import: a bad value is logged and the default used (`distserve engine` refuses it)."""
    try:
        return migration_tuning()
    except SettingsError as e:
        log.warning("%s; using the defaults", e)
        return MigrationTuning()


def engine_api_keys(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """DISTSERVE_ENGINE_API_KEYS: comma-separated Bearer keys (spaces around each are dropped)."""
    raw = (os.environ if environ is None else environ).get(ENV_ENGINE_API_KEYS, "")
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    for k in keys:
        if not k.isprintable():  # control characters can never arrive in an HTTP header
            raise SettingsError(f"{ENV_ENGINE_API_KEYS}: a key must not contain control characters")
    return keys


def _bytes(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number of bytes") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be in {low}-{high} bytes, got {value}")
    return value
