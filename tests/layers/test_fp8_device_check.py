"""FP8 on a GPU without FP8 tensor cores is decided at config time, before any weight loads: online dtype="fp8" is
refused with the fix, an FP8 checkpoint runs weight-only. The GPU is faked at the hardware boundary (torch.cuda)."""

from __future__ import annotations

import pytest
import torch

from shardllm.config import EngineConfig
from shardllm.layers.quantization import QuantizationConfig
from shardllm.layers.quantization.formats import check_fp8_device


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make this CPU host report one CUDA GPU of the given compute capability."""
    def install(capability: tuple[int, int]):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return install


@pytest.fixture
def no_model_load(monkeypatch):
    """Any weight load fails the test: the refusal must come first."""
    import shardllm.model_loader.loader as loader

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the FP8 device check")
    monkeypatch.setattr(loader, "load_model", fail)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (7, 5)])
def test_online_fp8_on_a_pre_ada_gpu_fails_at_config_time(tiny_checkpoints, fake_gpu, no_model_load, capability):
    fake_gpu(capability)
    with pytest.raises(ValueError, match=rf"compute capability {capability[0]}\.{capability[1]}.*dtype='bfloat16'"):
        EngineConfig.create(tiny_checkpoints["llama"], dtype="fp8", device="cuda")


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_online_fp8_on_an_fp8_gpu_is_accepted(tiny_checkpoints, fake_gpu, no_model_load, capability):
    fake_gpu(capability)
    qc = EngineConfig.create(tiny_checkpoints["llama"], dtype="fp8", device="cuda").model_config.quantization
    assert qc is not None and not qc.is_checkpoint_fp8 and not qc.weight_only


def test_fp8_checkpoint_on_a_pre_ada_gpu_runs_weight_only_with_a_warning(fake_gpu, caplog):
    fake_gpu((8, 0))
    qc = QuantizationConfig(source="fp8", weight_strategy="tensor", is_checkpoint_fp8=True)
    with caplog.at_level("WARNING"):
        got = check_fp8_device(qc, "cuda")
    assert got.weight_only and got.weight_strategy == "tensor" and "weight-only" in caplog.text
    fake_gpu((9, 0))
    assert check_fp8_device(qc, "cuda") is qc  # Hopper: the FP8 GEMMs


def test_cpu_and_gpu_less_hosts_are_left_to_the_runtime(monkeypatch):
    qc = QuantizationConfig()
    assert check_fp8_device(qc, "cpu") is qc  # the CPU reference path runs every recipe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_fp8_device(qc, "cuda") is qc  # a Ray driver without GPUs: the workers' load checks again
    assert check_fp8_device(None, "cuda") is None
