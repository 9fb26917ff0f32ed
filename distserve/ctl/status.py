"""`status`: one screen: etcd health, members and leader; engines by role and state; links established of
possible; routers; models; warnings."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import asdict
from typing import Any

from rich.console import Group
from rich.text import Text

from distserve.cluster.records import RoutingConfig

from . import views
from .context import Ctx
from .render import make_table
from .snapshot import ClusterSnapshot, load_snapshot

ROLES = ("prefill", "decode", "hybrid")
STATES = ("ready", "starting", "draining", "unhealthy")


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("status", help="one screen: etcd, engines, links, routers, models, warnings"))
    p.set_defaults(_run=run_status)


def etcd_dict(status: Any) -> dict[str, Any]:
    members = [asdict(m) for m in status.members]
    return {"healthy": status.healthy, "leader": f"{status.leader:x}" if status.leader else None,
            "version": status.version, "revision": status.revision,
            "members": [{**m, "member_id": f"{m['member_id']:x}" if m["member_id"] else None} for m in members]}


def warnings_of(snap: ClusterSnapshot, etcd: dict[str, Any]) -> list[str]:
    out = []
    if etcd["leader"] is None:
        out.append("etcd has no leader")
    for m in etcd["members"]:
        if not m["healthy"]:
            out.append(f"etcd member {m['name'] or m['endpoint']} unhealthy: {m['error'] or 'no answer'}")
    for engine_id, entry in sorted(snap.engines.items()):
        if entry.record.state == "unhealthy":
            out.append(f"engine {engine_id} unhealthy" + (f": {entry.record.state_reason}" if entry.record.state_reason else ""))
    for row in views.model_rows(snap):
        if not row["routable"]:
            out.append(f"model {row['model']} has no routable path")
    routing = routing_dict(snap)
    if not routing["valid"]:
        out.append(f"routing config (revision {routing['revision']}) is invalid, routers ignore it and keep "
                   f"their last good config: {routing['error']}")
    for bad in snap.malformed:
        if bad.key != snap.keys.config():
            out.append(f"unreadable value at {bad.key}: {bad.reason}")
    if snap.engines and not snap.routers:
        out.append("no router is registered")
    return out


def routing_dict(snap: ClusterSnapshot) -> dict[str, Any]:
    """The stored routing config: strategy, revision (None: never written, the defaults) and validity."""
    for bad in snap.malformed:
        if bad.key == snap.keys.config():
            return {"strategy": None, "revision": getattr(bad.kv, "mod_revision", None), "valid": False,
                    "error": bad.reason.removeprefix("RoutingConfig: ")}
    entry = snap.routing
    if entry is None:
        return {"strategy": RoutingConfig().strategy, "revision": None, "valid": True, "error": None}
    return {"strategy": entry.record.strategy, "revision": getattr(entry.kv, "mod_revision", None), "valid": True,
            "error": None}


def status_doc(ctx: Ctx, snap: ClusterSnapshot, etcd: dict[str, Any]) -> dict[str, Any]:
    by_role: dict[str, Counter[str]] = {role: Counter() for role in ROLES}
    for entry in snap.engines.values():
        by_role[entry.record.role][entry.record.state] += 1
    topo = snap.topology
    usable = sum(1 for pair in snap.links if views.link_row(snap, pair)["usable"])
    established = sum(1 for e in snap.links.values() if e.record.state == "established")
    flagged = {i: views.flags_text(views.flags_dict(snap, i)) for i in sorted(snap.flags)}
    return {
        "cluster": ctx.keys.cluster,
        "revision": snap.revision,
        "etcd": etcd,
        "engines": {
            "total": len(snap.engines),
            "by_role": {role: dict(counts) for role, counts in by_role.items()},
            "routable": {"prefill": topo.routable_prefills, "decode": topo.routable_decodes,
                         "hybrid": topo.routable_hybrids},
            "flagged": {i: f for i, f in flagged.items() if f != "-"},
        },
        "links": {"recorded": len(snap.links), "established": established, "usable": usable,
                  "possible": len(views.possible_pairs(snap))},
        "routers": {"total": len(snap.routers), "ids": sorted(snap.routers),
                    "in_flight": sum(e.record.in_flight for e in snap.routers.values())},
        "models": [{"model": r["model"], "routable": r["routable"]} for r in views.model_rows(snap)],
        "routing": routing_dict(snap),
        "warnings": warnings_of(snap, etcd),
    }


async def run_status(ctx: Ctx, args: argparse.Namespace) -> int:
    snap = await load_snapshot(ctx.client, ctx.keys, leases=False)
    etcd = etcd_dict(await ctx.client.status())
    doc = status_doc(ctx, snap, etcd)
    if ctx.out.json_mode:
        ctx.out.json(doc)
        return 0
    ctx.out.print(render_status(doc))
    return 0


def _routing_line(routing: dict[str, Any] | None) -> Text:
    if not routing:
        return Text("routing: -")
    if not routing["valid"]:
        return Text(f"routing: INVALID config at revision {routing['revision']} (routers keep their last good one)",
                    style="bold red")
    origin = "defaults" if routing["revision"] is None else f"revision {routing['revision']}"
    return Text(f"routing: {routing['strategy']} ({origin})")


def render_status(doc: dict[str, Any]) -> Group:
    etcd = doc["etcd"]
    head = Text.assemble(
        ("cluster ", "bold"), doc["cluster"], "  revision ", str(doc["revision"]), "  etcd ",
        (("healthy" if etcd["healthy"] else "UNHEALTHY"), "green" if etcd["healthy"] else "bold red"),
        f" v{etcd['version']}" if etcd["version"] else "",
    )
    members = make_table("etcd members", ("MEMBER", "ENDPOINT", "HEALTHY", "LEADER", "REVISION", "DB SIZE", "ERROR"),
                         ((m["name"] or m["member_id"], m["endpoint"], m["healthy"], m["is_leader"], m["revision"],
                           f"{m['db_size'] / 1e6:.1f} MB" if m["db_size"] else "-", m["error"]) for m in etcd["members"]))
    engines = doc["engines"]
    rows = []
    for role in ROLES:
        counts = engines["by_role"][role]
        rows.append([role, sum(counts.values()), *(counts.get(s, 0) for s in STATES), len(engines["routable"][role])])
    engine_table = make_table(f"engines ({engines['total']})", ("ROLE", "TOTAL", *(s.upper() for s in STATES), "ROUTABLE"), rows)
    links = doc["links"]
    routers = doc["routers"]
    lines = [
        Text(f"links: {links['usable']} usable, {links['established']} established of {links['possible']} possible "
             f"({links['recorded']} recorded)"),
        Text(f"routers: {routers['total']}" + (f" ({', '.join(routers['ids'])}), {routers['in_flight']} requests in flight"
                                               if routers["ids"] else "")),
        _routing_line(doc.get("routing")),
        Text("models: " + (", ".join(f"{m['model']}" + ("" if m["routable"] else " (not routable)")
                                     for m in doc["models"]) or "none")),
    ]
    if engines["flagged"]:
        lines.append(Text("operator flags: " + ", ".join(f"{i} {f}" for i, f in engines["flagged"].items())))
    if doc["warnings"]:
        lines.append(Text("warnings:", style="bold yellow"))
        lines += [Text(f"  ! {w}", style="yellow") for w in doc["warnings"]]
    else:
        lines.append(Text("no warnings", style="green"))
    return Group(head, members, engine_table, *lines)
