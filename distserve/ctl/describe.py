"""`describe engine|link|router ID`: everything known about one object, transfer metadata included."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from datetime import datetime
from typing import Any

import orjson
from rich.console import Group
from rich.panel import Panel

from distserve.cluster.keys import validate_id
from distserve.cluster.settings import cluster_token

from . import views
from .context import Ctx
from .errors import UnknownId, UsageError
from .render import age, cell, lease_text, make_table
from .snapshot import ClusterSnapshot, load_snapshot

_LINK_ID = re.compile(r"^\s*([^/,>→\s]+)\s*(?:/|,|->|→)\s*([^/,>→\s]+)\s*$")


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("describe", help="everything known about one engine, link or router"))
    p.add_argument("kind", choices=("engine", "link", "router"))
    p.add_argument("ids", nargs="+", metavar="ID", help="engine or router id; a link is PREFILL/DECODE (or PREFILL DECODE)")
    p.set_defaults(_run=run_describe)


def _kv_meta(entry: Any, snap: ClusterSnapshot) -> dict[str, Any]:
    kv = entry.kv
    return {"key": entry.key, "create_revision": kv.create_revision, "mod_revision": kv.mod_revision,
            "version": kv.version, "lease": kv.lease, "lease_ttl_left_s": snap.ttl_of(kv.lease)}


def parse_link_id(ids: list[str]) -> tuple[str, str]:
    if len(ids) == 2:
        return ids[0], ids[1]
    match = _LINK_ID.match(ids[0]) if len(ids) == 1 else None
    if not match:
        raise UsageError(f"a link id is PREFILL/DECODE (or PREFILL→DECODE), not {' '.join(ids)!r}")
    return _valid(match.group(1), "engine id"), _valid(match.group(2), "engine id")


def _valid(ident: str, what: str) -> str:
    try:
        return validate_id(ident, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def run_describe(ctx: Ctx, args: argparse.Namespace) -> int:
    # bad arguments are told apart from unknown ids (exit 1) before etcd is read
    if args.kind == "link":
        pair = parse_link_id(args.ids)
    elif len(args.ids) != 1:
        raise UsageError(f"describe {args.kind} takes one id, not {len(args.ids)}")
    else:
        _valid(args.ids[0], f"{args.kind} id")
    snap = await load_snapshot(ctx.client, ctx.keys)
    if args.kind == "engine":
        doc = describe_engine(snap, args.ids[0])
        record = snap.engines[args.ids[0]].record
        doc["cache"] = await engine_cache(record.url, cache_events_path(record), min(ctx.timeout, 3.0))
    elif args.kind == "link":
        doc = describe_link(snap, pair)
    else:
        doc = describe_router(snap, args.ids[0])
    doc = {"cluster": ctx.keys.cluster, "revision": snap.revision, **doc}
    if ctx.out.json_mode:
        ctx.out.json(doc)
    else:
        ctx.out.print(render_doc(doc))
    return 0


def describe_engine(snap: ClusterSnapshot, engine_id: str) -> dict[str, Any]:
    entry = snap.engines.get(engine_id)
    if entry is None:
        raise UnknownId("engine", engine_id, list(snap.engines))
    engine = entry.record
    row = views.engine_row(snap, engine_id)
    # Geometry against every engine of the other role serving a shared model.
    other_role = {"prefill": "decode", "decode": "prefill"}.get(engine.role)
    counterparts = []
    for other_id, other in sorted(snap.engines.items()):
        rec = other.record
        if other_role is None or rec.role != other_role or not set(rec.models) & set(engine.models):
            continue
        prefill, decode = (engine, rec) if engine.role == "prefill" else (rec, engine)
        counterparts.append({"engine": other_id, "compatible": prefill.engine_info.compatible_with(decode.engine_info) is None,
                             "mismatch": prefill.engine_info.compatible_with(decode.engine_info),
                             "linked": (prefill.id, decode.id) in snap.links})
    return {
        "kind": "engine",
        "id": engine_id,
        "summary": {k: row[k] for k in ("role", "url", "models", "state", "state_reason", "routable",
                                         "not_routable_because", "incarnation", "incarnation_age_s")},
        "etcd": _kv_meta(entry, snap),
        "flags": row["flags"],
        "load": row["load"],
        "links": [views.link_row(snap, (e.record.prefill_id, e.record.decode_id)) for e in snap.links_of(engine_id)],
        "counterparts": counterparts,
        "record": engine.model_dump(mode="json"),
    }


def describe_link(snap: ClusterSnapshot, pair: tuple[str, str]) -> dict[str, Any]:
    entry = snap.links.get(pair)
    if entry is None:
        raise UnknownId("link", f"{pair[0]}/{pair[1]}", [f"{p}/{d}" for p, d in snap.links])
    row = views.link_row(snap, pair)
    engines = {}
    for side, engine_id in (("prefill", pair[0]), ("decode", pair[1])):
        engine = snap.engines.get(engine_id)
        engines[side] = None if engine is None else {
            "id": engine_id, "url": engine.record.url, "state": engine.record.state,
            "incarnation": engine.record.incarnation, "transfer": engine.record.transfer.model_dump(mode="json"),
            "engine_info": engine.record.engine_info.model_dump(mode="json"),
        }
    return {"kind": "link", "id": f"{pair[0]}/{pair[1]}", "summary": row, "etcd": _kv_meta(entry, snap),
            "engines": engines, "record": entry.record.model_dump(mode="json")}


def describe_router(snap: ClusterSnapshot, router_id: str) -> dict[str, Any]:
    entry = snap.routers.get(router_id)
    if entry is None:
        raise UnknownId("router", router_id, list(snap.routers))
    return {"kind": "router", "id": router_id, "summary": views.router_row(snap, router_id),
            "etcd": _kv_meta(entry, snap), "record": entry.record.model_dump(mode="json")}


# --- prefix cache (issue 18) --------------------------------------------------------------------------
HIT_TOKENS = "distserve_engine_prefix_cache_hit_tokens_total"
PROMPT_TOKENS = "distserve_engine_prompt_tokens_total"
CACHE_BLOCKS = "distserve_engine_prefix_cache_blocks"


def cache_events_path(record: Any) -> str | None:
    """The engine's cache-state stream path, from its record's `cache_events` capability (None: no stream)."""
    info = getattr(record, "cache_events", None)
    path = info.get("path") if isinstance(info, dict) else getattr(info, "path", None)
    return path if isinstance(path, str) and path.startswith("/") else None


def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named metric's samples in a Prometheus text page (absent names are left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return out


def hit_rate(metrics: dict[str, float]) -> float | None:
    prompt = metrics.get(PROMPT_TOKENS)
    hits = metrics.get(HIT_TOKENS)
    if prompt is None or hits is None:
        return None
    return round(hits / prompt, 4) if prompt > 0 else 0.0


def _auth() -> dict[str, str]:
    token = cluster_token()  # engines take the cluster token as their API key (DISTSERVE_CLUSTER_TOKEN)
    return {"Authorization": f"Bearer {token}"} if token else {}


async def engine_metrics(session: Any, url: str) -> dict[str, float] | str:
    """The engine's prefix-cache figures from its /metrics, or a one-line error."""
    import aiohttp  # here: ctl's cold start loads aiohttp only for commands that call an engine

    try:
        async with session.get(url.rstrip("/") + "/metrics", headers=_auth()) as resp:
            if resp.status != 200:
                return f"/metrics answered HTTP {resp.status}"
            return parse_metrics(await resp.text(), (HIT_TOKENS, PROMPT_TOKENS, CACHE_BLOCKS))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        return f"/metrics: {type(exc).__name__} {exc}".strip()[:200]


async def stream_snapshot(session: Any, url: str, path: str, max_bytes: int = 64 << 20) -> dict | str:
    """The first line (a snapshot) of the engine's cache-state stream, read once, or a one-line error."""
    import aiohttp  # here: ctl's cold start loads aiohttp only for commands that call an engine

    try:
        async with session.get(url.rstrip("/") + path, headers=_auth()) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                buf += chunk
                if b"\n" in buf or len(buf) > max_bytes:
                    break
            msg = orjson.loads(bytes(buf.split(b"\n", 1)[0]))
            if not isinstance(msg, dict) or msg.get("type") != "snapshot" or not isinstance(msg.get("keys"), list):
                return "the stream did not start with a snapshot"
            return msg
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        return f"{type(exc).__name__} {exc}".strip()[:200]


async def engine_cache(url: str, path: str | None, timeout: float) -> dict[str, Any]:
    """describe's `cache` section: the stream's state and size (one snapshot, read with a timeout) and the
    hit rate from the engine's metrics. Nothing here fails the command: an engine that does not answer
    shows why."""
    import aiohttp  # here: ctl's cold start loads aiohttp only for commands that call an engine

    out: dict[str, Any] = {"stream": "none (the engine publishes no cache_events capability)" if path is None
                           else path}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        jobs = [engine_metrics(session, url)]
        if path is not None:
            jobs.append(stream_snapshot(session, url, path))
        results = await asyncio.gather(*jobs)
    metrics = results[0]
    if isinstance(metrics, str):
        out["metrics_error"] = metrics
    else:
        out["hit_rate"] = hit_rate(metrics)
        out["prompt_tokens"] = metrics.get(PROMPT_TOKENS)
        out["hit_tokens"] = metrics.get(HIT_TOKENS)
        out["cached_blocks"] = metrics.get(CACHE_BLOCKS)
    if path is not None:
        snap = results[1]
        if isinstance(snap, str):
            out["stream_state"] = f"unreachable: {snap}"
        else:
            out["stream_state"] = "ok"
            out["cached_keys"] = len(snap["keys"])
            out["seq"] = snap.get("seq")
            out["incarnation"] = snap.get("incarnation")
            out["block_size"] = snap.get("block_size")
    return out


# --- people -----------------------------------------------------------------------------------------
def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if isinstance(data, dict) and data:
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            rows += _flatten(value, f"{prefix}[{i}]")
    else:
        leaf = prefix.rsplit(".", 1)[-1]
        if isinstance(data, int) and not isinstance(data, bool) and leaf.endswith("ttl_left_s") and data < 0:
            text = "gone"  # TimeToLive answers -1 for a lease that no longer exists
        elif isinstance(data, (int, float)) and not isinstance(data, bool) and leaf.endswith("_s"):
            text = age(data)
        elif isinstance(data, (int, float)) and not isinstance(data, bool) and leaf.endswith("_at"):
            text = datetime.fromtimestamp(data).isoformat(sep=" ", timespec="milliseconds")
        elif isinstance(data, int) and not isinstance(data, bool) and (leaf == "lease" or prefix.endswith("lease.id")):
            text = lease_text(data)
        elif isinstance(data, (list, dict)):
            text = ", ".join(str(v) for v in data) if isinstance(data, list) and data else (json.dumps(data) if data else "-")
        else:
            text = cell(data)
        rows.append((prefix, text))
    return rows


def render_doc(doc: dict[str, Any]) -> Any:
    title = f"{doc['kind']} {doc['id']} · cluster {doc['cluster']} · revision {doc['revision']}"
    parts = []
    for section in ("summary", "etcd", "flags", "load", "cache"):
        if section in doc:
            parts.append(make_table(section, ("FIELD", "VALUE"), _flatten(doc[section]) or [("-", "-")]))
    if doc["kind"] == "engine":
        parts.append(make_table(f"links ({len(doc['links'])})", views.LINK_COLUMNS,
                                (views.link_cells(r) for r in doc["links"])))
        parts.append(make_table("counterparts (same model, other role)", ("ENGINE", "COMPATIBLE", "MISMATCH", "LINKED"),
                                ((c["engine"], c["compatible"], c["mismatch"], c["linked"]) for c in doc["counterparts"])))
    if doc["kind"] == "link":
        for side, engine in doc["engines"].items():
            rows = _flatten(engine) if engine else [("-", "not registered")]
            parts.append(make_table(f"{side} engine", ("FIELD", "VALUE"), rows))
    parts.append(make_table("record (as stored in etcd)", ("FIELD", "VALUE"), _flatten(doc["record"])))
    return Panel(Group(*parts), title=title, title_align="left", expand=False)
