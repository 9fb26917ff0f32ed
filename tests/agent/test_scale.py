"""16 prefill x 16 decode null engines with their agents in-process (`distserve engine --null --count 16
--etcd ...`, two OS processes): all 256 links established, each pair handshaken exactly once.

The timed figures come from tools/bench_links.py (docs/benchmarks.md), not from this test.
"""

from __future__ import annotations

from discovery.client import EtcdClient
from tests.agent.conftest import Fleet, wait_full


async def test_16x16_all_256_links(etcd):
    fleet = Fleet(etcd.endpoints)
    try:
        fleet.start_in_process("prefill", 16, "--handshake-concurrency", "4")
        fleet.start_in_process("decode", 16, "--handshake-concurrency", "4")
        fleet.wait_engines()
        async with EtcdClient(fleet.etcd_config()) as client:
            view = await wait_full(client, fleet, timeout=120)
        assert len(view.usable_links()) == 256
        # One p2p_initialize per pair on each side: no duplicate or piled-up handshakes.
        counts = fleet.handshake_counts()
        assert counts == {node.id: 16 for node in fleet.nodes}, counts
    finally:
        fleet.stop()
