"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start-up, replayed with padding.

A decode step (one new token per sequence) has shapes fixed by the batch size alone, and the Triton decode
kernel reads the context lengths from device memory, so one captured forward per bucket serves every step
of that size. Inputs are copied into static buffers; rows past the real batch have context length 0
(the kernel gives zeros) and write their k/v into slot 0 of the padding block 0.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
from torch import nn

from shardllm.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, min(max_num_seqs, 256), 16))
    sizes += list(range(256, max_num_seqs, 64))  # coarser past 256: padding costs little next to the batch
    return sorted(set(sizes + [max_num_seqs]))


class CudaGraphRunner:
    def __init__(self, model: nn.Module, device: torch.device, max_num_seqs: int, max_model_len: int,
                 block_size: int, dtype: torch.dtype):
        """`dtype`: the activations' dtype (the model's compute dtype; not a parameter's, which is FP8 under
        quantization)."""
        self.model, self.device, self.block_size = model, device, block_size
        self.buckets = batch_buckets(max_num_seqs)
        n, self.max_blocks = self.buckets[-1], -(-max_model_len // block_size)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, **i32)
        self.block_tables = torch.zeros(n, self.max_blocks, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.max_model_len = max_model_len
        self.intermediate = None  # a later pipeline stage's inputs: the activations of the stage before
        if not model.is_first_stage:
            h = model.config.hidden_size
            self.intermediate = {k: torch.zeros(n, h, dtype=dtype, device=device)
                                 for k in ("hidden_states", "residual")}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor | dict[str, torch.Tensor]]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:bs], self.query_start_loc[: bs + 1], self.seq_lens[:bs],
                                 self.block_tables[:bs], max_query_len=1, max_seq_len=self.max_model_len,
                                 block_size=self.block_size)

    @torch.inference_mode()
    def capture(self, log: bool = True) -> None:
        t = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.seq_lens.fill_(1)  # capture with a real context of one token in the padding block
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(bs)
            inter = None if self.intermediate is None else {k: v[:bs] for k, v in self.intermediate.items()}
            self.model(self.input_ids[:bs], self.positions[:bs], meta, inter)  # warm-up: kernels compiled
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.input_ids[:bs], self.positions[:bs], meta, inter)
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.seq_lens.zero_()
        if log:
            print(f"shardllm: captured {len(self.buckets)} CUDA graphs for decode (batch sizes {self.buckets[0]}.."
                  f"{self.buckets[-1]}) in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    def can_run(self, num_seqs: int, max_query_len: int, max_seq_len: int) -> bool:
        return max_query_len == 1 and num_seqs <= self.buckets[-1] and max_seq_len <= self.max_model_len

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            intermediate: dict[str, torch.Tensor] | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Replay the smallest bucket that holds the batch; returns the outputs of the real rows (hidden
        states on the last pipeline stage, the activations for the next stage elsewhere)."""
        n = positions.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        if self.intermediate is None:
            self.input_ids[:n].copy_(input_ids)
        else:
            for k, v in self.intermediate.items():
                v[:n].copy_(intermediate[k])
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables)
        if bs > n:  # padding rows: no context, k/v to slot 0 of block 0
            self.seq_lens[n:bs].zero_()
            self.slot_mapping[n:bs].zero_()
        graph, out = self.graphs[bs]
        graph.replay()
        if isinstance(out, dict):
            return {k: v[:n] for k, v in out.items()}
        return out[:n]
