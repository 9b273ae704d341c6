"""FP8 linear with block-wise weight scales (HF/DeepSeek "fp8" with weight_block_size, compressed-tensors
FP8_BLOCK): weight (N, K) e4m3fn, scales (ceil(N / bn), ceil(K / bk)) fp32 under the checkpoint's name
(`weight_scale_inv`, a multiplier despite the name, or `weight_scale`); activations quantized per token
in 1 x bk groups. Sharding cuts whole blocks, so every part's rows per rank (and K per rank for a
row-parallel layer) must be a multiple of the block: `check_block_layout` says which tp sizes work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardllm.layers.quantization import QuantizationConfig
from shardllm.layers.quantization.fp8_utils import (
    FP8_DTYPE,
    block_fp8_linear,
    dequantize,
    quantize_per_block,
    weight_only_fallback,
)
from shardllm.model_loader.weight_utils import copy_weight, materialize, narrow


class Fp8BlockLinearMethod:
    def __init__(self, cfg: QuantizationConfig):
        self.cfg = cfg
        self.block = tuple(cfg.weight_block_size or (128, 128))
        self.scale_name = cfg.weight_scale_name
        self.weight_only = cfg.weight_only

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        bn, bk = self.block
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8_DTYPE), requires_grad=False)
        scale = torch.ones(-(-output_size // bn), -(-input_size // bk), dtype=torch.float32)
        scale = nn.Parameter(scale, requires_grad=False)
        scale.is_derived = not self.cfg.is_checkpoint_fp8  # online: written by the weight's loader
        setattr(layer, self.scale_name, scale)

    def check_block_layout(self, name: str, layer: nn.Module) -> None:
        """Raise naming `name` and the tp sizes that work when this rank's shards do not cut whole blocks."""
        bn, bk = self.block
        tp = layer.tp_size
        parts = layer.shard_sizes
        kind = type(layer).__name__
        split_k = kind == "RowParallelLinear" and tp > 1
        split_n = kind not in ("RowParallelLinear", "ReplicatedLinear") and (tp > 1 or len(parts) > 1)
        rows_ok = not split_n or all(s % bn == 0 for s in parts)
        cols_ok = not split_k or layer.input_size % bk == 0
        if rows_ok and cols_ok:
            return
        total_parts = [s * tp for s in parts] if split_n else []
        total_k = layer.input_size * (tp if split_k else 1)
        valid = [t for t in (1, 2, 4, 8, 16, 32, 64)
                 if all(p % t == 0 and (p // t) % bn == 0 for p in total_parts) or (t == 1 and len(parts) == 1)]
        if split_k:
            valid = [t for t in valid if total_k % t == 0 and (total_k // t) % bk == 0]
        what = (f"output parts {parts} rows per rank" if not rows_ok else f"{layer.input_size} input columns per rank")
        raise ValueError(f"{name}: block-quantized FP8 weights ({bn} x {bk} blocks) cannot be split at "
                         f"tensor_parallel_size={tp}: {what} are not whole blocks; tensor_parallel_size values "
                         f"that work for this layer: {valid or 'none'}")

    def load(self, layer: nn.Module, param: nn.Parameter, w: Any, dim: int, dst: int, src: int, size: int,
             shard: int) -> None:
        bn, bk = self.block
        if param is layer.weight and not self.cfg.is_checkpoint_fp8:  # online block quantization (tests, bench)
            x = materialize(narrow(w, dim, src, size)).to(param.device)
            q, scale = quantize_per_block(x, self.block)
            copy_weight(param.data.narrow(dim, dst, size), q)
            scale_param = getattr(layer, self.scale_name)
            b = bn if dim == 0 else bk
            copy_weight(scale_param.data.narrow(dim, dst // b, scale.shape[dim]), scale)
            return
        if param is layer.weight:
            x = materialize(narrow(w, dim, src, size))
            if x.dtype != FP8_DTYPE:
                raise ValueError(f"the quantization config says FP8 weights, the checkpoint tensor is {x.dtype}")
            copy_weight(param.data.narrow(dim, dst, size), x)
        elif param is getattr(layer, self.scale_name):
            b = bn if dim == 0 else bk
            n_blocks = -(-size // b)
            copy_weight(param.data.narrow(dim, dst // b, n_blocks), narrow(w, dim, src // b, n_blocks))
        else:  # bias
            copy_weight(param.data.narrow(dim, dst, size), narrow(w, dim, src, size))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.weight_only = self.weight_only or weight_only_fallback(layer.weight.device, self.cfg)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_only:
            w = dequantize(layer.weight, getattr(layer, self.scale_name), self.block).to(x.dtype)
            return F.linear(x, w, bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        y = block_fp8_linear(x2, layer.weight, getattr(layer, self.scale_name), self.block, x.dtype)  # (M, N)
        if bias is not None:
            y = y + bias
        return y.view(*shape[:-1], y.shape[-1])
