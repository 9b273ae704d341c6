"""Forwards on the KV cache's padding block (block 0, never handed to a request): the profile run's long prompt, and
the start-up warm-up that compiles the attention kernel variants a run would otherwise compile in its middle (seconds
each on a cold Triton cache; docs/benchmarks.md, ninth session). ModelRunner inherits them."""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from shardllm.distributed.parallel_state import get_parallel_context
from shardllm.layers import argmax, microbatch_overlap
from shardllm.layers.attention import Attention, AttentionMetadata
from shardllm.layers.attention.decode_configs import decode_variant


def decode_warm_up_sizes(model: nn.Module, covered: list[int], max_size: int, block_size: int,
                         device: torch.device) -> list[int]:
    """Batch sizes in 1..max_size, the smallest of each decode-attention launch variant (per distinct attention
    layer shape, (config, num_splits): decode_configs.decode_variant) that no size in `covered` (batch sizes already
    run unsplit, e.g. the CUDA-graph buckets) takes. Decodes run eagerly at any batch size (a mixed step's, or every
    decode step without graphs) and would compile those variants in the middle of a run. Empty without an Attention
    layer holding a cache."""
    shapes = {(m.num_kv_heads, m.head_dim, m.kv_cache.dtype) for m in model.modules()
              if isinstance(m, Attention) and m.kv_cache is not None}
    if not shapes:
        return []

    def variants(n: int) -> set:  # the kernels a batch of n compiles: one per layer shape
        return {(shape, decode_variant(n, *shape, block_size, device)) for shape in shapes}

    seen = set().union(*(variants(b) for b in covered))
    sizes = []
    for n in range(1, max_size + 1):
        v = variants(n)
        if not v <= seen:
            seen |= v
            sizes.append(n)
    return sizes


class KernelWarmUp:
    """The padding-block forwards of ModelRunner (which holds model, config, device, block_size, attn_layers and
    graph_runner)."""

    def _dummy_forward(self, n: int, logits: bool = False, decode: bool = False) -> None:
        """A forward of one n-token prompt (`decode`: of n one-token sequences) whose k/v all go to slot 0 of block 0
        and whose context is block 0 (the padding block, never handed out): it changes no request's cache.
        `logits`: the LM head on the last rows too."""
        sc = self.config.scheduler_config
        i32 = dict(dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(n, dtype=torch.long, device=self.device),
            query_start_loc=torch.arange(n + 1, **i32) if decode else torch.tensor([0, n], **i32),
            seq_lens=torch.ones(n, **i32) if decode else torch.tensor([n], **i32),
            block_tables=torch.zeros(n, 1, **i32) if decode else torch.zeros(1, -(-n // self.block_size), **i32),
            max_query_len=1 if decode else n, max_seq_len=1 if decode else n, block_size=self.block_size)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.zeros(n, dtype=torch.long, device=self.device) if decode else torch.arange(n, device=self.device)
        intermediate = None
        if not self.model.is_first_stage:
            h = self.model_config.hf_config.hidden_size
            intermediate = {k: torch.zeros(n, h, dtype=self.model_config.dtype, device=self.device)
                            for k in ("hidden_states", "residual")}
        hidden = self.model(ids, pos, meta, intermediate)
        if logits and self.model.is_last_stage:
            self.model.compute_logits(hidden[-sc.max_num_seqs:])

    @torch.inference_mode()
    def warm_up_kernels(self, log: bool = False) -> tuple[list[int], list[int]]:
        """Compiles at start-up the attention kernel variants a run would otherwise compile in its middle (seconds
        each on a cold Triton cache): the decode batch sizes of warm_up_decode_sizes and the prompt lengths of
        warm_up_prefill_tiles, each run once on the padding block. Returns (decode batch sizes, prompt lengths)."""
        from shardllm.layers.attention import attention as attention_mod

        t = time.perf_counter()
        fused = attention_mod.DECODE_FUSED_ROTARY  # decode-only steps of at most this many rows: the fused launch
        with microbatch_overlap.suspended():  # the variants of whole batches, as mixed steps run them
            decode = self.warm_up_decode_sizes()
            attention_mod.DECODE_FUSED_ROTARY = 0  # the plain launch, as a mixed step's decodes take it
            try:
                for n in decode:
                    self._dummy_forward(n, decode=True)
            finally:
                attention_mod.DECODE_FUSED_ROTARY = fused
            if fused and self.graph_runner is None:  # eager decode-only steps up to `fused` rows: the fused launch
                for n in decode_warm_up_sizes(self.model, [], min(fused, self.config.scheduler_config.max_num_seqs),
                                              self.block_size, self.device):
                    self._dummy_forward(n, decode=True)
        tiles = self.warm_up_prefill_tiles()
        # the sampler's greedy arg-max of small batches (layers/argmax.py), else compiled at the first greedy step
        logits = torch.zeros(1, self.vocab_size, dtype=self.model_config.dtype, device=self.device)
        if argmax.applies(logits):
            argmax.greedy_argmax(logits)
        if log:
            print(f"shardllm: kernel warm-up: {len(decode)} decode batch sizes, {len(tiles)} prompt lengths in "
                  f"{time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        return decode, tiles

    def warm_up_decode_sizes(self) -> list[int]:
        """The decode batch sizes to run once (decode_warm_up_sizes): every decode variant up to
        max_num_seqs without CUDA graphs (each decode step runs eagerly); with them, those no bucket ran whole (a
        bucket of at most SHARDLLM_DECODE_FUSED_ROTARY rows ran only the fused launch), and only when mixed steps
        run their decodes eagerly (SHARDLLM_MIXED_STEP_DECODE_KERNEL)."""
        from shardllm.layers.attention import attention as attention_mod

        g = self.graph_runner
        if g is not None and not attention_mod.MIXED_STEP_DECODE_KERNEL:
            return []
        halves = microbatch_overlap.active(get_parallel_context().tp_size)  # the overlap split large buckets
        # buckets of at most SHARDLLM_DECODE_FUSED_ROTARY rows compiled the fused launch, not the plain one mixed
        # steps take
        whole = [] if g is None else [b for b in g.buckets if b > attention_mod.DECODE_FUSED_ROTARY
                                      and not (halves and b >= microbatch_overlap.MIN_TOKENS)]
        return decode_warm_up_sizes(self.model, whole, self.config.scheduler_config.max_num_seqs, self.block_size,
                                    self.device)

    @torch.inference_mode()
    def warm_up_prefill_tiles(self) -> list[int]:
        """Runs a short prompt (_dummy_forward, on the padding block) for each launch of the prefill attention kernel
        (triton_prefill.prefill_config and prefill_block_q of chunk lengths >= 2, per distinct GQA group and V
        layout of the layers; the profile run, skipped when num_kv_blocks is given, compiled at most the largest):
        a step whose chunks are all short would otherwise compile that kernel variant in the middle of a run.
        Returns the prompt lengths run."""
        from shardllm.layers.attention import triton_prefill as tp

        kinds = {(a.num_heads // a.num_kv_heads, a.v_transposed) for a in self.attn_layers}
        if not kinds:
            return []
        sc = self.config.scheduler_config
        longest = min(sc.max_num_batched_tokens, sc.max_model_len)

        def launches(n: int) -> set:
            return {(g, tp.prefill_block_q(n, g, c), c) for g, v_t in kinds for c in [tp.prefill_config(v_t, n)]}

        rows = max(c.rows for n in (2, longest) for _, _, c in launches(n))  # block_q is at most `rows` tokens
        candidates = sorted({*range(2, min(longest, rows) + 1), *(n for n in tp.LAUNCH_CHANGES_AT if n <= longest)})
        seen, lengths = set(), []
        for n in candidates:  # the lengths where a launch starts (past `rows`, configs change only at those)
            new = launches(n)
            if not new <= seen:
                seen |= new
                lengths.append(n)
                self._dummy_forward(n)
        return lengths
