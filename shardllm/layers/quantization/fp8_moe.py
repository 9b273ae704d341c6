"""FP8 experts for FusedMoE: e4m3fn expert weights with fp32 scales per expert (per channel online; per
tensor, per channel or per block from a checkpoint), activations quantized per token (or 1 x bk group, or the
static per-tensor scale). Every format runs grouped (expert-sorted rows, one GEMM launch per projection over
all local experts, no host sync on CUDA: a decode step is captured in a CUDA graph); see `grouped_backend`.

Parameters (E = this rank's experts, I = its slice of the intermediate size):
    w13.weight (E, 2I, H) e4m3fn, w13.weight_scale (E, 2I) | (E, 2) per tensor of gate and up, expanded to rows
        after loading (exact: a per-tensor scale is a per-channel one with equal channels)
        | block: w13.<scale name> (E, ceil(2I / bn), ceil(H / bk))
    w2.weight (E, H, I), w2.weight_scale (E, H) | (E, 1) | block (E, ceil(H / bn), ceil(I / bk))
    w13.input_scale, w2.input_scale (E, parts): static activation scales (their max is used)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardllm import envs
from shardllm.layers import moe_kernels
from shardllm.layers.moe import combine_expert_rows, grouped_mm, sort_by_expert
from shardllm.layers.quantization import QuantizationConfig
from shardllm.layers.quantization.fp8_fused import silu_and_mul_quant
from shardllm.layers.quantization.fp8_moe_triton import grouped_block_fp8_mm, grouped_block_triton_ok
from shardllm.layers.quantization.fp8_triton import quantize_per_token_triton, triton_fp8_ok
from shardllm.layers.quantization.fp8_utils import (
    FP8_DTYPE,
    block_fp8_linear,
    cpu_weight_f32,
    dequantize,
    quantize_per_block,
    quantize_per_row,
    quantize_per_token_group,
    quantize_with_scale,
    scaled_mm_rowwise,
    weight_only_fallback,
)
from shardllm.model_loader.weight_utils import copy_weight, materialize, narrow

logger = logging.getLogger(__name__)
_BLOCK_TRITON = envs.SHARDLLM_FP8_BLOCK_MOE_TRITON  # see Fp8MoEMethod.grouped_backend
_SCALED_GROUPED_OK: dict[tuple, bool] = {}  # (device, dtype) -> False once torch._scaled_grouped_mm refused it


class Fp8MoEMethod:
    def __init__(self, cfg: QuantizationConfig):
        self.cfg = cfg
        self.block = tuple(cfg.weight_block_size) if cfg.weight_strategy == "block" else None
        self.per_tensor = cfg.is_checkpoint_fp8 and cfg.weight_strategy == "tensor"
        self.static_input = cfg.activation_scheme == "static"
        self.scale_name = cfg.weight_scale_name if self.block else "weight_scale"
        self.weight_only = cfg.weight_only

    def create_weights(self, moe: nn.Module, num_experts: int, hidden_size: int, intermediate: int) -> None:
        shapes = {"w13": (2 * intermediate, hidden_size, 2), "w2": (hidden_size, intermediate, 1)}
        for name, (n, k, parts) in shapes.items():
            holder = getattr(moe, name)
            holder.weight = nn.Parameter(torch.empty(num_experts, n, k, dtype=FP8_DTYPE), requires_grad=False)
            if self.block:
                bn, bk = self.block
                if moe.moe_tp_size > 1 and (intermediate % (bk if name == "w2" else bn)):
                    raise ValueError(f"{name} experts: block-quantized FP8 ({bn} x {bk}) cannot be split over "
                                     f"tp_size / ep_size = {moe.moe_tp_size} ranks, the intermediate size per rank "
                                     f"{intermediate} is not whole blocks: raise expert_parallel_size so each "
                                     "expert stays whole, or lower tensor_parallel_size")
                shape = (num_experts, -(-n // bn), -(-k // bk))
            else:
                shape = (num_experts, parts if self.per_tensor else n)
            scale = nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False)
            scale.is_derived = not self.cfg.is_checkpoint_fp8  # online: written by the weight's loader
            setattr(holder, self.scale_name, scale)
            if self.static_input:
                holder.input_scale = nn.Parameter(torch.zeros(num_experts, parts, dtype=torch.float32),
                                                  requires_grad=False)

    def load(self, moe: nn.Module, param: nn.Parameter, w: Any, expert: int, dim: int, dst: int, src: int,
             size: int, part: int) -> None:
        """Rows (dim 0) or columns (dim 1) [src, src + size) of expert `expert`'s checkpoint tensor (part 0 gate,
        1 up of w13; 0 for w2) into local expert `expert` at [dst, dst + size)."""
        holder = moe.w13 if any(param is p for p in moe.w13.parameters(recurse=False)) else moe.w2
        scale = getattr(holder, self.scale_name)
        if param is holder.weight:
            if not self.cfg.is_checkpoint_fp8:  # online, per channel (or per block in tests)
                x = materialize(narrow(w, dim, src, size)).to(param.device)
                if self.block:
                    q, s = quantize_per_block(x, self.block)
                    b = self.block[dim]
                    copy_weight(scale.data[expert].narrow(dim, dst // b, s.shape[dim]), s)
                else:
                    if dim == 1:
                        dst = 0
                    q, s = quantize_per_row(x)
                    copy_weight(scale.data[expert].narrow(0, dst, q.shape[0]), s.view(-1))
                copy_weight(param.data[expert].narrow(dim, dst, size), q)
                return
            x = materialize(narrow(w, dim, src, size))
            if x.dtype != FP8_DTYPE:
                raise ValueError(f"the quantization config says FP8 weights, the checkpoint tensor is {x.dtype}")
            copy_weight(param.data[expert].narrow(dim, dst, size), x)
        elif param is scale:
            if self.block:
                b = self.block[dim]
                n_blocks = -(-size // b)
                copy_weight(param.data[expert].narrow(dim, dst // b, n_blocks), narrow(w, dim, src // b, n_blocks))
            elif self.per_tensor:
                param.data[expert, part] = materialize(w).float().reshape(())
            else:
                x = materialize(w).float().reshape(-1)
                if dim == 0:
                    copy_weight(param.data[expert].narrow(0, dst, size), x.narrow(0, src, size))
                else:
                    copy_weight(param.data[expert], x)
        else:  # input_scale
            param.data[expert, part] = materialize(w).float().reshape(())

    def process_weights_after_loading(self, moe: nn.Module) -> None:
        self.weight_only = self.weight_only or weight_only_fallback(moe.w13.weight.device, self.cfg)
        for holder in (moe.w13, moe.w2):
            if self.per_tensor:  # (E, parts) -> (E, rows)
                rows = holder.weight.shape[1] // holder.weight_scale.shape[1]
                holder.weight_scale = nn.Parameter(holder.weight_scale.data.repeat_interleave(rows, dim=1),
                                                   requires_grad=False)
            if self.static_input:
                holder.input_scale = nn.Parameter(holder.input_scale.data.max().reshape(()), requires_grad=False)

    def _linear(self, holder: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) through expert e's weight of `holder`: (M, N) in x's dtype (the oracle's: a per-tensor route's
        product in fp32, one rounding of the output, as the grouped GEMMs round)."""
        w, scale = holder.weight[e], getattr(holder, self.scale_name)[e]
        if self.weight_only:
            return F.linear(x, dequantize(w, scale if self.block else scale[:, None], self.block).to(x.dtype))
        if self.block:
            return block_fp8_linear(x, w, scale, self.block, x.dtype)
        if self.static_input:
            x_q = quantize_with_scale(x, holder.input_scale)
            x_scale = holder.input_scale.expand(x.shape[0], 1).contiguous()
        else:
            x_q, x_scale = quantize_per_row(x)
        w_f32 = cpu_weight_f32(holder, holder.weight)
        return scaled_mm_rowwise(x_q, w, x_scale, scale.view(1, -1), x.dtype, None if w_f32 is None else w_f32[e],
                                 fp32_product=True)

    def apply(self, moe: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """x (N, H); topk_* (N, k) over global expert ids -> this rank's partial sum (N, H) in x's dtype."""
        return self.apply_grouped(moe, x, topk_weights, topk_ids)

    def apply_grouped(self, moe: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
        """As fused_experts_grouped (layers/moe.py): expert-sorted rows, one grouped GEMM per projection over all
        local experts (`grouped_backend` says which), no host sync on CUDA, so a decode step is graph-capturable.
        Every weight format and device takes this path; `apply_reference` is its oracle."""
        k = topk_ids.shape[1]
        if moe_kernels.applies(x) and self.grouped_backend(x.device, x.dtype) == "scaled_grouped_mm":
            try:
                return self._apply_fused_glue(moe, x, topk_weights, topk_ids)
            except _NoScaledGroupedMM as e:  # as in _grouped: no FP8 grouped GEMM here (other errors propagate)
                _SCALED_GROUPED_OK[(x.device, x.dtype)] = False
                logger.warning("FP8 grouped GEMM unavailable (%s); experts run on dequantized weights", e)
        order, is_local, offs = sort_by_expert(topk_ids, moe.expert_start, moe.num_local_experts)
        rows = x.index_select(0, order // k)  # (N * k, H)
        gate, up = self._grouped(moe.w13, rows, offs).chunk(2, dim=-1)  # (N * k, I) each
        y = self._grouped(moe.w2, F.silu(gate) * up, offs)  # (N * k, H)
        return combine_expert_rows(y, topk_weights, order, is_local, x.dtype)

    def _apply_fused_glue(self, moe: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor) -> torch.Tensor:
        """apply_grouped's "scaled_grouped_mm" form with the Triton glue (layers/moe_kernels.py): the N tokens are
        quantized before the gather (per-token or static scales commute with selecting rows: the same e4m3 rows and
        scales as quantizing the N * k gathered rows), SiLU-and-mul writes the down GEMM's e4m3 input and scales in
        one kernel (dynamic scales; static ones quantize after torch's SiLU-and-mul), and one kernel combines."""
        order, _, offs, inv = moe_kernels.sort_pairs(topk_ids, moe.expert_start, moe.num_local_experts)
        tok = order // topk_weights.shape[1]
        x_q, x_s = self._quantize_rows(moe.w13, x)  # (N, H) e4m3fn, (N, 1) fp32
        rows_q = x_q.view(torch.uint8).index_select(0, tok).view(FP8_DTYPE)  # (N * k, H): gathered as bytes
        h = _scaled_grouped_mm(rows_q, moe.w13.weight, x_s.view(-1).index_select(0, tok), moe.w13.weight_scale,
                               offs, x.dtype)  # (N * k, 2I)
        if self.static_input or not _fused_act_quant_ok(h.device):
            gate, up = h.chunk(2, dim=-1)
            a_q, a_s = self._quantize_rows(moe.w2, F.silu(gate) * up)
        else:
            a_q, a_s, _ = silu_and_mul_quant(h, num_rows=offs[-1:])  # other ranks' rows (ep > 1) skipped
        y = _scaled_grouped_mm(a_q, moe.w2.weight, a_s.view(-1), moe.w2.weight_scale, offs, x.dtype)  # (N * k, H)
        return moe_kernels.moe_combine(y, topk_weights, order, offs, x.dtype, inv=inv)

    def grouped_backend(self, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
        """The grouped GEMM the experts run on `device`:
        "scaled_grouped_mm": torch._scaled_grouped_mm, row-wise scales (per-channel and per-tensor weights, the
            latter expanded to rows at load, which is exact; dynamic per-token or static activation scales);
        "triton_block": `grouped_block_fp8_mm`, 128 x 128-style weight blocks and 1 x bk activation groups;
        "dequantized": weights dequantized (cached in fp32 on CPU; per call in x's dtype on a GPU), activations
            quantized and dequantized as the FP8 GEMM would see them (unless weight-only), torch._grouped_mm: the
            CPU path, weight-only runs, and the fallback where a fast backend is unavailable. In bf16 (a GPU) it is
            within FP8's own error of the loop, not equal to it (up to 3.8% of the output's max, 3.6% relative L2
            in tests/layers/test_fp8_block_cublas_layout.py's layer); in fp32 (CPU) it equals the loop. On a GPU it is
            capturable in bf16 on sm90+ (CUTLASS); other dtypes or GPUs take torch's fallback, which syncs with
            the host, so those decode steps run eagerly."""
        if device.type != "cuda" or self.weight_only:
            return "dequantized"
        if self.block:  # the Triton kernel is opt-in since its "wrong sums" on an H200 (2026-11-30), which were the
            # oracle's: the loop's cuBLAS GEMM read misplaced scales at K / 128 = 3 (fp8_utils.cublas_block_scale_
            # layout_ok); test_fp8_moe_gpu.py::test_block_triton_backend_equals_the_loop decides the default
            ok = _BLOCK_TRITON and grouped_block_triton_ok(device, self.block)
            return "triton_block" if ok else "dequantized"
        ok = _SCALED_GROUPED_OK.get((device, dtype), True) and hasattr(torch, "_scaled_grouped_mm")
        return "scaled_grouped_mm" if ok else "dequantized"

    def _grouped(self, holder: nn.Module, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """a (R, K) expert-sorted rows, offs (E,) int32 group ends -> (R, N) in a's dtype (rows past offs[-1]
        undefined)."""
        backend = self.grouped_backend(a.device, a.dtype)
        if backend == "scaled_grouped_mm":
            try:
                a_q, a_s = self._quantize_rows(holder, a)
                return _scaled_grouped_mm(a_q, holder.weight, a_s.view(-1), holder.weight_scale, offs, a.dtype)
            except _NoScaledGroupedMM as e:  # a build or GPU without the FP8 grouped GEMM
                _SCALED_GROUPED_OK[(a.device, a.dtype)] = False
                logger.warning("FP8 grouped GEMM unavailable (%s); experts run on dequantized weights", e)
        elif backend == "triton_block":
            a_q, a_s = self._quantize_groups(a)
            return grouped_block_fp8_mm(a_q, a_s, holder.weight, getattr(holder, self.scale_name), offs, self.block,
                                        a.dtype)
        w = self._dequantized_weight(holder, a)  # (E, N, K)
        a_in = a
        if not self.weight_only:  # the activations as the FP8 GEMM sees them, in fp32
            if self.block:
                a_q, a_s = self._quantize_groups(a)
                a_in = a_q.float() * a_s.repeat_interleave(self.block[1], dim=1)[:, : a.shape[1]]
            else:
                a_q, a_s = self._quantize_rows(holder, a)
                a_in = a_q.float() * a_s
        return grouped_mm(a_in.to(w.dtype), w.transpose(1, 2), offs).to(a.dtype)

    def _quantize_rows(self, holder: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a (R, K) -> (q (R, K) e4m3fn, scale (R, 1) fp32): the static per-tensor scale, or one per row."""
        if self.static_input:
            return quantize_with_scale(a, holder.input_scale), holder.input_scale.expand(a.shape[0], 1).contiguous()
        if a.is_cuda and a.dtype != torch.float32 and triton_fp8_ok(a.device):
            return quantize_per_token_triton(a.contiguous())
        return quantize_per_row(a)

    def _quantize_groups(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a (R, K) -> (q (R, K) e4m3fn, scale (R, ceil(K / bk)) fp32) per 1 x bk group (K zero-padded to whole
        groups for the amax), as `block_fp8_linear` quantizes."""
        bk, k = self.block[1], a.shape[1]
        pad = -k % bk
        q, s = quantize_per_token_group(F.pad(a, (0, pad)) if pad else a, bk)
        return (q[:, :k].contiguous() if pad else q), s

    def _dequantized_weight(self, holder: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """holder.weight (E, N, K) dequantized: fp32, converted once and kept on the holder on CPU (as
        `cpu_weight_f32`); in a's dtype per call on a GPU (a fallback: a temporary of E * N * K elements)."""
        if not a.is_cuda:
            cached = holder.__dict__.get("_fp8_w_deq")
            if cached is None or cached.shape != holder.weight.shape:
                cached = dequantize_experts(holder.weight, getattr(holder, self.scale_name), self.block)
                holder.__dict__["_fp8_w_deq"] = cached
            return cached
        return dequantize_experts(holder.weight, getattr(holder, self.scale_name), self.block, a.dtype)

    def apply_reference(self, moe: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
        """A loop over the local experts (the order of operations of `fused_experts_reference`), with host syncs:
        the test oracle of `apply_grouped`; no serving path calls it."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        local_ids = topk_ids - moe.expert_start
        for e in range(moe.num_local_experts):
            token, slot = torch.where(local_ids == e)
            if token.numel() == 0:
                continue
            gate, up = self._linear(moe.w13, e, x.index_select(0, token)).chunk(2, dim=-1)
            y = self._linear(moe.w2, e, F.silu(gate) * up)
            out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
        return out.to(x.dtype)


def _fused_act_quant_ok(device: torch.device) -> bool:
    """Whether `fp8_fused.silu_and_mul_quant` may write the down GEMM's e4m3 input on `device`: on CUDA only where
    the FP8 Triton kernels passed their probe (`triton_fp8_ok`, as the dense layers' fused quantization and
    `_quantize_rows` require); off CUDA the glue runs only when tests force it (Triton's interpreter)."""
    return device.type != "cuda" or triton_fp8_ok(device)


def _scaled_grouped_mm(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                       offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Row-wise scaled FP8 grouped GEMM: rows a_q[offs[e-1]:offs[e]] (R, K) e4m3fn with a_scale (R,) fp32 times
    expert e's w_q (E, N, K) e4m3fn with w_scale (E, N) fp32 -> (R, N) in out_dtype (rows past offs[-1] undefined).
    torch._scaled_grouped_mm (CUTLASS, sm90+); _NoScaledGroupedMM (a RuntimeError) where this build or GPU
    refuses it."""
    try:
        return torch._scaled_grouped_mm(a_q, w_q.transpose(1, 2), a_scale, w_scale, offs=offs, out_dtype=out_dtype)
    except (RuntimeError, NotImplementedError) as e:
        raise _NoScaledGroupedMM(f"{type(e).__name__}: {e}") from e


class _NoScaledGroupedMM(RuntimeError):
    """torch._scaled_grouped_mm refused the call: the fused glue path falls back, other errors are not masked."""


def dequantize_experts(w_q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_q (E, N, K) e4m3fn with scale (E, N) per row or (E, ceil(N / bn), ceil(K / bk)) per block -> (E, N, K)
    in `dtype`, each element rounded once from its fp32 product. One expert at a time (E launches of fixed shapes,
    no host sync), so the temporaries beside the result are one expert's."""
    out = torch.empty(w_q.shape, dtype=dtype, device=w_q.device)
    for e in range(w_q.shape[0]):
        out[e] = dequantize(w_q[e], scale[e] if block else scale[e][:, None], block)
    return out
