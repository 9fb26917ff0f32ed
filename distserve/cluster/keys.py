"""The etcd key schema: `/distserve/v1/<cluster>/<kind>/...` (documented in docs/keys.md).

| key                                  | value (distserve.cluster.records) | lease            |
| ------------------------------------ | ------------------------- | ---------------- |
| engines/<engine_id>                  | EngineRecord              | the engine agent |
| links/<prefill_id>/<decode_id>       | LinkRecord                | the decode agent |
| load/<engine_id>                     | LoadRecord                | the engine agent |
| state/<engine_id>                    | OperatorFlags             | none (operator)  |
| routers/<router_id>                  | RouterRecord              | the router       |
| config/routing                       | RoutingConfig             | none (operator)  |

Ids are restricted to [A-Za-z0-9._-] so a key splits unambiguously on "/".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMA_ROOT = "/distserve/v1"
DEFAULT_CLUSTER = "default"

ENGINES = "engines"
LINKS = "links"
LOAD = "load"
STATE = "state"
ROUTERS = "routers"
CONFIG = "config"
KINDS = (ENGINES, LINKS, LOAD, STATE, ROUTERS, CONFIG)

ROUTING_CONFIG_NAME = "routing"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_id(value: str, what: str = "id") -> str:
    if not _ID.match(value or ""):
        raise ValueError(f"invalid {what} {value!r}: use 1-128 characters of [A-Za-z0-9._-], starting alphanumeric")
    return value


def sanitize_id(value: str) -> str:
    """Turn free text (a host:port, a URL) into a valid id."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-._") or "x"
    return cleaned[:128]


@dataclass(frozen=True)
class ParsedKey:
    kind: str
    ids: tuple[str, ...]


class Keys:
    """Key builder and parser for one cluster."""

    def __init__(self, cluster: str = DEFAULT_CLUSTER) -> None:
        self.cluster = validate_id(cluster, "cluster name")
        self.root = f"{SCHEMA_ROOT}/{self.cluster}/"

    def prefix(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown key kind {kind!r}")
        return f"{self.root}{kind}/"

    def engine(self, engine_id: str) -> str:
        return f"{self.root}{ENGINES}/{engine_id}"

    def link(self, prefill_id: str, decode_id: str) -> str:
        return f"{self.root}{LINKS}/{prefill_id}/{decode_id}"

    def links_of_prefill(self, prefill_id: str) -> str:
        return f"{self.root}{LINKS}/{prefill_id}/"

    def load(self, engine_id: str) -> str:
        return f"{self.root}{LOAD}/{engine_id}"

    def state(self, engine_id: str) -> str:
        return f"{self.root}{STATE}/{engine_id}"

    def router(self, router_id: str) -> str:
        return f"{self.root}{ROUTERS}/{router_id}"

    def config(self, name: str = ROUTING_CONFIG_NAME) -> str:
        return f"{self.root}{CONFIG}/{name}"

    def parse(self, key: str | bytes) -> ParsedKey | None:
        """Split a key of this cluster into its kind and ids; None for anything else."""
        if isinstance(key, bytes):
            key = key.decode(errors="replace")
        if not key.startswith(self.root):
            return None
        parts = key[len(self.root):].split("/")
        if not parts or parts[0] not in KINDS:
            return None
        kind, ids = parts[0], tuple(parts[1:])
        expected = 2 if kind == LINKS else 1
        if len(ids) != expected or not all(_ID.match(i) for i in ids):
            return None
        return ParsedKey(kind, ids)
