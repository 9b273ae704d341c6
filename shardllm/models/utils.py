"""What every model file shares: the pipeline-stage layer range and the strict weight loading loop."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from shardllm.distributed.parallel_state import get_parallel_context, pp_layer_split
from shardllm.model_loader.weight_utils import default_weight_loader

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class PPMissingLayer(nn.Identity):
    """Stands in for a layer that another pipeline stage holds, so parameter names keep their indices."""


def stage_layer_range(num_layers: int) -> tuple[int, int]:
    """Layers [start, end) of this rank's pipeline stage (parallel_state.pp_layer_split, which the planner uses too)."""
    ctx = get_parallel_context()
    sizes = pp_layer_split(num_layers, ctx.pp_size, getattr(ctx, "pp_partition", None))
    start = sum(sizes[: ctx.pp_rank])
    return start, start + sizes[ctx.pp_rank]


def make_layers(num_layers: int, build) -> tuple[nn.ModuleList, int, int]:
    start, end = stage_layer_range(num_layers)
    layers = nn.ModuleList([build(i) if start <= i < end else PPMissingLayer() for i in range(num_layers)])
    return layers, start, end


def load_weights_strict(model: nn.Module, weights: Iterable[tuple[str, Any]],
                        packed: dict[str, tuple[str, Any]], ignored: Iterable[str] = (),
                        skip_layer=lambda i: False) -> None:
    """Load checkpoint tensors by HF name into `model`, failing with the names that are missing or unexpected.

    `packed` maps a checkpoint name part to (fused parameter part, shard id), e.g.
    {"q_proj": ("qkv_proj", "q")}. Tensors of layers other stages hold (`skip_layer`) are skipped.
    """
    params = dict(model.named_parameters())
    expected_shards: dict[str, set] = {}  # fused parameter -> the shard ids it must receive
    for fused, sid in packed.values():
        for name in params:
            if f".{fused}." in name:
                expected_shards.setdefault(name, set()).add(sid)
    loaded: dict[str, set] = {}
    unexpected: list[str] = []
    ignored = tuple(ignored)
    for name, w in weights:
        m = _LAYER_RE.search(name)
        if m and skip_layer(int(m.group(1))):
            continue
        if any(s in name for s in ignored):
            continue
        target, shard = name, None
        for part, (fused, sid) in packed.items():
            if f".{part}." in name:
                target, shard = name.replace(f".{part}.", f".{fused}."), sid
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                default_weight_loader(param, w)
            elif shard is None:
                loader(param, w)
            else:
                loader(param, w, shard)
        except ValueError as e:
            raise ValueError(f"cannot load checkpoint tensor {name!r}: {e}") from e
        loaded.setdefault(target, set()).add(shard)
    missing = [n for n in params if not getattr(params[n], "is_derived", False)  # filled by another (fp8 scales)
               and (n not in loaded or not expected_shards.get(n, {None}) <= loaded[n])]
    if unexpected or missing:
        raise ValueError("checkpoint does not match the model: "
                         f"missing tensors {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                         f"unexpected tensors {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
