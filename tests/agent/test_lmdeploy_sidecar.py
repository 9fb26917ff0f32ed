"""The sidecar agent next to lmdeploy-shaped engines (tests/agent/fake_lmdeploy.py, a stand-in named as such:
lmdeploy needs CUDA). What differs from the reference engine: no instance_id, no kv_layout, no role in
engine_info; load only from `--enable-metrics`; an engine restart seen as an outage or a new process start
time."""

from __future__ import annotations

import asyncio
import json
import urllib.request

from discovery.client import EtcdClient
from tests.agent.conftest import Fleet, Node, read_view, wait_until
from tests.util import Proc, free_port, wait_http

MODEL = "internlm/internlm2_5-7b-chat"


def fake_stats(node: Node) -> dict:
    with urllib.request.urlopen(f"{node.url}/_fake/stats", timeout=5) as resp:
        return json.loads(resp.read())


def start_fake(fleet: Fleet, node: Node, *extra: str) -> None:
    node.engine = Proc.python(["tests.agent.fake_lmdeploy", "--port", str(node.port), "--role", node.role, *extra],
                              name=f"fake-lmdeploy-{node.port}")
    fleet.procs.append(node.engine)
    wait_http(f"{node.url}/health", timeout=30)


async def test_lmdeploy_sidecars_register_link_publish_load_and_follow_restarts(etcd):
    fleet = Fleet(etcd.endpoints)
    prefill, decode = Node("prefill", free_port()), Node("decode", free_port())
    fleet.nodes += [prefill, decode]
    prefill_args = ("--enable-metrics", "--running", "2", "--waiting", "1", "--usage", "0.25")
    try:
        start_fake(fleet, prefill, *prefill_args)
        start_fake(fleet, decode)  # no --enable-metrics: no load figures, no process identity
        for node in fleet.nodes:
            fleet.start_agent(node, "--software-version", "lmdeploy 0.18.0")
        async with EtcdClient(fleet.etcd_config()) as client:
            async def linked(expect_decode_instance: str | None = None, expect_prefill_instance: str | None = None):
                view = await read_view(client)
                if view.usable_links() != {(prefill.id, decode.id)}:
                    return False
                if expect_decode_instance and view.engines[decode.id].instance == expect_decode_instance:
                    return False
                if expect_prefill_instance and view.engines[prefill.id].instance == expect_prefill_instance:
                    return False
                return True

            await wait_until(linked, 30, "lmdeploy prefill and decode linked")
            view = await read_view(client)
            p, d = view.engines[prefill.id], view.engines[decode.id]
            for record in (p, d):
                assert record.engine_kind == "lmdeploy" and record.models == [MODEL]
                assert record.transfer.protocol == "rdma"  # lmdeploy's only implemented transport
                assert record.engine_info.block_size == 64 and record.engine_info.kv_layout is None
                assert record.software_version == "lmdeploy 0.18.0"
            assert p.instance.startswith("pst-")  # from process_start_time_seconds
            assert d.instance.startswith("a-")  # drawn by the agent: lmdeploy exposes no identity
            load = view.load[prefill.id]
            assert (load.running, load.waiting, load.kv_blocks_total, load.kv_blocks_free) == (2, 1, 1000, 750)
            assert load.prefill_tokens_pending is None and load.preserved_blocks is None  # not exposed by lmdeploy
            assert decode.id not in view.load  # no --enable-metrics: nothing to publish
            assert fake_stats(prefill)["p2p_initialize"] == 1 and fake_stats(decode)["p2p_initialize"] == 1

            # The decode engine restarts (lmdeploy takes seconds to load a model: the port is closed meanwhile).
            decode.engine.kill()
            await asyncio.sleep(1.5)
            start_fake(fleet, decode)
            await wait_until(lambda: linked(expect_decode_instance=d.instance), 15, "new decode process linked")
            view = await read_view(client)
            assert view.engines[decode.id].incarnation != d.incarnation
            assert fake_stats(prefill)["p2p_initialize"] == 2 and fake_stats(decode)["p2p_initialize"] == 1

            # The prefill engine restarts: a new process start time, even if no probe saw it down.
            prefill.engine.kill()
            start_fake(fleet, prefill, *prefill_args)
            await wait_until(lambda: linked(expect_prefill_instance=p.instance), 15, "new prefill process linked")
            assert fake_stats(prefill)["p2p_initialize"] == 1

            # Only the prefill's agent restarts: same process start time, so the link is kept, not redone.
            before = (fake_stats(prefill)["p2p_initialize"], fake_stats(decode)["p2p_initialize"])
            view = await read_view(client)
            prefill.agent.kill()
            fleet.start_agent(prefill)

            async def re_registered() -> bool:
                new = await read_view(client)
                record = new.engines.get(prefill.id)
                return (record is not None and record.incarnation != view.engines[prefill.id].incarnation
                        and await linked())

            await wait_until(re_registered, 15, "prefill agent back, link kept")
            assert (fake_stats(prefill)["p2p_initialize"], fake_stats(decode)["p2p_initialize"]) == before
    finally:
        fleet.stop()


async def test_handshake_retries_then_links_and_a_kv_mismatch_is_recorded_failed(etcd):
    fleet = Fleet(etcd.endpoints)
    flaky = Node("prefill", free_port())  # its first 2 p2p_initialize calls fail
    other_layout = Node("prefill", free_port())  # a model with 16 layers: its KV pool cannot match
    decode = Node("decode", free_port())
    fleet.nodes += [flaky, other_layout, decode]
    try:
        start_fake(fleet, flaky, "--fail-initialize", "2")
        start_fake(fleet, other_layout, "--pool-layers", "16")
        start_fake(fleet, decode)
        for node in fleet.nodes:
            fleet.start_agent(node)
        async with EtcdClient(fleet.etcd_config()) as client:
            async def settled() -> bool:
                view = await read_view(client)
                good, bad = view.links.get((flaky.id, decode.id)), view.links.get((other_layout.id, decode.id))
                return good is not None and good.state == "established" and bad is not None and bad.state == "failed"

            await wait_until(settled, 30, "flaky pair established after retries, mismatched pair failed")
            view = await read_view(client)
            assert view.usable_links() == {(flaky.id, decode.id)}
            assert fake_stats(flaky)["p2p_initialize"] == 3  # two failures, then success: bounded retries
            assert fake_stats(flaky)["p2p_drop_connect"] >= 2  # half-made state cleared before each retry
            failed = view.links[(other_layout.id, decode.id)]
            assert "KV pools differ" in failed.error
            assert fake_stats(other_layout)["p2p_initialize"] == 1  # a mismatch is not retried in a loop
            await asyncio.sleep(2.0)
            assert fake_stats(other_layout)["p2p_initialize"] == 1
            # When an engine of a failed pair changes (here: the mismatched prefill restarts), it is tried again.
            other_layout.engine.kill()
            await asyncio.sleep(1.5)
            start_fake(fleet, other_layout, "--pool-layers", "16")

            async def retried() -> bool:
                view = await read_view(client)
                record, link = view.engines.get(other_layout.id), view.links.get((other_layout.id, decode.id))
                return (record is not None and link is not None and link.state == "failed"
                        and link.prefill_incarnation == record.incarnation != failed.prefill_incarnation)

            await wait_until(retried, 15, "failed pair tried again with the restarted engine")
            assert fake_stats(other_layout)["p2p_initialize"] == 1
    finally:
        fleet.stop()
