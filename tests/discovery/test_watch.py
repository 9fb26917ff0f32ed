"""watch_prefix and Informer against a real etcd: resume, compaction, progress, malformed values."""

from __future__ import annotations

import asyncio
import logging


from discovery.client import EtcdClient
from discovery.informer import Informer
from discovery.record import VersionedRecord
from discovery.watch import WatchEvent, watch_prefix


class Thing(VersionedRecord):
    name: str
    size: int = 0


async def _collect(agen, n: int, timeout: float = 10.0) -> list[WatchEvent]:
    out: list[WatchEvent] = []

    async def run():
        async for ev in agen:
            out.append(ev)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_list_then_watch_in_order(etcd_client: EtcdClient):
    await etcd_client.put("/w/a", b"1")
    await etcd_client.put("/w/b", b"2")
    await etcd_client.put("/wx", b"not under the prefix")
    agen = watch_prefix(etcd_client, "/w/")
    try:
        initial = await _collect(agen, 2)
        assert [(e.type, e.key, e.value) for e in initial] == [("put", "/w/a", b"1"), ("put", "/w/b", b"2")]
        r1 = await etcd_client.put("/w/c", b"3")
        await etcd_client.put("/wx", b"ignored")
        await etcd_client.delete("/w/a")
        later = await _collect(agen, 2)
        assert [(e.type, e.key, e.value) for e in later] == [("put", "/w/c", b"3"), ("delete", "/w/a", None)]
        assert later[0].mod_revision == r1 and later[1].mod_revision == r1 + 2
    finally:
        await agen.aclose()


async def test_replay_of_5000_events_cut_by_sigkill_is_exact(etcd, etcd_client: EtcdClient, caplog):
    """etcd3aio's own resume (header.revision + 1) loses most of these; ours must deliver all, once, in order."""
    sem = asyncio.Semaphore(64)

    async def put(i: int) -> int:
        async with sem:
            return await etcd_client.put(f"/r/{i % 100:03d}", f"{i}".encode())

    revisions = sorted(await asyncio.gather(*(put(i) for i in range(5000))))
    caplog.set_level(logging.INFO, logger="discovery.watch")
    agen = watch_prefix(etcd_client, "/r/", start_revision=revisions[0])
    got: list[WatchEvent] = []
    try:
        async def consume():
            async for ev in agen:
                got.append(ev)
                if len(got) == 200:
                    etcd.kill()  # mid-replay: the stream still had most of the history to send
                    etcd.restart()
                if len(got) == 5000:
                    return

        await asyncio.wait_for(consume(), 60)
    finally:
        await agen.aclose()
    assert [e.mod_revision for e in got] == revisions  # all, exactly once, in order
    assert all(e.type == "put" for e in got)
    assert any("stream broken" in r.getMessage() for r in caplog.records), "the kill did not cut the stream"


async def test_compacted_start_revision_converges_to_a_fresh_list(etcd_client: EtcdClient):
    for i in range(10):
        await etcd_client.put(f"/c/{i}", b"v0")
    kvs, r0 = await etcd_client.get_prefix("/c/")
    view = {kv.key: kv.value for kv in kvs}
    known = {kv.key: kv.mod_revision for kv in kvs}
    # history after r0: updates, deletes, creates, then compaction beyond all of it
    for i in range(0, 10, 2):
        await etcd_client.delete(f"/c/{i}")
    await etcd_client.put("/c/1", b"v1")
    await etcd_client.put("/c/new", b"n")
    await etcd_client.put("/c/gone-again", b"x")
    await etcd_client.delete("/c/gone-again")
    _, now = await etcd_client.get_prefix("/c/")
    await etcd_client.compact(now)

    agen = watch_prefix(etcd_client, "/c/", start_revision=r0 + 1, known=known, meta_events=True)
    try:
        async def until_synced():
            async for ev in agen:
                if ev.type == "synced":
                    return ev
                if ev.type == "put":
                    view[ev.key] = ev.value
                elif ev.type == "delete":
                    view.pop(ev.key, None)

        synced = await asyncio.wait_for(until_synced(), 10)
        fresh, _ = await etcd_client.get_prefix("/c/")
        assert view == {kv.key: kv.value for kv in fresh}
        assert synced.revision >= now
        # and it keeps watching after the re-list
        await etcd_client.put("/c/after", b"a")
        ev = (await _collect(agen, 1))[0]
        assert (ev.type, ev.key, ev.value) == ("put", "/c/after", b"a")
    finally:
        await agen.aclose()


async def test_progress_notifications_advance_an_idle_watch(etcd_client: EtcdClient):
    agen = watch_prefix(etcd_client, "/idle/", meta_events=True, progress_interval=0.2)
    try:
        first = (await _collect(agen, 1))[0]
        assert first.type == "synced"
        rev = await etcd_client.put("/elsewhere", b"x")  # outside the prefix
        async def until_progress():
            async for ev in agen:
                if ev.type == "progress" and ev.revision >= rev:
                    return ev
        ev = await asyncio.wait_for(until_progress(), 5)
        assert ev.key == "" and ev.value is None
    finally:
        await agen.aclose()


async def test_informer_view_callbacks_and_malformed_values(etcd_client: EtcdClient, caplog):
    await etcd_client.put("/inf/a", Thing(name="a", size=1).encode())
    await etcd_client.put("/inf/bad0", b"{not json")
    changes: list[tuple] = []
    inf: Informer[Thing] = Informer(etcd_client, "/inf/", decode=lambda key, raw: Thing.decode(raw))
    inf.add_listener(lambda kind, key, old, new: changes.append((kind, key, old and old.size, new and new.size)))
    with caplog.at_level(logging.WARNING, logger="discovery.informer"):
        await inf.start()
        try:
            await inf.wait_synced(5)
            assert set(inf.items()) == {"/inf/a"} and inf.get("/inf/a").size == 1
            assert inf.malformed_count == 1
            await etcd_client.put("/inf/b", Thing(name="b", size=2).encode())
            await etcd_client.put("/inf/a", b'{"schema_version": 99, "name": "a"}')  # too new: malformed
            await etcd_client.put("/inf/c", b'{"name": 5}')  # wrong type
            last = await etcd_client.put("/inf/d", Thing(name="d", size=4).encode())
            for _ in range(100):
                if inf.revision >= last:
                    break
                await asyncio.sleep(0.02)
            assert inf.revision >= last
            assert {k: v.size for k, v in inf.items().items()} == {"/inf/b": 2, "/inf/d": 4}
            assert inf.malformed_count == 3
            assert changes == [("put", "/inf/a", None, 1), ("put", "/inf/b", None, 2), ("delete", "/inf/a", 1, None),
                               ("put", "/inf/d", None, 4)]
            # a bad value fixed later comes back into the view
            await etcd_client.put("/inf/c", Thing(name="c", size=3).encode())
            await etcd_client.delete("/inf/b")
            for _ in range(100):
                if "/inf/c" in inf and "/inf/b" not in inf:
                    break
                await asyncio.sleep(0.02)
            assert {k: v.size for k, v in inf.items().items()} == {"/inf/c": 3, "/inf/d": 4}
        finally:
            await inf.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("malformed" in w for w in warnings) == 3
    assert any("/inf/bad0" in w for w in warnings)


async def test_informer_survives_a_listener_error_and_an_etcd_restart(etcd, etcd_client: EtcdClient):
    inf = Informer(etcd_client, "/s/")
    inf.add_listener(lambda *a: 1 / 0)
    seen: list[str] = []
    inf.add_listener(lambda kind, key, old, new: seen.append(f"{kind}:{key}"))
    await inf.start()
    try:
        await inf.wait_synced(5)
        await etcd_client.put("/s/1", b"x")
        etcd.kill()
        etcd.restart()
        await etcd_client.put("/s/2", b"y")
        await etcd_client.delete("/s/1")
        for _ in range(200):
            if seen == ["put:/s/1", "put:/s/2", "delete:/s/1"]:
                break
            await asyncio.sleep(0.02)
        assert seen == ["put:/s/1", "put:/s/2", "delete:/s/1"]
        assert inf.items() == {"/s/2": b"y"}
    finally:
        await inf.stop()
