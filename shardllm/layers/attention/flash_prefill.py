"""Prompt chunks without cached context through torch's FlashAttention-2 varlen kernel (SHARDLLM_FLASH_PREFILL).

A prompt's first chunk attends only to its own tokens, whose k and v the step has just computed (and rotated): it
need not read them back from the paged cache. For those sequences the Triton path can hand q, k, v as they are to
FlashAttention-2's variable-length causal kernel, which torch builds for CUDA sm80+ (`aten::_flash_attention_forward`,
the kernel behind `F.scaled_dot_product_attention`'s flash backend; GQA native: k, v keep their nkv heads). The
rows of sequences that do have cached context (a later chunk of a long prompt, a prefix-cache hit) still take the
Triton prefill kernel over the cache, and leading decodes the decode kernel (attention.Attention.forward). The
FlashAttention part is the step's tail of sequences without context (AttentionMetadata.fresh_from): the scheduler
lists a step's decodes, then its chunks over cached context, then its prompts from their start.

Numerics: with a bf16 / fp16 cache the cache holds exactly these k, v, so the result is the paged kernel's up to
summation order. With an FP8 cache the fresh chunks attend to unquantized k, v (as TensorRT-LLM's context phase
does, which reads the step's QKV, not the cache); later tokens read the FP8 cache as before.

Why: the 1000/1000 prefill phase is ~26% of that benchmark, and its attention ran at ~100 TFLOP/s in the Triton
kernel (docs/benchmarks.md, twelfth session's profile).
"""

from __future__ import annotations

import functools

import torch

from shardllm import envs

ENABLED = envs.SHARDLLM_FLASH_PREFILL
_DTYPES = (torch.bfloat16, torch.float16)


def available(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether flash_prefill can take these (N, nh, D) q and (N, nkv, D) k: CUDA sm80+, bf16 / fp16, D a multiple
    of 8 up to 256, nh a multiple of nkv, a torch with the op, and the switch on."""
    if not (ENABLED and q.is_cuda and q.dtype in _DTYPES and k.dtype == q.dtype):
        return False
    d = q.shape[-1]
    if d % 8 or d > 256 or q.shape[1] % k.shape[1]:
        return False
    return _sm80(q.device.index if q.device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm80(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0) and hasattr(torch.ops.aten, "_flash_attention_forward")


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                  scale: float) -> torch.Tensor:
    """Causal attention of each sequence's q rows over its own k, v rows, sequences laid out one after another.

    Args:
        q: (T, nh, D); k, v: (T, nkv, D), bf16 or fp16, last dim contiguous (views of the QKV projection do).
        cu_seqlens: (B + 1,) int32 on q's device, cu_seqlens[0] == 0 and cu_seqlens[-1] == T.
        max_len: the longest sequence (host int). scale: softmax scale (1 / sqrt(D) usually).
    Returns (T, nh, D) in q's dtype. Raises RuntimeError from the kernel on shapes it refuses (see `available`).
    """
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True,
                                                  False, scale=scale)
    return out[0]
