"""Staged-TCP KV migration between two processes over real DLSlime TCP, with CPU tensors as KV pools.

The peer process (tests/lmdeploy_ext/peer.py) plays the prefill: it serves its regions through its
link's control port and staging buffer. This process plays the decode and pulls.
"""

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dlslime")

from distserve.lmdeploy_ext.staged_tcp import (  # noqa: E402
    MigrationError,
    Segment,
    StagedTcpLink,
    StagedTcpSettings,
)
from tests.lmdeploy_ext.peer import pattern  # noqa: E402
from tests.util import REPO  # noqa: E402

SIZES = [1 << 20, 3 << 20]
PEER_STAGING = 256 << 10  # small: a migration takes several rounds


def _start_peer():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lmdeploy_ext.peer", ",".join(map(str, SIZES)), str(PEER_STAGING)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(REPO),
    )
    return proc, json.loads(proc.stdout.readline())


def _stop_peer(proc):
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def peer():
    """One prefill peer for the tests that leave it alive (a process start costs seconds on CI)."""
    proc, info = _start_peer()
    yield proc, info
    _stop_peer(proc)


@pytest.fixture
def own_peer():
    proc, info = _start_peer()
    yield proc, info
    _stop_peer(proc)


def make_link(info=None, **settings):
    defaults = {"staging_bytes": 1 << 20, "chunk_bytes": 64 << 10, "deadline_s": 20, "control_timeout_s": 5}
    link = StagedTcpLink("127.0.0.1", StagedTcpSettings(**{**defaults, **settings}), name="decode")
    local = [torch.zeros(n, dtype=torch.uint8) for n in SIZES]
    for k, t in enumerate(local):
        link.register_region(k, t.data_ptr(), t.numel(), "cpu")
    if info is not None:
        link.connect(info)
    return link, local


def expect(local, segs):
    ref = [pattern(k, n) for k, n in enumerate(SIZES)]
    for s in segs:
        got = local[s.key][s.local_offset : s.local_offset + s.length]
        assert torch.equal(got, ref[s.key][s.remote_offset : s.remote_offset + s.length]), s


async def test_pull_scattered_blocks_over_several_rounds(peer):
    _, info = peer
    link, local = make_link(info)
    try:
        # 100 one-block copies in reverse order, plus a 2 MiB range: 10 rounds of the peer's 256 KiB staging.
        segs = [Segment(0, b * 4096, (100 - b) * 4096, 4096) for b in range(100)] + [
            Segment(1, 1 << 20, 0, 2 << 20)
        ]
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        stats = await link.migrate(segs)
        task.cancel()
        expect(local, segs)
        assert stats["bytes"] == 100 * 4096 + (2 << 20)
        assert stats["rounds"] == -(-stats["bytes"] // PEER_STAGING)
        assert ticks > 0  # the event loop kept running during the migration
        untouched = local[0][101 * 4096 :]
        assert not untouched.any()  # nothing written outside the requested ranges
    finally:
        link.close()


async def test_local_validation_rejects_before_any_network_io(peer):
    _, info = peer
    link, _ = make_link(info)
    try:
        with pytest.raises(MigrationError, match="outside region 1"):
            await link.migrate([Segment(1, (3 << 20) - 10, 0, 11)])
        with pytest.raises(MigrationError, match="unknown remote region"):
            await link.migrate([Segment(5, 0, 0, 1)])
    finally:
        link.close()


def control_call(info, frames):
    """Speak the control protocol by hand (a misbehaving or hostile peer)."""
    with socket.create_connection((info["control"]["host"], info["control"]["port"]), timeout=5) as s:
        replies = []
        for f in frames:
            data = json.dumps(f).encode()
            s.sendall(struct.pack("!I", len(data)) + data)
            n = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))[0]
            replies.append(json.loads(s.recv(n, socket.MSG_WAITALL)))
            if not replies[-1].get("ok"):
                break
        return replies


def test_serving_side_checks_token_and_ranges(peer):
    _, info = peer
    assert control_call(info, [{"op": "hello", "token": "0" * 32}]) == [
        {"ok": False, "error": "bad link token"}
    ]
    hello = {"op": "hello", "token": info["token"]}
    out = control_call(info, [hello, {"op": "stage", "ranges": [[0, (1 << 20) - 4, 8]]}])
    assert out[1]["ok"] is False and "outside region 0" in out[1]["error"]
    out = control_call(info, [hello, {"op": "stage", "ranges": [[0, 0, PEER_STAGING + 1]]}])
    assert out[1]["ok"] is False and "exceeds" in out[1]["error"]
    out = control_call(info, [hello, {"op": "stage", "ranges": [[0, 0, 16]]}, {"op": "done"}])
    assert out[1]["ok"] and out[1]["nbytes"] == 16 and out[2] == {"ok": True}


async def test_wrong_token_fails_cleanly_and_is_not_retried_forever(peer):
    _, info = peer
    link, _ = make_link({**info, "token": "f" * 32}, deadline_s=5)
    try:
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match="bad link token"):
            await link.migrate([Segment(0, 0, 0, 4096)])
        assert time.monotonic() - t0 < 5
    finally:
        link.close()


async def test_peer_gone_is_a_clean_error_within_the_deadline(own_peer):
    proc, info = own_peer
    link, _ = make_link(info, deadline_s=4, control_timeout_s=1)
    try:
        await link.migrate([Segment(0, 0, 0, 4096)])  # works while the peer lives
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        with pytest.raises(MigrationError):
            await link.migrate([Segment(0, 0, 0, 4096)])
        assert time.monotonic() - t0 < 6
    finally:
        link.close()


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda i: {**i, "kind": "rdma"}, "not a distserve-staged-tcp"),
        (lambda i: {**i, "version": 99}, "version 99"),
        (lambda i: {k: v for k, v in i.items() if k != "regions"}, "malformed"),
        (lambda i: {**i, "regions": {"0": -5}}, "empty regions"),
    ],
)
def test_connect_refuses_malformed_peer_info(peer, mutate, why):
    _, info = peer
    link, _ = make_link()
    try:
        with pytest.raises(MigrationError, match=why):
            link.connect(mutate(info))
    finally:
        link.close()


def test_endpoint_info_has_no_memory_addresses():
    link, _ = make_link()
    try:
        info = link.endpoint_info()
        assert info["slime"]["mr_info"] == {} and info["control"]["host"] == "127.0.0.1"
        assert info["regions"] == {"0": SIZES[0], "1": SIZES[1]}
    finally:
        link.close()
