"""A separate process that holds keys under a LeaseSession (for crash and graceful-exit tests).

python -m tests.discovery.lease_holder ENDPOINTS TTL KEY [KEY ...]
Prints "READY <lease_id>" once every key is written; SIGTERM closes the session (revoke) and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from discovery.lease import LeaseSession


async def main(endpoints: str, ttl: int, keys: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with EtcdClient(EtcdConfig(endpoints=endpoints, timeout=5.0)) as client:
        session = LeaseSession(client, ttl=ttl, name="holder")
        await session.start()
        for key in keys:
            await session.put(key, b"held")
        print(f"READY {session.lease_id}", flush=True)
        await stop.wait()
        await session.close(revoke=True)
        print("CLOSED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])))
