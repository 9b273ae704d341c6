"""The KV cache's storage dtype: `kv_cache_dtype` auto (the model's dtype) or FP8 (e4m3 / e5m2).

FP8 entries are stored as k.to(fp8) and read back as fp8.to(q.dtype): a scale of 1.0 for every layer. Per-layer
k/v scales from checkpoints (`k_scale`, `v_scale`, `kv_scale`, `k_proj.k_scale`) are not applied yet.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

KV_CACHE_TORCH_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                         "fp8_e5m2": torch.float8_e5m2}
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype == "auto":
        return model_dtype
    return KV_CACHE_TORCH_DTYPES[kv_cache_dtype]


def drop_kv_scales(weights):
    """Skip checkpoint k/v cache scales (not applied: the FP8 cache uses 1.0), saying so once."""
    warned = False
    for name, w in weights:
        if name.endswith(KV_SCALE_SUFFIXES):
            if not warned:
                logger.warning("the checkpoint has KV-cache scales (%s ...); shardllm's FP8 KV cache uses a "
                               "scale of 1.0 and ignores them", name)
                warned = True
            continue
        yield name, w
