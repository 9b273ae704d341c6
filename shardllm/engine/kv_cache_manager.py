"""Paged KV cache bookkeeping: fixed-size blocks with reference counts and prefix caching by hash.

Pure Python over integers; the tensors live in the workers. A block of `block_size` tokens is cached
(findable by later requests) once it is full and computed; its hash chains the hash of the block
before it with its own token ids, so equal hashes mean equal prefixes. Block 0 is never handed out:
runners use it as padding.

Start-up costs the same for any number of blocks (an engine sized from an H200's free memory has millions):
blocks never used yet are the id range [next_fresh_id, num_blocks), handed out in ascending order by a counter,
and a `KVCacheBlock` exists only once its block has been allocated. Blocks that come back sit in an LRU free
queue; a free block that still holds a cached prefix is only evicted when it is handed out again. Never-used
blocks go before any recycled one (evicting nothing beats evicting a cached prefix), which is the order an
eager queue of every block in id order gives, so allocation order is as if every block had been queued at
start.
"""

from __future__ import annotations

from collections import OrderedDict

from shardllm.engine.request import Request


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class KVCacheManager:
    """Block allocation, reference counts and the prefix cache for one engine (every rank holds the same ids).

    Args: `num_blocks` blocks of `block_size` tokens each (block 0 included, never handed out);
    `enable_prefix_caching` turns hash lookups on. Raises ValueError for fewer than 2 blocks.
    Construction does no per-block work: a `KVCacheBlock` is built when its id is first handed out, and is then
    held by requests (`req_to_blocks`) or queued in `free_queue` (ref_cnt 0), nowhere else but `cached`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}: give it more memory")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.next_fresh_id = 1  # ids in [next_fresh_id, num_blocks) were never handed out and have no object
        # blocks that came back with ref_cnt 0, least recently freed first
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict()
        self.cached: dict[int, KVCacheBlock] = {}
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # get_block_ids' lists
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out: never-used ones plus freed ones (cached or not)."""
        return self.num_blocks - self.next_fresh_id + len(self.free_queue)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache can hold: every block but block 0, which padded slots write to."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached-but-free blocks count as free)."""
        usable = self.num_blocks - 1
        return (usable - self.num_free_blocks) / usable  # not 1 - free/usable: that rounds a few used blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block ids (a list kept up to date as blocks are added; do not modify it)."""
        held = self.req_to_blocks.get(request_id)
        if not held:
            return []
        ids = self._block_ids.get(request_id)
        if ids is None or len(ids) != len(held):
            ids = self._block_ids[request_id] = [b.block_id for b in held]
        return ids

    def _update_hashes(self, req: Request) -> None:
        """Extend req.block_hashes over every full block of its known tokens."""
        bs = self.block_size
        while (len(req.block_hashes) + 1) * bs <= req.num_tokens:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if i else None
            req.block_hashes.append(hash_block(parent, tuple(req.token_ids[i * bs:(i + 1) * bs])))

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of `req`, as blocks and a token count.

        At least one token is always left to compute, since the step must produce logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._update_hashes(req)
        hits: list[KVCacheBlock] = []
        for h in req.block_hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        if hits and len(hits) * self.block_size >= req.num_tokens:
            hits.pop()
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ---- allocation ----------------------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of `req` after its computed ones.

        `computed_blocks` (from get_computed_blocks, first schedule only) are shared into the request.
        Returns False, changing nothing, when there are not enough free blocks; the caller preempts.
        """
        held = self.req_to_blocks.setdefault(req.request_id, [])
        if not computed_blocks and req.num_computed_tokens + num_new_tokens <= len(held) * self.block_size:
            return True  # fits in the blocks it holds (most decode steps)
        computed_blocks = computed_blocks or []
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(held) - len(computed_blocks)
        num_reused_free = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if needed + num_reused_free > self.num_free_blocks:
            if not held:
                del self.req_to_blocks[req.request_id]
            return False
        for b in computed_blocks:
            if b.ref_cnt == 0:
                del self.free_queue[b.block_id]
            b.ref_cnt += 1
            held.append(b)
        needed = max(needed, 0)
        # never-used blocks first (evicting nothing beats evicting a cached prefix), in id order
        fresh = min(needed, self.num_blocks - self.next_fresh_id)
        for i in range(self.next_fresh_id, self.next_fresh_id + fresh):
            b = KVCacheBlock(i)
            b.ref_cnt = 1
            held.append(b)
        self.next_fresh_id += fresh
        for _ in range(needed - fresh):  # then the least recently freed
            _, b = self.free_queue.popitem(last=False)
            if b.block_hash is not None:  # evict the prefix it held
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = None
            b.ref_cnt = 1
            held.append(b)
        if computed_blocks:
            req.num_blocks_offered = len(computed_blocks)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Offer the request's full, computed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        held = self.req_to_blocks.get(req.request_id)
        if not held:
            return
        # only blocks of known tokens (async scheduling may have computed past them with a placeholder)
        num_full = min(min(req.num_computed_tokens, req.num_tokens) // self.block_size, len(held))
        start = req.num_blocks_offered
        if num_full <= start:
            return
        self._update_hashes(req)
        for i in range(start, num_full):
            h = req.block_hashes[i]
            b = held[i]
            if b.block_hash is None and h not in self.cached:
                b.block_hash = h
                self.cached[h] = b
        req.num_blocks_offered = num_full

    def free(self, req: Request) -> None:
        """Release a request's blocks. Tail blocks go to the free queue first, so they are evicted first."""
        held = self.req_to_blocks.pop(req.request_id, [])
        req.num_blocks_offered = 0
        self._block_ids.pop(req.request_id, None)
        for b in reversed(held):
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, b
            if b.ref_cnt == 0:
                self.free_queue[b.block_id] = b

    def reset_prefix_cache(self) -> None:
        for b in self.cached.values():
            b.block_hash = None
        self.cached.clear()
