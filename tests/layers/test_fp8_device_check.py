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


# ---- at load time: weight_only_fallback, each FP8 layer's own check of its device ------------------------------
@pytest.fixture
def fresh_fp8_probe(monkeypatch):
    """fp8_utils with no device probed yet and its once-per-process warning not given (both restored after)."""
    from shardllm.layers.quantization import fp8_utils

    monkeypatch.setattr(fp8_utils, "_PROBED", {})
    monkeypatch.setattr(fp8_utils, "_UNIT_SCALE", {})
    monkeypatch.setattr(fp8_utils, "_WARNED", [False])
    return fp8_utils


FP8_CHECKPOINT = QuantizationConfig(source="fp8", weight_strategy="tensor", is_checkpoint_fp8=True)
ONLINE_FP8 = QuantizationConfig()  # dtype="fp8" on a bf16 checkpoint


@pytest.mark.parametrize("capability", [(8, 0), (8, 6)])
def test_weight_only_fallback_refuses_online_fp8_on_a_pre_ada_gpu(fake_gpu, fresh_fp8_probe, caplog, capability):
    fake_gpu(capability)
    with caplog.at_level("WARNING"), pytest.raises(
            ValueError, match=r"dtype='fp8' needs a GPU with FP8 tensor cores \(compute capability >= 8\.9.*"
                              r"use dtype='bfloat16'"):
        fresh_fp8_probe.weight_only_fallback(torch.device("cuda", 0), ONLINE_FP8)
    assert "weight-only" not in caplog.text  # refused, not run slower
    assert fresh_fp8_probe._PROBED[("cuda", 0)] == frozenset()  # decided by the capability: no GEMM was tried


@pytest.mark.parametrize("capability", [(8, 0), (8, 6)])
def test_weight_only_fallback_runs_an_fp8_checkpoint_weight_only_with_one_warning(fake_gpu, fresh_fp8_probe, caplog,
                                                                                   capability):
    fake_gpu(capability)
    dev = torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger=fresh_fp8_probe.logger.name):
        assert fresh_fp8_probe.weight_only_fallback(dev, FP8_CHECKPOINT) is True
    warnings = [r for r in caplog.records if r.name == fresh_fp8_probe.logger.name and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no FP8 GEMM" in warnings[0].getMessage()
    assert "weight-only" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger=fresh_fp8_probe.logger.name):
        assert fresh_fp8_probe.weight_only_fallback(dev, FP8_CHECKPOINT) is True  # every layer falls back...
    assert "weight-only" not in caplog.text  # ... the warning once per process


def test_weight_only_fallback_leaves_fp8_devices_alone(fresh_fp8_probe, monkeypatch, caplog):
    """The contrast: on a device with FP8 GEMMs (a probed GPU, or the CPU's emulated _scaled_mm) both configs run
    FP8 as they are: False, no error, no warning."""
    monkeypatch.setitem(fresh_fp8_probe._PROBED, ("cuda", 0), frozenset({"tensorwise", "rowwise"}))
    with caplog.at_level("WARNING"):
        for qc in (ONLINE_FP8, FP8_CHECKPOINT):
            assert fresh_fp8_probe.weight_only_fallback(torch.device("cuda", 0), qc) is False
            assert fresh_fp8_probe.weight_only_fallback(torch.device("cpu"), qc) is False
    assert "weight-only" not in caplog.text and not fresh_fp8_probe._WARNED[0]
