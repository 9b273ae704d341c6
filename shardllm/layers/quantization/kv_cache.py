"""The KV cache's storage dtype (`kv_cache_dtype`: auto = the model's dtype, or FP8 e4m3 / e5m2) and the
per-layer k/v scales of an FP8 cache.

An FP8 cache stores k / k_scale and v / v_scale and reads them back through the attention's softmax scale
(q.k * k_scale) and its output (* v_scale). The Triton kernels take the 0-dim scale tensors and load them when they
run (the KV write divides, the attention folds k_scale into its softmax scale and multiplies its output by v_scale:
no extra launch); the torch reference (CPU, attention_backend="torch") runs the four elementwise ops instead.
Scales come from the checkpoint under any of the names producers use (vLLM's
`weight_utils.maybe_remap_kv_scale_name` lists the same):
    <attn>.k_scale, <attn>.v_scale             compressed-tensors kv_cache_scheme, vLLM
    <attn>.kv_scale                            older AutoFP8 (one scale for both)
    <attn>.k_proj.k_scale, <attn>.v_proj.v_scale   NVIDIA ModelOpt
    <attn>.k_proj.output_scale, <attn>.v_proj.output_scale   older compressed-tensors
    <attn>.attn.k_scale, <attn>.attn.v_scale   our own module path
where <attn> is the decoder layer's attention module, e.g. model.layers.3.self_attn.

Without checkpoint scales they are computed on the engine's first step (as vLLM's `calculate_kv_scales` does), from
that step's k and v before they are written: scale = 2^ceil(log2(amax / (fp8_max / 4))), so the step's largest value
lands in (fp8_max / 8, fp8_max / 4] and later values up to 4x the step's amax still fit (k: 2.8x, as its rotation
can grow a component by sqrt(2)); beyond that they saturate. A short first step (a one-line chat) rarely sets the
range, and the headroom costs next to nothing: a power of two divides exactly, so the value stored is the value's
own FP8 rounding whatever the power, except values below 2^-6 * scale (subnormals: under ~3e-4 of the amax).
Under tensor parallelism the amax is the max over the tp group, so every rank holds the scale one rank holding all
heads would compute, and a tp run stores the same bytes as one rank. 1.0 (values beyond +-fp8_max saturate) only
for a model that never runs a step.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from shardllm.model_loader.weight_utils import materialize

logger = logging.getLogger(__name__)

KV_CACHE_TORCH_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                         "fp8_e5m2": torch.float8_e5m2}
_KV_SCALE_RE = re.compile(r"^(.*?)\.(?:attn\.)?(?:(k_scale|v_scale|kv_scale)|(k|v)_proj\.(?:\3_scale|output_scale))$")


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype == "auto":
        return model_dtype
    return KV_CACHE_TORCH_DTYPES[kv_cache_dtype]


def kv_scale_target(name: str) -> tuple[str, tuple[str, ...]] | None:
    """('model.layers.3.self_attn', ('k',)) for a checkpoint KV-scale name, ('...', ('k', 'v')) for kv_scale;
    None for any other tensor."""
    m = _KV_SCALE_RE.match(name)
    if m is None:
        return None
    prefix, direct, proj = m.group(1), m.group(2), m.group(3)
    if direct == "kv_scale":
        return prefix, ("k", "v")
    return prefix, ((direct[0],) if direct else (proj,))


def split_kv_scales(weights, scales: dict[str, dict[str, float]]):
    """Pass every tensor but the KV-cache scales through; collect those into scales[attn prefix]['k'|'v']."""
    for name, w in weights:
        target = kv_scale_target(name)
        if target is None:
            yield name, w
            continue
        prefix, which = target
        value = float(materialize(w).float().reshape(-1).max())
        for kv in which:
            scales.setdefault(prefix, {})[kv] = value


def apply_kv_scales(model: nn.Module, scales: dict[str, dict[str, float]]) -> int:
    """Give each Attention its checkpoint k/v scales (written into its k_scale / v_scale tensors) and record which
    of the two came from the checkpoint (`kv_scales_from_checkpoint`: (k, v) bools; the first step computes the
    others, calibrate_kv_scales_); returns how many layers got at least one."""
    from shardllm.layers.attention import Attention

    found, parents = 0, set()
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            parents.add(parent.rsplit(".", 1)[-1])
            s = scales.get(parent) or {}
            for kv in s:
                getattr(m, f"{kv}_scale").fill_(s[kv])
            m.kv_scales_from_checkpoint = ("k" in s, "v" in s)
            found += bool(s)
    # a scale under a module that is no attention layer's (e.g. "...k_proj.v_scale", "...mlp.kv_scale") has no
    # reader: say so (another pipeline stage's layers end in the same module name, and are not reported)
    stray = sorted(p for p in scales if parents and p.rsplit(".", 1)[-1] not in parents)
    if stray:
        logger.warning("checkpoint KV-cache scales under %s match no attention layer and are ignored (expected "
                       "under %s)", ", ".join(stray[:4]) + (" ..." if len(stray) > 4 else ""),
                       " / ".join(sorted(parents)))
    return found


def layers_to_calibrate(attn_layers: list[nn.Module]) -> list[nn.Module]:
    """The Attention layers whose k or v scale the checkpoint did not give (all of them without checkpoint
    scales): an FP8 cache computes those on the first step."""
    return [a for a in attn_layers if not all(a.kv_scales_from_checkpoint)]


def calibrated_scale(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """amax () fp32 -> the power of two 2^ceil(log2(amax / (fp8_max / 4))) (fp32, same device; 1.0 for an all-zero
    amax): the step's largest value lands in (fp8_max / 8, fp8_max / 4], leaving 4x headroom."""
    target = float(torch.finfo(fp8_dtype).max) / 4
    amax = amax.float()
    exp = torch.ceil(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny) / target))
    return torch.where(amax > 0, torch.exp2(exp), torch.ones_like(amax))


def calibrate_kv_scales_(attn: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
    """Set attn.k_scale / v_scale in place from this step's k (N, nkv, D) and v, the amax taken over the tp group
    (every rank runs the step: a collective in the layer's forward, like a row-parallel all-reduce); a scale the
    checkpoint gave (attn.kv_scales_from_checkpoint) is kept."""
    from shardllm.distributed.parallel_state import get_parallel_context

    amax = torch.stack([k.detach().abs().amax(), v.detach().abs().amax()]).float()  # (2,)
    ctx = get_parallel_context()
    if ctx.tp_size > 1:
        import torch.distributed as dist

        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=ctx.tp_group)
    fp8 = attn.kv_cache.dtype
    if not attn.kv_scales_from_checkpoint[0]:  # a scale the checkpoint gave stays as loaded
        attn.k_scale.copy_(calibrated_scale(amax[0], fp8))
    if not attn.kv_scales_from_checkpoint[1]:
        attn.v_scale.copy_(calibrated_scale(amax[1], fp8))


def set_kv_scale_calibration(attn_layers: list[nn.Module], on: bool) -> None:
    """Turn the first-step computation of k/v scales on (before the step) or off (after it) in every layer."""
    for a in attn_layers:
        a.calibrate_kv_scales = on
