"""`config get [KEY]`, `config set KEY VALUE`, `config unset KEY`: the routing config every router hot-reloads.

KEY is `strategy`, `weights.<engine_id>` or `params.<name>`. Values are validated before anything is
written, and writes use compare-and-swap so concurrent operators never lose each other's change.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from typing import Any, get_args

from discovery.record import MalformedRecord
from distserve.keys import validate_id
from distserve.records import RoutingConfig, StrategyName

from .context import Ctx
from .errors import CtlError

STRATEGIES: tuple[str, ...] = get_args(StrategyName)
_PARAM = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
CAS_ATTEMPTS = 8


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("config", help="get or set the routing config (strategy, weights, params)"))
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", required=True,
                               parser_class=type(p))
    g = common(actions.add_parser("get", help="show the routing config, or one KEY of it"))
    g.add_argument("key", nargs="?", metavar="KEY", help="strategy | weights | weights.<engine> | params | params.<name>")
    g.set_defaults(_run=run_get)
    s = common(actions.add_parser("set", help="set one KEY to VALUE (routers reload it at once)"))
    s.add_argument("key", metavar="KEY", help="strategy | weights.<engine> | params.<name>")
    s.add_argument("value", metavar="VALUE", help="a strategy name, a weight > 0, or a JSON value for params")
    s.set_defaults(_run=run_set)
    u = common(actions.add_parser("unset", help="remove weights.<engine> or params.<name> (back to the default)"))
    u.add_argument("key", metavar="KEY")
    u.set_defaults(_run=run_unset)


def parse_key(key: str) -> tuple[str, str | None]:
    head, _, name = key.partition(".")
    if head == "strategy" and not name:
        return head, None
    if head in ("weights", "params"):
        if not name:
            return head, None
        if head == "weights":
            try:
                validate_id(name, "engine id")
            except ValueError as exc:
                raise CtlError(f"bad key {key!r}: {exc}") from None
        elif not _PARAM.match(name):
            raise CtlError(f"bad key {key!r}: a parameter name is letters, digits, '_', '.', '-'")
        return head, name
    raise CtlError(f"unknown config key {key!r}: use strategy, weights.<engine_id> or params.<name>")


def parse_value(head: str, name: str | None, text: str) -> Any:
    if head == "strategy":
        if text not in STRATEGIES:
            raise CtlError(f"unknown strategy {text!r}: choose one of {', '.join(STRATEGIES)}")
        return text
    if name is None:
        raise CtlError(f"set one entry at a time: {head}.<name> VALUE")
    if head == "weights":
        try:
            weight = float(text)
        except ValueError:
            raise CtlError(f"weight {text!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise CtlError(f"weight must be a finite number > 0, not {text}")
        return weight
    try:
        value = json.loads(text)
    except ValueError:
        value = text  # a bare word is a string
    if isinstance(value, float) and not math.isfinite(value):
        raise CtlError(f"params.{name}: {text} is not a finite number")
    return value


def lookup(config: RoutingConfig, head: str, name: str | None) -> Any:
    data = config.model_dump(mode="json")
    if name is None:
        return data[head]
    table = data[head]
    if name not in table:
        return None
    return table[name]


async def read_config(ctx: Ctx) -> tuple[RoutingConfig, Any]:
    kv = await ctx.client.get(ctx.keys.config())
    if kv is None:
        return RoutingConfig(), None
    try:
        return RoutingConfig.decode(kv.value), kv
    except MalformedRecord as exc:
        raise CtlError(f"{ctx.keys.config()} holds an unreadable value ({exc}); `config set` replaces it",
                       ) from None


async def run_get(ctx: Ctx, args: argparse.Namespace) -> int:
    config, kv = await read_config(ctx)
    revision = kv.mod_revision if kv else None
    if args.key is None:
        if ctx.out.json_mode:
            ctx.out.json({"key": ctx.keys.config(), "mod_revision": revision, "default": kv is None,
                          "config": config.model_dump(mode="json")})
        else:
            origin = "defaults (no config written)" if kv is None else f"revision {revision}"
            rows = [("strategy", config.strategy)]
            rows += [(f"weights.{k}", v) for k, v in sorted(config.weights.items())]
            rows += [(f"params.{k}", json.dumps(v)) for k, v in sorted(config.params.items())]
            ctx.out.table(f"routing config · {origin}", ("KEY", "VALUE"), rows)
        return 0
    head, name = parse_key(args.key)
    value = lookup(config, head, name)
    if name is not None and value is None and head == "weights":
        value = 1.0  # engines not listed weigh 1.0
    if ctx.out.json_mode:
        ctx.out.json({"key": args.key, "value": value, "mod_revision": revision})
    else:
        ctx.out.print(value if isinstance(value, str) else json.dumps(value), markup=False)
    return 0


async def _write(ctx: Ctx, mutate: Any) -> tuple[RoutingConfig, int]:
    key = ctx.keys.config()
    for _ in range(CAS_ATTEMPTS):
        kv = await ctx.client.get(key)
        try:
            current = RoutingConfig.decode(kv.value) if kv else RoutingConfig()
        except MalformedRecord:
            current = RoutingConfig()
        data = current.model_dump()
        mutate(data)
        data["updated_at"] = time.time()
        try:
            updated = RoutingConfig.model_validate(data)
        except ValueError as exc:
            raise CtlError(f"invalid routing config: {' '.join(str(exc).split())[:300]}") from None
        if await ctx.client.compare_and_swap(key, updated.encode(), kv.mod_revision if kv else 0):
            written = await ctx.client.get(key)
            return updated, written.mod_revision if written else ctx.client.last_revision
    raise CtlError(f"could not update {key}: it kept changing under concurrent writers")


async def run_set(ctx: Ctx, args: argparse.Namespace) -> int:
    head, name = parse_key(args.key)
    value = parse_value(head, name, args.value)
    if head == "weights" and name is not None and await ctx.client.get(ctx.keys.engine(name)) is None:
        ctx.out.note(f"note: engine {name} is not registered now; the weight applies when it registers")

    def mutate(data: dict[str, Any]) -> None:
        if name is None:
            data[head] = value
        else:
            data[head] = {**data[head], name: value}

    updated, revision = await _write(ctx, mutate)
    if ctx.out.json_mode:
        ctx.out.json({"key": args.key, "value": value, "revision": revision, "config": updated.model_dump(mode="json")})
    else:
        ctx.out.print(f"{args.key} = {json.dumps(value) if not isinstance(value, str) else value} "
                      f"(revision {revision}); routers reload it as soon as they see it", markup=False)
    return 0


async def run_unset(ctx: Ctx, args: argparse.Namespace) -> int:
    head, name = parse_key(args.key)
    if head == "strategy" or name is None:
        raise CtlError("unset takes weights.<engine_id> or params.<name> (set strategy to change it)")
    config, _ = await read_config(ctx)
    if name not in getattr(config, head):
        raise CtlError(f"{args.key} is not set")

    def mutate(data: dict[str, Any]) -> None:
        data[head] = {k: v for k, v in data[head].items() if k != name}

    updated, revision = await _write(ctx, mutate)
    if ctx.out.json_mode:
        ctx.out.json({"key": args.key, "value": None, "revision": revision, "config": updated.model_dump(mode="json")})
    else:
        ctx.out.print(f"{args.key} removed (revision {revision})", markup=False)
    return 0
