"""Engine configuration: small frozen dataclasses per concern, built and validated once.

`EngineConfig.create(**llm_kwargs)` takes the `LLM` arguments (the CLI flags map 1:1 onto them),
resolves the model, and fails with a ValueError that says what to change.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shardllm import envs
from shardllm.distributed.parallel_state import pp_layer_split

_DTYPES = {
    "auto": None, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "fp8": None,  # = quantization="fp8": FP8 linears (online W8A8), everything else in auto's dtype
}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# Tokens per KV block when block_size is not given: 16 (vLLM's default), 64 for an e4m3 FP8 cache on a Hopper-class GPU.
# A page of 64 FP8 tokens is 8 KiB of K per kv head, where 16 tokens left the decode kernels paying their fixed cost
# a page (a TMA barrier wait, a softmax update) for 2 KiB. Measured on an H200 (sixth session, benchmarks/device_s6_b.sh
# and device_s6_d.sh, docs/benchmarks.md): Llama-3-8B fp8 + fp8 KV, 500 x 1000/1000, 14,098 (16) -> 15,253 (32) ->
# 15,885 (64) out tok/s, and 13,629 -> 15,143 (16 -> 64) in another call; 1000 x 128/128 within 1.5%. A bf16 cache's
# page is already 4 KiB at 16 tokens; e5m2 and pre-Hopper GPUs were not measured and keep 16. The price: prefix
# caching reuses whole blocks, so a shared prefix counts in steps of 64 tokens (none under 64).
DEFAULT_BLOCK_SIZE, FP8_CACHE_BLOCK_SIZE = 16, 64


def default_block_size(kv_cache_dtype: str = "auto", device: str = "cuda") -> int:
    """Tokens per KV cache block when none is given: FP8_CACHE_BLOCK_SIZE (64) for an e4m3 FP8 cache (`kv_cache_dtype`
    fp8 or fp8_e4m3, any case) on `device` "cuda" where the GPU is sm90 or later (or no GPU is visible here: a Ray
    driver's workers), else DEFAULT_BLOCK_SIZE (16). See the measurements above."""
    e4m3 = isinstance(kv_cache_dtype, str) and kv_cache_dtype.lower() in ("fp8", "fp8_e4m3")
    if not e4m3 or device != "cuda":
        return DEFAULT_BLOCK_SIZE
    try:
        hopper = not torch.cuda.is_available() or torch.cuda.get_device_capability(0) >= (9, 0)
    except RuntimeError:  # a driver that lists GPUs but cannot open one: the usual size
        hopper = False
    return FP8_CACHE_BLOCK_SIZE if hopper else DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class ModelConfig:
    model: str  # what the user named: path, repo id, shipped config name, or "default"
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    load_format: str  # safetensors | gguf | dummy
    path: str | None  # checkpoint directory or .gguf file (None for dummy from a shipped config)
    tokenizer_path: str | None
    max_model_len: int
    seed: int = 0
    trust_remote_code: bool = False
    quantization: Any = None  # layers.quantization.QuantizationConfig, or None (unquantized)

    @property
    def architecture(self) -> str:
        return (getattr(self.hf_config, "architectures", None) or ["?"])[0]

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def total_num_kv_heads(self) -> int:
        c = self.hf_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    pp_partition: tuple[int, ...] | None = None
    distributed_executor_backend: str | None = None  # None: uni for one rank, mp for several on one host
    num_workers: int | None = None  # Ray: nodes to spread the ranks over (tp x pp / num_workers ranks each)
    ray_address: str | None = None  # Ray: the cluster to attach to (None: $RAY_ADDRESS, else a local one)
    all_reduce: str = "nccl"  # tp all-reduce: nccl | symm_mem (PyTorch's P2P kernels, small tensors; GPUs only)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_free_gpu_memory_fraction: float = 0.9
    cpu_kv_cache_gb: float = 1.0  # KV cache budget on CPU, where free memory says little
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # override the sizing (tests)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    num_microbatches: int = 1  # batches kept in flight: pp, or pp + 1 for a synchronous pipeline (create)
    # Requests running at once. EngineConfig.create: max_num_seqs x pp (a pipeline holds as many requests per stage
    # as one GPU would, as vLLM's per-stage virtual engines did), split evenly over the num_microbatches batches,
    # each at most max_num_seqs: with pp = 2 and 1000 requests, three batches of 171 at max_num_seqs 256 (the
    # configuration measured in docs/benchmarks.md). SHARDLLM_PP_SHARED_MAX_SEQS=1 at start-up: max_num_seqs in all
    # (the earlier behaviour, for A/B runs). None (tests building a SchedulerConfig): max_num_seqs per batch.
    max_num_running_seqs: int | None = None
    # Schedule step k+1 while step k runs on the device: a decoding request joins the next batch before its
    # token is known (a placeholder the worker fills on the device from step k's sampled tokens).
    async_scheduling: bool = False


SMALL_MODEL_PARAMS = 1_000_000_000


def _warn_small_model_fp8_cache(model_config, kv_cache_dtype: str) -> None:
    """A warning for an FP8 KV cache on a model under SMALL_MODEL_PARAMS parameters: its k/v rounding can change or
    degrade the answers of so small a model (the embedded 135M default's France chat turns into a repetition loop;
    README, FP8), where 8B and larger models absorb it."""
    if not (isinstance(kv_cache_dtype, str) and kv_cache_dtype.startswith("fp8")):
        return
    from shardllm.model_loader.size import count_parameters

    try:
        params = count_parameters(model_config.hf_config)
    except Exception:  # an architecture the counter does not know: no warning rather than no engine
        return
    if params < SMALL_MODEL_PARAMS:
        import logging

        logging.getLogger("shardllm").warning(
            "kv_cache_dtype=%r on a model of %.0fM parameters: FP8 rounding of the KV cache can change or degrade "
            "the answers of a model this small (use kv_cache_dtype='auto' here; an FP8 cache suits 8B and larger "
            "models)", kv_cache_dtype, params / 1e6)


def check_engine_settings(*, tensor_parallel_size: int | str = 1, pipeline_parallel_size: int = 1,
                          expert_parallel_size: int = 1, max_batch_size: int | None = None,
                          max_num_tokens: int | None = None, block_size: int | None = None,
                          kv_cache_free_gpu_memory_fraction: float = 0.9, dtype: str = "auto",
                          kv_cache_dtype: str = "auto", quantization: str | None = None,
                          num_kv_blocks: int | None = None, cpu_kv_cache_gb: float = 1.0, seed: int = 0,
                          enable_prefix_caching: bool = True, enforce_eager: bool = False,
                          trust_remote_code: bool = False, async_scheduling: bool | None = None,
                          tokenizer: str | None = None, pp_partition: list[int] | None = None) -> None:
    """The checks of `EngineConfig.create` that need no model (sizes, types, dtypes, quantization), for callers
    that validate settings without loading one (`shardllm deploy`). Raises ValueError naming the fix for a size,
    number or name out of range or of the wrong type, TypeError for a flag that is not a bool, a tokenizer that is
    not a path, a pp_partition that is not a list of ints. numpy scalars count as numbers and bools."""
    from shardllm.layers.quantization.formats import check_quantization_method

    for name, v in [("tensor_parallel_size", 1 if tensor_parallel_size == "auto" else tensor_parallel_size),
                    ("pipeline_parallel_size", pipeline_parallel_size),
                    ("expert_parallel_size", expert_parallel_size), ("max_batch_size", max_batch_size),
                    ("max_num_tokens", max_num_tokens), ("block_size", block_size), ("num_kv_blocks", num_kv_blocks)]:
        if v is None and name in ("max_batch_size", "max_num_tokens", "block_size", "num_kv_blocks"):
            continue  # None: the defaults decide
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    for name, v in [("kv_cache_free_gpu_memory_fraction", kv_cache_free_gpu_memory_fraction),
                    ("cpu_kv_cache_gb", cpu_kv_cache_gb)]:  # numpy numbers are numbers.Real too
        if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0.0 < kv_cache_free_gpu_memory_fraction <= 1.0:
        raise ValueError("kv_cache_free_gpu_memory_fraction must be in (0, 1], got "
                         f"{kv_cache_free_gpu_memory_fraction}")
    if not cpu_kv_cache_gb > 0:
        raise ValueError(f"cpu_kv_cache_gb must be > 0 (GiB of KV cache on CPU), got {cpu_kv_cache_gb}")
    if (not isinstance(seed, numbers.Integral) or isinstance(seed, (bool, np.bool_))
            or not -2**63 <= int(seed) < 2**64):
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    for name, v in [("enable_prefix_caching", enable_prefix_caching), ("enforce_eager", enforce_eager),
                    ("trust_remote_code", trust_remote_code), ("async_scheduling", async_scheduling)]:
        if not isinstance(v, (bool, np.bool_)) and not (v is None and name == "async_scheduling"):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a path or a Hugging Face repo id (a string), got {tokenizer!r}")
    if pp_partition is not None and (not isinstance(pp_partition, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in pp_partition)):
        raise TypeError(f"pp_partition must be a list of layer counts, one a stage (e.g. [40, 40]), got "
                        f"{pp_partition!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}: choose one of {list(KV_CACHE_DTYPES)}")
    check_quantization_method(quantization or ("fp8" if dtype == "fp8" else None))  # before any download


def check_settings_without_model(engine_kwargs: dict) -> None:
    """`check_engine_settings` on the entries of `engine_kwargs` (LLM arguments) it takes: what serve and deploy
    check before a port is bound or a manifest written. Raises ValueError naming the fix."""
    import inspect

    keys = inspect.signature(check_engine_settings).parameters
    check_engine_settings(**{k: v for k, v in engine_kwargs.items() if k in keys})


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    parallel_config: ParallelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: str  # "cuda" | "cpu"
    enforce_eager: bool = False
    attention_backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | torch (the reference)
    extra: dict = field(default_factory=dict)

    @staticmethod
    def create(model: str | None = None, *, dtype: str = "auto", tensor_parallel_size: int | str = 1,
               pipeline_parallel_size: int = 1, expert_parallel_size: int = 1,
               moe_expert_parallel_size: int | None = None, pp_partition: list[int] | None = None,
               max_batch_size: int | None = None, max_num_tokens: int | None = None,
               max_seq_len: int | None = None,
               kv_cache_free_gpu_memory_fraction: float = 0.9, cpu_kv_cache_gb: float = 1.0,
               enable_prefix_caching: bool = True, block_size: int | None = None, num_kv_blocks: int | None = None,
               load_format: str = "auto", device: str = "auto", seed: int = 0, enforce_eager: bool = False,
               trust_remote_code: bool = False, tokenizer: str | None = None,
               distributed_executor_backend: str | None = None, attention_backend: str = "auto",
               async_scheduling: bool | None = None, all_reduce: str = "nccl", num_workers: int | None = None,
               ray_address: str | None = None, quantization: str | None = None,
               kv_cache_dtype: str = "auto") -> EngineConfig:
        from shardllm.layers.quantization.formats import check_fp8_device, detect_quantization
        from shardllm.model_loader.resolve import resolve_model

        if moe_expert_parallel_size is not None:
            expert_parallel_size = moe_expert_parallel_size
        # names of dtypes and methods are case-insensitive ("FP8", "BF16"), as in vLLM
        dtype, kv_cache_dtype = (v.lower() if isinstance(v, str) else v for v in (dtype, kv_cache_dtype))
        quantization = quantization.lower() if isinstance(quantization, str) else quantization
        check_engine_settings(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                              expert_parallel_size=expert_parallel_size, max_batch_size=max_batch_size,
                              max_num_tokens=max_num_tokens, block_size=block_size,
                              kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction, dtype=dtype,
                              kv_cache_dtype=kv_cache_dtype, quantization=quantization, num_kv_blocks=num_kv_blocks,
                              cpu_kv_cache_gb=cpu_kv_cache_gb, seed=seed, enable_prefix_caching=enable_prefix_caching,
                              enforce_eager=enforce_eager, trust_remote_code=trust_remote_code,
                              async_scheduling=async_scheduling, tokenizer=tokenizer, pp_partition=pp_partition)
        tokenizer = os.fspath(tokenizer) if tokenizer is not None else None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
        # With Ray the GPUs are the workers' (a CPU-only head may drive them with device='cuda')
        on_ray = _executor_backend(distributed_executor_backend, num_workers, ray_address) == "ray"
        if device == "cuda" and not torch.cuda.is_available() and not on_ray:
            raise ValueError("device='cuda' but no CUDA GPU is visible: use device='cpu' or check the driver")
        if dtype == "fp8":
            quantization = quantization or "fp8"
        max_batch_size, max_num_tokens = default_batch_limits(device, max_batch_size, max_num_tokens)

        resolved = resolve_model(model, load_format, trust_remote_code=trust_remote_code)
        hf_config = resolved.hf_config
        torch_dtype = _DTYPES[dtype]
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        if device == "cpu" and torch_dtype == torch.float16:
            raise ValueError("fp16 is not supported on CPU: use dtype='float32' or 'bfloat16'")

        max_seq_len = check_max_seq_len(max_seq_len, hf_config)

        model_config = ModelConfig(
            model=resolved.name, hf_config=hf_config, dtype=torch_dtype, load_format=resolved.load_format,
            path=resolved.path, tokenizer_path=tokenizer or resolved.tokenizer_path, max_model_len=max_seq_len,
            seed=seed, trust_remote_code=trust_remote_code,
            quantization=check_fp8_device(detect_quantization(hf_config, resolved.path, quantization), device))
        from shardllm.models.registry import check_architecture
        check_architecture(model_config.architecture)

        if block_size is None:
            block_size = default_block_size(kv_cache_dtype, device)
        _warn_small_model_fp8_cache(model_config, kv_cache_dtype)
        if tensor_parallel_size == "auto":  # the planner's smallest tp for these GPUs (shardllm/planner.py)
            from shardllm.planner import resolve_auto_tp

            tensor_parallel_size = resolve_auto_tp(model_config, pipeline_parallel_size, device, kv_cache_dtype,
                                                   kv_cache_free_gpu_memory_fraction, block_size)
        parallel_config = ParallelConfig(tensor_parallel_size, pipeline_parallel_size, expert_parallel_size,
                                         tuple(pp_partition) if pp_partition else None,
                                         _executor_backend(distributed_executor_backend, num_workers, ray_address),
                                         num_workers=num_workers, ray_address=ray_address,
                                         all_reduce=all_reduce)
        _check_parallel(parallel_config, model_config, device)
        from shardllm.distributed.fast_all_reduce import BACKENDS

        if all_reduce not in BACKENDS:
            raise ValueError(f"all_reduce must be 'nccl' or 'symm_mem', got {all_reduce!r}")
        if all_reduce == "symm_mem" and device != "cuda":
            raise ValueError("all_reduce='symm_mem' runs on CUDA GPUs only: use all_reduce='nccl' (the default) on "
                             "CPU")
        cache_config = CacheConfig(block_size, kv_cache_free_gpu_memory_fraction, cpu_kv_cache_gb,
                                   enable_prefix_caching, num_kv_blocks, kv_cache_dtype=kv_cache_dtype)
        if async_scheduling is None:  # with a pipeline: opt in (not yet measured on GPUs against the default)
            async_scheduling = parallel_config.pipeline_parallel_size == 1
        pp = parallel_config.pipeline_parallel_size
        # A synchronous pipeline keeps one batch more in flight than it has stages: the first stage computes it
        # while the driver digests the oldest batch's tokens and plans that batch's next step, which would otherwise
        # be a bubble on every stage (profiled: docs/benchmarks.md). SHARDLLM_PP_EXTRA_MICROBATCH=0: pp batches.
        extra = pp > 1 and not async_scheduling and envs.SHARDLLM_PP_EXTRA_MICROBATCH
        shared = envs.SHARDLLM_PP_SHARED_MAX_SEQS
        scheduler_config = SchedulerConfig(max_batch_size, max_num_tokens, max_seq_len,
                                           num_microbatches=pp + extra,
                                           async_scheduling=bool(async_scheduling),
                                           max_num_running_seqs=max_batch_size * (1 if shared else pp))
        if attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {attention_backend!r}")
        return EngineConfig(model_config, parallel_config, cache_config, scheduler_config, device, enforce_eager,
                            attention_backend)


def default_batch_limits(device: str, max_batch_size: int | None = None,
                         max_num_tokens: int | None = None) -> tuple[int, int]:
    """(max_batch_size, max_num_tokens), each as given or else by the GPU, as vLLM's engine defaults do
    (vllm/engine/arg_utils.py, get_batch_defaults): on a CUDA GPU of at least 70 GiB that is not an A100, 1,024
    sequences and 16,384 tokens a step; otherwise (and on CPU) 256 and 8,192. Measured on one H200 with
    Llama-3-8B fp8, 1000 x 128/128: 20,841 out tok/s at 512 / 8,192, 24,650 at 1,024 / 16,384 (docs/benchmarks.md).
    The server passes its own 8,192 tokens (shorter prefill chunks between decode steps). Reads the device's
    properties only (no CUDA context)."""
    big = False
    if device == "cuda" and (max_batch_size is None or max_num_tokens is None) and torch.cuda.is_available():
        try:
            props = torch.cuda.get_device_properties(0)
        except (RuntimeError, AssertionError):  # a build or driver that cannot say: the smaller limits
            props = None
        big = props is not None and large_gpu(props.name, props.total_memory)
    return (max_batch_size or (1024 if big else 256)), (max_num_tokens or (16384 if big else 8192))


def large_gpu(name: str | None, memory_bytes: int) -> bool:
    """Whether a GPU gets the larger default step limits: at least 70 GiB and not an A100 (vLLM's rule)."""
    return memory_bytes >= 70 * 2**30 and "a100" not in (name or "").lower()


def check_max_seq_len(max_seq_len: int | None, hf_config=None, flag: str = "max_seq_len") -> int | None:
    """max_seq_len checked (an integer >= 2, within the model's context when `hf_config` is given: its
    max_position_embeddings, capped at a sliding window) and returned; None gives the model's context (None without a
    config). The one rule of serve, `plan` and `deploy`; ValueError naming `flag` and the fix."""
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool)
                                    or max_seq_len < 2):
        raise ValueError(f"{flag} must be an integer >= 2, got {max_seq_len!r}")
    if hf_config is None:
        return max_seq_len
    model_max = _model_max_len(hf_config)
    if max_seq_len is None:
        return model_max
    if max_seq_len > model_max:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {model_max} tokens: lower "
                         f"{flag} to at most {model_max}")
    return max_seq_len


def _model_max_len(hf_config) -> int:
    n = getattr(hf_config, "max_position_embeddings", None) or 4096
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        n = min(n, window)  # we do not implement sliding-window attention; stay inside the window
    return int(n)


def tp_split_problem(tp: int, hf_config) -> str | None:
    """Why tensor_parallel_size `tp` cannot split the model, as the end of a sentence "tensor_parallel_size=N ...";
    None where it can. Every dimension the tp group splits is checked: the attention heads (the kv heads split,
    or are replicated a whole number of times), the dense MLP's intermediate size, a shared expert's, and the routed
    experts' (split over tp / ep ranks: some expert_parallel_size dividing tp and the experts must make it divide;
    `check_expert_parallel` checks the one chosen). The vocabulary is padded to a multiple of tp (never a
    problem)."""
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    if tp < 1 or heads % tp:
        return f"does not divide the model's {heads} attention heads"
    if (kv % tp if tp < kv else tp % kv):
        return (f"does not split the model's {kv} kv heads evenly, nor replicate them a whole number of times "
                f"({heads} attention heads)")
    experts = num_experts(hf_config)
    if not experts:
        inter = int(hf_config.intermediate_size)
        return None if inter % tp == 0 else f"does not divide the model's MLP intermediate size {inter}"
    shared = int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
    if shared % tp:
        return f"does not divide the model's shared-expert intermediate size {shared}"
    inter = moe_intermediate_size(hf_config)
    if not any(tp % ep == 0 and experts % ep == 0 and inter % (tp // ep) == 0 for ep in range(1, tp + 1)):
        return (f"splits the model's experts (intermediate size {inter}, {experts} experts) at no "
                "expert_parallel_size")
    return None


def valid_tp_sizes(hf_config) -> list[int]:
    """tp sizes that split the model (tp_split_problem is None), ascending; at most the attention heads."""
    return [t for t in range(1, hf_config.num_attention_heads + 1) if tp_split_problem(t, hf_config) is None]


def num_experts(hf_config) -> int:
    """Routed experts per MoE layer (Mixtral: num_local_experts, Qwen MoE: num_experts); 0 for a dense model."""
    return int(getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 0)


def moe_intermediate_size(hf_config) -> int:
    return int(getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size)


def check_expert_parallel(tp: int, ep: int, hf_config) -> None:
    """EP is carved out of the tp group: ep x moe_tp = tp, ep dividing the experts, moe_tp the expert width.
    ValueError naming the fix otherwise (serve's engine config and `shardllm deploy`)."""
    experts = num_experts(hf_config)
    if experts == 0:
        if ep == 1:
            return
        arch = (getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", "the model")])[0]
        raise ValueError(f"expert_parallel_size={ep} applies to mixture-of-experts models only and "
                         f"{arch} is dense: use expert_parallel_size=1 (tensor_parallel_size splits it)")
    valid = [e for e in range(1, tp + 1) if tp % e == 0 and experts % e == 0]
    if tp % ep:
        raise ValueError(f"expert_parallel_size={ep} does not divide tensor_parallel_size={tp}: expert "
                         f"parallelism is carved out of the tp group, so use an ep_size in {valid} "
                         f"or raise tensor_parallel_size to a multiple of {ep}")
    if experts % ep:
        raise ValueError(f"expert_parallel_size={ep} does not divide the model's {experts} experts: "
                         f"use an ep_size in {valid}")
    inter = moe_intermediate_size(hf_config)
    if inter % (tp // ep):
        raise ValueError(f"each expert is split over tp_size / ep_size = {tp // ep} ranks, which does not divide "
                         f"its intermediate size {inter}: raise expert_parallel_size or lower tensor_parallel_size")


def check_tp_size(tp: int, hf_config) -> None:
    """ValueError naming the dimension and the valid sizes where tensor_parallel_size `tp` does not split the model
    (tp_split_problem); serve's engine config, `shardllm plan` and `shardllm deploy` give the same message."""
    problem = tp_split_problem(tp, hf_config)
    if problem:
        raise ValueError(f"tensor_parallel_size={tp} {problem}: valid sizes are {valid_tp_sizes(hf_config)}")


def _check_parallel(pc: ParallelConfig, mc: ModelConfig, device: str) -> None:
    check_tp_size(pc.tensor_parallel_size, mc.hf_config)
    pp_layer_split(mc.num_layers, pc.pipeline_parallel_size, pc.pp_partition)  # ValueError: more stages than layers
    check_expert_parallel(pc.tensor_parallel_size, pc.expert_parallel_size, mc.hf_config)
    check_num_workers(pc)
    if device == "cuda" and pc.distributed_executor_backend != "ray":  # Ray's GPUs may be on other nodes
        visible = torch.cuda.device_count()
        if pc.world_size > visible:
            raise ValueError(f"{visible} GPUs visible, tp_size={pc.tensor_parallel_size} x "
                             f"pp_size={pc.pipeline_parallel_size} needs {pc.world_size}: lower tp_size or set "
                             "CUDA_VISIBLE_DEVICES")
    if pc.distributed_executor_backend == "uni" and pc.world_size > 1:
        raise ValueError("distributed_executor_backend='uni' runs one rank: use 'mp' for several")


def check_num_workers(pc: ParallelConfig) -> None:
    """The ranks split evenly over the nodes (also checked by `shardllm deploy` before a model is at hand)."""
    if pc.num_workers is not None and pc.world_size % pc.num_workers:
        raise ValueError(f"num_workers={pc.num_workers} nodes do not divide tp_size={pc.tensor_parallel_size} x "
                         f"pp_size={pc.pipeline_parallel_size} = {pc.world_size} ranks: use a num_workers that "
                         f"divides {pc.world_size} (e.g. num_workers = pp_size, tp_size = GPUs per node)")


def _executor_backend(backend: str | None, num_workers: int | None, ray_address: str | None) -> str | None:
    """The executor the settings ask for: `num_workers` or `ray_address` imply Ray."""
    if backend not in (None, "uni", "mp", "ray"):
        raise ValueError(f"unknown distributed_executor_backend {backend!r}: use 'uni', 'mp' or 'ray'")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
        raise ValueError(f"num_workers must be an integer >= 1 (nodes of the Ray cluster), got {num_workers!r}")
    if num_workers is not None or ray_address is not None:
        if backend in ("uni", "mp"):
            raise ValueError(f"num_workers / ray_address place ranks on a Ray cluster, but "
                             f"distributed_executor_backend={backend!r}: drop one, or use 'ray'")
        return "ray"
    return backend
