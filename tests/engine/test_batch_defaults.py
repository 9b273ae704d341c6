"""Default step limits (config.default_batch_limits): vLLM's rule, by the GPU's memory and name (the device
properties are faked: no GPU here), values given always kept, the server's own token budget, bad values refused."""

from types import SimpleNamespace

import pytest
import torch

from shardllm.config import EngineConfig, check_engine_settings, default_batch_limits

GiB = 2**30


def fake_gpu(monkeypatch, name: str, gib: float) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name=name, total_memory=int(gib * GiB)))


@pytest.mark.parametrize(("name", "gib", "want"), [
    ("NVIDIA H200", 139.8, (1024, 16384)), ("NVIDIA H100 80GB HBM3", 79.2, (1024, 16384)),
    ("NVIDIA A100-SXM4-80GB", 79.2, (256, 8192)),  # vLLM measured its large budget slower on A100s
    ("NVIDIA L40S", 44.4, (256, 8192)), ("NVIDIA RTX 6000 Ada Generation", 47.5, (256, 8192))])
def test_large_gpus_get_vllms_larger_limits(monkeypatch, name, gib, want):
    fake_gpu(monkeypatch, name, gib)
    assert default_batch_limits("cuda") == want
    assert default_batch_limits("cpu") == (256, 8192)


def test_given_values_are_kept(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H200", 139.8)
    assert default_batch_limits("cuda", 64, None) == (64, 16384)
    assert default_batch_limits("cuda", None, 4096) == (1024, 4096)
    assert default_batch_limits("cuda", 8, 512) == (8, 512)


def test_bad_limits_are_refused_and_none_is_a_default():
    check_engine_settings(max_batch_size=None, max_num_tokens=None)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
            check_engine_settings(max_batch_size=bad)
        with pytest.raises(ValueError, match="max_num_tokens must be an integer >= 1"):
            check_engine_settings(max_num_tokens=bad)


def test_engine_config_on_cpu_keeps_the_small_defaults(tiny_checkpoints):
    cfg = EngineConfig.create(tiny_checkpoints["llama"], device="cpu", load_format="safetensors")
    assert (cfg.scheduler_config.max_num_seqs, cfg.scheduler_config.max_num_batched_tokens) == (256, 8192)


def test_a_gpu_that_cannot_be_queried_gets_the_small_limits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def fail(i):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_properties", fail)
    assert default_batch_limits("cuda") == (256, 8192)
