"""Host memory before a CPU load: a ValueError naming the fix before the executor starts, not the OOM killer.
The host's free memory is the hardware boundary, faked through psutil where a test needs a small machine."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import psutil
import pytest

from shardllm import LLM
from shardllm.config import EngineConfig
from shardllm.executor.base import Executor
from shardllm.model_loader.host_memory import GiB, available_host_memory, check_host_memory, host_memory_needed


def small_host(monkeypatch, available: int) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=0))


def test_a_cpu_model_larger_than_the_host_fails_before_loading(tiny_checkpoints, monkeypatch):
    def no_executor(config):
        raise AssertionError("the executor started: the check must come first")

    small_host(monkeypatch, 64 << 10)  # 64 KiB left: the tiny model's 0.5 MiB of fp32 weights do not fit
    monkeypatch.setattr(Executor, "create", staticmethod(no_executor))
    with pytest.raises(ValueError, match=r"on CPU needs about .* GiB of host memory .* but this host has 0\.0 GiB "
                                         r"available .*device='cuda'.*cpu_kv_cache_gb"):
        LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=16)


def test_what_counts_and_where(monkeypatch):
    config = EngineConfig.create("llama-3-405b", load_format="dummy", device="cpu", dtype="bf16",
                                 cpu_kv_cache_gb=2.0)
    weights, kv = host_memory_needed(config)
    assert weights == pytest.approx(405.9e9 * 2, rel=0.01) and kv == 2 * GiB  # one rank's KV budget
    if available_host_memory() < weights:  # every CI machine: the real psutil, a clear error
        with pytest.raises(ValueError, match="llama-3-405b on CPU needs about 758"):
            check_host_memory(config)
    small_host(monkeypatch, 1 << 20)
    check_host_memory(dataclasses.replace(config, device="cuda"))  # on GPUs the weights never sit in host memory
    fp8 = EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu", dtype="fp8", num_kv_blocks=10,
                              block_size=16, tensor_parallel_size=2)
    weights, kv = host_memory_needed(fp8)
    # both ranks: the 32 layers' Linears (qkv 6144 x 4096, o 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336)
    # in e4m3 plus the float32 copy the CPU path keeps (1 + 4 bytes); embedding, LM head and norms in fp32
    linears = 32 * (6144 * 4096 + 4096 * 4096 + 28672 * 4096 + 4096 * 14336)
    assert weights == linears * 5 + (2 * 128256 * 4096 + 2 * 4096 * 32 + 4096) * 4
    # 10 blocks of 16 tokens per rank, each rank half the 8 kv heads, K and V in the activations' fp32 (on CPU)
    assert fp8.model_config.dtype.itemsize == 4 and kv == 10 * 16 * 2 * 32 * 8 * 128 * 4


def test_an_fp8_model_too_large_for_the_host_says_what_fp8_holds_on_cpu(monkeypatch):
    """FP8 on CPU keeps a float32 copy of each FP8 weight: the check counts it (an 8B model passed it and was then
    OOM-killed at its first step), and its message does not suggest dtype='fp8' to a model already in FP8."""
    small_host(monkeypatch, 20 * GiB)  # holds Llama-3-8B in bf16 (15 GiB), not in FP8 on CPU (36 GiB)
    check_host_memory(EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu", dtype="bf16"))
    fp8 = EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu", dtype="fp8")
    with pytest.raises(ValueError) as e:
        check_host_memory(fp8)
    message = str(e.value)
    assert "float32 copy" in message and "dtype='bfloat16'" in message and "dtype='fp8'" not in message


def _fp8_checkpoint_config(tmp_path, block: bool) -> EngineConfig:
    """An FP8 checkpoint's config.json (Llama-3-8B's shape, HF "fp8" quantization_config, block-scaled or per
    tensor): all the check reads; no weights needed."""
    import json

    from shardllm.model_loader.resolve import load_shipped_config

    cfg = load_shipped_config("llama-3-8b").to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  **({"weight_block_size": [128, 128]} if block else {})}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return EngineConfig.create(str(tmp_path), load_format="dummy", device="cpu", num_kv_blocks=1, block_size=16)


@pytest.mark.parametrize("block", [True, False])
def test_fp8_checkpoints_count_what_their_cpu_path_keeps(tmp_path, monkeypatch, block):
    """Block-scaled dense linears dequantize per call on CPU (1 byte a parameter held), per-tensor / per-channel ones
    keep a float32 copy (5); a checkpoint already in FP8 is told to use a bf16 checkpoint, not dtype='bfloat16'
    (which would not change its format)."""
    config = _fp8_checkpoint_config(tmp_path, block)
    assert config.model_config.quantization.is_checkpoint_fp8
    weights, _ = host_memory_needed(config)
    linears = 32 * (6144 * 4096 + 4096 * 4096 + 28672 * 4096 + 4096 * 14336)
    rest = (2 * 128256 * 4096 + 2 * 4096 * 32 + 4096) * config.model_config.dtype.itemsize
    assert weights == linears * (1 if block else 5) + rest
    small_host(monkeypatch, 1 << 30)
    with pytest.raises(ValueError, match="a bf16 checkpoint of it") as e:
        check_host_memory(config)
    assert "dtype='bfloat16'" not in str(e.value) and "dtype='fp8'" not in str(e.value)


def test_mixtral_experts_keep_their_dequantized_copy_on_cpu():
    """Routed experts keep fp8_moe's dequantized float32 copy on CPU whatever the scale layout: 5 bytes a
    parameter; the router and the rest in the model's dtype."""
    from shardllm.model_loader.size import count_parameters, linear_parameters

    config = EngineConfig.create("mixtral-8x7b", load_format="dummy", device="cpu", dtype="fp8", num_kv_blocks=1,
                                 block_size=16, tensor_parallel_size=2)
    c = config.model_config.hf_config
    dense, routed = linear_parameters(c)
    assert routed == 32 * 8 * (2 * 14336 * 4096 + 4096 * 14336)  # 32 layers x 8 experts x (gate_up + down)
    assert dense == 32 * (6144 * 4096 + 4096 * 4096)  # qkv (32 + 2 x 8 heads of 128) and o
    weights, _ = host_memory_needed(config)
    assert weights == (dense + routed) * 5 + (count_parameters(c) - dense - routed) * 4
