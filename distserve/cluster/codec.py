"""Key + raw value -> (kind, ids, typed record): the one decoder of the key schema.

Every reader (router cache, agent, distserve-ctl snapshot and watch) decodes with it, so they agree on what a
value means and on which values are malformed: a value that fails its record's schema, a record whose ids
differ from its key's (engines/P1 holding {"id": "P2"}), a config other than config/routing, or a key
outside the schema. All of them raise `MalformedValue` (a `discovery.record.MalformedRecord`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from discovery.record import MalformedRecord, VersionedRecord
from distserve.cluster import keys as K, records

R = TypeVar("R", bound=VersionedRecord)

RECORD_TYPES: dict[str, type[VersionedRecord]] = {
    K.ENGINES: records.EngineRecord,
    K.LINKS: records.LinkRecord,
    K.LOAD: records.LoadRecord,
    K.STATE: records.OperatorFlags,
    K.ROUTERS: records.RouterRecord,
    K.CONFIG: records.RoutingConfig,
}
# Kinds whose keys live under a holder's lease (a key there without a live lease is stale).
LEASED_KINDS = (K.ENGINES, K.LINKS, K.LOAD, K.ROUTERS)


class MalformedValue(MalformedRecord):
    """A value under the schema that is not a valid record for its key. `str()` is one line, for logs."""


@dataclass(frozen=True)
class Decoded(Generic[R]):
    kind: str
    ids: tuple[str, ...]
    record: R


def named_ids(kind: str, record: Any) -> tuple[str, ...] | None:
    """The ids a record names itself (None for kinds whose records carry none: state, config)."""
    if kind in (K.ENGINES, K.ROUTERS):
        return (record.id,)
    if kind == K.LINKS:
        return (record.prefill_id, record.decode_id)
    if kind == K.LOAD:
        return (record.engine_id,)
    return None


def decode_value(kind: str, ids: tuple[str, ...], raw: bytes | str) -> VersionedRecord:
    """The typed record for a key of `kind` with `ids` (as `Keys.parse` returns them); raises MalformedValue."""
    if kind == K.CONFIG and ids != (K.ROUTING_CONFIG_NAME,):
        raise MalformedValue(f"unknown config {'/'.join(ids)!r}")
    try:
        model = RECORD_TYPES[kind]
    except KeyError:
        raise MalformedValue(f"unknown key kind {kind!r}") from None
    try:
        record = model.decode(raw)
    except MalformedValue:
        raise
    except MalformedRecord as exc:
        raise MalformedValue(str(exc)) from None
    named = named_ids(kind, record)
    if named is not None and named != ids:
        raise MalformedValue(f"{model.__name__} names {'/'.join(named)} but sits under {'/'.join(ids)}")
    return record


class Codec:
    """Decodes the keys of one cluster (`Keys`)."""

    def __init__(self, keys: K.Keys) -> None:
        self.keys = keys

    def parse(self, key: str | bytes) -> K.ParsedKey | None:
        return self.keys.parse(key)

    def decode(self, key: str, raw: bytes | str) -> Decoded[VersionedRecord]:
        """Kind, ids and typed record of one key; raises MalformedValue, also for a key outside the schema."""
        parsed = self.keys.parse(key)
        if parsed is None:
            raise MalformedValue(f"not a key of cluster {self.keys.cluster!r}'s schema: {key}")
        return Decoded(parsed.kind, parsed.ids, decode_value(parsed.kind, parsed.ids, raw))

    def record(self, kind: str, key: str, raw: bytes | str) -> VersionedRecord:
        """`decode` for a key expected to be of `kind`: the typed record alone."""
        decoded = self.decode(key, raw)
        if decoded.kind != kind:
            raise MalformedValue(f"expected a {kind} key, got {key}")
        return decoded.record

    def engine(self, key: str, raw: bytes | str) -> records.EngineRecord:
        return self.record(K.ENGINES, key, raw)  # type: ignore[return-value]

    def link(self, key: str, raw: bytes | str) -> records.LinkRecord:
        return self.record(K.LINKS, key, raw)  # type: ignore[return-value]

    def load(self, key: str, raw: bytes | str) -> records.LoadRecord:
        return self.record(K.LOAD, key, raw)  # type: ignore[return-value]

    def flags(self, key: str, raw: bytes | str) -> records.OperatorFlags:
        return self.record(K.STATE, key, raw)  # type: ignore[return-value]

    def router(self, key: str, raw: bytes | str) -> records.RouterRecord:
        return self.record(K.ROUTERS, key, raw)  # type: ignore[return-value]

    def routing_config(self, key: str, raw: bytes | str) -> records.RoutingConfig:
        return self.record(K.CONFIG, key, raw)  # type: ignore[return-value]
