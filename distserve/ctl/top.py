"""`top`: a live view of load per engine and requests per router, kept current by one etcd watch.

On a terminal it redraws in place; `--once` prints one frame, `--iterations N` prints N frames
`--interval` seconds apart (JSON: one object per frame and line), which is also how it is tested.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.text import Text

from discovery.watch import watch_prefix
from distserve.cluster.records import RouterRecord

from . import argtypes, views
from .context import Ctx
from .describe import engine_metrics, hit_rate
from .errors import CtlError
from .render import age, make_table
from .snapshot import ClusterSnapshot


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("top", help="live load per engine and requests per router"))
    p.add_argument("--interval", type=argtypes.refresh_seconds, default=1.0, metavar="S",
                   help="seconds between frames (default 1, at least 0.1)")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--once", action="store_true", help="print one frame and exit")
    frames.add_argument("--iterations", type=argtypes.positive_int, metavar="N", help="print N frames and exit")
    p.set_defaults(_run=run_top)


class LiveView:
    """The cluster's keys, kept current by a watch; router request rates from successive records."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.kvs: dict[str, Any] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        # router id -> [(updated_at, requests_total)], the last two distinct samples
        self.samples: dict[str, list[tuple[float, int]]] = {}

    async def follow(self) -> None:
        async for ev in watch_prefix(self.ctx.client, self.ctx.keys.root, None, meta_events=True):
            if ev.type in ("progress", "synced"):
                self.revision = max(self.revision, ev.revision)
                if ev.type == "synced":
                    self.synced.set()
                continue
            self.revision = max(self.revision, ev.mod_revision)
            if ev.type == "put":
                self.kvs[ev.key] = ev
                self._sample(ev)
            else:
                self.kvs.pop(ev.key, None)

    def _sample(self, ev: Any) -> None:
        parsed = self.ctx.keys.parse(ev.key)
        if parsed is None or parsed.kind != "routers":
            return
        try:
            router = RouterRecord.decode(ev.value)
        except ValueError:
            return
        history = self.samples.setdefault(router.id, [])
        if not history or history[-1][0] != router.updated_at:
            history.append((router.updated_at, router.requests_total))
            del history[:-2]

    def rate(self, router_id: str) -> float | None:
        history = self.samples.get(router_id, [])
        if len(history) < 2 or history[1][0] <= history[0][0]:
            return None
        return max(0.0, (history[1][1] - history[0][1]) / (history[1][0] - history[0][0]))

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot.from_kvs(self.ctx.keys, sorted(self.kvs.values(), key=lambda kv: kv.key), self.revision)

    async def hit_rates(self, timeout: float) -> dict[str, float | None]:
        """Each engine's prefix-cache hit rate (hit tokens / prompt tokens) from its /metrics, scraped
        concurrently within `timeout`; None for an engine that does not answer or has no prefix cache."""
        import aiohttp  # here: ctl's cold start loads aiohttp only for commands that call an engine


        engines = {e: entry.record.url for e, entry in self.snapshot().engines.items()}
        if not engines:
            return {}
        limit = asyncio.Semaphore(32)

        async def one(session: aiohttp.ClientSession, url: str) -> float | None:
            async with limit:
                metrics = await engine_metrics(session, url)
            return None if isinstance(metrics, str) else hit_rate(metrics)

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            rates = await asyncio.gather(*(one(session, url) for url in engines.values()))
        return dict(zip(engines, rates))


def frame(view: LiveView, hit_rates: dict[str, float | None] | None = None) -> dict[str, Any]:
    snap = view.snapshot()
    engines = []
    for engine_id, entry in sorted(snap.engines.items()):
        load = views.load_dict(snap, engine_id) or {}
        total = load.get("kv_blocks_total")
        used = (total - (load.get("kv_blocks_free") or 0)) if total else None
        engines.append({
            "id": engine_id, "role": entry.record.role, "state": entry.record.state,
            "flags": views.flags_text(views.flags_dict(snap, engine_id)),
            "running": load.get("running"), "waiting": load.get("waiting"),
            "kv_used_pct": round(100 * used / total, 1) if total else None,
            "prefill_tokens_pending": load.get("prefill_tokens_pending"),
            "preserved_blocks": load.get("preserved_blocks"), "load_age_s": load.get("age_s"),
            "prefix_hit_rate": (hit_rates or {}).get(engine_id),
        })
    routers = []
    for router_id, entry in sorted(snap.routers.items()):
        routers.append({"id": router_id, "in_flight": entry.record.in_flight,
                        "requests_total": entry.record.requests_total, "requests_per_s": view.rate(router_id),
                        "view_revision": entry.record.view_revision, "strategy": entry.record.strategy})
    return {"cluster": view.ctx.keys.cluster, "revision": snap.revision, "time": time.time(),
            "engines": engines, "routers": routers,
            "totals": {"running": sum(e["running"] or 0 for e in engines),
                       "waiting": sum(e["waiting"] or 0 for e in engines),
                       "router_in_flight": sum(r["in_flight"] for r in routers)}}


def render_frame(doc: dict[str, Any]) -> Group:
    def num(value: Any) -> Any:
        return "-" if value is None else value

    engines = make_table(
        f"engines ({len(doc['engines'])}) · {doc['totals']['running']} running, {doc['totals']['waiting']} waiting",
        ("ID", "ROLE", "STATE", "FLAGS", "RUNNING", "WAITING", "KV USED", "PREFILL TOKENS", "PRESERVED", "HIT RATE",
         "LOAD AGE"),
        ((e["id"], e["role"], e["state"], e["flags"], num(e["running"]), num(e["waiting"]),
          "-" if e["kv_used_pct"] is None else f"{e['kv_used_pct']:.0f}%", num(e["prefill_tokens_pending"]),
          num(e["preserved_blocks"]),
          "-" if e.get("prefix_hit_rate") is None else f"{100 * e['prefix_hit_rate']:.0f}%",
          age(e["load_age_s"])) for e in doc["engines"]))
    routers = make_table(
        f"routers ({len(doc['routers'])}) · {doc['totals']['router_in_flight']} in flight",
        ("ID", "IN FLIGHT", "REQUESTS", "REQ/S", "VIEW REV", "STRATEGY"),
        ((r["id"], r["in_flight"], r["requests_total"],
          "-" if r["requests_per_s"] is None else f"{r['requests_per_s']:.1f}", r["view_revision"] or "-",
          r["strategy"] or "-") for r in doc["routers"]))
    head = Text(f"distserve top · cluster {doc['cluster']} · revision {doc['revision']} · "
                f"{time.strftime('%H:%M:%S', time.localtime(doc['time']))}", style="bold")
    return Group(head, engines, routers)


async def run_top(ctx: Ctx, args: argparse.Namespace) -> int:
    view = LiveView(ctx)
    task = asyncio.create_task(view.follow(), name="ctl-top-watch")
    try:
        synced = asyncio.ensure_future(view.synced.wait())
        done, _ = await asyncio.wait({synced, task}, timeout=ctx.timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # the watch failed for good: raise its error
        if synced not in done:
            synced.cancel()
            raise CtlError(f"could not list the cluster within {ctx.timeout:g} s")
        frames = 1 if args.once else args.iterations
        scrape = min(1.0, args.interval)  # engine /metrics scrapes (hit rates) never hold a frame longer
        live = ctx.out.tty and not ctx.out.json_mode and frames is None
        if live:
            with Live(render_frame(frame(view, await view.hit_rates(scrape))), console=ctx.out.console,
                      refresh_per_second=4) as screen:
                while True:
                    await asyncio.sleep(args.interval)
                    screen.update(render_frame(frame(view, await view.hit_rates(scrape))))
        for i in range(frames or 1_000_000_000):
            if i:
                await asyncio.sleep(args.interval)
            if task.done():
                task.result()
            doc = frame(view, await view.hit_rates(scrape))
            if ctx.out.json_mode:
                ctx.out.json_line(doc)
            else:
                ctx.out.print(render_frame(doc))
        return 0
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
