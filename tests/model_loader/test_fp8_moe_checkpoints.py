"""FP8 MoE checkpoints with per-tensor static scales and block scales, end to end on CPU through the grouped
expert path: greedy tokens equal the dequantized fp32 twin's (weight-only), also at tp = 2, ep = 2; the
per-expert loop is never called (in-process runs)."""

from __future__ import annotations

import pytest

from shardllm.layers.quantization.fp8_moe import Fp8MoEMethod
from tests.model_loader.test_fp8_checkpoints import W8A8_MIN_AGREEMENT, agreement, greedy, write_fp8_checkpoint


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("fp8_moe")
    made = {}

    def get(arch: str, fmt: str) -> tuple[str, str]:
        if (arch, fmt) not in made:
            dst, twin = str(root / f"{arch}_{fmt}"), str(root / f"{arch}_{fmt}_twin")
            write_fp8_checkpoint(tiny_checkpoints[arch], dst, twin, fmt)
            made[(arch, fmt)] = (dst, twin)
        return made[(arch, fmt)]

    return get


@pytest.fixture
def no_expert_loop(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the per-expert loop was called")

    monkeypatch.setattr(Fp8MoEMethod, "apply_reference", refuse)
    monkeypatch.setattr(Fp8MoEMethod, "_linear", refuse)


@pytest.mark.parametrize("fmt", ["hf_block", "ct_tensor_static"])
def test_qwen_moe_checkpoint_equals_its_twin_through_the_grouped_path(moe_checkpoints, no_expert_loop, fmt):
    dst, twin = moe_checkpoints("qwen3_moe", fmt)
    expected = greedy(twin)
    assert greedy(dst, weight_only=True) == expected
    if fmt == "hf_block":  # W8A8 (the layer tests check its error per format): 0.375 measured, static 1.0
        assert agreement(greedy(dst), expected) >= W8A8_MIN_AGREEMENT


def test_mixtral_block_experts_at_tp2_ep2_equal_the_twin(moe_checkpoints):
    """Block-scaled experts split over two expert-parallel ranks (each rank's partial sums meet in the
    all-reduce); per-tensor static experts at tp = 2, ep = 2: test_fp8_checkpoints' Mixtral test."""
    dst, twin = moe_checkpoints("mixtral", "hf_block")
    assert greedy(dst, weight_only=True, tensor_parallel_size=2, expert_parallel_size=2) == greedy(twin)
