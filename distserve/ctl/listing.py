"""`engines`, `links`, `routers`, `models`: one table each (or JSON), from one snapshot."""

from __future__ import annotations

import argparse
from typing import Any

from . import argtypes, views
from .context import Ctx
from .errors import UnknownId
from .snapshot import load_snapshot


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("engines", help="list engines: role, URL, models, state, flags, load, links, lease"))
    p.add_argument("--role", choices=("prefill", "decode", "hybrid"), help="only engines of this role")
    p.add_argument("--model", help="only engines serving this model")
    p.set_defaults(_run=run_engines)

    p = common(subparsers.add_parser("links", help="list prefill→decode links and whether each is usable"))
    p.add_argument("--engine", metavar="ID", type=argtypes.engine_id, help="only links of this engine")
    p.set_defaults(_run=run_links)

    p = common(subparsers.add_parser("routers", help="list router replicas"))
    p.set_defaults(_run=run_routers)

    p = common(subparsers.add_parser("models", help="list served models and whether each is routable"))
    p.set_defaults(_run=run_models)


def _head(ctx: Ctx, snap: Any) -> dict[str, Any]:
    return {"cluster": ctx.keys.cluster, "revision": snap.revision}


async def run_engines(ctx: Ctx, args: argparse.Namespace) -> int:
    snap = await load_snapshot(ctx.client, ctx.keys)
    routable = views.routable_ids(snap)
    rows = [views.engine_row(snap, i, routable) for i in sorted(snap.engines)]
    if args.role:
        rows = [r for r in rows if r["role"] == args.role]
    if args.model:
        rows = [r for r in rows if args.model in r["models"]]
    if ctx.out.json_mode:
        ctx.out.json({**_head(ctx, snap), "engines": rows})
    else:
        ctx.out.table(f"engines ({len(rows)}) · cluster {ctx.keys.cluster} · revision {snap.revision}",
                      views.ENGINE_COLUMNS, (views.engine_cells(r) for r in rows),
                      caption="LOAD: running r / waiting w, KV blocks used; LINKS: usable/recorded")
    return 0


async def run_links(ctx: Ctx, args: argparse.Namespace) -> int:
    snap = await load_snapshot(ctx.client, ctx.keys)
    pairs = sorted(snap.links)
    if args.engine:
        pairs = [p for p in pairs if args.engine in p]
        if not pairs and args.engine not in snap.engines:
            # a typo would otherwise read as "no links"
            raise UnknownId("engine", args.engine, list(snap.engines))
    rows = [views.link_row(snap, p) for p in pairs]
    possible = views.possible_pairs(snap)
    usable = sum(1 for r in rows if r["usable"])
    if ctx.out.json_mode:
        ctx.out.json({**_head(ctx, snap), "links": rows, "usable": usable, "possible": len(possible)})
    else:
        ctx.out.table(f"links ({len(rows)}, {usable} usable of {len(possible)} possible) · revision {snap.revision}",
                      views.LINK_COLUMNS, (views.link_cells(r) for r in rows))
    return 0


async def run_routers(ctx: Ctx, args: argparse.Namespace) -> int:
    snap = await load_snapshot(ctx.client, ctx.keys)
    rows = [views.router_row(snap, i) for i in sorted(snap.routers)]
    if ctx.out.json_mode:
        ctx.out.json({**_head(ctx, snap), "routers": rows})
    else:
        ctx.out.table(f"routers ({len(rows)}) · revision {snap.revision}", views.ROUTER_COLUMNS,
                      (views.router_cells(r) for r in rows))
    return 0


async def run_models(ctx: Ctx, args: argparse.Namespace) -> int:
    snap = await load_snapshot(ctx.client, ctx.keys, leases=False)
    rows = views.model_rows(snap)
    if ctx.out.json_mode:
        ctx.out.json({**_head(ctx, snap), "models": rows})
    else:
        ctx.out.table(f"models ({len(rows)}) · revision {snap.revision}", views.MODEL_COLUMNS,
                      (views.model_cells(r) for r in rows), caption="counts: routable/registered")
    return 0
