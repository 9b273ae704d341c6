"""The KV block manager's start-up does no per-block work, and its lazily created blocks behave like an eager queue.

An engine sized from an H200's free memory gets millions of blocks; the manager must not build an object per block
before serving. The eager twin below is the manager as it was before (every block built and queued in id order at
start), the reference for allocation order, prefix-cache hits and eviction.
"""

import random
import tracemalloc
from collections import OrderedDict

from shardllm.engine.kv_cache_manager import KVCacheBlock, KVCacheManager
from shardllm.engine.request import Request
from shardllm.sampling_params import SamplingParams


def req(rid, tokens):
    return Request(rid, tokens, SamplingParams())


class EagerKVCacheManager(KVCacheManager):
    """Every block built at start and queued in id order (the pre-lazy manager)."""

    def __init__(self, num_blocks, block_size, enable_prefix_caching=True):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.free_queue = OrderedDict((i, KVCacheBlock(i)) for i in range(1, num_blocks))
        self.next_fresh_id = num_blocks  # nothing left to create lazily


def test_fifty_million_blocks_build_no_per_block_objects():
    n = 50_000_000
    tracemalloc.start()
    try:
        kv = KVCacheManager(num_blocks=n, block_size=16)
        allocated, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert allocated < 64 * 1024  # an object per block would be gigabytes
    assert len(kv.free_queue) == 0 and not kv.cached and not kv.req_to_blocks and kv.next_fresh_id == 1
    assert kv.num_free_blocks == n - 1 and kv.usage == 0.0 and kv.capacity_tokens == (n - 1) * 16
    a = req("a", list(range(40)))
    assert kv.allocate_slots(a, 40)  # 3 blocks, the lowest ids
    assert kv.get_block_ids("a") == [1, 2, 3] and kv.next_fresh_id == 4 and len(kv.free_queue) == 0
    assert kv.num_free_blocks == n - 4 and kv.usage == 3 / (n - 1)
    kv.free(a)
    assert kv.num_free_blocks == n - 1 and kv.usage == 0.0
    assert list(kv.free_queue) == [3, 2, 1]  # only blocks that came back are queued, tail first


def test_never_used_blocks_go_before_cached_ones_then_lru_eviction():
    kv = KVCacheManager(num_blocks=8, block_size=2)  # 7 usable
    a = req("a", [1, 2, 3, 4])
    assert kv.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    assert kv.get_block_ids("a") == [1, 2]
    kv.free(a)
    assert kv.num_free_blocks == 7
    # never-used blocks are handed out before a's cached ones, so its prefix survives
    b = req("b", [9, 9, 9, 9, 9, 9, 9, 9, 9, 9])
    assert kv.allocate_slots(b, 10)
    assert kv.get_block_ids("b") == [3, 4, 5, 6, 7] and kv.num_free_blocks == 2
    assert kv.get_computed_blocks(req("q", [1, 2, 3, 4, 5]))[1] == 4
    # no never-used block left: the least recently freed goes first (a's tail block, freed before its head)
    c = req("c", [7, 7])
    assert kv.allocate_slots(c, 2)
    assert kv.get_block_ids("c") == [2]
    assert kv.get_computed_blocks(req("q2", [1, 2, 3, 4, 5]))[1] == 2  # a's first block still hits
    d = req("d", [6, 6])
    assert kv.allocate_slots(d, 2) and kv.get_block_ids("d") == [1] and kv.cached == {}
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    assert not kv.allocate_slots(req("e", [5]), 1)
    for r in (b, c, d):
        kv.free(r)
    assert kv.num_free_blocks == 7 and list(kv.free_queue) == [7, 6, 5, 4, 3, 2, 1] and kv.next_fresh_id == 8


def _drive(seed):
    """Random allocate / decode / cache / free / reset steps on a lazy manager and its eager twin in lockstep."""
    rng = random.Random(seed)
    num_blocks, bs = rng.choice([6, 12, 30]), rng.choice([1, 2, 4])
    caching = rng.random() < 0.8
    lazy, eager = KVCacheManager(num_blocks, bs, caching), EagerKVCacheManager(num_blocks, bs, caching)
    running: dict[str, tuple[Request, Request]] = {}
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    hits = 0
    for step in range(300):
        op = rng.random()
        if op < 0.35 or not running:  # a new request, its cached prefix shared in
            rid = f"r{step}"
            tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 8))]
            pair = req(rid, tokens), req(rid, tokens)
            results = []
            for kv, r in zip((lazy, eager), pair):
                blocks, n = kv.get_computed_blocks(r)
                r.num_computed_tokens = n
                ok = kv.allocate_slots(r, r.num_tokens - n, blocks)
                results.append((ok, n, [b.block_id for b in blocks]))
                if ok:
                    r.num_computed_tokens = r.num_tokens
                    kv.cache_full_blocks(r)
                else:
                    r.num_computed_tokens = 0
            assert results[0] == results[1]
            hits += results[0][1]
            if results[0][0]:
                running[rid] = pair
        elif op < 0.75:  # one decode token
            rid = rng.choice(sorted(running))
            tok = rng.randrange(5)
            oks = []
            for kv, r in zip((lazy, eager), running[rid]):
                ok = kv.allocate_slots(r, 1)
                oks.append(ok)
                if ok:
                    r.append_token(tok)
                    r.num_computed_tokens += 1
                    kv.cache_full_blocks(r)
            assert oks[0] == oks[1]
        elif op < 0.97:
            rid = rng.choice(sorted(running))
            for kv, r in zip((lazy, eager), running.pop(rid)):
                kv.free(r)
        else:
            lazy.reset_prefix_cache()
            eager.reset_prefix_cache()
        # the simple model of the free count: every usable block not held by some request
        held = {b.block_id for blocks in lazy.req_to_blocks.values() for b in blocks}
        assert 0 not in held
        assert lazy.num_free_blocks == eager.num_free_blocks == num_blocks - 1 - len(held)
        assert lazy.usage == eager.usage == len(held) / (num_blocks - 1)
        for rid in running:
            assert lazy.get_block_ids(rid) == eager.get_block_ids(rid)
        assert {h: b.block_id for h, b in lazy.cached.items()} == {h: b.block_id for h, b in eager.cached.items()}
        # lazily built blocks: each id handed out so far is held or queued free (not both), the rest a counted range
        held_objects = {id(b) for blocks in lazy.req_to_blocks.values() for b in blocks}
        assert all(b.ref_cnt == 0 and id(b) not in held_objects for b in lazy.free_queue.values())
        assert sorted(held | set(lazy.free_queue)) == list(range(1, lazy.next_fresh_id))
        assert len(held) + len(lazy.free_queue) == lazy.next_fresh_id - 1
        assert lazy.num_free_blocks == num_blocks - lazy.next_fresh_id + len(lazy.free_queue)
    for rid in list(running):
        for kv, r in zip((lazy, eager), running.pop(rid)):
            kv.free(r)
    assert lazy.num_free_blocks == eager.num_free_blocks == num_blocks - 1
    return hits


def test_random_operations_match_the_eager_manager_and_keep_the_free_count_exact():
    hits = sum(_drive(seed) for seed in range(40))
    assert hits > 0  # the sequences did exercise prefix-cache hits
