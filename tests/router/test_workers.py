"""`distserve router --workers N`: N replicas on one port, each with its own record, supervised.

Real etcd, real null engines (one prefill, one decode, handshaken), the real router CLI as a process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

from distserve.cluster.keys import Keys
from distserve.cluster.records import RouterRecord
from tests.router.cluster import (
    MODEL,
    etcd_client,
    null_farm,
    publish_pd,
    start_router,
)


@pytest.fixture(scope="module")
def farm():
    with null_farm(prefills=1, decodes=1) as farm:
        yield farm


@pytest.fixture
async def cluster(farm):
    """An etcd client and a fresh cluster name with one routable prefill->decode pair published."""
    async with etcd_client(farm["etcd"].endpoints) as client:
        keys = Keys(f"w{uuid.uuid4().hex[:8]}")
        await publish_pd(client, keys, farm)
        yield client, keys


async def router_records(client, keys) -> dict[str, RouterRecord]:
    kvs, _ = await client.get_prefix(keys.prefix("routers"))
    recs = (RouterRecord.decode(kv.value) for kv in kvs)
    return {r.id: r for r in recs}


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def serve_some(url: str, n: int) -> None:
    """n requests, each on its own connection (the kernel spreads connections, not requests), half streamed,
    through the official client; every one must succeed."""

    async def one(i: int) -> None:
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="none", http_client=httpx.AsyncClient(timeout=30)
        ) as client:
            if i % 2:
                stream = await client.completions.create(model=MODEL, prompt=f"hi {i}", max_tokens=4, stream=True)
                chunks = [c async for c in stream]
                assert chunks and chunks[-1].choices[0].finish_reason is not None
            else:
                out = await client.completions.create(model=MODEL, prompt=f"hi {i}", max_tokens=4)
                assert out.choices[0].text is not None

    await asyncio.gather(*(one(i) for i in range(n)))


async def test_workers_share_a_port_restart_and_stop_together(farm, cluster):
    client, keys = cluster
    proc, url = start_router(
        farm["etcd"].endpoints, "--cluster", keys.cluster, "--router-id", "rw", "--workers", "2"
    )
    try:
        # both workers register, each under its own suffixed id and its own pid
        recs = await wait_for(
            lambda: _ids(client, keys, {"rw-w0", "rw-w1"}), 20, "both worker records"
        )
        pids = {r.id: r.pid for r in recs.values()}
        assert len(set(pids.values())) == 2 and proc.pid not in pids.values()
        assert all(r.url == url for r in recs.values())  # one port, one URL

        await serve_some(url, 40)

        # both served: each worker's record counts its own requests (refreshed every 5 s)
        async def both_served():
            recs = await router_records(client, keys)
            return all(recs[i].requests_total > 0 for i in ("rw-w0", "rw-w1")) and recs

        await wait_for(both_served, 15, "requests counted by both workers")

        # a worker that dies is restarted (back-off starts at 0.5 s) and registers again
        os.kill(pids["rw-w0"], signal.SIGKILL)

        async def back():
            recs = await router_records(client, keys)
            w0 = recs.get("rw-w0")
            return w0 is not None and w0.pid != pids["rw-w0"] and alive(w0.pid) and w0

        w0 = await wait_for(back, 20, "the restarted worker's record")
        new_pids = {"rw-w0": w0.pid, "rw-w1": pids["rw-w1"]}
        await serve_some(url, 10)

        # one SIGTERM stops everything gracefully: exit 0, no worker left, records revoked at once
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, proc.tail(3000)
        for pid in new_pids.values():
            assert not alive(pid), f"worker {pid} outlived the supervisor"
        assert await router_records(client, keys) == {}
    finally:
        proc.kill()


async def _ids(client, keys, wanted: set[str]):
    recs = await router_records(client, keys)
    return recs if wanted <= set(recs) else None


def test_bad_worker_counts_are_refused_with_exit_2():
    for value in ("0", "-1", "257"):
        out = subprocess.run(
            [sys.executable, "-m", "distserve", "router", "--workers", value, "--etcd", "http://127.0.0.1:1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == ["distserve router: --workers must be in 1-256"]


# ---------------------------------------------------------------------------------------------- rolling restart
class ReadyPool:
    """What a load balancer does: polls each router's /health/ready and sends only to the ready ones."""

    def __init__(self, routers: dict[str, str], period: float = 0.1) -> None:
        self.routers = routers
        self.ready = dict(routers)
        self.period = period
        self.first_not_ready: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._quiet_until = 0.0

    def hold(self, seconds: float) -> None:
        """No poll for `seconds`: a balancer whose next poll is that far away (it keeps sending as it last saw)."""
        self._quiet_until = time.monotonic() + seconds

    def __call__(self) -> list[tuple[str, str]]:
        return list(self.ready.items())

    async def _poll(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if time.monotonic() < self._quiet_until:
                    await asyncio.sleep(self._quiet_until - time.monotonic())
                for name, url in self.routers.items():
                    try:
                        ok = (await http.get(f"{url}/health/ready")).status_code == 200
                    except httpx.ConnectError:  # nothing listens: out
                        ok = False
                    except httpx.HTTPError:  # a slow answer on a busy machine: no verdict
                        continue
                    if time.monotonic() < self._quiet_until:  # held while this poll ran: it never happened
                        break
                    if ok:
                        self.ready[name] = url
                    else:
                        self.ready.pop(name, None)
                        self.first_not_ready.setdefault(name, time.time())
                await asyncio.sleep(self.period)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_rolling_restart_under_load_fails_no_request(farm, cluster):
    """SIGTERM one of two replicas under load (scaled to a 2-core machine: 16 clients, half of them streams,
    plus 4 long streams): it turns not ready and leaves etcd first, keeps serving for its drain delay, its
    requests in flight (streams too) finish, it exits 0, and not one request fails."""
    from distserve.testing.chaos.load import LoadGenerator

    client, keys = cluster
    routers = {}
    procs = {}
    for name in ("ra", "rb"):
        procs[name], routers[name] = start_router(
            farm["etcd"].endpoints, "--cluster", keys.cluster, "--router-id", name, "--drain-delay", "1.0",
            "--log-level", "WARNING",
        )
    pool = ReadyPool(routers)
    pool.start()
    load = LoadGenerator(pool, MODEL, workers=16, long_workers=4, interval=0.005, max_tokens=16,
                         long_tokens=600, timeout=30)
    try:
        await wait_for(lambda: _ids(client, keys, {"ra", "rb"}), 20, "both router records")
        await load.start()
        await asyncio.sleep(1.5)
        # SIGTERM while a stream is in flight on the victim (on null engines streams are short: wait for one)
        for _ in range(2500):
            if any(r.stream and r.routers_tried and r.routers_tried[-1] == "ra" for r in load.in_flight()):
                break
            await asyncio.sleep(0.002)
        victim = procs["ra"]
        pool.hold(0.3)  # the balancer's next poll 0.3 s away: requests keep coming to the victim meanwhile
        t_term = time.time()
        victim.signal(signal.SIGTERM)
        record_gone = None
        while victim.alive():
            if record_gone is None and "ra" not in await router_records(client, keys):
                record_gone = time.time()
            await asyncio.sleep(0.02)
        t_exit = time.time()
        assert victim.wait(timeout=30) == 0, victim.tail(3000)
        await asyncio.sleep(1.0)
        await load.stop()
    finally:
        await pool.stop()
        for p in procs.values():
            p.kill()

    records = load.records
    bad = [r for r in records if not r.ok]
    assert not bad, [(r.router, r.outcome, r.status, r.error) for r in bad[:5]]
    # readiness and etcd first: both while the victim still ran (and served)
    assert record_gone is not None and t_term <= record_gone < t_exit
    assert t_term <= pool.first_not_ready["ra"] < t_exit
    on_victim = [r for r in records if r.router == "ra"]
    in_flight = [r for r in on_victim if r.start <= t_term <= (r.end or t_exit)]
    assert in_flight and any(r.stream for r in in_flight), "no request was in flight on the victim at SIGTERM"
    assert any(r.long for r in in_flight) or len(in_flight) >= 2
    # sent there after the SIGTERM, before the balancer noticed: served during the drain delay
    assert any(r.start > t_term for r in on_victim)
    assert sum(1 for r in records if r.router == "rb" and r.start > t_exit) > 0
