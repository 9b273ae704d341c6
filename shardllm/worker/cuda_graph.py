"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start-up, replayed with padding.

A decode step (one new token per sequence) has shapes fixed by the batch size alone, and the Triton decode
kernel reads the context lengths from device memory, so one captured forward per bucket serves every step
of that size. Inputs are copied into static buffers; rows past the real batch have context length 0
(the kernel gives zeros) and write their k/v into slot 0 of the padding block 0.

With `SHARDLLM_GRAPH_LM_HEAD=1` at start-up (off by default until its GPU tests have passed on a GPU and it has
shown a gain: at tp = 2 batch 1 it measured 3.115 ms/token against 3.119 eager), on the last pipeline stage a graph
also holds the LM head (GEMV, and at tp > 1 the all-gather of the vocabulary
shards) and a greedy argmax, writing one static logits buffer: the gather of the sampling rows, the head and (at tp > 1)
an eager NCCL call leave the step's eager part, and an all-greedy batch without logprobs, penalties or biases skips
the sampler too.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import NamedTuple

import torch
from torch import nn

from shardllm import envs
from shardllm.layers.argmax import greedy_argmax
from shardllm.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# The static logits buffer of the graphs' LM head is at most this large: buckets whose (B, V) logits would not
# fit keep their head eager. 128 MiB holds 512 rows of a 128k vocabulary in bf16 (the default max_batch_size of
# 256 needs 64 MiB); at max_batch_size 1024 the buckets past 512 run the head eagerly, where its launches are
# a small part of a step anyway. The graph pool holds about as much again for the head's temporaries (at tp > 1
# the gathered shards, about twice).
MAX_GRAPH_LOGITS_BYTES = 128 << 20


def graph_lm_head_enabled() -> bool:
    """The A/B switch, read at start-up: `SHARDLLM_GRAPH_LM_HEAD=1` puts the LM head in the graphs (off by default)."""
    return envs.SHARDLLM_GRAPH_LM_HEAD


def head_buckets(buckets: list[int], vocab_size: int, itemsize: int,
                 max_bytes: int = MAX_GRAPH_LOGITS_BYTES) -> list[int]:
    """The buckets whose graphs hold the LM head: those whose (B, vocab_size) logits of `itemsize` bytes fit in
    `max_bytes`."""
    return [b for b in buckets if b * vocab_size * itemsize <= max_bytes]


def sampled_rows(t: torch.Tensor, logits_indices: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """The rows of a graph's per-token output `t` (B padded, ...) that sample: in a decode step row i is sequence
    i's one token, so when every sequence samples they are the first `num_seqs` rows (a view, no gather); else
    (a prompt chunk of one token that does not sample yet) the rows at `logits_indices` (S,)."""
    if logits_indices.shape[0] == num_seqs:
        return t[:num_seqs]
    return t[logits_indices]


class GraphOutput(NamedTuple):
    """A replay's outputs for the real rows (views of the graph's static buffers, valid until the next replay)."""

    hidden: torch.Tensor | dict[str, torch.Tensor]  # (N, H) on the last stage, else the next stage's activations
    logits: torch.Tensor | None = None  # (N, V) when this bucket's graph holds the LM head
    greedy: torch.Tensor | None = None  # (N,) long: the argmax of `logits`


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, min(max_num_seqs, 256), 16))
    sizes += list(range(256, max_num_seqs, 64))  # coarser past 256: padding costs little next to the batch
    return sorted(set(sizes + [max_num_seqs]))


class CudaGraphRunner:
    def __init__(self, model: nn.Module, device: torch.device, max_num_seqs: int, max_model_len: int,
                 block_size: int, dtype: torch.dtype, lm_head: bool = False,
                 max_logits_bytes: int = MAX_GRAPH_LOGITS_BYTES):
        """`dtype`: the activations' dtype (the model's compute dtype; not a parameter's, which is FP8 under
        quantization), also that of the logits. `lm_head`: capture the LM head too (last pipeline stage only)
        in the buckets whose logits fit in `max_logits_bytes`."""
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
        self.head_buckets: list[int] = []
        self.logits = self.greedy = None
        if lm_head and model.is_last_stage:
            vocab = model.config.vocab_size
            self.head_buckets = head_buckets(self.buckets, vocab, dtype.itemsize, max_logits_bytes)
            if self.head_buckets:
                rows = self.head_buckets[-1]
                self.logits = torch.zeros(rows, vocab, dtype=dtype, device=device)  # (B, V), one for all buckets
                self.greedy = torch.zeros(rows, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, GraphOutput]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:bs], self.query_start_loc[: bs + 1], self.seq_lens[:bs],
                                 self.block_tables[:bs], max_query_len=1, max_seq_len=self.max_model_len,
                                 block_size=self.block_size)

    def forward(self, bs: int) -> GraphOutput:
        """The captured work of bucket `bs`, on the static inputs: the layers, then (in a head bucket) the LM head
        into the static logits buffer and its argmax. Runs eagerly too (the warm-up, and CPU tests)."""
        inter = None if self.intermediate is None else {k: v[:bs] for k, v in self.intermediate.items()}
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs), inter)
        if bs not in self.head_buckets:
            return GraphOutput(hidden)
        logits = self.model.compute_logits(hidden)  # (bs, V)
        assert logits.dtype == self.logits.dtype, (logits.dtype, self.logits.dtype)
        out = self.logits[:bs]
        out.copy_(logits)  # one buffer for every bucket (per-bucket outputs would each hold their own)
        greedy_argmax(out, out=self.greedy[:bs])  # small buckets: layers/argmax.py's kernels
        return GraphOutput(hidden, out, self.greedy[:bs])

    @torch.inference_mode()
    def capture(self, log: bool = True) -> None:
        t = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.seq_lens.fill_(1)  # capture with a real context of one token in the padding block
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self.forward(bs)  # warm-up: kernels compiled
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(bs)
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.seq_lens.zero_()
        if log:
            head = f", LM head in batch sizes <= {self.head_buckets[-1]}" if self.head_buckets else ""
            print(f"shardllm: captured {len(self.buckets)} CUDA graphs for decode (batch sizes {self.buckets[0]}.."
                  f"{self.buckets[-1]}{head}) in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    def can_run(self, num_seqs: int, max_query_len: int, max_seq_len: int) -> bool:
        return max_query_len == 1 and num_seqs <= self.buckets[-1] and max_seq_len <= self.max_model_len

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            intermediate: dict[str, torch.Tensor] | None = None) -> GraphOutput:
        """Replay the smallest bucket that holds the batch; returns the outputs of the real rows (hidden
        states on the last pipeline stage, the activations for the next stage elsewhere; logits and their
        argmax where the bucket holds the LM head). They are the graph's buffers: the next replay overwrites them
        (later work on the same stream reads them first)."""
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
        hidden = {k: v[:n] for k, v in out.hidden.items()} if isinstance(out.hidden, dict) else out.hidden[:n]
        if out.logits is None:
            return GraphOutput(hidden)
        return GraphOutput(hidden, out.logits[:n], out.greedy[:n])  # padding rows' logits left out
