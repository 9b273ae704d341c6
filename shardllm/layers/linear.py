"""Linear layers that split their weight over the tensor-parallel group.

Column-parallel layers split the output features (no communication); row-parallel layers split the
input features and all-reduce the partial sums. Each parameter carries a `weight_loader` that cuts
this rank's slice out of a checkpoint tensor. The matmul itself is delegated to a quantization
method object (unquantized here), so a new weight format is a new method, not a branch in here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardllm.distributed.communication import tp_all_reduce
from shardllm.distributed.parallel_state import get_parallel_context
from shardllm.layers.gemv import DeferredGemvInput, maybe_small_m_linear_bf16
from shardllm.layers.quantization import get_linear_method
from shardllm.layers.quantization.fp8_utils import ScaledProduct
from shardllm.model_loader.weight_utils import copy_weight, narrow


def divide(a: int, b: int, what: str = "size") -> int:
    if a % b:
        raise ValueError(f"{what} {a} is not divisible by tensor_parallel_size {b}")
    return a // b


class UnquantizedLinearMethod:
    """Weights in the model's dtype, F.linear. The interface every quantization method implements."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)

    def load(self, layer: nn.Module, param: nn.Parameter, w: Any, dim: int, dst: int, src: int, size: int,
             shard: int) -> None:
        """Copy rows (dim 0) or columns (dim 1) [src, src + size) of checkpoint tensor `w` (logical part
        `shard` of a fused layer) into [dst, dst + size) of `param`."""
        copy_weight(param.data.narrow(dim, dst, size), narrow(w, dim, src, size))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, DeferredGemvInput):  # SiLU-and-mul formed in the GEMV (gemv_silu.py)
            return x.gemv(layer.weight, None, bias)
        y = maybe_small_m_linear_bf16(x, layer.weight, bias)  # decode GEMV where its table beats cuBLAS, else None
        return F.linear(x, layer.weight, bias) if y is None else y


class LinearBase(nn.Module):
    """`shard_sizes`: this rank's output rows of each logical part ([q, k, v], [gate, up], or one part)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype | None,
                 quant_method: Any = None):
        super().__init__()
        ctx = get_parallel_context()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.input_size, self.output_size = input_size, output_size  # this rank's sizes
        if not hasattr(self, "shard_sizes"):
            self.shard_sizes = [output_size]
        self.params_dtype = dtype or torch.get_default_dtype()
        self.quant_method = quant_method or get_linear_method() or UnquantizedLinearMethod()
        self._create_weights()
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=self.params_dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _create_weights(self) -> None:
        self.quant_method.create_weights(self, self.input_size, self.output_size, self.params_dtype)
        for name, p in self.named_parameters(recurse=False):
            if name != "bias":
                p.weight_loader = self.weight_loader

    def unquantize(self) -> None:
        """Back to weights in the model's dtype (a module a quantized checkpoint leaves unquantized)."""
        for name, _ in list(self.named_parameters(recurse=False)):
            if name != "bias":
                delattr(self, name)
        self.quant_method = UnquantizedLinearMethod()
        self._create_weights()

    def _load(self, param: nn.Parameter, w: Any, dim: int, dst: int, src: int, size: int, shard: int = 0) -> None:
        self.quant_method.load(self, param, w, dim, dst, src, size, shard)

    def weight_loader(self, param: nn.Parameter, w: Any, shard_id: Any = None) -> None:
        self._load(param, w, 0, 0, 0, param.shape[0] if param.dim() else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ScaledProduct:
        """The method's product: a tensor, or a ScaledProduct where fp8_fused.link_deferred_scale set defer_scale."""
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (output features) split over tp ranks; output stays split."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype=None, quant_method=None):
        tp = get_parallel_context().tp_size
        super().__init__(input_size, divide(output_size, tp, "output size"), bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, w: Any, shard_id: Any = None) -> None:
        n = self.output_size
        self._load(param, w, 0, 0, self.tp_rank * n, n)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate_up_proj = [gate; up])."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, dtype=None, quant_method=None):
        self.output_sizes = list(output_sizes)
        self.shard_sizes = [divide(s, get_parallel_context().tp_size, "output size") for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, w: Any, shard_id: int | None = None) -> None:
        if shard_id is None:  # a checkpoint that stores the parts fused: load each part's slice
            for i in range(len(self.output_sizes)):
                src = sum(self.output_sizes[:i]) + self.tp_rank * (self.output_sizes[i] // self.tp_size)
                self._load_part(param, w, i, src)
            return
        self._load_part(param, w, shard_id, self.tp_rank * (self.output_sizes[shard_id] // self.tp_size))

    def _load_part(self, param: nn.Parameter, w: Any, part: int, src: int) -> None:
        offset = sum(self.output_sizes[:part]) // self.tp_size
        size = self.output_sizes[part] // self.tp_size
        self._load(param, w, 0, offset, src, size, part)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split over tp ranks.

    When tp exceeds the number of kv heads, each kv head is replicated so that every rank holds the
    one its query heads attend with: rank r holds kv head r // (tp / total_num_kv_heads).
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, dtype=None, quant_method=None):
        tp = get_parallel_context().tp_size
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, "number of attention heads")
        if tp >= total_num_kv_heads:
            divide(tp, total_num_kv_heads, "tensor_parallel_size must be a multiple of the kv heads;")
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp // total_num_kv_heads
        else:
            self.num_kv_heads, self.num_kv_head_replicas = divide(total_num_kv_heads, tp, "number of kv heads"), 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp
        self.shard_sizes = [self.num_heads * head_size] + [self.num_kv_heads * head_size] * 2
        super().__init__(hidden_size, out, bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, w: Any, shard_id: str | None = None) -> None:
        if shard_id is None:
            raise ValueError("QKVParallelLinear loads q, k and v separately")
        hq, hkv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        offset, size, src, part = {
            "q": (0, hq, self.tp_rank * hq, 0),
            "k": (hq, hkv, (self.tp_rank // self.num_kv_head_replicas) * hkv, 1),
            "v": (hq + hkv, hkv, (self.tp_rank // self.num_kv_head_replicas) * hkv, 2),
        }[shard_id]
        self._load(param, w, 0, offset, src, size, part)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (input features) split; partial sums all-reduced over tp."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype=None, quant_method=None,
                 reduce_results: bool = True):
        tp = get_parallel_context().tp_size
        self.reduce_results = reduce_results
        super().__init__(divide(input_size, tp, "input size"), output_size, bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, w: Any, shard_id: Any = None) -> None:
        if param is self.bias:  # whole, added once after the reduce
            return copy_weight(param, w)
        n = self.input_size
        self._load(param, w, 1, 0, self.tp_rank * n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ScaledProduct:
        y = self.quant_method.apply(self, x, None)  # a ScaledProduct only at tp 1 (link_deferred_scale)
        if self.reduce_results:
            y = tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
