"""FP8 W8A8 linear with per-output-channel weight scales: online quantization and per-tensor/channel checkpoints.

Parameters of a layer (N = this rank's output rows, K = its input columns):
    weight        (N, K) float8_e4m3fn
    weight_scale  (N,) fp32 per channel; a per-tensor checkpoint first loads one scale per logical part
                  (q, k, v / gate, up) into (num_parts,), expanded to rows after loading, so the product
                  equals dequantize-then-compute exactly (no requantization to a shared max)
    input_scale   (num_parts,) fp32, static activation scheme only; their max is used (vLLM does the same)
Online (bf16/fp32 checkpoint): each row is quantized as its slice arrives, so no bf16 copy of a layer exists.
Activations: dynamic per-token scales, or the static per-tensor one. GEMM: `fp8_utils.scaled_mm_rowwise`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardllm.layers.gemv import DeferredGemvInput
from shardllm.layers.quantization import QuantizationConfig, fp8_triton
from shardllm.layers.quantization.fp8_fused import QuantizedActivation
from shardllm.layers.quantization.fp8_triton import (
    fp8_small_m_linear,
    quantize_per_token_triton,
    triton_fp8_ok,
)
from shardllm.layers.quantization.fp8_utils import (
    FP8_DTYPE,
    ScaledProduct,
    cpu_weight_f32,
    quantize_per_row,
    quantize_with_scale,
    scaled_mm_rowwise,
    weight_only_fallback,
)
from shardllm.model_loader.weight_utils import copy_weight, materialize, narrow


def check_fp8_shape(layer: nn.Module, n: int, k: int, multiple: int = 16) -> None:
    """torch._scaled_mm needs K and N divisible by 16 (block recipes: by the block)."""
    if n % multiple or k % multiple:
        raise ValueError(f"{type(layer).__name__} of this rank is ({n} x {k}) at tensor_parallel_size="
                         f"{layer.tp_size}: FP8 GEMMs need both dims divisible by {multiple}; use another "
                         "tensor_parallel_size or leave the model unquantized")


class Fp8LinearMethod:
    def __init__(self, cfg: QuantizationConfig):
        self.cfg = cfg
        self.per_tensor = cfg.is_checkpoint_fp8 and cfg.weight_strategy == "tensor"
        self.static_input = cfg.activation_scheme == "static"
        self.weight_only = cfg.weight_only

    @property
    def accepts_quantized_input(self) -> bool:
        """Whether `apply` takes a QuantizedActivation (per-token e4m3 rows from a fused norm / activation,
        fp8_fused.py): with dynamic per-token activation scales and FP8 GEMMs."""
        return not (self.weight_only or self.static_input)

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        check_fp8_shape(layer, output_size, input_size)
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8_DTYPE), requires_grad=False)
        parts = len(layer.shard_sizes)
        n_scales = parts if self.per_tensor else output_size
        layer.weight_scale = nn.Parameter(torch.ones(n_scales, dtype=torch.float32), requires_grad=False)
        layer.weight_scale.is_derived = not self.cfg.is_checkpoint_fp8  # online: written by the weight's loader
        if self.static_input:
            layer.input_scale = nn.Parameter(torch.zeros(parts, dtype=torch.float32), requires_grad=False)

    def load(self, layer: nn.Module, param: nn.Parameter, w: Any, dim: int, dst: int, src: int, size: int,
             shard: int) -> None:
        if param is layer.weight:
            if not self.cfg.is_checkpoint_fp8:  # online: quantize the rows as they arrive
                x = materialize(narrow(w, dim, src, size)).to(param.device)
                if dim == 1:
                    dst, size = 0, param.shape[0]
                if tuple(x.shape) != (size, param.shape[1]):
                    raise ValueError(f"shape mismatch: parameter rows {(size, param.shape[1])} vs checkpoint "
                                     f"{tuple(x.shape)}")
                q, scale = quantize_per_row(x)
                param.data.narrow(0, dst, size).copy_(q)
                layer.weight_scale.data.narrow(0, dst, size).copy_(scale.view(-1))
                return
            x = materialize(narrow(w, dim, src, size))
            if x.dtype != FP8_DTYPE:
                raise ValueError(f"the quantization config says FP8 weights, the checkpoint tensor is {x.dtype}")
            copy_weight(param.data.narrow(dim, dst, size), x)
        elif param is layer.weight_scale:
            x = materialize(w).float()
            if self.per_tensor:  # one scale per logical part (a fused checkpoint tensor: the same for all)
                if x.numel() != 1:
                    raise ValueError(f"expected one per-tensor weight scale, got shape {tuple(x.shape)}")
                param.data[shard] = x.reshape(())
            else:  # per channel: (N,) or (N, 1), rows split like the weight's (row-parallel: whole)
                x = x.reshape(-1)
                if dim == 0:
                    x = x.narrow(0, src, size)
                else:
                    dst, size = 0, param.shape[0]
                copy_weight(param.data.narrow(0, dst, size), x)
        elif param is getattr(layer, "input_scale", None):
            param.data[shard if dim == 0 else 0] = materialize(w).float().reshape(())
        else:  # bias
            copy_weight(param.data.narrow(dim, dst, size), narrow(w, dim, src, size))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.per_tensor:  # (num_parts,) -> one scale per row
            sizes = torch.tensor(layer.shard_sizes, device=layer.weight_scale.device)
            rows = layer.weight_scale.data.repeat_interleave(sizes)
            layer.weight_scale = nn.Parameter(rows, requires_grad=False)
        if self.static_input:
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(()), requires_grad=False)
        self.weight_only = self.weight_only or weight_only_fallback(layer.weight.device, self.cfg)

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor | ScaledProduct:
        # a linear whose output's reader applies the route's scales itself (fp8_fused.link_deferred_scale) may
        # return a ScaledProduct: (M, N) rows, no bias
        defer = bias is None and getattr(layer, "defer_scale", False)
        if isinstance(x, QuantizedActivation):  # quantized by the kernel before (M > FP8_GEMV_MAX_M rows)
            y = scaled_mm_rowwise(x.data, layer.weight, x.scale, layer.weight_scale.view(1, -1), x.dtype,
                                  cpu_weight_f32(layer, layer.weight), defer=defer)  # (M, N)
            return y if bias is None else y + bias
        if isinstance(x, DeferredGemvInput):  # SiLU-and-mul formed in the GEMV (gemv_silu.py)
            return x.gemv(layer.weight, layer.weight_scale.view(-1), bias)
        if self.weight_only:
            return F.linear(x, (layer.weight.to(x.dtype) * layer.weight_scale.to(x.dtype)[:, None]), bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        kernels = x.is_cuda and x.dtype != torch.float32 and triton_fp8_ok(x.device)
        if self.static_input:
            x_scale = layer.input_scale.expand(x2.shape[0], 1).contiguous()
            x_q = quantize_with_scale(x2, layer.input_scale)
        elif kernels and x2.shape[0] <= fp8_triton.FP8_GEMV_MAX_M:  # decode: the GEMV, activations unquantized
            y = fp8_small_m_linear(x2.contiguous(), layer.weight, layer.weight_scale)
            if bias is not None:
                y = y + bias
            return y.view(*shape[:-1], y.shape[-1])
        elif kernels:
            x_q, x_scale = quantize_per_token_triton(x2.contiguous())
        else:
            x_q, x_scale = quantize_per_row(x2)  # per token, (M, 1)
        y = scaled_mm_rowwise(x_q, layer.weight, x_scale, layer.weight_scale.view(1, -1), x.dtype,
                              cpu_weight_f32(layer, layer.weight), defer=defer and x.dim() == 2)  # (M, N)
        if isinstance(y, ScaledProduct):
            return y
        if bias is not None:
            y = y + bias
        return y.view(*shape[:-1], y.shape[-1])
