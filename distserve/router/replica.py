"""One router replica in this process: serve until SIGTERM/SIGINT. `distserve router` runs one here; with
--workers N the supervisor (workers.py) starts N processes that each run one (and cli.py starts the supervisor)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from discovery.client import EtcdClient, EtcdError
from discovery.config import EtcdConfig
from distserve.router import compiled
from distserve.router.app import Router
from distserve.router.settings import RouterSettings

log = logging.getLogger("distserve.router")


async def serve(settings: RouterSettings, etcd_config: EtcdConfig, reuse_port: bool = False) -> int:
    client = EtcdClient(etcd_config)
    await client.connect()
    router = Router(settings, client, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await router.start()
        # Everything allocated so far (modules, records, the app) lives as long as the process: keep it out
        # of the collector's scans, and collect the young generation less often. A full collection over it
        # takes milliseconds, and it would land on whichever request happens to allocate at that moment.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 50, 100)
        print(
            f"distserve router {router.router_id} listening on {router.url} "
            f"(cluster {settings.cluster}, strategy {router.strategy_name}, compiled parts {compiled.summary()})",
            flush=True,
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        await router.stop()
        await client.close()
    return 0


def run_router(settings: RouterSettings, etcd_config: EtcdConfig, reuse_port: bool = False) -> int:
    """One replica in this process until SIGTERM/SIGINT: 0 after a graceful stop, 1 if it cannot start."""
    try:  # optional: not installed on Windows
        import uvloop  # optional dependency (not on Windows)

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        run = asyncio.run
    try:
        return run(serve(settings, etcd_config, reuse_port))
    except (EtcdError, OSError) as exc:
        print(f"distserve router: {exc}", file=sys.stderr)
        return 1
