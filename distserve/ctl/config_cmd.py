"""`config get [KEY]`, `config set KEY VALUE`, `config unset KEY`: the routing config every router hot-reloads.

KEY is `strategy`, `weights.<engine_id>` or `params.<name>`. Values are validated before anything is
written, by the schema routers read with (distserve.cluster.records.RoutingConfig: typed, bounded, params per
strategy); a bad key or value is one line on stderr and exit 2, nothing written. Writes use compare-and-swap
so concurrent operators never lose each other's change. A stored value that fails the schema (written
with etcdctl) can be repaired key by key: set or unset the bad key.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any, get_args

from pydantic import ValidationError

from discovery.record import MalformedRecord
from distserve.cluster.keys import validate_id
from distserve.cluster.records import STRATEGY_PARAMS, RoutingConfig, StrategyName, explain

from .context import Ctx
from .errors import CtlError

STRATEGIES: tuple[str, ...] = get_args(StrategyName)
_PARAM = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
CAS_ATTEMPTS = 8
EXIT_BAD_VALUE = 2  # a bad KEY or VALUE is a bad argument: exit 2, as argparse does


def bad_value(message: str) -> CtlError:
    return CtlError(message, EXIT_BAD_VALUE)


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("config", help="get or set the routing config (strategy, weights, params)"))
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", required=True,
                               parser_class=type(p))
    g = common(actions.add_parser("get", help="show the routing config, or one KEY of it"))
    g.add_argument("key", nargs="?", metavar="KEY", help="strategy | weights | weights.<engine> | params | params.<name>")
    g.set_defaults(_run=run_get)
    s = common(actions.add_parser("set", help="set one KEY to VALUE (routers reload it at once)"))
    s.add_argument("key", metavar="KEY", help="strategy | weights.<engine> | params.<name>")
    s.add_argument("value", metavar="VALUE", help="a strategy name, a weight (0 < w <= 100), or a JSON value for "
                                                   "params (prefix_affinity: prefix_chars, load_factor, vnodes)")
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
                raise bad_value(f"bad key {key!r}: {exc}") from None
        elif not _PARAM.match(name):
            raise bad_value(f"bad key {key!r}: a parameter name is letters, digits, '_', '.', '-'")
        return head, name
    raise bad_value(f"unknown config key {key!r}: use strategy, weights.<engine_id> or params.<name>")


def parse_value(head: str, name: str | None, text: str) -> Any:
    """The typed value of VALUE; its range is the schema's to check (in _write)."""
    if head == "strategy":
        if text not in STRATEGIES:
            raise bad_value(f"unknown strategy {text!r}: choose one of {', '.join(STRATEGIES)}")
        return text
    if name is None:
        raise bad_value(f"set one entry at a time: {head}.<name> VALUE")
    if head == "weights":
        try:
            return float(text)
        except ValueError:
            raise bad_value(f"weight {text!r} is not a number") from None
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word is a string (the schema says whether the param takes one)


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
        raise CtlError(f"{ctx.keys.config()} (revision {kv.mod_revision}) is invalid, routers keep their last "
                       f"good config: {str(exc).removeprefix('RoutingConfig: ')}; repair it with "
                       f"`distserve-ctl config set|unset KEY`") from None


def stored_data(kv: Any) -> dict[str, Any]:
    """The stored config as a dict to change: the decoded record, or (when it fails the schema) its raw
    JSON object, so setting or unsetting the bad key repairs it; defaults when there is nothing usable."""
    defaults = RoutingConfig().model_dump()
    if kv is None:
        return defaults
    try:
        return RoutingConfig.decode(kv.value).model_dump()
    except MalformedRecord:
        pass
    try:
        raw = json.loads(kv.value)
    except ValueError:
        return defaults
    if not isinstance(raw, dict):
        return defaults
    data = {**defaults, **raw, "schema_version": RoutingConfig.SCHEMA_VERSION}
    for head in ("weights", "params"):
        if not isinstance(data[head], dict):
            data[head] = {}
    return data


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
        data = stored_data(kv)
        mutate(data)
        data["updated_at"] = time.time()
        try:
            updated = RoutingConfig.model_validate(data)
        except ValidationError as exc:
            raise bad_value(f"invalid routing config: {explain(exc)[:300]}") from None
        if await ctx.client.compare_and_swap(key, updated.encode(), kv.mod_revision if kv else 0):
            written = await ctx.client.get(key)
            return updated, written.mod_revision if written else ctx.client.last_revision
    raise CtlError(f"could not update {key}: it kept changing under concurrent writers")


async def run_set(ctx: Ctx, args: argparse.Namespace) -> int:
    head, name = parse_key(args.key)
    value = parse_value(head, name, args.value)
    if head == "strategy":  # params are per strategy: say which ones stand in the way of this one
        stale = sorted(set(stored_data(await ctx.client.get(ctx.keys.config()))["params"])
                       - set(STRATEGY_PARAMS[value].model_fields))
        if stale:
            raise bad_value(f"strategy {value} does not take params.{stale[0]}: unset it first "
                            f"(distserve-ctl config unset params.{stale[0]})")
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
        raise bad_value("unset takes weights.<engine_id> or params.<name> (set strategy to change it)")
    if name not in stored_data(await ctx.client.get(ctx.keys.config()))[head]:
        raise CtlError(f"{args.key} is not set")

    def mutate(data: dict[str, Any]) -> None:
        data[head] = {k: v for k, v in data[head].items() if k != name}

    updated, revision = await _write(ctx, mutate)
    if ctx.out.json_mode:
        ctx.out.json({"key": args.key, "value": None, "revision": revision, "config": updated.model_dump(mode="json")})
    else:
        ctx.out.print(f"{args.key} removed (revision {revision})", markup=False)
    return 0
