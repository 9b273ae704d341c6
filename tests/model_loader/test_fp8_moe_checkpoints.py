"""FP8 MoE checkpoints with per-tensor static scales and block scales, end to end on CPU through the grouped
expert path: greedy tokens equal the dequantized fp32 twin's (weight-only), also at tp = 2, ep = 2; the
per-expert loop is never called (in-process runs)."""

from __future__ import annotations

import pytest

from tests.layers.test_fp8_moe_grouped import no_expert_loop  # noqa: F401 - a fixture
from tests.model_loader.test_fp8_checkpoints import (
    W8A8_MIN_AGREEMENT,
    agreement,
    checkpoints,  # noqa: F401 - a fixture (module-scoped here)
    greedy,
)


@pytest.mark.parametrize("fmt", ["hf_block", "ct_tensor_static"])
@pytest.mark.usefixtures("no_expert_loop")
def test_qwen_moe_checkpoint_equals_its_twin_through_the_grouped_path(checkpoints, fmt):  # noqa: F811
    dst, twin = checkpoints("qwen3_moe", fmt)
    expected = greedy(twin)
    assert greedy(dst, weight_only=True) == expected
    if fmt == "hf_block":  # W8A8 (the layer tests check its error per format): 0.375 measured, static 1.0
        assert agreement(greedy(dst), expected) >= W8A8_MIN_AGREEMENT


def test_mixtral_block_experts_at_tp2_ep2_equal_the_twin(checkpoints):  # noqa: F811
    """Block-scaled experts split over two expert-parallel ranks (each rank's partial sums meet in the
    all-reduce); per-tensor static experts at tp = 2, ep = 2: test_fp8_checkpoints' Mixtral test."""
    dst, twin = checkpoints("mixtral", "hf_block")
    assert greedy(dst, weight_only=True, tensor_parallel_size=2, expert_parallel_size=2) == greedy(twin)
