"""The prefix-cache stream of lmdeploy engines (distserve.lmdeploy_ext.cache_events), on CPU.

lmdeploy (and torch) are not installed where CI runs, so its trie node is stood in for by `FakeTrieNode`
/ `FakeBlockTrie` below, which have the shape the hooks rely on in lmdeploy 0.17/0.18
(lmdeploy/pytorch/paging/block_trie/node.py: `attach_to(parent)` once per fresh full block,
`detach_leaf()` on eviction, adapter roots with block_id -1). tools/gpu/cache_events.py runs the same
code inside real lmdeploy engines. Everything else here is real: the key chain of
distserve.cluster.prefix_keys, the engine-side block log, the api_server-side tracker and the NDJSON
stream through the ASGI middleware.
"""

import asyncio
import json

import pytest

from distserve.cluster.prefix_keys import chat_keys, key_hex, text_keys
from distserve.lmdeploy_ext import cache_events as ce
from distserve.lmdeploy_ext.server_patches import CACHE_EVENTS, DistserveApiMiddleware, PeerBook


class FakeArray(list):
    def tolist(self):
        return list(self)


class FakeTrieNode:
    """Stand-in for lmdeploy's block_trie Node (topology methods only, same contract)."""

    def __init__(self, block_id, token_ids=None, adapter_name=None, extra_identity=()):
        self.block_id = block_id
        self.token_ids = None if token_ids is None else FakeArray(token_ids)
        self.adapter_name = adapter_name
        self.extra_identity = extra_identity
        self.children = {}
        self.parent = None

    def attach_to(self, parent):
        parent.children[tuple(self.token_ids)] = self
        self.parent = parent

    def detach_leaf(self):
        if self.children or self.parent is None:
            return False
        del self.parent.children[tuple(self.token_ids)]
        self.parent = None
        return True


class FakeBlockTrie:
    def __init__(self, block_size=4):
        self.block_size = block_size
        self.enabled = True


FAKE_LOG = ce.BlockLog(ring=8)


@pytest.fixture
def hooked():
    # Installed once on the fake classes (lmdeploy's are never touched here); a fresh log per test.
    assert ce.install_trie_hooks(FakeTrieNode, FakeBlockTrie, log=FAKE_LOG)
    FAKE_LOG.clear()
    return FAKE_LOG


def insert_path(root, ids, block_size):
    node, nodes = root, []
    for start in range(0, len(ids) - block_size + 1, block_size):
        child = FakeTrieNode(len(nodes), ids[start: start + block_size])
        child.attach_to(node)
        nodes.append(child)
        node = child
    return nodes


def test_engine_hooks_name_blocks_as_the_api_server_chain_does(hooked):
    root = FakeTrieNode(-1)
    ids = list(range(100, 113))
    nodes = insert_path(root, ids, 4)
    assert hooked.blocks == set(ce.block_chain(ids, 4)) and len(nodes) == 3
    assert nodes[-1].detach_leaf()
    assert ce.block_chain(ids, 4)[-1] not in hooked.blocks
    assert [op for _, op, _ in hooked.events] == [1, 1, 1, -1]


def test_other_adapters_and_multimodal_blocks_are_not_published(hooked):
    lora_root = FakeTrieNode(-1, adapter_name="lora")
    insert_path(lora_root, list(range(8)), 4)
    root = FakeTrieNode(-1)
    vl = FakeTrieNode(0, [1, 2, 3, 4], extra_identity=("img",))
    vl.attach_to(root)
    FakeTrieNode(1, [5, 6, 7, 8]).attach_to(vl)  # below an unnamed block: unnamed too
    assert hooked.blocks == set()


def test_new_trie_clears_the_log_and_resume_falls_back_to_snapshot(hooked):
    insert_path(FakeTrieNode(-1), list(range(8)), 4)
    gen, seq = hooked.gen, hooked.seq
    assert hooked.since(gen, 1)["events"] == [[1, f"{ce.block_chain(list(range(8)), 4)[1]:016x}"]]
    FakeBlockTrie()
    ans = hooked.since(gen, seq)
    assert ans["snapshot"] == [] and ans["gen"] != gen


def test_block_ring_overflow_gives_a_snapshot(hooked):
    root = FakeTrieNode(-1)
    insert_path(root, list(range(40)), 4)  # 10 events, ring of 8
    ans = hooked.since(hooked.gen, 1)
    assert "snapshot" in ans and len(ans["snapshot"]) == 10
    assert "events" in hooked.since(hooked.gen, 5)


def byte_encode(text):
    return [1] + list(text.encode())  # BOS + bytes: a tokenizer whose prefixes are exact


def render(messages):
    return byte_encode("".join(f"<{m['role']}>{m['content']}</>" for m in messages))


def test_chat_keys_map_to_whole_blocks_of_each_message_prefix():
    msgs = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "q" * 30}]
    full = byte_encode("".join(f"<{m['role']}>{m['content']}</>" for m in msgs) + "<assistant>")
    items = ce.request_key_blocks({"messages": msgs}, full, 16, render_chat=render, encode=byte_encode)
    chain = ce.block_chain(full, 16)
    t1, t2 = len(render(msgs[:1])), len(render(msgs))
    assert items == [
        (chat_keys(msgs)[0], t1 // 16 * 16, chain[t1 // 16 - 1]),
        (chat_keys(msgs)[1], t2 // 16 * 16, chain[t2 // 16 - 1]),
    ]


def test_chat_keys_stop_where_the_template_is_not_a_prefix():
    msgs = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "q" * 30}]
    full = byte_encode("PREAMBLE" + "x" * 100)
    assert ce.request_key_blocks({"messages": msgs}, full, 16, render_chat=render, encode=byte_encode) == []


def test_text_keys_count_tokens_wholly_inside_the_chunks():
    prompt = "é" * 100  # 200 bytes: 3 chunks of 64; cuts at odd bytes drop the cut character
    full = byte_encode(prompt)
    items = ce.request_key_blocks({"prompt": prompt}, full, 16, render_chat=None, encode=byte_encode)
    keys = text_keys(prompt)
    assert [(k, t) for k, t, _ in items] == [(keys[0], 64), (keys[1], 128), (keys[2], 192)]


def test_text_keys_of_long_prompts_are_sampled_keeping_the_longest():
    idx = ce.sample_indices(1000, 64)
    assert len(idx) <= 64 and idx[-1] == 1000 and idx == sorted(set(idx))


def test_tracker_stores_a_key_when_its_block_arrives_and_removes_it_on_eviction():
    log = ce.KeyLog("inc")
    tr = ce.KeyTracker(log)
    tr.add_request([(11, 64, 0xA), (12, 128, 0xB)])
    assert log.keys == {} and len(tr.pending) == 2
    tr.blocks_stored([0xA, 0xB])
    assert dict(log.keys) == {11: 64, 12: 128}
    tr.blocks_removed([0xB])
    assert dict(log.keys) == {11: 64}
    tr.add_request([(13, 64, 0xA)])  # already cached: stored at once
    assert dict(log.keys) == {11: 64, 13: 64}
    tr.reset([])  # an engine snapshot without the block
    assert log.keys == {}
    assert [e["type"] for e in log.ring] == ["stored", "removed", "stored", "removed"]
    assert [e["seq"] for e in log.ring] == [1, 2, 3, 4]


def test_key_log_bound_drops_least_recent_as_removed():
    log = ce.KeyLog("inc", max_keys=2)
    tr = ce.KeyTracker(log)
    tr.blocks_stored([1, 2, 3])
    tr.add_request([(10, 64, 1), (20, 64, 2), (30, 64, 3)])
    assert list(log.keys) == [20, 30] and log.dropped == 1
    assert log.ring[-1] == {"type": "removed", "keys": [key_hex(10)], "seq": 2, "incarnation": "inc"}
    tr.blocks_removed([1])  # the dropped key's block: nothing more to say
    assert log.seq == 2


def test_replay_semantics():
    log = ce.KeyLog("inc", ring=2)
    for k in range(3):
        log.store([(k, 64)])
    assert log.replay("inc", 3) == []
    assert [e["seq"] for e in log.replay("inc", 1)] == [2, 3]
    assert log.replay("inc", 0) is None  # left the ring
    assert log.replay("other", 3) is None and log.replay("inc", 9) is None and log.replay("inc", None) is None


def fold(lines):
    """What a stream client holds after these lines: {key: tokens}."""
    keys = {}
    for m in lines:
        if m["type"] == "snapshot":
            keys = dict(m["keys"])
        elif m["type"] == "stored":
            keys.update(dict(m["keys"]))
        elif m["type"] == "removed":
            for k in m["keys"]:
                keys.pop(k, None)
    return keys


class FakeEngineWorker:
    """Stands in for lmdeploy's EngineWorkerBase: `engine.scheduler.block_trie`."""

    def __init__(self, trie):
        self.engine = type("E", (), {"scheduler": type("S", (), {"block_trie": trie})()})()


async def collect(app, path, query, until, timeout=5.0):
    """GET through the ASGI middleware; returns the NDJSON objects once `until(lines)` holds."""
    lines, buf, done = [], b"", asyncio.Event()
    status = {}

    async def receive():
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        nonlocal buf
        if msg["type"] == "http.response.start":
            status["status"], status["headers"] = msg["status"], dict(msg["headers"])
            return
        buf += msg.get("body", b"")
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.append(json.loads(line))
        if not msg.get("more_body") or until(lines):
            done.set()

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode()}
    task = asyncio.create_task(app(scope, receive, send))
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        done.set()
        await asyncio.wait_for(task, 5)  # the stream ends once the client is gone
    if not lines and buf:
        return status, json.loads(buf)
    return status, lines


async def test_stream_end_to_end_through_the_middleware(hooked, monkeypatch):
    """Engine hooks -> RPC -> tracker -> NDJSON: snapshot, stored, removed, resume, heartbeat."""
    monkeypatch.setattr(ce, "HEARTBEAT_S", 0.2)
    trie = FakeBlockTrie(block_size=16)
    worker = FakeEngineWorker(trie)

    async def rpc(name, *args):
        assert name == "distserve_cache_blocks"
        return ce.distserve_cache_blocks(worker, *args)

    monkeypatch.setattr(ce, "_hooks_installed", True)
    monkeypatch.setattr(ce, "BLOCKS", hooked)
    service = ce.CacheEventsService("lmd-test", rpc, 16, render_chat=render, encode=byte_encode)
    monkeypatch.setitem(CACHE_EVENTS, "service", service)

    async def inner(scope, receive, send):  # lmdeploy's routes are never reached by this path
        raise AssertionError("not for lmdeploy")

    app = DistserveApiMiddleware(inner, PeerBook())
    try:
        st, lines = await collect(app, ce.PATH, "", lambda ls: len(ls) >= 1)
        assert st["status"] == 200 and st["headers"][b"content-type"] == b"application/x-ndjson"
        assert lines[0] == {"type": "snapshot", "incarnation": "lmd-test", "seq": 0, "block_size": 16,
                            "chunk_bytes": 64, "keys": []}

        msgs = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "q" * 30}]
        full = render(msgs) + byte_encode("<assistant>")[1:]
        nodes = insert_path(FakeTrieNode(-1), full, 16)  # the engine caches the prompt's full blocks
        service.offer({"messages": msgs}, full)
        want = {key_hex(k) for k in chat_keys(msgs)}
        st, lines = await collect(app, ce.PATH, "", lambda ls: set(fold(ls)) >= want)
        assert lines[0]["type"] == "snapshot" and fold(lines) == {
            key_hex(k): t for k, t in zip(chat_keys(msgs), (48, 80))}  # whole 16-token blocks
        seq = service.log.seq

        while nodes and nodes[-1].detach_leaf():  # evict the whole path, leaf first
            nodes.pop()
        st, lines = await collect(app, ce.PATH, f"incarnation=lmd-test&since={seq}", lambda ls: any(
            m["type"] == "removed" for m in ls))
        removed = [m for m in lines if m["type"] != "heartbeat"]
        assert removed[0]["type"] == "removed" and removed[0]["seq"] == seq + 1
        st, lines = await collect(app, ce.PATH, f"incarnation=lmd-test&since={seq}",
                                  lambda ls: {k for m in ls if m["type"] == "removed" for k in m["keys"]} == want)
        assert fold([{"type": "snapshot", "keys": [[k, 1] for k in want]}, *lines]) == {}

        st, lines = await collect(app, ce.PATH, f"incarnation=lmd-test&since={service.log.seq}",
                                  lambda ls: ls and ls[-1]["type"] == "heartbeat")
        assert lines[-1] == {"type": "heartbeat", "seq": service.log.seq, "incarnation": "lmd-test"}
        st, body = await collect(app, ce.PATH, "since=x", lambda ls: False)
        assert st["status"] == 400 and "since" in body["error"]["message"]
        assert service.status()["keys"] == 0 and service.status()["poll_errors"] == 0
    finally:
        await service.stop()


async def test_no_stream_without_prefix_caching(monkeypatch):
    monkeypatch.delitem(CACHE_EVENTS, "service", raising=False)
    app = DistserveApiMiddleware(None, PeerBook())
    st, body = await collect(app, ce.PATH, "", lambda ls: False)
    assert st["status"] == 404 and body["error"]["code"] == "not_found"


async def engine_info_through(app):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    await app({"type": "http", "method": "GET", "path": "/distserve/engine_info"}, receive, send)
    return json.loads(json.loads(sent[-1]["body"]))


async def lmdeploy_engine_info(scope, receive, send):
    """What lmdeploy's /distserve/engine_info answers (a double-encoded JSON object)."""
    body = json.dumps(json.dumps({"tp_size": 1, "block_size": 64})).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@pytest.mark.parametrize("trie_enabled", [True, False])
async def test_stream_advertised_only_where_the_engine_trie_caches(hooked, monkeypatch, trie_enabled):
    """lmdeploy 0.17/0.18 turn prefix caching off in the engine process for Prefill/Decode roles
    (executor/base.py `_maybe_disable_unsupported_prefix_caching`) although the api_server's config says on:
    the record must then carry no cache_events, the stream answers 404 and requests are not tracked."""
    trie = FakeBlockTrie(block_size=64)
    trie.enabled = trie_enabled
    worker = FakeEngineWorker(trie)
    monkeypatch.setattr(ce, "_hooks_installed", True)
    monkeypatch.setattr(ce, "BLOCKS", hooked)

    async def rpc(name, *args):
        return ce.distserve_cache_blocks(worker, *args)

    service = ce.CacheEventsService("lmd-x", rpc, 64, render_chat=render, encode=byte_encode)
    monkeypatch.setitem(CACHE_EVENTS, "service", service)
    app = DistserveApiMiddleware(lmdeploy_engine_info, PeerBook())
    try:
        info = await engine_info_through(app)  # the first engine_info asks the engine process
        assert info["tp_size"] == 1
        service.offer({"prompt": "x" * 200}, byte_encode("x" * 200))
        if trie_enabled:
            assert info["cache_events"] == {"path": ce.PATH, "version": 1, "chunk_bytes": 64, "block_size": 64}
            assert service.queue.qsize() == 1
        else:
            assert "cache_events" not in info and service.queue.qsize() == 0
            st, body = await collect(app, ce.PATH, "", lambda ls: False)
            assert st["status"] == 404 and "Prefill and Decode" in body["error"]["message"]
    finally:
        await service.stop()
