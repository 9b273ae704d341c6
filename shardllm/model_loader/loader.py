"""Build the model for this rank and fill its weights: safetensors, GGUF or dummy (random, real shapes)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from shardllm.config import ModelConfig
from shardllm.layers.quantization.kv_cache import apply_kv_scales, split_kv_scales
from shardllm.models.registry import get_model_class


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, device: torch.device, show_progress: bool = True) -> nn.Module:
    from shardllm.layers import quantization

    cls = get_model_class(model_config.architecture)
    qc = getattr(model_config, "quantization", None)
    with torch.device(device), _default_dtype(model_config.dtype), quantization.quant_config_scope(qc):
        model = cls(model_config.hf_config, model_config.max_model_len)
        if qc is not None:
            quantization.prepare_quantized_model(model, qc)
    fmt = model_config.load_format
    if fmt == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        if fmt == "gguf":
            from shardllm.model_loader.gguf import iter_hf_weights, open_gguf

            gguf = open_gguf(model_config.path)  # lazy slices: each rank dequantizes only its own part
            weights = _progress(iter_hf_weights(gguf, lazy=True), len(gguf.tensor_names), "Loading GGUF",
                                show_progress)
        else:
            weights = iter_safetensors(model_config.path, show_progress)
        if qc is not None:
            weights = quantization.drop_unused_scales(weights, qc)
        kv_scales: dict = {}
        model.load_weights(split_kv_scales(weights, kv_scales))  # KV-cache scales go to the Attention modules
        model.num_kv_scales_loaded = apply_kv_scales(model, kv_scales)
        if fmt == "gguf":
            open_gguf.cache_clear()  # unmap the file: the weights are copied out
    quantization.process_weights_after_loading(model)
    return model.eval()


def _progress(it, total: int, desc: str, show: bool):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="tensor", leave=False)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"corrupt checkpoint index {index}: {e}") from e
        files = [os.path.join(path, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"checkpoint files listed in {index} are missing: {missing}")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}")
    return files


def iter_safetensors(path: str, show_progress: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield (name, lazy slice) for every tensor; loaders narrow the slice, so only this rank's part is read."""
    from safetensors import safe_open

    files = safetensors_files(path)
    for file in _progress(files, len(files), "Loading safetensors", show_progress and len(files) > 1):
        try:
            f = safe_open(file, framework="pt")
            keys = list(f.keys())
        except Exception as e:
            raise ValueError(f"cannot read checkpoint file {file}: {e}") from e
        for name in _progress(keys, len(keys), os.path.basename(file), show_progress and len(files) == 1):
            try:
                w = f.get_slice(name)
            except Exception as e:
                raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from e
            yield name, w


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the real shapes: norms 1, everything else N(0, 0.02). Each rank fills its shard."""
    seen = set()
    for i, (name, p) in enumerate(model.named_parameters()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        g = torch.Generator(device=p.device)
        g.manual_seed(seed * 100003 + i)
        if p.dtype == torch.float8_e4m3fn:  # FP8 weights N(0, 1) with their scales (below) at 0.02
            p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, 1.0, generator=g))
        elif "weight_scale" in name:
            p.fill_(0.02)
        elif name.endswith("input_scale"):
            p.fill_(1.0 / 448)
        elif p.dtype.is_floating_point:
            p.normal_(0.0, 0.02, generator=g)
