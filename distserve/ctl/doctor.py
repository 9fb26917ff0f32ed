"""`doctor`: find what is wrong with a cluster. Exit 0 when clean, 1 when it found problems.

Checks: stale keys (under engines/links/load/routers without a live lease), engines without links,
prefill/decode geometry mismatches, link/engine incarnation mismatches, unreachable engine URLs
(GET /health), routers on different schema versions, clock skew (record timestamps and etcd members
against this machine), unhealthy etcd members, unreadable values, a stored routing config that fails the
schema (routers ignore it and keep their last good one: the cluster looks healthy but runs another config).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any


from . import views
from .argtypes import non_negative_seconds, positive_seconds
from .context import Ctx, describe_error
from .render import make_table
from .snapshot import ClusterSnapshot, load_snapshot

PROBLEM, NOTE = "problem", "note"
CHECKS = ("etcd", "stale-keys", "records", "routing", "geometry", "links", "incarnations", "engines",
          "reachability", "routers", "clock")


@dataclass
class Finding:
    severity: str
    check: str
    subject: str
    message: str


def register(subparsers: Any, common: Any) -> None:
    p = common(subparsers.add_parser("doctor", help="find stale keys, missing links, mismatches, unreachable engines, skew"))
    p.add_argument("--http-timeout", type=positive_seconds, default=2.0, metavar="S", help="per-engine /health timeout (default 2)")
    p.add_argument("--skew", type=non_negative_seconds, default=2.0, metavar="S", help="tolerated clock difference in seconds (default 2)")
    p.add_argument("--skip", action="append", default=[], choices=CHECKS, metavar="CHECK",
                   help=f"skip a check (repeatable): {', '.join(CHECKS)}")
    p.set_defaults(_run=run_doctor)


# --- checks over the snapshot (pure) ------------------------------------------------------------------
def check_stale_keys(snap: ClusterSnapshot) -> list[Finding]:
    out = []
    for kv in snap.leased_kvs():
        rel = kv.key[len(snap.keys.root):]
        if not kv.lease:
            out.append(Finding(PROBLEM, "stale-keys", rel, "no lease: nothing will ever remove it "
                                                           "(written by hand or by a crashed tool); delete it"))
        elif snap.ttl_of(kv.lease) == -1:
            out.append(Finding(PROBLEM, "stale-keys", rel, f"its lease {kv.lease:x} is gone but the key remains"))
    for entry in snap.loads.values():
        if entry.record.engine_id not in snap.engines:
            out.append(Finding(NOTE, "stale-keys", f"load/{entry.record.engine_id}", "load of an engine that is not registered"))
    for engine_id in snap.flags:
        if engine_id not in snap.engines:
            out.append(Finding(NOTE, "stale-keys", f"state/{engine_id}",
                               f"operator flags for an engine that is not registered ({views.flags_text(views.flags_dict(snap, engine_id))}); "
                               f"`distserve-ctl uncordon {engine_id}` removes them"))
    return out


def check_records(snap: ClusterSnapshot) -> list[Finding]:
    out = [Finding(PROBLEM, "records", bad.key[len(snap.keys.root):], f"unreadable value: {bad.reason}")
           for bad in snap.malformed if bad.key != snap.keys.config()]  # the routing check reports that one
    out += [Finding(NOTE, "records", kv.key, "key under the cluster prefix outside the schema") for kv in snap.unknown]
    return out


def check_routing(snap: ClusterSnapshot) -> list[Finding]:
    """config/routing must pass the schema routers read it with: else every router ignores it."""
    out = []
    for bad in snap.malformed:
        if bad.key == snap.keys.config():
            revision = getattr(bad.kv, "mod_revision", 0)
            out.append(Finding(PROBLEM, "routing", bad.key[len(snap.keys.root):],
                               f"invalid routing config (revision {revision}): "
                               f"{bad.reason.removeprefix('RoutingConfig: ')}; routers ignore it and keep their "
                               f"last good config (or the defaults): repair it with "
                               f"`distserve-ctl config set|unset KEY`"))
    return out


def _pairs_by_model(snap: ClusterSnapshot) -> list[tuple[Any, Any, str]]:
    """(prefill, decode, reason or '') for every prefill/decode pair sharing a model."""
    return [(p, d, reason or "") for p, d, reason in views.same_model_pairs(snap)]


def check_geometry(snap: ClusterSnapshot) -> list[Finding]:
    pairs = _pairs_by_model(snap)
    compatible_partner: dict[str, bool] = {}
    for p, d, reason in pairs:
        compatible_partner.setdefault(p.id, False)
        compatible_partner.setdefault(d.id, False)
        if not reason:
            compatible_partner[p.id] = compatible_partner[d.id] = True
    out = []
    for p, d, reason in pairs:
        if not reason:
            continue
        model = ", ".join(sorted(set(p.models) & set(d.models)))
        linked = (p.id, d.id) in snap.links
        stranded = [e for e in (p.id, d.id) if not compatible_partner[e]]
        if linked or stranded:
            why = "they are linked" if linked else f"{' and '.join(stranded)} has no compatible partner"
            out.append(Finding(PROBLEM, "geometry", f"{p.id}→{d.id}",
                               f"prefill {p.id} and decode {d.id} both serve {model} but {reason} ({why})"))
        else:
            out.append(Finding(NOTE, "geometry", f"{p.id}→{d.id}", f"not linkable ({reason}); both have other partners"))
    return out


def check_engines(snap: ClusterSnapshot) -> list[Finding]:
    out = []
    now = time.time()
    for engine_id, entry in sorted(snap.engines.items()):
        engine = entry.record
        if engine.state == "unhealthy":
            out.append(Finding(PROBLEM, "engines", engine_id, "unhealthy" + (f": {engine.state_reason}" if engine.state_reason else "")))
        elif engine.state == "starting" and now - engine.registered_at > 120:
            out.append(Finding(PROBLEM, "engines", engine_id, f"still starting after {now - engine.registered_at:.0f} s"))
        if "0.0.0.0" in engine.url or "[::]" in engine.url:
            out.append(Finding(PROBLEM, "engines", engine_id, f"registered URL {engine.url} is not reachable by peers"))
    return out


def check_links(snap: ClusterSnapshot) -> list[Finding]:
    """Engines without a usable link (prefill and decode need one to be routable)."""
    out = []
    roles = {e.record.role for e in snap.engines.values()}
    for engine_id, entry in sorted(snap.engines.items()):
        engine = entry.record
        if engine.role == "hybrid":
            continue
        usable, linked = views.peers_of(snap, engine)
        if usable:
            continue
        other = "decode" if engine.role == "prefill" else "prefill"
        if other not in roles:
            why = f"no {other} engine is registered"
        elif linked:
            why = f"{len(linked)} link(s) recorded, none usable"
        else:
            why = f"no link to any {other} engine"
        out.append(Finding(PROBLEM, "links", engine_id, f"{engine.role} engine without links: {why}; it is not routable"))
    for (p, d), entry in sorted(snap.links.items()):
        if entry.record.state == "failed":
            out.append(Finding(PROBLEM, "links", f"{p}→{d}", f"link failed: {entry.record.error or 'no error given'}"))
    return out


def check_incarnations(snap: ClusterSnapshot) -> list[Finding]:
    out = []
    for pair in sorted(snap.links):
        row = views.link_row(snap, pair)
        for problem in row["problems"]:
            out.append(Finding(PROBLEM, "incarnations", f"{pair[0]}→{pair[1]}",
                               f"link record points at a dead incarnation: {problem}"))
    return out


def check_routers(snap: ClusterSnapshot) -> list[Finding]:
    """Schema versions from the raw values: a router newer than this tool writes records it cannot decode."""
    out = []
    schemas: dict[Any, list[str]] = {}
    versions: dict[str, list[str]] = {}
    for kv in snap.kvs:
        parsed = snap.keys.parse(kv.key)
        if parsed is None or parsed.kind != "routers":
            continue
        try:
            raw = json.loads(kv.value)
        except ValueError:
            continue
        if isinstance(raw, dict):
            schemas.setdefault(raw.get("schema_version"), []).append(parsed.ids[0])
            versions.setdefault(str(raw.get("version") or "?"), []).append(parsed.ids[0])
    if len(schemas) > 1:
        detail = "; ".join(f"v{v}: {', '.join(ids)}" for v, ids in sorted(schemas.items(), key=lambda x: str(x[0])))
        out.append(Finding(PROBLEM, "routers", "routers", f"routers on different schema versions ({detail})"))
    if len(versions) > 1:
        detail = "; ".join(f"{v}: {', '.join(ids)}" for v, ids in sorted(versions.items()))
        out.append(Finding(NOTE, "routers", "routers", f"routers run different software versions ({detail})"))
    return out


def record_times(snap: ClusterSnapshot) -> list[tuple[str, str, float]]:
    """(subject, field, timestamp) of every time a record holder wrote from its own clock."""
    out = []
    for i, e in snap.engines.items():
        out += [(f"engines/{i}", "registered_at", e.record.registered_at), (f"engines/{i}", "started_at", e.record.started_at)]
    for i, e in snap.loads.items():
        out.append((f"load/{i}", "updated_at", e.record.updated_at))
    for i, e in snap.routers.items():
        out += [(f"routers/{i}", "updated_at", e.record.updated_at), (f"routers/{i}", "started_at", e.record.started_at)]
    for (p, d), e in snap.links.items():
        out.append((f"links/{p}/{d}", "updated_at", e.record.updated_at))
    return out


def check_record_clocks(snap: ClusterSnapshot, tolerance: float, now: float | None = None) -> list[Finding]:
    """A timestamp from the future means the writer's clock runs ahead of ours (or ours behind)."""
    now = time.time() if now is None else now
    ahead: dict[str, float] = {}
    for subject, _, ts in record_times(snap):
        if ts - now > tolerance:
            holder = subject.split("/")[0] + "/" + subject.split("/")[1]
            ahead[holder] = max(ahead.get(holder, 0.0), ts - now)
    return [Finding(PROBLEM, "clock", holder, f"its timestamps are {skew:.1f} s ahead of this machine's clock")
            for holder, skew in sorted(ahead.items())]


# --- checks that reach out ----------------------------------------------------------------------------
def etcd_findings(status: Any) -> list[Finding]:
    out = []
    if not status.leader:
        out.append(Finding(PROBLEM, "etcd", "cluster", "no member reports a leader"))
    for m in status.members:
        if not m.healthy:
            out.append(Finding(PROBLEM, "etcd", m.name or m.endpoint, f"member unhealthy: {m.error or 'no answer'}"))
    versions = {m.version for m in status.members if m.version}
    if len(versions) > 1:
        out.append(Finding(NOTE, "etcd", "cluster", f"members run different etcd versions: {', '.join(sorted(versions))}"))
    return out


def _ssl_for(cfg: Any) -> ssl.SSLContext | None:
    if not cfg.tls:
        return None
    context = ssl.create_default_context(cafile=cfg.ca_cert) if cfg.ca_cert else ssl.create_default_context()
    if cfg.cert and cfg.key:
        context.load_cert_chain(cfg.cert, cfg.key)
    return context


async def probe_engines(snap: ClusterSnapshot, timeout: float, concurrency: int = 32) -> list[Finding]:
    import aiohttp  # here: ctl's cold start loads aiohttp only for commands that call an engine

    gate = asyncio.Semaphore(concurrency)
    out: list[Finding] = []

    async def one(session: aiohttp.ClientSession, engine_id: str, url: str) -> None:
        async with gate:
            try:
                async with session.get(f"{url.rstrip('/')}/health") as resp:
                    if resp.status != 200:
                        out.append(Finding(PROBLEM, "reachability", engine_id, f"GET {url}/health answered {resp.status}"))
            except (asyncio.TimeoutError, TimeoutError):
                out.append(Finding(PROBLEM, "reachability", engine_id, f"GET {url}/health: no answer within {timeout:g} s"))
            except aiohttp.ClientError as exc:
                out.append(Finding(PROBLEM, "reachability", engine_id, f"GET {url}/health: {describe_error(exc)}"))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(one(session, i, e.record.url) for i, e in sorted(snap.engines.items())))
    return sorted(out, key=lambda f: f.subject)


async def etcd_clock_findings(cfg: Any, tolerance: float, timeout: float) -> list[Finding]:
    """etcd's HTTP answers carry a Date header (1 s resolution): compare it with this machine's clock."""
    import aiohttp  # here: ctl's cold start loads aiohttp only for commands that call an engine

    out: list[Finding] = []
    context = _ssl_for(cfg)

    async def one(session: aiohttp.ClientSession, endpoint: str) -> None:
        try:
            sent = time.time()
            async with session.get(f"{endpoint}/version", ssl=context if context else False) as resp:
                received = time.time()
                date = resp.headers.get("Date")
        except Exception:  # noqa: BLE001 - an unreachable member is the etcd check's finding
            return
        if not date:
            return
        theirs = email.utils.parsedate_to_datetime(date).timestamp()
        ours = (sent + received) / 2
        # Date truncates to the second: allow one more second before calling it skew.
        skew = theirs - ours
        if abs(skew) > tolerance + 1.0:
            direction = "ahead of" if skew > 0 else "behind"
            out.append(Finding(PROBLEM, "clock", f"etcd {endpoint}", f"clock {abs(skew):.1f} s {direction} this machine"))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(one(session, ep) for ep in cfg.endpoints))
    return out


# --- command ------------------------------------------------------------------------------------------
async def diagnose(ctx: Ctx, *, http_timeout: float = 2.0, skew: float = 2.0,
                   skip: tuple[str, ...] | list[str] = ()) -> tuple[list[Finding], list[str]]:
    snap = await load_snapshot(ctx.client, ctx.keys)
    findings: list[Finding] = []
    ran: list[str] = []

    def run(name: str, produce: Any) -> None:
        if name not in skip:
            ran.append(name)
            findings.extend(produce())

    remote: dict[str, Any] = {}
    if "etcd" not in skip:
        remote["etcd"] = ctx.client.status()
    if "reachability" not in skip:
        remote["reachability"] = probe_engines(snap, http_timeout)
    if "clock" not in skip:
        remote["clock"] = etcd_clock_findings(ctx.cfg, skew, min(ctx.timeout, 5.0))
    results = dict(zip(remote, await asyncio.gather(*remote.values())))

    if "etcd" in results:
        ran.append("etcd")
        findings += etcd_findings(results["etcd"])
    run("stale-keys", lambda: check_stale_keys(snap))
    run("records", lambda: check_records(snap))
    run("routing", lambda: check_routing(snap))
    run("geometry", lambda: check_geometry(snap))
    run("links", lambda: check_links(snap))
    run("incarnations", lambda: check_incarnations(snap))
    run("engines", lambda: check_engines(snap))
    if "reachability" in results:
        ran.append("reachability")
        findings += results["reachability"]
    run("routers", lambda: check_routers(snap))
    if "clock" in results:
        ran.append("clock")
        findings += check_record_clocks(snap, skew) + results["clock"]
    return findings, ran


async def run_doctor(ctx: Ctx, args: argparse.Namespace) -> int:
    findings, ran = await diagnose(ctx, http_timeout=args.http_timeout, skew=args.skew, skip=args.skip)
    problems = [f for f in findings if f.severity == PROBLEM]
    notes = [f for f in findings if f.severity == NOTE]
    per_check = {name: ("problems" if any(f.check == name for f in problems) else "ok") for name in ran}
    if ctx.out.json_mode:
        ctx.out.json({"cluster": ctx.keys.cluster, "ok": not problems, "problems": len(problems), "notes": len(notes),
                      "checks": per_check, "findings": [asdict(f) for f in findings]})
    else:
        if findings:
            ctx.out.print(make_table(f"doctor · cluster {ctx.keys.cluster}", ("SEVERITY", "CHECK", "SUBJECT", "FINDING"),
                                     ((f.severity, f.check, f.subject, f.message) for f in findings)))
        verdict = "no problems found" if not problems else f"{len(problems)} problem(s)"
        ctx.out.print(f"{verdict}, {len(notes)} note(s); checks: "
                      + ", ".join(f"{n} {'ok' if s == 'ok' else 'FAILED'}" for n, s in per_check.items()), markup=False)
    return 1 if problems else 0


