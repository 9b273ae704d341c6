"""Two-micro-batch overlap for tensor parallelism: one half of a step computes while the other's all-reduce runs.

With tp > 1 every decoder layer ends its attention and its MLP in an all-reduce of (N, hidden) activations. At
decode batch sizes of a few hundred these take a quarter of the step on two H200s (docs/benchmarks.md), time in
which the SMs are mostly idle. Splitting the batch's sequences into two halves A and B, each on its own CUDA stream,
and issuing the work in the order

    A.attention, B.attention, A.mlp, B.mlp, A.attention (next layer), ...

puts A's all-reduce on the wire while B's attention computes and B's while A's MLP computes (NCCL runs every
collective of the group in issue order on its own stream, the same order on every rank). The same idea is
SGLang's "two-batch overlap" and NanoFlow's nano-batching; this is our own small version of it.

At tp 1 (SHARDLLM_TP_OVERLAP_AT_TP1=1, an experiment) the same order puts one half's decode attention, which is
bound by HBM bandwidth, beside the other half's GEMMs, bound by the tensor cores at a few hundred rows.

Scope: decode steps (one query token per sequence) of at least `MIN_TOKENS` rows, tp > 1 (or tp 1 as above), on
CUDA (on CPU the same interleaving runs on one stream, which tests the splitting and gives the same tokens). Works
inside CUDA graph capture (the side streams fork from and join the capturing stream). The symmetric-memory
all-reduce shares one buffer per rank, so two micro-batches in flight would race on it: inside the overlap every
all-reduce goes to NCCL.

Steps with prompt chunks (SHARDLLM_TP_OVERLAP_PREFILL=1 as well; tp > 1 only) split at the sequence boundary
nearest half their tokens, each half at least a quarter of them (`prefill_split`; a chunk is never cut, since its
second part would attend to keys the first part writes in the same layer). There the all-reduces carry (tokens,
hidden) activations of a 16k-token step: 256 MiB each for Llama-3-70B, 160 a step.

Each kernel of a big decode batch fills the GPU, so two halves on two streams mostly take turns: cuBLAS's GEMMs
launch one block per SM and hold it to the end. With SHARDLLM_TP_OVERLAP_SM_CARVEOUT=N the GEMMs issued inside the
overlap target N fewer SMs (`sm_carveout`), which the other half's attention can take meanwhile. Measured at tp 1
(one H200, 8B fp8 1000/1000, fourteenth session): no carveout rescued the overlap (17,391-17,444 tok/s against
the unsplit default's 17,719); at tp 2 it is not yet measured. Nor does giving the attention a part of the SMs
(fifteenth session, a persistent attention grid, code at 45ff49b): the decode attention reaches its 3.8 TB/s only
with most SMs busy, so two halves split that way took 0.635 ms a layer against the unsplit step's 0.586.

Switches: `SHARDLLM_TP_OVERLAP=1` (read at start-up) turns it on. Off by default: measured on two H200s, the decode
split gains nothing (8B 20,845 against 20,759 tok/s, 70B fp8 6,422 against 6,471) and at tp 1 it loses 1-2%
(docs/benchmarks.md, twelfth session); the prefill split is not yet measured.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

from shardllm import envs
from shardllm.distributed.communication import nccl_only
from shardllm.layers.attention import AttentionMetadata

ENABLED = envs.SHARDLLM_TP_OVERLAP
MIN_TOKENS = envs.SHARDLLM_TP_OVERLAP_MIN_TOKENS  # below: latency-bound, no split
PREFILL = envs.SHARDLLM_TP_OVERLAP_PREFILL  # steps with prompt chunks too, split at a sequence boundary
PREFILL_MIN_TOKENS = envs.SHARDLLM_TP_OVERLAP_PREFILL_MIN_TOKENS
AT_TP1 = envs.SHARDLLM_TP_OVERLAP_AT_TP1  # also without tp: attention (memory-bound) beside GEMMs (compute-bound)
SM_CARVEOUT = envs.SHARDLLM_TP_OVERLAP_SM_CARVEOUT  # SMs the overlap's cuBLAS GEMMs leave to the other half

_streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
_suspended = False  # see suspended()
_announced = False
_announced_prefill = False


@contextlib.contextmanager
def suspended():
    """Inside: no split (the step that computes FP8 k/v scales must see the whole batch: each half would set the
    layer's scales on its own, the second overwriting the first's after the first had stored k/v with them)."""
    global _suspended
    before, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = before


@contextlib.contextmanager
def sm_carveout(n: int, device: torch.device):
    """Inside: cuBLAS matmuls (torch.mm / addmm, torch._scaled_mm) issued, or captured into a CUDA graph, target
    `n` fewer SMs than the GPU has (torch._C._set_sm_carveout_experimental, cuBLAS's SM count target; read when a
    matmul is set up, so a captured graph keeps it). Restores the value before on exit. n <= 0: unchanged.

    Raises ValueError for a carveout that leaves no SM (n >= the SM count of `device`, a CUDA device) or on a
    torch without the setting."""
    if n <= 0:
        yield
        return
    if not hasattr(torch._C, "_set_sm_carveout_experimental"):
        raise ValueError(f"SHARDLLM_TP_OVERLAP_SM_CARVEOUT={n} needs torch._C._set_sm_carveout_experimental "
                         f"(torch {torch.__version__} lacks it): unset the variable")
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if n >= sms:
            raise ValueError(f"SHARDLLM_TP_OVERLAP_SM_CARVEOUT={n} leaves the GEMMs no SM: use fewer than the "
                             f"GPU's {sms}")
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(n)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)


def active(tp_size: int) -> bool:
    """Whether large decode batches are split at this tp size (SHARDLLM_TP_OVERLAP; at tp 1 only with
    SHARDLLM_TP_OVERLAP_AT_TP1)."""
    return ENABLED and (tp_size > 1 or AT_TP1)


def applies(meta: AttentionMetadata, num_tokens: int, tp_size: int) -> bool:
    """Whether a forward of `num_tokens` rows with `meta` runs as two overlapped micro-batches."""
    return active(tp_size) and not _suspended and meta.max_query_len == 1 and num_tokens >= MIN_TOKENS


def prefill_split(meta: AttentionMetadata, num_tokens: int, tp_size: int) -> int | None:
    """For a step with prompt chunks (max_query_len > 1): the sequence index k at which it runs as two overlapped
    micro-batches (sequences [0, k) and [k, B)), the boundary nearest half of its `num_tokens` tokens; None where
    the split is off (SHARDLLM_TP_OVERLAP and _PREFILL, tp > 1), the step is under PREFILL_MIN_TOKENS, the host does
    not know its boundaries (meta.host_query_start_loc), or either half would hold under a quarter of the tokens
    (one chunk most of the step: a chunk is never cut, its second half would attend to the first's keys)."""
    host = meta.host_query_start_loc
    if (not (PREFILL and ENABLED and tp_size > 1) or _suspended or meta.max_query_len == 1 or host is None
            or num_tokens < PREFILL_MIN_TOKENS or len(host) < 3):
        return None  # (not at tp 1 even with AT_TP1: no all-reduce to hide, both halves compute-bound)
    host = np.asarray(host)
    i = int(np.searchsorted(host, num_tokens / 2))  # the boundaries on either side of the middle
    k = min((j for j in (i - 1, i) if 1 <= j <= len(host) - 2), key=lambda j: abs(2 * int(host[j]) - num_tokens))
    t = int(host[k])
    if 4 * t < num_tokens or 4 * (num_tokens - t) < num_tokens:
        return None
    global _announced_prefill
    if not _announced_prefill:  # once per process: that the split took effect, where
        _announced_prefill = True
        print(f"shardllm: two-micro-batch overlap split a step with prompt chunks: sequences [0, {k}) and "
              f"[{k}, {len(host) - 1}), {t} | {num_tokens - t} tokens", file=sys.stderr, flush=True)
    return k


def split_step_meta(meta: AttentionMetadata, k: int) -> tuple[int, AttentionMetadata, AttentionMetadata]:
    """A step's metadata for sequences [0, k) and [k, B), split on the host (meta.host_query_start_loc): (the first
    half's token count t, its metadata, the second's). Each half keeps its own leading decodes (num_decodes), the
    longest chunk it holds (max_query_len) and the first of its sequences from which on none has cached context
    (fresh_from); max_seq_len stays the step's (an upper bound)."""
    host = np.asarray(meta.host_query_start_loc)
    t, qsl, nd = int(host[k]), meta.query_start_loc, meta.num_decodes

    def part(seqs: slice, rows: slice, q: torch.Tensor, hq: np.ndarray, decodes: int, fresh: int | None
             ) -> AttentionMetadata:
        longest = int(np.diff(hq).max())
        return AttentionMetadata(meta.slot_mapping[rows], q, meta.seq_lens[seqs], meta.block_tables[seqs],
                                 max_query_len=longest, max_seq_len=meta.max_seq_len, block_size=meta.block_size,
                                 num_decodes=decodes if longest > 1 else 0, host_query_start_loc=hq,
                                 fresh_from=fresh if longest > 1 else None)

    ff = meta.fresh_from
    ff_a, ff_b = (None, None) if ff is None else (min(ff, k), max(ff - k, 0))
    return t, part(slice(0, k), slice(0, t), qsl[: k + 1], host[: k + 1], min(nd, k), ff_a), \
        part(slice(k, None), slice(t, None), qsl[k:] - t, host[k:] - t, max(nd - k, 0), ff_b)


def split_decode_meta(meta: AttentionMetadata, m: int) -> tuple[AttentionMetadata, AttentionMetadata]:
    """A decode step's metadata for rows [0, m) and [m, N) (one token per sequence, so rows are sequences)."""
    qsl = meta.query_start_loc

    def part(rows: slice, q: torch.Tensor) -> AttentionMetadata:
        return AttentionMetadata(meta.slot_mapping[rows], q, meta.seq_lens[rows], meta.block_tables[rows],
                                 max_query_len=1, max_seq_len=meta.max_seq_len, block_size=meta.block_size)

    return part(slice(0, m), qsl[: m + 1]), part(slice(m, None), qsl[m:] - qsl[m])


def _side_streams(device: torch.device):
    if device.type != "cuda":
        return None
    if device not in _streams:
        _streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _streams[device]


def run_layers(layers, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
               meta: AttentionMetadata, split_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `layers` (each with `attention_block` and `mlp_block`) over two halves of a step, interleaved: a decode
    batch's two halves of rows, or with `split_at` (prefill_split's k) sequences [0, k) and [k, B) of any step.

    positions (N,), hidden_states (N, H), residual (N, H) or None (the first layer of the model). Returns
    (hidden_states, residual), (N, H) each, equal to running the layers over the whole batch up to the GEMMs'
    rounding (the halves are separate GEMMs).
    """
    global _announced
    if not _announced:  # once per process: the switch is read from the environment, so say that it took effect
        _announced = True
        also = f", steps with prompt chunks of {PREFILL_MIN_TOKENS}+ tokens" if PREFILL else ""
        print(f"shardllm: two-micro-batch overlap on (decode batches of {MIN_TOKENS}+ rows{also})", file=sys.stderr,
              flush=True)
    if split_at is None:
        m = positions.shape[0] // 2
        meta_a, meta_b = split_decode_meta(meta, m)
    else:
        m, meta_a, meta_b = split_step_meta(meta, split_at)
    state = [[positions[:m], hidden_states[:m], None if residual is None else residual[:m], meta_a],
             [positions[m:], hidden_states[m:], None if residual is None else residual[m:], meta_b]]
    streams = _side_streams(hidden_states.device)
    main = torch.cuda.current_stream(hidden_states.device) if streams else None
    if streams:
        for s in streams:
            s.wait_stream(main)

    def on(k: int):
        return torch.cuda.stream(streams[k]) if streams else contextlib.nullcontext()

    with nccl_only(), sm_carveout(SM_CARVEOUT, hidden_states.device):
        for layer in layers:
            for k in (0, 1):
                with on(k):
                    pos, h, r, mt = state[k]
                    state[k][1], state[k][2] = layer.attention_block(pos, h, r, mt)
            for k in (0, 1):
                with on(k):
                    state[k][1], state[k][2] = layer.mlp_block(state[k][1], state[k][2])
    if streams:
        for s in streams:
            main.wait_stream(s)
    return torch.cat([state[0][1], state[1][1]]), torch.cat([state[0][2], state[1][2]])
