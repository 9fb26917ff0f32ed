"""Rows shared by the tables and the JSON of `engines`, `links`, `routers`, `models`, `status`, `describe`.

Each row is a plain dict (the JSON form); tables pick and format columns from it.
"""

from __future__ import annotations

from typing import Any

from distserve.cluster.records import EngineRecord
from distserve.cluster.topology import link_usable, takes_new_requests

from .render import age, since
from .snapshot import ClusterSnapshot


def flags_dict(snap: ClusterSnapshot, engine_id: str) -> dict[str, Any]:
    flags = snap.flags_of(engine_id)
    if flags is None:
        return {"drain": False, "cordon": False, "reason": None}
    return {"drain": flags.drain, "cordon": flags.cordon, "reason": flags.reason,
            "updated_by": flags.updated_by, "updated_at": flags.updated_at}


def flags_text(flags: dict[str, Any]) -> str:
    names = [name for name in ("drain", "cordon") if flags.get(name)]
    return ",".join(names) or "-"


def load_dict(snap: ClusterSnapshot, engine_id: str) -> dict[str, Any] | None:
    load = snap.load_of(engine_id)
    if load is None:
        return None
    return {"running": load.running, "waiting": load.waiting, "in_flight": load.in_flight,
            "kv_blocks_free": load.kv_blocks_free, "kv_blocks_total": load.kv_blocks_total,
            "prefill_tokens_pending": load.prefill_tokens_pending, "preserved_blocks": load.preserved_blocks,
            "updated_at": load.updated_at, "age_s": since(load.updated_at, snap.taken_at)}


def load_text(load: dict[str, Any] | None) -> str:
    if load is None:
        return "-"
    text = f"{load['running']}r/{load['waiting']}w"
    if load.get("kv_blocks_total"):
        used = load["kv_blocks_total"] - (load.get("kv_blocks_free") or 0)
        text += f" kv {100 * used / load['kv_blocks_total']:.0f}%"
    return text


def peers_of(snap: ClusterSnapshot, engine: EngineRecord) -> tuple[list[str], list[str]]:
    """(usable peers, all linked peers) of an engine, by the shared routability rule."""
    engines = snap.engine_records
    usable, linked = [], []
    for entry in snap.links_of(engine.id):
        link = entry.record
        peer = link.decode_id if link.prefill_id == engine.id else link.prefill_id
        linked.append(peer)
        if link_usable(link, engines):
            usable.append(peer)
    return usable, linked


def routable_ids(snap: ClusterSnapshot) -> set[str]:
    topo = snap.topology
    return {*topo.routable_prefills, *topo.routable_decodes, *topo.routable_hybrids}


def why_not_routable(snap: ClusterSnapshot, engine_id: str, routable: set[str] | None = None) -> str | None:
    """None when the shared rule routes to this engine, else the first reason it does not."""
    if engine_id in (routable if routable is not None else routable_ids(snap)):
        return None
    engine = snap.engines[engine_id].record
    if engine.state != "ready":
        return f"state {engine.state}" + (f" ({engine.state_reason})" if engine.state_reason else "")
    flags = snap.flags_of(engine_id)
    if not takes_new_requests(engine, flags):
        return "drained by an operator" if flags and flags.drain else "cordoned by an operator"
    usable, _ = peers_of(snap, engine)
    if not usable:
        return "no usable link"
    return "no linked peer takes new requests"


def engine_row(snap: ClusterSnapshot, engine_id: str, routable: set[str] | None = None) -> dict[str, Any]:
    entry = snap.engines[engine_id]
    engine = entry.record
    usable, linked = peers_of(snap, engine)
    flags = flags_dict(snap, engine_id)
    reason = why_not_routable(snap, engine_id, routable if routable is not None else routable_ids(snap))
    return {
        "id": engine.id,
        "role": engine.role,
        "url": engine.url,
        "models": list(engine.models),
        "state": engine.state,
        "state_reason": engine.state_reason,
        "flags": flags,
        "routable": reason is None,
        "not_routable_because": reason,
        "load": load_dict(snap, engine_id),
        "links": {"usable": len(usable), "total": len(linked), "peers": usable},
        "lease": {"id": entry.lease, "ttl_left_s": snap.ttl_of(entry.lease)},
        "incarnation": engine.incarnation,
        "incarnation_age_s": since(engine.registered_at, snap.taken_at),
        "engine_kind": engine.engine_kind,
        "software_version": engine.software_version,
        "schema_version": engine.schema_version,
    }


ENGINE_COLUMNS = ("ID", "ROLE", "URL", "MODELS", "STATE", "FLAGS", "LOAD", "LINKS", "LEASE TTL", "INCARNATION AGE")


def engine_cells(row: dict[str, Any]) -> list[Any]:
    ttl = row["lease"]["ttl_left_s"]
    state = row["state"] + ("" if row["routable"] else " (not routable)")
    return [
        row["id"], row["role"], row["url"], row["models"], state, flags_text(row["flags"]),
        load_text(row["load"]), f"{row['links']['usable']}/{row['links']['total']}",
        "-" if ttl is None else ("gone" if ttl < 0 else f"{ttl}s"), age(row["incarnation_age_s"]),
    ]


def link_row(snap: ClusterSnapshot, pair: tuple[str, str]) -> dict[str, Any]:
    entry = snap.links[pair]
    link = entry.record
    engines = snap.engine_records
    problems = []
    for side, engine_id, incarnation in (("prefill", link.prefill_id, link.prefill_incarnation),
                                         ("decode", link.decode_id, link.decode_incarnation)):
        engine = engines.get(engine_id)
        if engine is None:
            problems.append(f"{side} {engine_id} not registered")
        elif engine.incarnation != incarnation:
            problems.append(f"{side} {engine_id} incarnation changed")
    return {
        "prefill_id": link.prefill_id,
        "decode_id": link.decode_id,
        "state": link.state,
        "usable": link_usable(link, engines),
        "problems": problems,
        "protocol": link.protocol,
        "handshake_ms": link.handshake_ms,
        "established_at": link.established_at,
        "age_s": since(link.established_at, snap.taken_at),
        "prefill_incarnation": link.prefill_incarnation,
        "decode_incarnation": link.decode_incarnation,
        "error": link.error,
        "lease": {"id": entry.lease, "ttl_left_s": snap.ttl_of(entry.lease)},
    }


LINK_COLUMNS = ("PREFILL", "DECODE", "STATE", "USABLE", "PROTOCOL", "HANDSHAKE", "AGE", "NOTE")


def link_cells(row: dict[str, Any]) -> list[Any]:
    hs = row["handshake_ms"]
    note = "; ".join(row["problems"]) or row["error"] or ""
    return [row["prefill_id"], row["decode_id"], row["state"], row["usable"], row["protocol"],
            "-" if hs is None else f"{hs:.0f} ms", age(row["age_s"]), note]


def router_row(snap: ClusterSnapshot, router_id: str) -> dict[str, Any]:
    entry = snap.routers[router_id]
    router = entry.record
    return {
        "id": router.id,
        "url": router.url,
        "version": router.version,
        "schema_version": router.schema_version,
        "strategy": router.strategy,
        "in_flight": router.in_flight,
        "requests_total": router.requests_total,
        "view_revision": router.view_revision,
        "view_lag_revisions": max(0, snap.revision - router.view_revision) if router.view_revision else None,
        "hostname": router.hostname,
        "pid": router.pid,
        "age_s": since(router.started_at, snap.taken_at),
        "updated_age_s": since(router.updated_at, snap.taken_at),
        "lease": {"id": entry.lease, "ttl_left_s": snap.ttl_of(entry.lease)},
    }


ROUTER_COLUMNS = ("ID", "URL", "VERSION", "SCHEMA", "STRATEGY", "IN FLIGHT", "REQUESTS", "VIEW REV", "AGE",
                  "LEASE TTL")


def router_cells(row: dict[str, Any]) -> list[Any]:
    ttl = row["lease"]["ttl_left_s"]
    return [row["id"], row["url"], row["version"] or "-", row["schema_version"], row["strategy"] or "-",
            row["in_flight"], row["requests_total"], row["view_revision"] or "-", age(row["age_s"]),
            "-" if ttl is None else ("gone" if ttl < 0 else f"{ttl}s")]


def model_rows(snap: ClusterSnapshot) -> list[dict[str, Any]]:
    routable = routable_ids(snap)
    routable_models = set(snap.topology.models())
    models: dict[str, dict[str, Any]] = {}
    for engine_id, entry in sorted(snap.engines.items()):
        for model in entry.record.models:
            row = models.setdefault(model, {
                "model": model, "routable": model in routable_models,
                "engines": {"prefill": [], "decode": [], "hybrid": []},
                "routable_engines": {"prefill": [], "decode": [], "hybrid": []},
            })
            row["engines"][entry.record.role].append(engine_id)
            if engine_id in routable:
                row["routable_engines"][entry.record.role].append(engine_id)
    return [models[m] for m in sorted(models)]


MODEL_COLUMNS = ("MODEL", "ROUTABLE", "PREFILL", "DECODE", "HYBRID")


def model_cells(row: dict[str, Any]) -> list[Any]:
    def count(role: str) -> str:
        return f"{len(row['routable_engines'][role])}/{len(row['engines'][role])}"

    return [row["model"], row["routable"], count("prefill"), count("decode"), count("hybrid")]


def possible_pairs(snap: ClusterSnapshot) -> list[tuple[str, str]]:
    """Prefill/decode pairs that could be linked: a shared model and compatible geometry."""
    return sorted((p.id, d.id) for p, d, reason in same_model_pairs(snap) if reason is None)


def same_model_pairs(snap: ClusterSnapshot) -> list[tuple[EngineRecord, EngineRecord, str | None]]:
    """(prefill, decode, why they cannot be linked or None) for every pair sharing a model, sorted by ids.

    A fleet has few distinct geometries: each distinct (prefill, decode) geometry pair is compared once."""
    engines = sorted(snap.engine_records.values(), key=lambda e: e.id)
    geometry = {e.id: e.engine_info.model_dump_json() for e in engines}
    decodes_by_model: dict[str, list[EngineRecord]] = {}
    for d in engines:
        if d.role == "decode":
            for model in d.models:
                decodes_by_model.setdefault(model, []).append(d)
    verdicts: dict[tuple[str, str], str | None] = {}
    out = []
    for p in engines:
        if p.role != "prefill":
            continue
        seen: set[str] = set()
        for model in p.models:
            for d in decodes_by_model.get(model, ()):
                if d.id in seen:
                    continue
                seen.add(d.id)
                key = (geometry[p.id], geometry[d.id])
                if key not in verdicts:
                    verdicts[key] = p.engine_info.compatible_with(d.engine_info)
                out.append((p, d, verdicts[key]))
    out.sort(key=lambda t: (t[0].id, t[1].id))
    return out
