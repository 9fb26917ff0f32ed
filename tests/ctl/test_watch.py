"""`watch`: plain-word events, JSON lines with revisions, and exact resume across a restart of the watcher."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from distserve.cluster.keys import Keys
from distserve.cluster.records import EngineRecord
from tests.ctl.conftest import ctl_argv, ctl_env
from tests.ctl.plant import engine, link, load, router

KEYS = Keys()


async def _revision(client) -> int:
    _, rev = await client.get_prefix(KEYS.root, keys_only=True)
    return rev


async def test_events_in_plain_words_and_json(ctl, planter, etcd_client):
    engines = await planter.small_cluster()
    start = await _revision(etcd_client) + 1
    # an engine that registers, becomes ready, gets a link, then its lease expires (a crash)
    crash_lease = await etcd_client.grant(2)
    p3 = engine("P3", "prefill", "http://127.0.0.1:1", state="starting")
    await planter.engine(p3, lease=crash_lease)
    await planter.engine(p3.model_copy(update={"state": "ready"}), lease=crash_lease)
    await planter.link(link(engines["P1"], engines["D1"], handshake_ms=12.4))  # rewritten unchanged: quiet
    d2 = engine("D2", "decode", "http://127.0.0.1:1")
    d2_lease = await etcd_client.grant(30)
    await planter.engine(d2, lease=d2_lease)
    await planter.link(link(engines["P1"], d2, handshake_ms=12.4), lease=d2_lease)
    await planter.router(router("r2", url="http://127.0.0.1:8"))
    assert ctl("drain", "D1", "--reason", "kernel update").rc == 0
    assert ctl("cordon", "P2").rc == 0
    assert ctl("uncordon", "P2").rc == 0
    await planter.load(load("P1", running=5))  # quiet
    # a graceful stop: the agent marks its engine draining, then revokes its lease
    await planter.engine(d2.model_copy(update={"state": "draining"}), lease=d2_lease)
    await etcd_client.revoke(d2_lease)
    assert ctl("config", "set", "strategy", "round_robin").rc == 0
    await etcd_client.delete(KEYS.router("r1"))
    await asyncio.sleep(3.5)  # P3's lease expires
    expected = [
        "engine P3 registered: prefill at http://127.0.0.1:1 serving tiny, state starting, incarnation",
        "engine P3 ready",
        "engine D2 registered: decode",
        "link P1→D2 established in 12 ms (tcp)",
        "router r2 joined at http://127.0.0.1:8 test, strategy min_expected_latency",
        "D1 draining (by ",
        "P2 cordoned (by ",
        "P2 uncordoned",
        "engine D2 draining",
        "engine D2 deregistered (graceful stop)",
        "link P1→D2 removed (D2 gone)",
        "routing config changed: strategy min_expected_latency → round_robin",
        "router r1 left",
        "engine P3 lease expired",
    ]
    res = ctl("watch", "--since-rev", str(start), "--limit", str(len(expected)), "--table", "--timeout", "20")
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    assert len(lines) == len(expected), res.out
    for line, text in zip(lines, expected):
        assert text in line, (line, text)
    assert "reason: kernel update" in lines[5]

    # JSON: one object a line, each with its revision, position and resume token; quiet ones with --all
    events = ctl("watch", "--since-rev", str(start), "--all", "--json", "--timeout", "3").lines()
    assert [e["revision"] for e in events] == sorted(e["revision"] for e in events)
    assert all(e["resume"] == f"{e['revision']}:{e['seq'] + 1}" for e in events)
    codes = [e["event"] for e in events]
    assert {"link.refreshed", "load.updated", "engine.lease_expired", "engine.deregistered", "router.joined",
            "flags.drain", "link.established"} <= set(codes)
    established = next(e for e in events if e["event"] == "link.established")
    assert established["prefill_id"] == "P1" and established["decode_id"] == "D2"
    assert established["details"]["handshake_ms"] == 12.4 and established["value"]["state"] == "established"
    # the revocation removed D2's record and its link in one revision
    removed = next(e for e in events if e["event"] == "link.removed")
    dereg = next(e for e in events if e["event"] == "engine.deregistered")
    assert removed["revision"] == dereg["revision"] and removed["seq"] > dereg["seq"]
    # --prefix narrows the stream
    only_links = ctl("watch", "--since-rev", str(start), "--prefix", "links/", "--limit", "2", "--all",
                     "--timeout", "20").lines()
    assert {e["kind"] for e in only_links} == {"links"}


async def _read_lines(stream, count: int, timeout: float = 30) -> list[dict]:
    out = []
    while len(out) < count:
        line = await asyncio.wait_for(stream.readline(), timeout)
        assert line, "watcher ended early"
        out.append(json.loads(line))
    return out


async def _group(planter, client, name: str, size: int) -> None:
    """`size` keys under one lease, then the lease revoked: `size` deletes in one revision."""
    lease = await client.grant(60)
    for i in range(size):
        await planter.load(load(f"{name}{i}", running=i), lease=lease)
    await client.revoke(lease)


async def test_since_rev_resumes_without_gaps_or_duplicates_across_a_restart(ctl, planter, etcd, etcd_client):
    await planter.small_cluster()
    start = await _revision(etcd_client) + 1
    # history the first watcher replays, ending in a revision with 6 events
    for i in range(10):
        await planter.load(load("P1", running=i))
    await _group(planter, etcd_client, "g", 6)
    env = ctl_env(etcd.endpoints)
    first = await asyncio.create_subprocess_exec(
        *ctl_argv("watch", "--since-rev", str(start), "--all", "--json"), stdout=asyncio.subprocess.PIPE, env=env)
    consumed = await _read_lines(first.stdout, 10 + 6)  # 10 load puts, 6 puts of the group
    consumed += await _read_lines(first.stdout, 3)  # and 3 of the group's 6 deletes (one revision)
    assert consumed[-1]["type"] == "delete" and consumed[-1]["seq"] == 2
    os.kill(first.pid, signal.SIGKILL)  # the watcher dies mid-revision
    await first.wait()
    # the cluster moves on while nobody watches
    for i in range(5):
        await planter.engine(engine(f"X{i}", "decode", "http://127.0.0.1:1"))
    await _group(planter, etcd_client, "h", 4)
    second = await asyncio.create_subprocess_exec(
        *ctl_argv("watch", "--since-rev", consumed[-1]["resume"], "--all", "--json"),
        stdout=asyncio.subprocess.PIPE, env=env)
    try:
        resumed = await _read_lines(second.stdout, 3 + 5 + 8)
        # and while it watches live
        await planter.router(router("r9"))
        resumed += await _read_lines(second.stdout, 1)
    finally:
        second.kill()
        await second.wait()

    def ident(e: dict) -> tuple:
        return e["revision"], e["seq"], e["type"], e["key"]

    total = len(consumed) + len(resumed)
    truth = ctl("watch", "--since-rev", str(start), "--all", "--json", "--limit", str(total), "--timeout", "20").lines()
    assert [ident(e) for e in consumed + resumed] == [ident(e) for e in truth]
    assert len({ident(e) for e in truth}) == total  # no duplicates
    # ... and the truth is what etcd has: one line per change, in revision order
    kvs, now = await etcd_client.get_prefix(KEYS.root)
    assert truth[-1]["revision"] == now and truth[-1]["event"] == "router.joined"
    # resuming at a revision boundary (N = last revision + 1) works too
    boundary = ctl("watch", "--since-rev", str(consumed[-1]["revision"] + 1), "--all", "--json", "--limit", "1",
                   "--timeout", "20").lines()
    assert ident(boundary[0]) == ident(resumed[3])
    assert isinstance(EngineRecord.model_validate(next(e for e in resumed if e["kind"] == "engines")["value"]),
                      EngineRecord)


async def test_compacted_since_rev_is_refused_clearly(ctl, planter, etcd_client):
    await planter.small_cluster()
    old = await _revision(etcd_client)
    for i in range(3):
        await planter.load(load("P1", running=i))
    await etcd_client.compact(await _revision(etcd_client))
    res = ctl("watch", "--since-rev", str(old - 2))
    assert res.rc == 1 and "compacted" in res.err and "export" in res.err
    assert len(res.err.strip().splitlines()) == 1
