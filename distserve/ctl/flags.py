"""`drain ID [--wait] [--timeout S]`, `cordon ID`, `uncordon ID`: operator flags under state/<id>.

Flags carry no lease (operator intent survives restarts) and are written with compare-and-swap, so two
operators never overwrite each other's flag. Routers and agents watch them (distserve.cluster.topology).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from discovery.record import MalformedRecord
from distserve.cluster.keys import validate_id
from distserve.cluster.records import LoadRecord, OperatorFlags, RouterRecord

from . import argtypes
from .context import Ctx, operator_name
from .errors import CtlError, UnknownId, UsageError

CAS_ATTEMPTS = 8
# After every router has applied the drain flag, the engine's in-flight work must read zero for this long:
# a request picked just before a router saw the flag can take a moment to show up in the load record,
# which agents publish at most every 0.5 s.
DEFAULT_SETTLE_S = 1.5
POLL_S = 0.2


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("drain", help="stop new requests to an engine; --wait until its work is done"))
    p.add_argument("engine_id", metavar="ID", type=argtypes.engine_id)
    p.add_argument("--wait", action="store_true", help="return only when in-flight work is zero and routers stopped sending")
    p.add_argument("--timeout", type=argtypes.positive_seconds, default=None, metavar="S",
                   help="give up waiting after S seconds (exit 1; default: wait until done)")
    p.add_argument("--settle", type=argtypes.non_negative_seconds, default=DEFAULT_SETTLE_S, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--reason", type=argtypes.reason, help="why (shown by engines, describe and watch)")
    p.add_argument("--force", action="store_true", help="flag an id that is not registered now")
    p.set_defaults(_run=run_drain)

    p = common(subparsers.add_parser("cordon", help="stop new requests to an engine; in-flight work continues"))
    p.add_argument("engine_id", metavar="ID", type=argtypes.engine_id)
    p.add_argument("--reason", type=argtypes.reason, help="why (shown by engines, describe and watch)")
    p.add_argument("--force", action="store_true", help="flag an id that is not registered now")
    p.set_defaults(_run=run_cordon)

    p = common(subparsers.add_parser("uncordon", help="clear drain and cordon: the engine takes new requests again"))
    p.add_argument("engine_id", metavar="ID", type=argtypes.engine_id)
    p.set_defaults(_run=run_uncordon)


def _valid_id(ident: str) -> None:
    """The parser checks ids already; callers that build args themselves get the same exit 2."""
    try:
        validate_id(ident, "engine id")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def _check_engine(ctx: Ctx, engine_id: str, force: bool) -> None:
    _valid_id(engine_id)
    if force:
        return
    if await ctx.client.get(ctx.keys.engine(engine_id)) is None:
        kvs, _ = await ctx.client.get_prefix(ctx.keys.prefix("engines"), keys_only=True)
        known = [kv.key.rsplit("/", 1)[-1] for kv in kvs]
        raise UnknownId("engine", engine_id, known)


async def update_flags(ctx: Ctx, engine_id: str, **changes: Any) -> tuple[OperatorFlags | None, int]:
    """Apply `changes` to state/<engine_id> with compare-and-swap; delete the key when no flag is left.

    Returns (the flags now in effect or None, the revision of the write)."""
    key = ctx.keys.state(engine_id)
    for _ in range(CAS_ATTEMPTS):
        kv = await ctx.client.get(key)
        current = OperatorFlags()
        if kv is not None:
            try:
                current = OperatorFlags.decode(kv.value)
            except MalformedRecord:
                pass  # an unreadable flag is replaced by the operator's intent
        updated = current.model_copy(update={**changes, "updated_by": operator_name(), "updated_at": time.time()})
        if not updated.drain and not updated.cordon:
            if kv is None:
                return None, ctx.client.last_revision
            if await ctx.client.delete_if(key, kv.mod_revision):
                return None, ctx.client.last_revision
            continue
        if await ctx.client.compare_and_swap(key, updated.encode(), kv.mod_revision if kv else 0):
            written = await ctx.client.get(key)
            return updated, (written.mod_revision if written else ctx.client.last_revision)
    raise CtlError(f"could not update {key}: it kept changing under concurrent writers")


def _result(ctx: Ctx, engine_id: str, flags: OperatorFlags | None, revision: int, message: str,
            extra: dict[str, Any] | None = None) -> None:
    if ctx.out.json_mode:
        ctx.out.json({"engine": engine_id, "key": ctx.keys.state(engine_id), "revision": revision,
                      "flags": flags.model_dump(mode="json") if flags else None, **(extra or {})})
    else:
        ctx.out.print(message)


async def run_cordon(ctx: Ctx, args: argparse.Namespace) -> int:
    await _check_engine(ctx, args.engine_id, args.force)
    flags, rev = await update_flags(ctx, args.engine_id, cordon=True, reason=args.reason)
    _result(ctx, args.engine_id, flags, rev,
            f"{args.engine_id} cordoned: no new requests, in-flight work continues (revision {rev})")
    return 0


async def run_uncordon(ctx: Ctx, args: argparse.Namespace) -> int:
    _valid_id(args.engine_id)
    engine_kv = await ctx.client.get(ctx.keys.engine(args.engine_id))
    flags_kv = await ctx.client.get(ctx.keys.state(args.engine_id))
    if engine_kv is None and flags_kv is None:
        kvs, _ = await ctx.client.get_prefix(ctx.keys.prefix("engines"), keys_only=True)
        raise UnknownId("engine", args.engine_id, [kv.key.rsplit("/", 1)[-1] for kv in kvs])
    flags, rev = await update_flags(ctx, args.engine_id, drain=False, cordon=False, reason=None)
    _result(ctx, args.engine_id, flags, rev, f"{args.engine_id} uncordoned: takes new requests (revision {rev})")
    return 0


async def run_drain(ctx: Ctx, args: argparse.Namespace) -> int:
    await _check_engine(ctx, args.engine_id, args.force)
    flags, rev = await update_flags(ctx, args.engine_id, drain=True, reason=args.reason)
    if not args.wait:
        _result(ctx, args.engine_id, flags, rev,
                f"{args.engine_id} draining: routers send it no new requests (revision {rev}); "
                f"`distserve-ctl drain {args.engine_id} --wait` waits for its work to finish")
        return 0
    if not ctx.out.json_mode:
        limit = f"timeout {args.timeout:g} s" if args.timeout is not None else "Ctrl-C stops waiting"
        ctx.out.note(f"{args.engine_id} draining (revision {rev}); waiting for in-flight work to finish "
                     f"and routers to stop sending ({limit})")
    outcome = await wait_drained(ctx, args.engine_id, rev, timeout=args.timeout, settle=args.settle)
    _result(ctx, args.engine_id, flags, rev, outcome["message"], {"drained": True, **outcome})
    return 0


async def wait_drained(ctx: Ctx, engine_id: str, flag_revision: int, *, timeout: float | None,
                       settle: float = DEFAULT_SETTLE_S) -> dict[str, Any]:
    """Wait until (every live router has applied the flag and the engine's in-flight work reads zero for
    `settle` seconds) or the engine deregistered. Raises CtlError (exit 1) on timeout."""
    started = time.monotonic()
    deadline = started + timeout if timeout is not None else float("inf")
    zero_since: float | None = None
    status: dict[str, Any] = {}
    while True:
        status = await drain_status(ctx, engine_id, flag_revision)
        now = time.monotonic()
        if status["deregistered"]:
            waited = now - started
            return {"waited_s": round(waited, 3), "in_flight": 0, "deregistered": True,
                    "routers_pending": [], "message": f"{engine_id} drained and deregistered (waited {waited:.1f} s)"}
        quiet = status["in_flight"] == 0 and status["preserved_blocks"] == 0 and not status["routers_pending"]
        zero_since = (zero_since or now) if quiet else None
        if zero_since is not None and now - zero_since >= settle:
            waited = now - started
            routers = status["routers_acknowledged"]
            return {"waited_s": round(waited, 3), "in_flight": 0, "deregistered": False, "routers_pending": [],
                    "routers_acknowledged": routers,
                    "message": f"{engine_id} drained: no work in flight and {len(routers)} router(s) stopped "
                               f"sending it requests (waited {waited:.1f} s)"}
        if now >= deadline:
            pending = status["routers_pending"]
            tail = f"; routers not yet updated: {', '.join(pending)}" if pending else ""
            raise CtlError(f"timed out after {timeout:g} s waiting for {engine_id} to drain: "
                           f"{status['in_flight']} request(s) in flight, {status['preserved_blocks']} KV blocks "
                           f"awaiting migration{tail} (the drain flag stays set)")
        await asyncio.sleep(max(0.0, min(POLL_S, deadline - now)))


async def drain_status(ctx: Ctx, engine_id: str, flag_revision: int) -> dict[str, Any]:
    engine_kv, load_kv, (router_kvs, _) = await asyncio.gather(
        ctx.client.get(ctx.keys.engine(engine_id)),
        ctx.client.get(ctx.keys.load(engine_id)),
        ctx.client.get_prefix(ctx.keys.prefix("routers")),
    )
    in_flight = preserved = 0
    if load_kv is not None:
        try:
            load = LoadRecord.decode(load_kv.value)
            in_flight = load.in_flight
            # A prefill's preserved blocks are work too: a decode has yet to pull that KV.
            preserved = load.preserved_blocks or 0
        except MalformedRecord:
            pass
    pending, acknowledged = [], []
    for kv in router_kvs:
        try:
            router = RouterRecord.decode(kv.value)
        except MalformedRecord:
            continue
        # A router reports the revision its view has applied; until it passes the flag's revision it may
        # still pick this engine.
        (acknowledged if router.view_revision >= flag_revision else pending).append(router.id)
    return {"deregistered": engine_kv is None, "in_flight": in_flight, "preserved_blocks": preserved,
            "routers_pending": sorted(pending), "routers_acknowledged": sorted(acknowledged)}
