"""The prefix cache inside the block allocator (hash chain, LRU leaf-first eviction, reference counts, no
leaks) and the engine's key registry / event log (distserve.engine.prefix_cache), without processes."""

from __future__ import annotations

import pytest

from distserve.cluster import prefix_keys as PK
from distserve.engine import tokenizer as T
from distserve.engine.prefix_cache import CacheEvents, key_plan
from distserve.migration.blocks import BlockAllocator, PreservedSessions, block_hashes

BS = 4


def _cached_run(alloc: BlockAllocator, tokens: list[int]) -> list[int]:
    """What the scheduler does: reuse the cached prefix, allocate the rest, register, return the blocks held."""
    hashes = block_hashes(tokens, BS, (len(tokens) - 1) // BS)
    cached = alloc.acquire_cached(hashes)
    fresh = alloc.allocate(-(-len(tokens) // BS) - len(cached))
    assert fresh is not None
    blocks = cached + fresh
    alloc.register(blocks, block_hashes(tokens, BS))
    return blocks


def test_hash_chain_names_the_whole_prefix():
    a = block_hashes(list(range(12)), BS)
    assert len(a) == 3 and len(set(a)) == 3
    assert block_hashes(list(range(12)) + [99], BS) == a  # partial tail block: no hash
    assert block_hashes(list(range(8)), BS) == a[:2]
    other = block_hashes([7, 7, 7, 7] + list(range(4, 12)), BS)
    assert other[0] != a[0] and other[1] != a[1]  # same block tokens, different parent: different hash
    assert block_hashes(list(range(12)), BS, count=1) == a[:1]


def test_reuse_refcounts_and_no_leak():
    alloc = BlockAllocator(16, prefix_caching=True)
    p = list(range(13))  # 3 full blocks + 1 token
    b1 = _cached_run(alloc, p)
    assert alloc.num_cached == 3 and alloc.num_used == 4
    b2 = _cached_run(alloc, p)  # shares 3 blocks (at most (13-1)//4 = 3)
    assert b2[:3] == b1[:3] and b2[3] != b1[3]
    assert alloc.num_used == 5
    alloc.free(b1)
    assert alloc.num_used == 4  # the shared blocks are still held by the second request
    alloc.free(b2)
    assert alloc.num_used == 0 and alloc.num_free == 16 and alloc.num_cached == 3
    alloc.free(b2)  # a double free changes nothing
    assert alloc.num_used == 0 and alloc.num_cached == 3
    assert alloc.clear_cache() == 3 and alloc.num_cached == 0 and alloc.num_free == 16


def test_held_blocks_are_never_evicted_and_lru_leaves_go_first():
    alloc = BlockAllocator(8, prefix_caching=True)
    evicted: list[bytes] = []
    alloc.on_evict = evicted.extend
    a = list(range(100, 112))  # 3 full blocks
    ha = block_hashes(a, BS)
    blocks_a = _cached_run(alloc, a)
    alloc.free(blocks_a)  # cached, evictable
    b = list(range(200, 212))
    blocks_b = _cached_run(alloc, b)  # held
    # 2 blocks free, 3 evictable (a), 3 held (b): asking 3 evicts exactly one block of a, its leaf
    got = alloc.allocate(3)
    assert got is not None and evicted == [ha[2]]
    assert not set(got) & set(blocks_b)
    assert alloc.allocate(5) is None  # b's blocks are held: never evicted
    assert alloc.is_cached(ha[0]) and alloc.is_cached(ha[1]) and not alloc.is_cached(ha[2])
    # a's remaining prefix is still reusable
    assert alloc.acquire_cached(ha) == blocks_a[:2]
    alloc.free(blocks_a[:2])
    alloc.free(got)
    alloc.free(blocks_b)
    assert alloc.num_used == 0


def test_recently_used_chain_survives():
    alloc = BlockAllocator(4, prefix_caching=True)
    old, new = [1] * 8, [2] * 8
    alloc.free(_cached_run(alloc, old))
    alloc.free(_cached_run(alloc, new))
    alloc.free(alloc.acquire_cached(block_hashes(old, BS)))  # touch old: new is now the LRU
    got = alloc.allocate(2)
    assert got is not None
    assert alloc.is_cached(block_hashes(old, BS)[1]) and not alloc.is_cached(block_hashes(new, BS)[0])
    alloc.free(got)
    assert alloc.num_used == 0


def test_preserved_sessions_hold_cached_blocks():
    alloc = BlockAllocator(8, prefix_caching=True)
    sessions = PreservedSessions(alloc, ttl=60)
    blocks = _cached_run(alloc, list(range(8)))
    sessions.add(7, blocks)  # the request hands its blocks over to a pending migration
    assert alloc.allocate(8) is None  # nothing of the session may be evicted
    assert alloc.num_used == 2
    assert sessions.free(7)
    assert alloc.num_used == 0 and alloc.num_cached == 2
    assert alloc.allocate(8) is not None  # now evictable


def test_duplicate_computation_stays_private():
    alloc = BlockAllocator(8, prefix_caching=True)
    t = list(range(8))
    a = alloc.allocate(2)
    b = alloc.allocate(2)
    alloc.register(a, block_hashes(t, BS))
    assert alloc.register(b, block_hashes(t, BS)) == 0  # the same prefix computed twice concurrently
    alloc.free(b)
    assert alloc.num_used == 2 and alloc.num_free == 6
    alloc.free(a)
    assert alloc.num_used == 0 and alloc.num_cached == 2


def test_caching_off_is_the_plain_allocator():
    alloc = BlockAllocator(4, prefix_caching=False)
    blocks = alloc.allocate(2)
    assert alloc.register(blocks, block_hashes(list(range(8)), BS)) == 0
    assert alloc.acquire_cached(block_hashes(list(range(8)), BS)) == []
    alloc.free(blocks)
    assert alloc.num_free == 4 and alloc.num_cached == 0


def test_key_plan_counts_full_block_tokens():
    msgs = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "u" * 20}]
    ids = T.BYTE_TOKENIZER.chat(msgs)
    plan = key_plan("chat", {"messages": msgs}, ids, T.BYTE_TOKENIZER, 16)
    keys = PK.chat_keys(msgs)
    # "<BOS><|system|>\n" + 40 + "\n" = 1 + 11 + 40 = 52 tokens -> 48 in full blocks
    assert plan[0] == (keys[0], 48)
    assert plan[1][0] == keys[1] and plan[1][1] == (52 + 9 + 20 + 1) // 16 * 16
    text = "x" * 150
    plan = key_plan("completion", {"prompt": text}, T.encode(text), T.BYTE_TOKENIZER, 16)
    assert plan == [(k, (1 + 64 * (j + 1)) // 16 * 16) for j, k in enumerate(PK.text_keys(text))]
    ids = list(range(40))
    assert key_plan("completion", {"prompt": ids}, ids, T.BYTE_TOKENIZER, 16) == list(
        zip(PK.ids_keys(ids), [16, 32]))


def test_cache_events_register_evict_and_resume():
    alloc = BlockAllocator(6, prefix_caching=True)
    ev = CacheEvents(alloc, "inc1", BS, ring=4)
    tokens = list(range(300, 312))
    blocks = _cached_run(alloc, tokens)
    plan = [(11, 4), (22, 8), (33, 12), (44, 16)]  # the last needs a 4th block: not cached, not registered
    assert ev.register(plan, tokens) == 3
    assert ev.register(plan, tokens) == 0  # idempotent: no duplicate events
    snap = ev.snapshot()
    assert snap["seq"] == 1 and sorted(snap["keys"]) == [[PK.key_hex(k), t] for k, t in plan[:3]]
    assert ev.after(0)[0]["type"] == "stored" and ev.after(1) == []
    alloc.free(blocks)
    alloc.allocate(4)  # 3 free blocks, evicts the leaf: the key that needs it goes
    assert ev.after(1) == [{"type": "removed", "keys": [PK.key_hex(33)], "seq": 2, "incarnation": "inc1"}]
    assert ev.num_keys == 2
    for _ in range(5):
        ev.clear()
    assert ev.after(1) is None  # gone from the ring: the client needs a snapshot
    assert ev.after(99) is None
    assert [e["seq"] for e in ev.after(3)] == [4, 5, 6, 7]
    assert ev.snapshot()["keys"] == []


def test_cache_events_announce_a_pending_root_at_admission_and_withdraw_it_if_nothing_was_cached():
    """A family's root is in the stream from the moment the engine admits its first request (routers count it
    at once, not after that prefill), once per family; a stored root ends the mark; a family whose requests
    all ended with nothing cached is withdrawn; a root already held announces nothing."""
    alloc = BlockAllocator(16, prefix_caching=True)
    ev = CacheEvents(alloc, "inc1", BS)
    tokens = list(range(500, 512))
    plan = [(11, 4), (22, 8)]
    first = ev.admit(plan)
    assert ev.after(0) == [{"type": "stored", "keys": [], "pending": [PK.key_hex(11)], "seq": 1,
                            "incarnation": "inc1"}]
    assert ev.snapshot()["pending"] == [PK.key_hex(11)] and ev.num_pending == 1
    second = ev.admit([(11, 4), (33, 8)])  # another conversation of the same family: already announced
    assert ev.seq == 1
    ev.release(second)  # ends without caching, the first still runs: the mark stays
    assert ev.seq == 1 and ev.num_pending == 1
    _cached_run(alloc, tokens)
    assert ev.register(plan, tokens) == 2
    stored = ev.after(1)[0]
    assert stored["roots"] == [PK.key_hex(11)] and "pending" not in stored
    snap = ev.snapshot()
    assert "pending" not in snap and snap["roots"] == [PK.key_hex(11)]
    ev.release(first)  # its root is stored: nothing to withdraw
    assert ev.seq == 2
    assert ev.admit(plan) is None and ev.seq == 2  # held: nothing to announce, nothing to release

    # a new family whose requests all fail (or are cancelled) before anything is cached: withdrawn once
    a, b = ev.admit([(55, 4)]), ev.admit([(55, 4), (56, 8)])
    ev.release(a)
    assert ev.seq == 3
    ev.release(b)
    assert ev.after(3) == [{"type": "removed", "keys": [], "pending": [PK.key_hex(55)], "seq": 4,
                            "incarnation": "inc1"}]
    assert "pending" not in ev.snapshot() and ev.num_pending == 0
    assert ev.admit([]) is None

    # a request admitted before a clear cannot withdraw the mark of one admitted after it
    old = ev.admit([(77, 4)])
    ev.clear()
    new = ev.admit([(77, 4)])
    seq = ev.seq
    ev.release(old)
    assert ev.seq == seq and ev.snapshot()["pending"] == [PK.key_hex(77)]
    ev.release(new)
    assert ev.after(seq)[0]["pending"] == [PK.key_hex(77)] and "pending" not in ev.snapshot()


@pytest.mark.parametrize("n", [1, 4, 5, 8, 9])
def test_at_least_one_token_is_computed(n):
    alloc = BlockAllocator(8, prefix_caching=True)
    tokens = list(range(n))
    alloc.free(_cached_run(alloc, tokens))
    reused = alloc.acquire_cached(block_hashes(tokens, BS, (n - 1) // BS))
    assert len(reused) * BS < n
    alloc.free(reused)
    assert alloc.num_used == 0


@pytest.mark.parametrize("caching", [True, False])
def test_shared_sessions_free_blocks_with_the_last_choice(caching):
    """A shared prefill (n choices): each choice's session frees on its own; the blocks (cached or not, the
    partial last block included) go back only when the last choice's session is freed or expires."""
    alloc = BlockAllocator(8, prefix_caching=caching)
    sessions = PreservedSessions(alloc, ttl=60)
    blocks = _cached_run(alloc, list(range(8))) + alloc.allocate(1)  # two full blocks and a partial one
    sessions.add_shared([11, 12, 13], blocks)
    assert sessions.num_sessions == 3 and sessions.num_blocks == 3  # the blocks counted once
    assert sessions.free(12) and not sessions.free(12)  # a double free counts once
    assert sessions.free(11)
    assert alloc.num_used == 3 and alloc.allocate(8) is None  # choice 13 still pulls them
    assert sessions.free(13)
    assert alloc.num_used == 0 and sessions.num_blocks == 0 and sessions.num_sessions == 0
    assert alloc.allocate(8) is not None


def test_shared_sessions_expire_and_clear():
    alloc = BlockAllocator(8)
    sessions = PreservedSessions(alloc, ttl=0)
    sessions.add_shared([1, 2], alloc.allocate(2))
    sessions.free(1)
    assert alloc.num_used == 2
    assert sessions.expire() == 1 and alloc.num_used == 0
    sessions.ttl = 60
    sessions.add_shared([3, 4, 5], alloc.allocate(3))
    sessions.add(6, alloc.allocate(1))
    sessions.clear()
    assert alloc.num_used == 0 and sessions.num_sessions == 0
    with pytest.raises(ValueError):
        sessions.add_shared([], [])
