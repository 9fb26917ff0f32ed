"""`export`: the whole key space of the cluster as one JSON document, read at one revision."""

from __future__ import annotations

import argparse
import base64
import json
import time
from typing import Any

from .context import Ctx
from .render import lease_text


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("export", help="a JSON snapshot of the cluster's whole key space and its revision"))
    p.set_defaults(_run=run_export)


def value_field(raw: bytes) -> dict[str, Any]:
    """Records are JSON: keep them as JSON; anything else is kept exactly (text or base64)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(raw).decode()}
    try:
        return {"value": json.loads(text)}
    except ValueError:
        return {"value_text": text}


async def run_export(ctx: Ctx, args: argparse.Namespace) -> int:
    kvs, revision = await ctx.client.get_prefix(ctx.keys.root)
    entries = []
    for kv in kvs:
        parsed = ctx.keys.parse(kv.key)
        entries.append({
            "key": kv.key,
            "kind": parsed.kind if parsed else None,
            "ids": list(parsed.ids) if parsed else None,
            "create_revision": kv.create_revision,
            "mod_revision": kv.mod_revision,
            "version": kv.version,
            "lease": kv.lease,
            **value_field(kv.value),
        })
    doc = {"cluster": ctx.keys.cluster, "prefix": ctx.keys.root, "revision": revision,
           "exported_at": time.time(), "count": len(entries), "keys": entries}
    # export is JSON unless a table is asked for explicitly (--table)
    if getattr(args, "output", "auto") == "table":
        rows = [(e["key"][len(ctx.keys.root):], lease_text(e["lease"]), e["mod_revision"], e["version"],
                 len(kv.value)) for e, kv in zip(entries, kvs)]
        ctx.out.table(f"{ctx.keys.root} at revision {revision} ({len(entries)} keys)",
                      ("KEY", "LEASE", "MOD REV", "VERSION", "BYTES"), rows)
    else:
        ctx.out.json(doc)
    return 0
