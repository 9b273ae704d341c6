"""The MoE layer's glue in Triton: everything around the grouped GEMMs that torch ran as a chain of elementwise,
gather, scatter and reduce kernels.

A Mixtral-8x7B fp8 decode step at batch 1024, tp = 2, on an H200 (benchmarks/profile_decode.py, fifth session) spent
17.5 ms of 37.5 in the grouped GEMMs and ~9 ms in that chain: SiLU and the multiply on strided halves, the per-token
quantization of 2k gathered rows, and the combine (weights gathered, fp32 products, a select, an index_copy back to
token order, a sum over k, a cast). Here:

- `moe_combine`: one launch per layer reads each token's k expert rows from the sorted layout (through the inverse
  permutation) and writes the weighted fp32 sum in the output dtype: `combine_expert_rows` in one pass;
- the callers quantize the N tokens before the gather (per-token scales commute with selecting rows, so it equals
  quantizing the N * k gathered rows, at 1/k of the work and half the gathered bytes) and run SiLU-and-mul (with the
  FP8 quantization fused, `fp8_fused.silu_and_mul_quant`) as one kernel.

Numerics: `moe_combine` equals `combine_expert_rows` bit for bit at k <= 2 (the same fp32 products, summed in slot
order) and within fp32 rounding above. Switch: SHARDLLM_MOE_FUSED_GLUE=0 (read at import) restores the torch chain.
"""

from __future__ import annotations

import torch

from shardllm import envs
from shardllm.layers import triton_ops
from shardllm.layers.pdl import launch_args, pdl_enter
from shardllm.layers.triton_ops import HAS_TRITON, _jit, _pow2

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the kernel below only parses (its annotations are strings)
    triton = tl = None

ENABLED = envs.SHARDLLM_MOE_FUSED_GLUE
# None: the kernels on CUDA tensors; True forces them on (tests on CPU, which need TRITON_INTERPRET=1), False off.
FORCE: bool | None = None
COMBINE_BLOCK = 1024  # hidden columns per program


def applies(x: torch.Tensor) -> bool:
    """Whether the MoE layer takes the Triton glue for activations `x` (host checks only: graph-capturable). Not
    where triton_ops is off (attention_backend="torch": the all-torch reference path has no fused kernels)."""
    if not ENABLED or FORCE is False or not HAS_TRITON:
        return False
    return FORCE is True or (x.is_cuda and triton_ops.use_triton(x))


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """order (R,) a permutation of 0..R-1 (int64) -> inv (R,) int32 with inv[order[i]] = i: the sorted row that
    holds (token, slot) pair p = token * k + slot. One scatter, no host sync."""
    inv = torch.empty(order.shape, dtype=torch.int32, device=order.device)
    return inv.scatter_(0, order, torch.arange(order.numel(), dtype=torch.int32, device=order.device))


@_jit
def _moe_combine_kernel(y_ptr, w_ptr, inv_ptr, offs_ptr, out_ptr, hidden, num_local, stride_y, stride_out,
                        K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (token n, column block): out[n, cols] = sum over slots j of w[n, j] * y[inv[n * K + j], cols] in fp32,
    a slot whose sorted row is at or past offs[num_local - 1] (another rank's expert) adding nothing."""
    pdl_enter(USE_PDL)
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < hidden
    local_rows = tl.load(offs_ptr + num_local - 1)  # rows of this rank's experts come first in the sorted layout
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        r = tl.load(inv_ptr + n * K + j)
        wt = tl.load(w_ptr + n * K + j)
        local = (r + tl.zeros([BLOCK], tl.int32)) < local_rows  # (BLOCK,): a scalar mask as a vector
        # never read another rank's rows (their values are undefined, possibly NaN): masked, then selected
        y = tl.load(y_ptr + r.to(tl.int64) * stride_y + cols, mask=col_ok & local, other=0.0).to(tl.float32)
        acc += tl.where(local, y * wt, 0.0)
    tl.store(out_ptr + n * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


if HAS_TRITON and hasattr(_moe_combine_kernel, "rewrite"):  # the interpreter: see the note in triton_ops
    _moe_combine_kernel.rewrite()


def moe_combine(y: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """`combine_expert_rows` (layers/moe.py) in one launch.

    y (N * k, H) expert outputs in `sort_by_expert` order (rows at or past offs[-1] undefined); topk_weights (N, k)
    fp32; order (N * k,) int64 and offs (E_local,) int32 from `sort_by_expert`. Returns (N, H) in out_dtype: the
    weighted sum over each token's k slots, in fp32, slots of other ranks' experts left out.
    """
    n, k = topk_weights.shape
    hidden = y.shape[1]
    if y.shape[0] != n * k or order.shape != (n * k,) or y.stride(-1) != 1:
        raise ValueError(f"moe_combine: y {tuple(y.shape)} (contiguous rows) must hold N * k = {n * k} rows, "
                         f"order {tuple(order.shape)} as many entries")
    out = torch.empty((n, hidden), dtype=out_dtype, device=y.device)
    if n == 0 or hidden == 0:
        return out
    inv = inverse_order(order)
    w = topk_weights.to(torch.float32).contiguous()
    block = min(_pow2(hidden), COMBINE_BLOCK)
    _moe_combine_kernel[(n, triton.cdiv(hidden, block))](
        y, w, inv, offs, out, hidden, offs.numel(), y.stride(0), out.stride(0), K=k, BLOCK=block,
        num_warps=4 if block >= 512 else 1, **launch_args(y.device))
    return out
