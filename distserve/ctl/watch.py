"""`watch [--since-rev N] [--prefix P] [--all] [--json]`: the cluster's changes as a resumable event stream.

Each event carries its etcd revision and its position (`seq`) among the events of that revision, and a
`resume` token "REV:SEQ+1": `watch --since-rev <resume>` continues exactly after that event (no gap, no
duplicate), even inside a revision that changed several keys at once (a lease expiry removes an engine's
record, its load and its links in one revision). `--since-rev N` alone starts at the first event of
revision N, like `etcdctl watch --rev N`. A revision past the next one (current + 1) is a bad argument
(exit 2, naming the current revision); one whose history etcd compacted exits 1 naming the oldest revision
still available and the command that resumes from there.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from typing import Any

from discovery.client import RevisionCompacted
from discovery.watch import watch_prefix
from distserve.cluster import keys as K

from .argtypes import MAX_REVISION, positive_int, positive_seconds
from .context import Ctx
from .errors import CtlError, UsageError
from .events import EventNarrator

_SINCE = re.compile(r"^(\d+)(?::(\d+))?$")


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("watch", help="follow the cluster as events in plain words (JSON lines with --json)"))
    p.add_argument("--since-rev", metavar="REV[:SEQ]", type=parse_since,
                   help="start at etcd revision REV (inclusive), or right after event SEQ-1 of it: pass an "
                        "event's `resume` to continue after it")
    p.add_argument("--prefix", metavar="P", default="", type=parse_prefix,
                   help="only keys under P, relative to the cluster (e.g. engines/, links/P1/) or absolute")
    p.add_argument("--all", action="store_true", help="also heartbeat-like rewrites (load updates, router counters)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="stop after N events")
    # stop after S seconds, exit 0 (for scripts and tests; not in --help until docs/configuration.md lists it)
    p.add_argument("--timeout", type=positive_seconds, metavar="S", help=argparse.SUPPRESS)
    p.set_defaults(_run=run_watch)


def parse_since(text: str) -> tuple[int, int]:
    match = _SINCE.match(text.strip())
    if not match or not 1 <= int(match.group(1)) <= MAX_REVISION or int(match.group(2) or 0) > MAX_REVISION:
        raise argparse.ArgumentTypeError(f"expected a revision N >= 1 or a resume token N:SEQ, not {text!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def parse_prefix(text: str) -> str:
    """A relative prefix starts with a key kind (or part of one: `eng`); an absolute one with `/`. A typo
    such as `engine/` would otherwise watch nothing, silently, forever."""
    if not text or text.startswith("/"):
        return text
    head, slash, _ = text.partition("/")
    if (head in K.KINDS) if slash else any(kind.startswith(head) for kind in K.KINDS):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(K.KINDS)} (then /...), or an absolute key "
                                     f"prefix starting with /, not {text!r}")


def resolve_prefix(ctx: Ctx, prefix: str) -> str:
    if prefix.startswith("/"):
        return prefix
    return ctx.keys.root + prefix


async def _state_at(ctx: Ctx, prefix: str, revision: int) -> tuple[dict[str, Any], bool]:
    """The keys under `prefix` at `revision` (the state just before the first event), and whether it was readable."""
    if revision < 1:
        return {}, True
    try:
        kvs, _ = await ctx.client.get_prefix(prefix, revision=revision)
        return {kv.key: kv for kv in kvs}, True
    except RevisionCompacted:
        # The watch itself can still start at revision + 1 when that is the compaction point.
        try:
            await ctx.client.get_prefix(prefix, revision=revision + 1, keys_only=True)
        except RevisionCompacted:
            oldest = await oldest_revision(ctx, revision + 1)
            # exit 1 (docs/keys.md): a stored resume token went stale, which a consumer handles by re-reading
            raise CtlError(
                f"--since-rev {revision + 1}: that history was compacted; the oldest revision etcd still has is "
                f"{oldest}: resume with `distserve-ctl watch --since-rev {oldest}`, or re-read the state "
                f"(`distserve-ctl export`) and watch without --since-rev") from None
        return {}, False


async def current_revision(ctx: Ctx) -> int:
    """The cluster's revision now (any read's header carries it)."""
    await ctx.client.get(ctx.keys.config())
    return int(ctx.client.last_revision)


async def oldest_revision(ctx: Ctx, compacted: int) -> int:
    """The compaction point: the oldest revision etcd can still read, found by bisection between a revision
    known compacted and the current one (etcd's KV API does not report it; at most ~64 cheap reads)."""
    lo, hi = compacted, await current_revision(ctx)  # lo: compacted; hi: readable
    probe = ctx.keys.root + "\x00compaction-probe"  # a range that holds no key: each read is tiny
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            await ctx.client.get_prefix(probe, revision=mid, keys_only=True)
            hi = mid
        except RevisionCompacted:
            lo = mid
    return hi


async def run_watch(ctx: Ctx, args: argparse.Namespace) -> int:
    prefix = resolve_prefix(ctx, args.prefix)
    show_quiet = args.all or prefix.startswith(ctx.keys.root + "load/")
    if args.since_rev is None:
        kvs, revision = await ctx.client.get_prefix(prefix)
        state, prior_known = {kv.key: kv for kv in kvs}, True
        start, skip = revision + 1, 0
    else:
        start, skip = args.since_rev
        if start > ctx.client.last_revision + 1:
            current = await current_revision(ctx)
            if start > current + 1:
                # etcd would wait for it silently (a watch) or fail (a read): either way a typo, not a resume
                raise UsageError(f"--since-rev {start}: that revision is in the future (the current revision is "
                                 f"{current}); use --since-rev {current + 1} (the next change) or leave it out "
                                 f"to start from the current state")
        state, prior_known = await _state_at(ctx, prefix, start - 1)
    narrator = EventNarrator(ctx.keys, {k: kv.value for k, kv in state.items()}, prior_known=prior_known)
    if ctx.out.tty and not ctx.out.json_mode:
        ctx.out.note(f"watching {prefix} from revision {start}" + (f" (after {skip} of its events)" if skip else "")
                     + "; Ctrl-C stops")
    if args.timeout is not None:
        try:
            return await asyncio.wait_for(_follow(ctx, args, prefix, start, skip, state, narrator, show_quiet),
                                          args.timeout)
        except asyncio.TimeoutError:
            return 0
    return await _follow(ctx, args, prefix, start, skip, state, narrator, show_quiet)


async def _follow(ctx: Ctx, args: argparse.Namespace, prefix: str, start: int, skip: int, state: dict[str, Any],
                  narrator: EventNarrator, show_quiet: bool) -> int:
    emitted = 0
    current_rev, seq = 0, -1
    stream = watch_prefix(ctx.client, prefix, start, known={k: kv.mod_revision for k, kv in state.items()},
                          meta_events=True)
    try:
        async for raw in stream:
            if raw.type == "progress":
                continue
            if raw.type == "synced":
                # Only after a compaction overtook this watcher: what came just before were differences.
                _emit_notice(ctx, raw.revision, "watch.resynced",
                             f"history was compacted while watching; the events before this line summarise "
                             f"the changes up to revision {raw.revision}")
                continue
            if raw.mod_revision != current_rev:
                current_rev, seq = raw.mod_revision, 0
            else:
                seq += 1
            if current_rev == start and seq < skip:
                narrator.narrate(raw.type, raw.key, raw.value, raw.mod_revision, seq, raw.lease)
                continue
            event = narrator.narrate(raw.type, raw.key, raw.value, raw.mod_revision, seq, raw.lease)
            if event.quiet and not show_quiet:
                continue
            if ctx.out.json_mode:
                ctx.out.json_line(event.to_json())
            else:
                sys.stdout.write(f"{event.revision:>8}  {event.message}\n")
                sys.stdout.flush()
            emitted += 1
            if args.limit is not None and emitted >= args.limit:
                break
    finally:
        await stream.aclose()
    return 0


def _emit_notice(ctx: Ctx, revision: int, code: str, message: str) -> None:
    if ctx.out.json_mode:
        ctx.out.json_line({"revision": revision, "event": code, "message": message})
    else:
        sys.stdout.write(f"{revision:>8}  ({message})\n")
        sys.stdout.flush()
