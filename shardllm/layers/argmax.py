"""Greedy arg-max of a few rows of logits over a large vocabulary, in two small Triton kernels.

At decode batch 1 the greedy token of Llama-3's 128,256 logits is one row's arg-max. torch's reduction took 35 us of
a 2.87 ms step on an H200 (eleventh session profile, `benchmarks/profile_decode.py --batch_sizes 1`, PDL off:
docs/benchmarks.md), one kernel for a 256 KB read. Here the row is split into chunks of `CHUNK` values, one
program each, that write their chunk's largest value and its first index; a second kernel, one program per row,
keeps the largest of those and, among equal ones, the smallest index, so the result is torch.argmax's: the first
index of the largest value. NaN counts as larger than every number (torch's rule), its first occurrence wins.

Used where rows <= MAX_ROWS on CUDA (the CUDA-graph head's and the sampler's greedy path); larger batches keep
torch's arg-max, which spreads rows over blocks already. `SHARDLLM_TRITON_ARGMAX=0` (read at import) turns it off.
"""

from __future__ import annotations

import torch

from shardllm import envs

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU images without triton
    HAS_TRITON = False

ENABLED = envs.SHARDLLM_TRITON_ARGMAX
MAX_ROWS = 16  # rows up to which the kernels run (a decode batch this small has one row per few SMs in torch's)
CHUNK = 4096  # values a first-stage program reads (128,256 / 4,096 = 32 programs a row)


if HAS_TRITON:

    @triton.jit
    def _first_largest(v, idx, valid):
        """Among the valid entries of v (fp32), the first index (smallest idx) of the largest value. Order: NaN
        (rank 2) above +inf (rank 1) above the rest (rank 0, by value); NaN / +inf candidates are alike."""
        rank = tl.where(valid, tl.where(v != v, 2, tl.where(v == float("inf"), 1, 0)), -1)
        cand = rank == tl.max(rank, 0)
        best = tl.max(tl.where(cand, v, float("-inf")), 0)
        return tl.min(tl.where(cand & ((v == best) | (rank > 0)), idx, 2147483647), 0)

    @triton.jit
    def _argmax_chunk_kernel(x_ptr, part_val_ptr, part_idx_ptr, V, stride_xb, num_chunks, CHUNK: tl.constexpr):
        """Program (row b, chunk c): the first index of the largest value of x[b, c*CHUNK : (c+1)*CHUNK], and
        that value."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        valid = offs < V
        x = tl.load(x_ptr + b * stride_xb + offs, mask=valid, other=float("-inf")).to(tl.float32)
        first = _first_largest(x, offs, valid)
        out = b * num_chunks + c
        tl.store(part_val_ptr + out, tl.load(x_ptr + b * stride_xb + first).to(tl.float32))
        tl.store(part_idx_ptr + out, first)

    @triton.jit
    def _argmax_merge_kernel(part_val_ptr, part_idx_ptr, out_ptr, num_chunks, CHUNKS_PAD: tl.constexpr):
        """Program (row b): the chunks' results merged by the same order; among equals the smallest index."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS_PAD)
        m = c < num_chunks
        v = tl.load(part_val_ptr + b * num_chunks + c, mask=m, other=float("-inf"))
        i = tl.load(part_idx_ptr + b * num_chunks + c, mask=m, other=2147483647)
        tl.store(out_ptr + b, _first_largest(v, i, m).to(tl.int64))


DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # exact in the kernels' fp32 (float64 would not be)


def _shape_ok(logits: torch.Tensor) -> bool:
    return (logits.dim() == 2 and 0 < logits.shape[0] <= MAX_ROWS and 0 < logits.shape[1] < 2**31
            and logits.dtype in DTYPES)


def applies(logits: torch.Tensor) -> bool:
    """Whether greedy_argmax runs the kernels for `logits` (else torch.argmax): CUDA, (B <= MAX_ROWS, V > 0) of
    fp16 / bf16 / fp32."""
    return ENABLED and HAS_TRITON and logits.is_cuda and _shape_ok(logits)


def greedy_argmax(logits: torch.Tensor, out: torch.Tensor | None = None, force: bool = False) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for logits (B, V) of any float dtype, last dim contiguous.

    Args:
        logits: (B, V) float16 / bfloat16 / float32.
        out: optional (B,) int64 to write into (as torch.argmax's out=); a CUDA graph captures either form.
        force: run the kernels on any device where the shape and dtype allow (tests: CPU tensors under
            TRITON_INTERPRET=1).
    Returns:
        (B,) int64: per row the first index of the largest value (NaN largest); `out` where given.
    Raises:
        whatever torch.argmax raises where the kernels do not apply (an empty row, say).
    """
    if not (applies(logits) or force and HAS_TRITON and _shape_ok(logits)):
        return torch.argmax(logits, dim=-1, out=out) if out is not None else torch.argmax(logits, dim=-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    part_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    dest = out if out is not None and out.is_contiguous() else torch.empty(rows, dtype=torch.long,
                                                                         device=logits.device)
    _argmax_chunk_kernel[(rows, num_chunks)](logits, part_val, part_idx, vocab, logits.stride(0), num_chunks,
                                             CHUNK=CHUNK, num_warps=4)
    _argmax_merge_kernel[(rows,)](part_val, part_idx, dest, num_chunks,
                                  CHUNKS_PAD=max(triton.next_power_of_2(num_chunks), 2), num_warps=1)
    if out is not None and dest is not out:
        out.copy_(dest)  # a strided out: the merge kernel writes contiguous rows
        return out
    return dest
