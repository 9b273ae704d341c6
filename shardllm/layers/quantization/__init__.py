"""Quantization: a config per weight format and the method objects linear and MoE layers delegate to.

A layer built inside `quant_config_scope(cfg)` asks `get_linear_method()` / `get_moe_method()` for its
method (create weights, load, process after loading, matmul); outside a scope every layer is unquantized.
The scope lives only while the model is constructed (as `torch.device(...)` does), so a model file reads
like single-GPU code and never passes a config around.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

QUANTIZATION_METHODS = ("fp8",)


@dataclass(frozen=True)
class QuantizationConfig:
    """How the linear layers hold their weights.

    weight_strategy: "channel" (one fp32 scale per output row), "tensor" (one per checkpoint tensor, fused
        layers keep one per part) or "block" (one per `weight_block_size` block of the (N, K) weight).
    is_checkpoint_fp8: the checkpoint holds e4m3 weights and scales; False = quantize bf16/fp32 weights as they
        load (online, per channel).
    activation_scheme: "dynamic" (per token, or per 1 x block_k group for block weights) or "static" (the
        checkpoint's per-tensor `input_scale`).
    ignore: module names (checkpoint spelling) kept unquantized: exact, suffix, `re:` regex or glob patterns.
    weight_only: see below.
    """

    method: str = "fp8"
    source: str = "online"  # online | fp8 | compressed-tensors | modelopt
    weight_strategy: str = "channel"
    is_checkpoint_fp8: bool = False
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    ignore: tuple[str, ...] = ()
    weight_scale_name: str = "weight_scale"  # HF/DeepSeek block checkpoints: "weight_scale_inv"
    # W8A16: dequantize the weights in the matmul, activations unquantized. Chosen on GPUs without FP8 tensor
    # cores (with a warning), and by tests that compare with the dequantized checkpoint token for token.
    weight_only: bool = False

    def is_ignored(self, name: str) -> bool:
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], name):
                    return True
            elif any(c in pat for c in "*?["):
                if fnmatch.fnmatchcase(name, pat):
                    return True
            elif name == pat or name.endswith("." + pat) or name.startswith(pat + "."):
                return True
        return False


_SCOPE: list[QuantizationConfig | None] = [None]


@contextmanager
def quant_config_scope(cfg: QuantizationConfig | None) -> Iterator[None]:
    """Layers built inside take their quantization method from `cfg` (None: unquantized)."""
    old = _SCOPE[0]
    _SCOPE[0] = cfg
    try:
        yield
    finally:
        _SCOPE[0] = old


def get_linear_method():
    """The method a LinearBase built now delegates to (None: the layer's unquantized default)."""
    cfg = _SCOPE[0]
    if cfg is None:
        return None
    if cfg.weight_strategy == "block":
        from shardllm.layers.quantization.fp8_block import Fp8BlockLinearMethod

        return Fp8BlockLinearMethod(cfg)
    from shardllm.layers.quantization.fp8 import Fp8LinearMethod

    return Fp8LinearMethod(cfg)


def get_moe_method():
    cfg = _SCOPE[0]
    if cfg is None:
        return None
    from shardllm.layers.quantization.fp8_moe import Fp8MoEMethod

    return Fp8MoEMethod(cfg)


def unquantize_ignored(model: nn.Module, cfg: QuantizationConfig, packed: dict) -> list[str]:
    """Give the layers `cfg.ignore` names back their unquantized weights (before loading); returns their names.

    Ignore lists name checkpoint modules (q_proj), ours are fused (qkv_proj): a fused layer is unquantized when
    its parts are, and a list that ignores only some parts of one fused layer is an error.
    """
    from shardllm.layers.linear import LinearBase
    from shardllm.layers.moe import FusedMoE

    done = []
    if not cfg.ignore:
        return done
    fused_parts: dict[str, list[str]] = {}
    for part, (fused, _) in packed.items():
        fused_parts.setdefault(fused, []).append(part)
    for name, m in model.named_modules():
        if not isinstance(m, (LinearBase, FusedMoE)) or getattr(m, "quant_method", None) is None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = name[: -len(leaf)]
        names = [parent + p for p in fused_parts.get(leaf, [])] if leaf in fused_parts else [name]
        if isinstance(m, FusedMoE):  # experts: mlp.experts.E.w1 ... (checkpoint spelling varies)
            names = [n for n in (name, name + ".experts") if n]
        hits = [cfg.is_ignored(n) for n in names]
        if isinstance(m, FusedMoE):  # the two spellings name the same experts: either one ignores them
            hits = [any(hits)]
        if any(hits) and not all(hits):
            raise ValueError(f"the quantization config's ignore list names only some of {names}, which shardllm "
                             "fuses into one layer: ignore all of them or none")
        if all(hits) and hits:
            m.unquantize()
            done.append(name)
    return done


def prepare_quantized_model(model: nn.Module, cfg: QuantizationConfig) -> None:
    """After construction, before loading: unquantize ignored layers, check block layouts (naming the layer)."""
    unquantize_ignored(model, cfg, getattr(model, "packed", {}))
    for name, m in model.named_modules():
        check = getattr(getattr(m, "quant_method", None), "check_block_layout", None)
        if check is not None:
            check(name, m)


def producer_linear_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(producer, linear) for each entry of `model.fp8_act_quant_inputs` ({producer: linear}, names relative to a
    decoder layer of `model.model.layers`) in every layer where both exist (a MoE layer has no dense
    `mlp.down_proj`; a pipeline stage's missing layers have neither): what the fused-input linkers walk."""
    pairs = getattr(model, "fp8_act_quant_inputs", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not pairs or layers is None:
        return
    for layer in layers:
        for producer_name, linear_name in pairs.items():
            try:
                yield layer.get_submodule(producer_name), layer.get_submodule(linear_name)
            except AttributeError:
                continue


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every quantized layer finish its weights (per-part scales expanded to rows, static scales reduced),
    then link the FP8 linears to the norms / activations that feed them."""
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(m)
    from shardllm.layers.quantization.fp8_fused import link_act_quant, link_deferred_scale

    link_act_quant(model)  # norms / activations before FP8 linears quantize their output (fp8_fused.py)
    link_deferred_scale(model)  # ... and apply the scales of the FP8 linear before them (fp8_fused.py)
    from shardllm.layers.gemv_silu import link_gemv_silu

    link_gemv_silu(model)  # SiLU-and-mul folded into the down projection's GEMV at M = 1 (gemv_silu.py)


def drop_unused_scales(weights, cfg: QuantizationConfig):
    """Checkpoint tensors a layer of this config has no parameter for: input scales under a dynamic scheme."""
    for name, w in weights:
        if cfg.activation_scheme == "dynamic" and name.endswith(".input_scale"):
            continue
        yield name, w
