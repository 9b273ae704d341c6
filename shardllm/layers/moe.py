"""Mixture-of-experts layer: router, top-k, this rank's experts, and one all-reduce over the tp group.

Expert parallelism is carved out of the tensor-parallel group (as TensorRT-LLM): `expert_parallel_layout`
says which experts, and which slice of each, a tp rank holds. Every rank routes every token (activations
are replicated after each all-reduce), runs the tokens routed to its own experts on its slice, and the
partial sums meet in the same all-reduce a row-parallel layer does; no other process group is needed.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardllm.distributed.communication import tp_all_reduce
from shardllm.distributed.parallel_state import get_parallel_context
from shardllm.layers import moe_kernels, triton_ops
from shardllm.layers.activation import SiluAndMul
from shardllm.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from shardllm.layers.quantization import get_moe_method
from shardllm.model_loader.weight_utils import copy_weight, narrow

logger = logging.getLogger(__name__)


def expert_parallel_layout(tp_rank: int, tp_size: int, ep_size: int) -> tuple[int, int, int]:
    """(ep_rank, moe_tp_rank, moe_tp_size) of a tp rank: the tp ranks form an ep x moe_tp grid.

    ep group `ep_rank` holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep), each expert's intermediate
    dim split over its moe_tp = tp/ep ranks. E.g. Mixtral (8 experts, I = 14336) at tp=4, ep=2:

        tp rank       0          1          2          3
        ep_rank       0          0          1          1
        moe_tp_rank   0          1          0          1
        experts      0-3        0-3        4-7        4-7
        I rows     [0, 7168) [7168, I)  [0, 7168) [7168, I)

    ep=1: every rank holds all experts, split tp ways; ep=tp: every rank holds E/tp whole experts.
    """
    if ep_size < 1 or tp_size % ep_size:
        raise ValueError(f"expert_parallel_size={ep_size} must divide tensor_parallel_size={tp_size}")
    moe_tp_size = tp_size // ep_size
    return tp_rank // moe_tp_size, tp_rank % moe_tp_size, moe_tp_size


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing: (weights (N, k) fp32, expert ids (N, k) int64).

    renormalize=True (Mixtral; Qwen MoE with norm_topk_prob) scales the k weights to sum to one, which is
    the softmax over the top-k logits; False (Qwen2-MoE by default) keeps the full-softmax probabilities.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # (N, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (N, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """The plain torch path (CPU, and the oracle): a loop over the local experts.

    x (N, H); w13 (E_local, 2 * I, H) = [gate; up]; w2 (E_local, H, I); topk_* (N, k) over global expert
    ids, of which this rank holds [expert_start, expert_start + E_local). Returns this rank's part (N, H).
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # weighted sum in fp32, one rounding
    local_ids = topk_ids - expert_start  # (N, k)
    for e in range(w13.shape[0]):
        token, slot = torch.where(local_ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x.index_select(0, token), w13[e]).chunk(2, dim=-1)  # (n_e, I) each
        y = F.linear(F.silu(gate) * up, w2[e])  # (n_e, H)
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
    return out.to(x.dtype)


def _grouped_mm_padded(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm's 2D x 3D contract by one bmm over groups padded to the largest: rows of group g
    are a[offs[g-1]:offs[g]] times b[g]; rows past offs[-1] are zero. For torch builds without it."""
    m, g = a.shape[0], b.shape[0]
    offs = offs.long()
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    group = torch.searchsorted(offs, torch.arange(m, device=a.device), right=True)  # (M,) g for each row
    valid = group < g
    group = group.clamp(max=g - 1)
    pos = torch.arange(m, device=a.device) - starts[group]  # row index inside its group
    cap = max(int((offs - starts).max()), 1)  # host sync: the padded size
    padded = a.new_zeros(g, cap, a.shape[1])
    padded[group[valid], pos[valid]] = a[valid]
    y = torch.bmm(padded, b)  # (G, cap, N)
    return torch.where(valid[:, None], y[group, pos.clamp(max=cap - 1)], 0)


_GROUPED_MM_OK: dict[tuple, bool] = {}  # (device type, dtype) -> False once torch._grouped_mm refused it


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm (a (R, K), b (E, K, N), offs (E,) int32 group ends -> (R, N); rows past offs[-1]
    undefined), or `_grouped_mm_padded` where this build or dtype lacks it (that one syncs with the host)."""
    key = (a.device.type, a.dtype)
    if _GROUPED_MM_OK.get(key, True) and hasattr(torch, "_grouped_mm"):
        try:
            return torch._grouped_mm(a, b, offs=offs)
        except (RuntimeError, NotImplementedError) as e:
            _GROUPED_MM_OK[key] = False
            logger.warning("torch._grouped_mm refuses %s on %s (%s); using a padded bmm", a.dtype, a.device.type, e)
    return _grouped_mm_padded(a, b, offs)


def sort_by_expert(topk_ids: torch.Tensor, expert_start: int,
                   num_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped GEMMs' layout of the N * k (token, slot) pairs, without a host sync.

    Returns order (N * k,) int64, the pairs sorted by local expert (stable; pairs of other ranks' experts last:
    row i of the sorted layout is token order[i] // k); is_local (N * k,) bool of the sorted rows; offs (E_local,)
    int32 group ends, offs[e] = number of rows of local experts <= e (torch._grouped_mm's `offs`).
    """
    local_ids = topk_ids.reshape(-1) - expert_start  # (N * k,)
    key = torch.where((local_ids >= 0) & (local_ids < num_local), local_ids, num_local)
    key_sorted, order = torch.sort(key, stable=True)  # (N * k,)
    offs = torch.searchsorted(key_sorted, torch.arange(num_local, device=key.device), right=True).to(torch.int32)
    return order, key_sorted < num_local, offs


def combine_expert_rows(y: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor, is_local: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """y (N * k, H) expert outputs in `sort_by_expert` order -> (N, H) weighted sum over the k slots, in fp32."""
    n, k = topk_weights.shape
    w = topk_weights.reshape(-1)[order]  # (N * k,) fp32
    # rows of other ranks' experts were never written (undefined values): select, never multiply by 0
    y = torch.where(is_local[:, None], y.float() * w[:, None], 0)
    out = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
    return out.view(n, k, -1).sum(dim=1).to(out_dtype)  # summed in fp32 as the reference does


def fused_experts_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """The GPU path, same contract as `fused_experts_reference`, without a Python loop over experts.

    The N * k (token, slot) pairs are sorted by local expert (pairs for other ranks' experts sort last),
    each expert's rows are multiplied by its weights in one grouped GEMM (`torch._grouped_mm`: CUTLASS for
    bf16 on sm90+, no host sync), and the weighted rows are put back in token order and summed over k.
    With the Triton glue (`moe_kernels.applies`: CUDA, SHARDLLM_MOE_FUSED_GLUE on) SiLU-and-mul is one kernel and
    the combine `moe_kernels.moe_combine` (bit-equal to combine_expert_rows at top_k <= 2); the activation may
    differ from torch's by one rounding in its dtype (Triton's exp).
    """
    k = topk_ids.shape[1]
    glue = moe_kernels.applies(x)
    if glue:
        order, is_local, offs, inv = moe_kernels.sort_pairs(topk_ids, expert_start, w13.shape[0])
    else:
        order, is_local, offs = sort_by_expert(topk_ids, expert_start, w13.shape[0])
    rows = x.index_select(0, order // k)  # (N * k, H), row i is token order[i] // k
    h = grouped_mm(rows, w13.transpose(1, 2), offs=offs)  # (N * k, 2 * I)
    if glue:
        act = triton_ops.silu_and_mul(h, num_rows=offs[-1:])  # other ranks' rows (ep > 1) skipped
        y = grouped_mm(act, w2.transpose(1, 2), offs=offs)  # (N * k, H)
        return moe_kernels.moe_combine(y, topk_weights, order, offs, x.dtype, inv=inv)
    gate, up = h.chunk(2, dim=-1)
    y = grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)  # (N * k, H)
    return combine_expert_rows(y, topk_weights, order, is_local, x.dtype)  # (N, H)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    fn = fused_experts_grouped if x.is_cuda else fused_experts_reference
    return fn(x, w13, w2, topk_weights, topk_ids, expert_start)


class FusedMoE(nn.Module):
    """A sparse MoE block: router, softmax top-k, SwiGLU experts, optional sigmoid-gated shared expert.

    Parameters (what checkpoints map onto with `moe_packed_names`):
        gate.weight (E, H)                       the router, replicated
        w13.weight  (E / ep, 2 * I / moe_tp, H)  [gate_proj; up_proj] of this rank's experts, its I slice
        w2.weight   (E / ep, H, I / moe_tp)      down_proj of the same
        shared_expert.{gate_up_proj, down_proj}, shared_expert_gate   (Qwen2-MoE) tp-split over all tp ranks
    `expert_token_counts` (E,) counts tokens routed to each global expert since the last reset.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, shared_expert_intermediate_size: int = 0, reduce_results: bool = True):
        super().__init__()
        ctx = get_parallel_context()
        self.tp_size = ctx.tp_size
        self.ep_rank, self.moe_tp_rank, self.moe_tp_size = expert_parallel_layout(ctx.tp_rank, ctx.tp_size,
                                                                                  ctx.ep_size)
        if num_experts % ctx.ep_size:
            raise ValueError(f"expert_parallel_size={ctx.ep_size} does not divide the {num_experts} experts")
        if intermediate_size % self.moe_tp_size:
            raise ValueError(f"the experts' intermediate size {intermediate_size} is not divisible by "
                             f"tp_size / ep_size = {self.moe_tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.num_local_experts = num_experts // ctx.ep_size
        self.expert_start = self.ep_rank * self.num_local_experts
        self.intermediate_size = intermediate_size // self.moe_tp_size  # this rank's slice
        self.reduce_results = reduce_results
        self.params_dtype = torch.get_default_dtype()
        self.quant_method = get_moe_method()  # None: experts in the model's dtype

        # the router stays in the model's dtype (checkpoints never quantize it)
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, dtype=None,
                                     quant_method=UnquantizedLinearMethod())
        # one level down (w13.weight), so that load_weights_strict's packed names can target them
        self.w13, self.w2 = nn.Module(), nn.Module()
        self._create_weights(hidden_size)
        self.shared_expert = None
        if shared_expert_intermediate_size:
            self.shared_expert = nn.Module()
            self.shared_expert.gate_up_proj = MergedColumnParallelLinear(
                hidden_size, [shared_expert_intermediate_size] * 2)
            self.shared_expert.down_proj = RowParallelLinear(shared_expert_intermediate_size, hidden_size,
                                                             reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, bias=False, dtype=None,
                                                       quant_method=UnquantizedLinearMethod())
            self.act_fn = SiluAndMul()
        self.register_buffer("expert_token_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def is_local_expert(self, expert_id: int) -> bool:
        return self.expert_start <= expert_id < self.expert_start + self.num_local_experts

    def _create_weights(self, hidden_size: int) -> None:
        e, i = self.num_local_experts, self.intermediate_size
        if self.quant_method is not None:
            self.quant_method.create_weights(self, e, hidden_size, i)
        else:
            dtype = self.params_dtype
            self.w13.weight = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=dtype), requires_grad=False)
            self.w2.weight = nn.Parameter(torch.empty(e, hidden_size, i, dtype=dtype), requires_grad=False)
        for p in self.w13.parameters():
            p.weight_loader = self.w13_loader
        for p in self.w2.parameters():
            p.weight_loader = self.w2_loader

    def unquantize(self) -> None:
        """Experts back in the model's dtype (a quantized checkpoint that leaves them unquantized)."""
        self.quant_method = None
        hidden_size = self.w2.weight.shape[1]
        self.w13, self.w2 = nn.Module(), nn.Module()
        self._create_weights(hidden_size)

    def _load(self, param: nn.Parameter, w: Any, expert: int, dim: int, dst: int, src: int, size: int,
              part: int) -> None:
        if self.quant_method is not None:
            return self.quant_method.load(self, param, w, expert, dim, dst, src, size, part)
        copy_weight(param.data[expert].narrow(dim, dst, size), narrow(w, dim, src, size))

    def w13_loader(self, param: nn.Parameter, w: Any, shard_id: tuple[int, int] | None = None) -> None:
        """Checkpoint gate_proj (shard (e, 0)) or up_proj ((e, 1)) of expert e, (I, H); other groups' skipped."""
        if shard_id is None:
            raise ValueError("FusedMoE loads per-expert gate and up projections (experts.{e}.gate_proj/up_proj)")
        expert_id, part = shard_id
        if not self.is_local_expert(expert_id):
            return
        n = self.intermediate_size
        self._load(param, w, expert_id - self.expert_start, 0, part * n, self.moe_tp_rank * n, n, part)

    def w2_loader(self, param: nn.Parameter, w: Any, shard_id: int | None = None) -> None:
        """Checkpoint down_proj of expert `shard_id`, (H, I): this rank's columns of I."""
        if shard_id is None:
            raise ValueError("FusedMoE loads per-expert down projections (experts.{e}.down_proj)")
        if not self.is_local_expert(shard_id):
            return
        n = self.intermediate_size
        self._load(param, w, shard_id - self.expert_start, 1, 0, self.moe_tp_rank * n, n, 0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (N, H), the same on every tp rank; returns the block's output (N, H)."""
        router_logits = self.gate(hidden_states)  # (N, E)
        if moe_kernels.applies(router_logits):  # one kernel, as select_experts
            topk_weights, topk_ids = moe_kernels.route(router_logits, self.top_k, self.renormalize)
        else:
            topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)  # (N, k)
        ids = topk_ids.reshape(-1)
        self.expert_token_counts.index_add_(0, ids, torch.ones_like(ids))  # no host sync
        if self.quant_method is not None:
            out = self.quant_method.apply(self, hidden_states, topk_weights, topk_ids)  # (N, H) partial sum
        else:
            out = fused_experts(hidden_states, self.w13.weight, self.w2.weight, topk_weights, topk_ids,
                                self.expert_start)  # (N, H), this rank's partial sum
        if self.shared_expert is not None:
            shared = self.shared_expert.down_proj(self.act_fn(self.shared_expert.gate_up_proj(hidden_states)))
            # the gate is a per-token scalar of replicated inputs, so it may scale the partial sums
            out = out + torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
        return tp_all_reduce(out) if self.reduce_results else out


def moe_packed_names(num_experts: int, src: str, dst: str, names: tuple[str, str, str]) -> dict[str, tuple]:
    """Entries for load_weights_strict's `packed` that map per-expert checkpoint tensors onto FusedMoE.

    `names` are the checkpoint's (gate, up, down) names: Mixtral
    moe_packed_names(8, "block_sparse_moe.experts", "mlp", ("w1", "w3", "w2")) maps
    block_sparse_moe.experts.5.w3 -> mlp.w13 with shard (5, 1), and .w2 -> mlp.w2 with shard 5.
    Put them before the dense entries: "gate_proj" also matches inside "experts.5.gate_proj".
    """
    gate, up, down = names
    packed: dict[str, tuple] = {}
    for e in range(num_experts):
        packed[f"{src}.{e}.{gate}"] = (f"{dst}.w13", (e, 0))
        packed[f"{src}.{e}.{up}"] = (f"{dst}.w13", (e, 1))
        packed[f"{src}.{e}.{down}"] = (f"{dst}.w2", e)
    return packed


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _moe_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, FusedMoE):
            match = _LAYER_RE.search(name)
            yield (int(match.group(1)) if match else -1), m


def collect_expert_load(model: nn.Module, local_only: bool = False) -> dict[tuple[int, int], int]:
    """Tokens routed per (layer, global expert id) since the last reset, one host sync for all layers.

    Every tp rank routes every token, so each rank returns the same numbers; `local_only` keeps the experts
    this rank holds (for a per-rank view). The counts include every forward, profiling runs too.
    """
    layers = list(_moe_layers(model))
    if not layers:
        return {}
    counts = torch.stack([m.expert_token_counts for _, m in layers]).tolist()
    return {(layer, e): c for (layer, m), row in zip(layers, counts) for e, c in enumerate(row)
            if not local_only or m.is_local_expert(e)}


def reset_expert_load(model: nn.Module) -> None:
    for _, m in _moe_layers(model):
        m.expert_token_counts.zero_()
