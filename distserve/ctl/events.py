"""Turn raw etcd changes under a cluster's prefix into operator events in plain words.

`EventNarrator` keeps the last value of every key (seeded with the state just before the first event),
so it can say what changed: "engine P3 lease expired" (the record vanished while the engine was not
shutting down) versus "engine P3 deregistered" (it was draining: a graceful stop), "link P1→D2
established in 12 ms", "router r2 joined", "D1 draining". Heartbeat-like rewrites (load updates, a router
refreshing its counters, a link re-put unchanged) are marked `quiet` and hidden unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from discovery.record import VersionedRecord
from distserve.cluster import keys as K
from distserve.cluster.codec import MalformedValue, decode_value
from distserve.cluster.records import EngineRecord, LinkRecord, LoadRecord, OperatorFlags, RouterRecord, RoutingConfig


@dataclass
class OpsEvent:
    revision: int
    seq: int  # position among the events of this revision under the watched prefix
    type: str  # "put" | "delete"
    key: str
    kind: str | None
    ids: tuple[str, ...]
    event: str  # a stable code, e.g. "engine.lease_expired"
    message: str  # plain words
    quiet: bool = False  # a heartbeat-like rewrite, hidden by default
    value: dict[str, Any] | None = None
    lease: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def resume(self) -> str:
        """What to pass to `watch --since-rev` to continue right after this event."""
        return f"{self.revision}:{self.seq + 1}"

    def to_json(self) -> dict[str, Any]:
        out = {"revision": self.revision, "seq": self.seq, "resume": self.resume, "type": self.type,
               "event": self.event, "message": self.message, "key": self.key, "kind": self.kind}
        if self.kind == K.LINKS and len(self.ids) == 2:
            out["prefill_id"], out["decode_id"] = self.ids
        elif self.ids:
            out["id"] = self.ids[0]
        if self.details:
            out["details"] = self.details
        out["lease"] = self.lease
        out["value"] = self.value
        return out


def _subject(ids: tuple[str, ...]) -> str:
    return "→".join(ids)


class EventNarrator:
    def __init__(self, keys: K.Keys, state: dict[str, bytes] | None = None, *, prior_known: bool = True) -> None:
        self.keys = keys
        self._raw: dict[str, bytes] = dict(state or {})
        # False when the state before the first event could not be read (history compacted):
        # then a delete cannot say how the key went.
        self.prior_known = prior_known
        self._deleted_engines: dict[int, set[str]] = {}

    def _decode(self, key: str, raw: bytes | None) -> VersionedRecord | None:
        if raw is None:
            return None
        parsed = self.keys.parse(key)
        if parsed is None:
            return None
        try:
            return decode_value(parsed.kind, parsed.ids, raw)
        except MalformedValue:
            return None

    def narrate(self, type_: str, key: str, value: bytes | None, revision: int, seq: int,
                lease: int = 0, create_revision: int = 0) -> OpsEvent:
        old_raw = self._raw.get(key)
        had_key = key in self._raw
        if type_ == "put":
            self._raw[key] = value or b""
        else:
            self._raw.pop(key, None)
        parsed = self.keys.parse(key)
        ev = OpsEvent(revision, seq, type_, key, parsed.kind if parsed else None, parsed.ids if parsed else (),
                      "key.changed", "", lease=lease)
        if parsed is None:
            ev.message = f"{type_} {key} (outside the distserve schema)"
            return ev
        new = None
        if type_ == "put":
            try:
                new = decode_value(parsed.kind, parsed.ids, value or b"")
            except MalformedValue as exc:
                ev.event, ev.message = "record.malformed", f"unreadable value written at {key[len(self.keys.root):]}: {exc}"
                return ev
            ev.value = new.model_dump(mode="json")
        old = self._decode(key, old_raw)
        handler = getattr(self, f"_{parsed.kind}")
        handler(ev, parsed.ids, old, new, had_key)
        return ev

    # --- one method per key kind ------------------------------------------------------------------
    def _engines(self, ev: OpsEvent, ids: tuple[str, ...], old: Any, new: Any, had_key: bool) -> None:
        engine_id = ids[0]
        if new is None:
            self._deleted_engines.setdefault(ev.revision, set()).add(engine_id)
            self._deleted_engines = {r: s for r, s in self._deleted_engines.items() if r >= ev.revision - 1}
            if not had_key and not self.prior_known:
                ev.event, ev.message = "engine.removed", f"engine {engine_id} removed (lease expired or revoked)"
            elif isinstance(old, EngineRecord) and old.state == "draining":
                ev.event, ev.message = "engine.deregistered", f"engine {engine_id} deregistered (graceful stop)"
            else:
                last = f" (it was {old.state})" if isinstance(old, EngineRecord) and old.state != "ready" else ""
                ev.event, ev.message = "engine.lease_expired", f"engine {engine_id} lease expired{last}"
            return
        assert isinstance(new, EngineRecord)
        models = ", ".join(new.models) or "no model"
        if not isinstance(old, EngineRecord):
            ev.event = "engine.registered"
            ev.message = (f"engine {engine_id} registered: {new.role} at {new.url} serving {models}, "
                          f"state {new.state}, incarnation {new.incarnation}")
            return
        if old.incarnation != new.incarnation:
            ev.event = "engine.reregistered"
            ev.message = (f"engine {engine_id} re-registered as a new incarnation "
                          f"({old.incarnation} → {new.incarnation}), state {new.state}")
            return
        if old.state != new.state:
            reason = f": {new.state_reason}" if new.state_reason else ""
            ev.event, ev.message = f"engine.{new.state}", f"engine {engine_id} {new.state}{reason}"
            ev.details = {"from": old.state, "to": new.state}
            return
        changed = [f for f in ("url", "models", "role", "engine_info", "transfer", "software_version", "state_reason")
                   if getattr(old, f) != getattr(new, f)]
        if changed:
            ev.event, ev.message = "engine.updated", f"engine {engine_id} updated: {', '.join(changed)}"
        else:
            ev.event, ev.message, ev.quiet = "engine.refreshed", f"engine {engine_id} record refreshed", True

    def _links(self, ev: OpsEvent, ids: tuple[str, ...], old: Any, new: Any, had_key: bool) -> None:
        name = f"link {_subject(ids)}"
        if new is None:
            gone = [i for i in ids if i in self._deleted_engines.get(ev.revision, set())]
            tail = f" ({' and '.join(gone)} gone)" if gone else ""
            ev.event, ev.message = "link.removed", f"{name} removed{tail}"
            return
        assert isinstance(new, LinkRecord)
        same_pair = isinstance(old, LinkRecord) and (old.prefill_incarnation, old.decode_incarnation) == (
            new.prefill_incarnation, new.decode_incarnation)
        if isinstance(old, LinkRecord) and same_pair and old.state == new.state:
            ev.event, ev.message, ev.quiet = "link.refreshed", f"{name} record refreshed", True
            return
        if new.state == "established":
            took = f" in {new.handshake_ms:.0f} ms" if new.handshake_ms is not None else ""
            ev.event, ev.message = "link.established", f"{name} established{took} ({new.protocol})"
            ev.details = {"handshake_ms": new.handshake_ms}
        elif new.state == "failed":
            ev.event, ev.message = "link.failed", f"{name} failed: {new.error or 'no error given'}"
        else:
            ev.event, ev.message = "link.establishing", f"{name} establishing"

    def _load(self, ev: OpsEvent, ids: tuple[str, ...], old: Any, new: Any, had_key: bool) -> None:
        ev.quiet = True
        if new is None:
            ev.event, ev.message = "load.removed", f"load of {ids[0]} removed"
            return
        assert isinstance(new, LoadRecord)
        kv = ""
        if new.kv_blocks_total:
            kv = f", {new.kv_blocks_free}/{new.kv_blocks_total} KV blocks free"
        ev.event = "load.updated"
        ev.message = f"load {ids[0]}: {new.running} running, {new.waiting} waiting{kv}"

    def _state(self, ev: OpsEvent, ids: tuple[str, ...], old: Any, new: Any, had_key: bool) -> None:
        engine_id = ids[0]
        before = old if isinstance(old, OperatorFlags) else OperatorFlags()
        after = new if isinstance(new, OperatorFlags) else OperatorFlags()
        parts, codes = [], []
        if after.drain != before.drain:
            parts.append("draining" if after.drain else "drain lifted")
            codes.append("drain" if after.drain else "undrain")
        if after.cordon != before.cordon:
            parts.append("cordoned" if after.cordon else "uncordoned")
            codes.append("cordon" if after.cordon else "uncordon")
        who = []
        if new is not None and after.updated_by:
            who.append(f"by {after.updated_by}")
        if new is not None and after.reason:
            who.append(f"reason: {after.reason}")
        suffix = f" ({'; '.join(who)})" if who else ""
        if not parts:
            if new is None:
                ev.event, ev.message = "flags.cleared", f"{engine_id} operator flags cleared"
            else:
                ev.event, ev.message = "flags.updated", f"{engine_id} operator flags updated{suffix}"
            return
        ev.event = "flags." + "+".join(codes)
        ev.message = f"{engine_id} {' and '.join(parts)}{suffix}"

    def _routers(self, ev: OpsEvent, ids: tuple[str, ...], old: Any, new: Any, had_key: bool) -> None:
        router_id = ids[0]
        if new is None:
            ev.event, ev.message = "router.left", f"router {router_id} left"
            return
        assert isinstance(new, RouterRecord)
        if not isinstance(old, RouterRecord):
            strategy = f", strategy {new.strategy}" if new.strategy else ""
            version = f" {new.version}" if new.version else ""
            ev.event, ev.message = "router.joined", f"router {router_id} joined at {new.url}{version}{strategy}"
            return
        if old.strategy != new.strategy:
            ev.event, ev.message = "router.strategy", f"router {router_id} now routes with {new.strategy}"
            return
        if (old.url, old.version, old.started_at) != (new.url, new.version, new.started_at):
            ev.event, ev.message = "router.restarted", f"router {router_id} restarted ({new.version or 'unknown version'})"
            return
        ev.event = "router.refreshed"
        ev.message = f"router {router_id}: {new.in_flight} in flight, {new.requests_total} requests, view at revision {new.view_revision}"
        ev.quiet = True

    def _config(self, ev: OpsEvent, ids: tuple[str, ...], old: Any, new: Any, had_key: bool) -> None:
        if new is None:
            ev.event, ev.message = "config.removed", "routing config removed (routers use their defaults)"
            return
        assert isinstance(new, RoutingConfig)
        before = old if isinstance(old, RoutingConfig) else RoutingConfig()
        changes = []
        if before.strategy != new.strategy:
            changes.append(f"strategy {before.strategy} → {new.strategy}")
        for table in ("weights", "params"):
            a, b = getattr(before, table), getattr(new, table)
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    changes.append(f"{table}.{name} {a.get(name, '-')} → {b.get(name, '-')}")
        ev.event = "config.changed"
        ev.message = "routing config changed: " + ("; ".join(changes) if changes else "rewritten, same values")
