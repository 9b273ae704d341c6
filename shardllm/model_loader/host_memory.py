"""Host (CPU) memory checked before a model loads: a ValueError naming the fix instead of the OOM killer.

What a load keeps in host memory, path by path (model_loader/loader.py):
- on GPUs, safetensors: each rank reads memory-mapped slices and copies them to its GPU one tensor at a time; the
  page cache they pass through is reclaimable. Nothing to check.
- on GPUs, GGUF: the file is memory-mapped the same way and each rank dequantizes one tensor slice at a time to
  float32 before the copy: transient, one slice. Nothing to check.
- on GPUs, dummy weights: made on the GPU. Nothing to check.
- pickle checkpoints (`.bin`) are never loaded.
- on CPU (`device="cpu"`), every format: the weights are host memory, and so is each rank's KV cache
  (`cpu_kv_cache_gb`, or `num_kv_blocks` blocks). FP8 linears on CPU also keep a float32 copy of their weights
  from their first call (the reference path: `fp8_utils.cpu_weight_f32`; MoE experts `fp8_moe`'s dequantized
  copy), 5 bytes a parameter in all; block-scaled dense linears dequantize per call and keep none. A model
  larger than the memory left is killed part-way through its load by the kernel (or swaps for hours); this check
  fails first.
Available memory is psutil's `available` (Linux: MemAvailable) plus free swap. A machine whose memory grows as it
is used (a balloon) can report less than it will give.
"""

from __future__ import annotations

GiB = 1 << 30


FP8_CPU_BYTES = 1 + 4  # an FP8 linear's parameter on CPU: the e4m3 weight and its float32 copy (cpu_weight_f32)


def host_memory_needed(config) -> tuple[int, int]:
    """(weights, KV cache) in bytes that the ranks on this host hold in host memory: (0, 0) off CPU and under Ray
    (whose ranks may be on other hosts). Weights: every parameter in the model's dtype, or with FP8 the decoder
    layers' Linears at FP8_CPU_BYTES (block-scaled dense ones at 1) and the rest (embeddings, LM head, norms, routers)
    in the model's dtype."""
    import torch

    from shardllm.model_loader.size import count_parameters, linear_parameters
    from shardllm.planner import kv_bytes_per_element

    mc, pc, cc = config.model_config, config.parallel_config, config.cache_config
    if config.device != "cpu" or pc.distributed_executor_backend == "ray":
        return 0, 0
    act = torch.empty((), dtype=mc.dtype).element_size()
    total = count_parameters(mc.hf_config)
    if mc.quantization is not None:
        dense, routed = linear_parameters(mc.hf_config)
        dense_bytes = 1 if mc.quantization.weight_strategy == "block" else FP8_CPU_BYTES  # fp8_block: no copy kept
        weights = dense * dense_bytes + routed * FP8_CPU_BYTES + (total - dense - routed) * act
    else:
        weights = total * act
    if cc.num_blocks is None:
        kv = int(cc.cpu_kv_cache_gb * GiB) * pc.world_size
    else:  # each rank holds num_blocks blocks of its share of the layers and kv heads
        c = mc.hf_config
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads_held = max(kv_heads, pc.tensor_parallel_size)  # kv heads are replicated when tp exceeds them
        kv = (cc.num_blocks * cc.block_size * 2 * c.num_hidden_layers * kv_heads_held * head_dim
              * kv_bytes_per_element(cc.kv_cache_dtype, act))
    return weights, kv


def available_host_memory() -> int:
    """Bytes this host can still give: available RAM plus free swap (psutil)."""
    import psutil

    return psutil.virtual_memory().available + psutil.swap_memory().free


def check_host_memory(config) -> None:
    """Raise ValueError, before anything loads, when a CPU engine's weights and KV cache exceed the host's memory.

    Raises:
        ValueError: names the model, the bytes needed and available, and the fixes.
    """
    weights, kv = host_memory_needed(config)
    if not weights:
        return
    available = available_host_memory()
    if weights + kv <= available:
        return
    mc = config.model_config
    dtype = str(mc.dtype).removeprefix("torch.")
    if mc.quantization is not None:
        held = (f"FP8 linears with the float32 copy the CPU path keeps of each ({FP8_CPU_BYTES} bytes a parameter), "
                f"the rest in {dtype}")
        smaller = ("use a smaller model, or a bf16 checkpoint of it (FP8 on CPU takes more)"
                   if mc.quantization.is_checkpoint_fp8 else
                   "use a smaller model, or bfloat16 weights (dtype='bfloat16': FP8 on CPU takes more)")
    else:
        held = f"in {dtype}"
        smaller = "use a smaller model or dtype (bfloat16 halves float32)"
    raise ValueError(
        f"{mc.model} on CPU needs about {(weights + kv) / GiB:.1f} GiB of host memory (weights "
        f"{weights / GiB:.1f} GiB {held}, KV cache {kv / GiB:.1f} GiB), but this host has {available / GiB:.1f} GiB "
        f"available (RAM and swap): run it on GPUs (device='cuda'), {smaller}, or lower cpu_kv_cache_gb")
