from shardllm.engine.kv_cache_manager import KVCacheManager
from shardllm.engine.request import Request
from shardllm.sampling_params import SamplingParams


def req(rid, tokens):
    return Request(rid, tokens, SamplingParams())


def test_allocation_counts_blocks_and_refuses_when_full():
    kv = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable (block 0 is padding)
    a = req("a", list(range(10)))
    assert kv.allocate_slots(a, 10)  # ceil(10/4) = 3 blocks
    assert len(kv.get_block_ids("a")) == 3 and 0 not in kv.get_block_ids("a")
    assert kv.num_free_blocks == 1
    b = req("b", list(range(100, 108)))
    assert not kv.allocate_slots(b, 8)  # needs 2, has 1: nothing changes
    assert kv.num_free_blocks == 1 and kv.get_block_ids("b") == []
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2)  # 12 tokens still fit in 3 blocks
    assert kv.num_free_blocks == 1
    assert kv.allocate_slots(a, 3)  # 13..15 -> 4th block
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.usage == 0.0


def test_prefix_hit_shares_blocks_and_counts_refs():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(10)))
    kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)  # 2 full blocks cached
    b = req("b", list(range(8)) + [50, 51, 52])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in blocks] == kv.get_block_ids("a")[:2]
    assert kv.allocate_slots(b, 3, blocks)
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert all(blk.ref_cnt == 2 for blk in kv.req_to_blocks["b"][:2])
    kv.free(a)
    assert all(blk.ref_cnt == 1 for blk in kv.req_to_blocks["b"][:2])
    # a different second block: only the first block hits
    c = req("c", list(range(4)) + [9, 9, 9, 9, 9])
    _, n = kv.get_computed_blocks(c)
    assert n == 4


def test_full_prefix_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    _, n = kv.get_computed_blocks(req("b", list(range(8))))
    assert n == 4  # the last block is recomputed so the step has logits to sample from


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)  # 3 usable
    a = req("a", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    kv.free(a)
    assert kv.num_free_blocks == 3
    # a free block that holds a cached prefix is still found...
    blocks, n = kv.get_computed_blocks(req("b", [1, 2, 3, 4, 5]))
    assert n == 4
    # ...until someone needs the space: a big request evicts them
    c = req("c", [7] * 6)
    assert kv.allocate_slots(c, 6)
    assert kv.cached == {}
    _, n = kv.get_computed_blocks(req("d", [1, 2, 3, 4, 5]))
    assert n == 0


def test_touching_free_cached_blocks_counts_against_free_space():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    kv.free(a)
    b = req("b", [1, 2, 3, 4, 5, 6, 7])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4
    assert not kv.allocate_slots(b, 3 + 2, blocks)  # 2 reused + 2 new > 3 free
    assert all(blk.ref_cnt == 0 for blk in blocks) and kv.num_free_blocks == 3
    assert kv.allocate_slots(b, 2, blocks)
    assert kv.num_free_blocks == 0


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([], 0)
