#!/usr/bin/env python3
"""The floor under the router: what serving one PD request costs a process that does nothing but the two
engine calls, behind aiohttp's server and behind a bare asyncio protocol, beside the real router.

Why: it separates the server's share of the router's CPU per request from the orchestration's (the reason
for the fast path, distserve/router/fastpath.py). One etcd, one null prefill and one null decode engine,
then each front end in its own process, measured in turn (interleaved repeats): psutil CPU of the front
end's process over a closed loop of 8 aiohttp clients, divided by the requests answered. The floors use the
router's own engine client (distserve/router/http1.py) and send the decode a migration_request as the router
does; they do no validation, routing, metrics or logging.

    .venv/bin/python tools/bench_server_floor.py [--seconds 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402 - after the path tweak
import orjson  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402
from aiohttp import web  # noqa: E402

from distserve.router.http1 import EnginePool  # noqa: E402
from distserve.testing.cluster import null_pd_cluster, start_router  # noqa: E402
from distserve.testing.ports import free_port  # noqa: E402

MODEL = "distserve-reference"
HEADERS = b"Content-Type: application/json\r\n"


async def _pd(pool, prefill: str, decode: str, raw: bytes) -> bytes:
    body = orjson.loads(raw)
    pre = dict(body, max_tokens=1, stream=False)
    resp = await pool.request(prefill, b"POST", b"/v1/completions", orjson.dumps(pre), HEADERS)
    answer = orjson.loads(await resp.read())
    body["migration_request"] = {
        "remote_session_id": answer.get("remote_session_id"), "remote_block_ids": answer.get("cache_block_ids"),
        "remote_token_id": 1, "protocol": 1, "remote_engine_id": prefill, "is_dummy_prefill": False,
    }
    resp = await pool.request(decode, b"POST", b"/v1/completions", orjson.dumps(body), HEADERS)
    return await resp.read()


def serve(mode: str, port: int, prefill: str, decode: str) -> None:
    """A floor front end (`--serve`): 'aiohttp' or 'protocol'."""

    async def with_aiohttp() -> None:
        pool = EnginePool()

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=await _pd(pool, prefill, decode, await request.read()),
                                content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    class Bare(asyncio.Protocol):
        """Content-Length requests only, one at a time: the least a server can do."""

        def __init__(self, pool) -> None:
            self.pool, self.buf, self.transport = pool, b"", None

        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.buf += data
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            asyncio.get_running_loop().create_task(self.answer(rest[:length]))

        async def answer(self, raw: bytes) -> None:
            out = await _pd(self.pool, prefill, decode, raw)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(out), out))

    async def with_protocol() -> None:
        pool = EnginePool()
        await asyncio.get_running_loop().create_server(lambda: Bare(pool), "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(with_aiohttp() if mode == "aiohttp" else with_protocol())


def cpu_ms_per_request(url: str, pid: int, seconds: float) -> float:
    proc = psutil.Process(pid)
    body = {"model": MODEL, "prompt": "hello " * 30, "max_tokens": 16}

    async def load() -> int:
        async with aiohttp.ClientSession() as session:
            async def client() -> int:
                end, n = time.monotonic() + seconds, 0
                while time.monotonic() < end:
                    async with session.post(url + "/v1/completions", json=body,
                                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:200]}")
                        await resp.read()
                        n += 1
                return n
            return sum(await asyncio.gather(*[client() for _ in range(8)]))

    before = proc.cpu_times()
    n = asyncio.run(load())
    after = proc.cpu_times()
    return (after.user + after.system - before.user - before.system) * 1000 / n


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor server on port {port} did not start") from None
            time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serve", nargs=4, metavar=("MODE", "PORT", "PREFILL", "DECODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        mode, port, prefill, decode = args.serve
        serve(mode, int(port), prefill, decode)
        return 0
    if args.seconds <= 0 or args.repeats < 1:
        print("bench_server_floor: --seconds must be > 0 and --repeats >= 1", file=sys.stderr)
        return 2
    with null_pd_cluster("floor") as (etcd, urls, procs):
        router, router_url = start_router(etcd, "--cluster", "floor", log_level="WARNING")
        procs.append(router)
        fronts = [("router", router_url, router.pid)]
        for mode in ("aiohttp", "protocol"):
            port = free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port), urls["prefill"],
                                     urls["decode"]])
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            _wait_listening(port, proc)
            fronts.append((f"{mode} floor", url, proc.pid))
        for _, url, pid in fronts:  # warm-up
            cpu_ms_per_request(url, pid, 1.0)
        results: dict[str, list[float]] = {name: [] for name, _, _ in fronts}
        for _ in range(args.repeats):
            for name, url, pid in fronts:
                results[name].append(cpu_ms_per_request(url, pid, args.seconds))
    print("| front end | CPU-ms per PD request (median) | repeats |")
    print("| --- | --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
