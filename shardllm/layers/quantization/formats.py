"""Detect a checkpoint's FP8 format from config.json `quantization_config` or ModelOpt's hf_quant_config.json.

Formats (field meanings from each producer's own configs; see shared notes fp8-nvml-planner.md A3):
    HF / DeepSeek "fp8"      quant_method "fp8", weight_block_size [bn, bk] -> block, `weight_scale_inv`;
                             without it (AutoFP8) per-tensor `weight_scale`, `activation_scheme` static|dynamic
    compressed-tensors       format "float-quantized" | "naive-quantized", config_groups.*.weights.strategy
                             tensor|channel|block, input_activations.dynamic, `ignore`
    NVIDIA ModelOpt FP8      hf_quant_config.json {"producer": {"name": "modelopt"}, "quantization": {"quant_algo":
                             "FP8", "exclude_modules": [...]}}, or quant_method "modelopt" in config.json;
                             per-tensor static weight and input scales
"""

from __future__ import annotations

import json
import os
from typing import Any

from shardllm.layers.quantization import QUANTIZATION_METHODS, QuantizationConfig


def _as_dict(qc: Any) -> dict:
    if qc is None:
        return {}
    if isinstance(qc, dict):
        return qc
    return qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))


def checkpoint_quant_dict(hf_config: Any, path: str | None) -> dict:
    """The checkpoint's quantization description: config.json's, else hf_quant_config.json's ({} if none)."""
    d = _as_dict(getattr(hf_config, "quantization_config", None))
    if d:
        return d
    if path and os.path.isdir(path):
        f = os.path.join(path, "hf_quant_config.json")
        if os.path.isfile(f):
            with open(f) as fh:
                raw = json.load(fh)
            q = raw.get("quantization", raw)
            return {"quant_method": "modelopt", **q}
    return {}


def check_quantization_method(requested: str | None) -> None:
    """Refuse an unknown `quantization` (EngineConfig.create calls it before resolving, so before a download)."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {requested!r}: choose one of {list(QUANTIZATION_METHODS)} "
                         "(or leave it unset)")


def detect_quantization(hf_config: Any, path: str | None, requested: str | None) -> QuantizationConfig | None:
    """The QuantizationConfig for this model: the checkpoint's FP8 format if it has one, else online FP8 when
    `requested` is "fp8", else None. Raises ValueError for an unknown method or an unsupported checkpoint."""
    check_quantization_method(requested)
    d = checkpoint_quant_dict(hf_config, path)
    if not d:
        return QuantizationConfig() if requested == "fp8" else None
    method = str(d.get("quant_method", "")).lower()
    if method == "fp8":
        return _hf_fp8(d)
    if method == "compressed-tensors":
        return _compressed_tensors(d)
    if method == "modelopt":
        return _modelopt(d)
    raise ValueError(f"the checkpoint is quantized with {method or 'an unnamed method'!r}, which shardllm does not "
                     "load: FP8 formats are supported (HF/DeepSeek fp8, compressed-tensors float-quantized, "
                     "ModelOpt FP8); use a bf16 checkpoint with dtype='fp8' instead")


def _hf_fp8(d: dict) -> QuantizationConfig:
    fmt = str(d.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise ValueError(f"FP8 checkpoint format {fmt!r} is not supported: e4m3 weights only (re-export the "
                         "checkpoint in float8_e4m3fn, or load a bf16 checkpoint with dtype='fp8')")
    ignore = tuple(d.get("modules_to_not_convert") or d.get("ignored_layers") or ())
    block = d.get("weight_block_size")
    scheme = str(d.get("activation_scheme", "dynamic"))
    if scheme not in ("static", "dynamic"):
        raise ValueError(f"activation_scheme {scheme!r} is not supported: set quantization_config's "
                         "activation_scheme to 'static' (with input_scale tensors) or 'dynamic'")
    if block:
        if scheme != "dynamic":  # block-scaled weights take per-token-group activation scales, computed per step
            raise ValueError("a block-scaled FP8 checkpoint (weight_block_size) with activation_scheme 'static' is "
                             "not supported: block recipes quantize activations dynamically; set "
                             "activation_scheme to 'dynamic' (static input_scale tensors would go unused)")
        return QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                                  activation_scheme="dynamic", weight_block_size=tuple(int(b) for b in block),
                                  ignore=ignore, weight_scale_name="weight_scale_inv")
    return QuantizationConfig(source="fp8", weight_strategy="tensor", is_checkpoint_fp8=True,
                              activation_scheme=scheme, ignore=ignore)


def _compressed_tensors(d: dict) -> QuantizationConfig:
    fmt = d.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported: float-quantized FP8 only")
    groups = list((d.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("the compressed-tensors quantization_config has no config_groups, so nothing says how the "
                         "weights are quantized: add a config_groups entry (weights: float, 8 bits) or load a "
                         "bf16 checkpoint with dtype='fp8'")
    schemes = {json.dumps({k: g.get(k) for k in ("weights", "input_activations")}, sort_keys=True) for g in groups}
    if len(schemes) > 1:
        raise ValueError("compressed-tensors configs with several different config_groups (mixed schemes) are not "
                         "supported: one FP8 scheme for every targeted layer; re-export with a single scheme, or "
                         "load a bf16 checkpoint with dtype='fp8'")
    wts, acts = groups[0].get("weights") or {}, groups[0].get("input_activations") or None
    if wts.get("type") != "float" or wts.get("num_bits") != 8:
        raise ValueError(f"compressed-tensors weights {wts.get('type')}/{wts.get('num_bits')} bits are not supported: "
                         "float 8-bit (FP8) only")
    strategy = wts.get("strategy", "tensor")
    if strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported: tensor, channel or block")
    scheme = "dynamic" if acts is None or acts.get("dynamic", True) else "static"
    if scheme == "static" and acts.get("strategy", "tensor") != "tensor":
        raise ValueError(f"static compressed-tensors activation scales must be per tensor, got strategy "
                         f"{acts.get('strategy')!r}: re-export with input_activations strategy 'tensor', or with "
                         "dynamic per-token activations (dynamic: true, strategy 'token')")
    block = tuple(wts.get("block_structure") or (128, 128)) if strategy == "block" else None
    return QuantizationConfig(source="compressed-tensors", weight_strategy=strategy, is_checkpoint_fp8=True,
                              activation_scheme=scheme, weight_block_size=block,
                              ignore=tuple(d.get("ignore") or ()))


def _modelopt(d: dict) -> QuantizationConfig:
    q = d.get("quantization", d)
    algo = str(q.get("quant_algo", "")).upper()
    if algo != "FP8":
        raise ValueError(f"ModelOpt quant_algo {algo!r} is not supported: FP8 only")
    ignore = tuple(q.get("exclude_modules") or q.get("ignore") or ())
    return QuantizationConfig(source="modelopt", weight_strategy="tensor", is_checkpoint_fp8=True,
                              activation_scheme="static", ignore=ignore)


FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89), Hopper (sm_90) and later (NVIDIA's CUDA guide)


def check_fp8_device(qc: QuantizationConfig | None, device: str) -> QuantizationConfig | None:
    """At config time, before any weight loads: FP8 on a GPU without FP8 tensor cores (compute capability below
    8.9, every visible GPU checked). Online `dtype="fp8"` there is refused (ValueError: it would only lose
    accuracy); an FP8 checkpoint runs weight-only (weights dequantized in each matmul) with a warning, the
    returned config saying so. CPU, no quantization, or no GPU visible here (a Ray driver): `qc` unchanged."""
    import torch

    if qc is None or device != "cuda" or not torch.cuda.is_available():
        return qc
    caps = [tuple(torch.cuda.get_device_capability(i)) for i in range(max(torch.cuda.device_count(), 1))]
    low = min(caps)
    if low >= FP8_MIN_CAPABILITY:
        return qc
    cc = f"compute capability {low[0]}.{low[1]}"
    if not qc.is_checkpoint_fp8:
        raise ValueError(f"dtype='fp8' (quantization='fp8') needs GPUs with FP8 tensor cores (compute capability "
                         f">= 8.9: Ada, Hopper or later) and this one has {cc}: use dtype='bfloat16' (or 'float16' "
                         "on GPUs without bf16)")
    if not qc.weight_only:
        import dataclasses
        import logging

        logging.getLogger(__name__).warning(
            "this GPU (%s) has no FP8 tensor cores: the FP8 checkpoint runs weight-only (weights dequantized in "
            "each matmul), slower than a bf16 checkpoint", cc)
        qc = dataclasses.replace(qc, weight_only=True)
    return qc
