"""benchmarks/accuracy.py's FP8 diagnostics: re-drawn weight scales (same expected rounding error, other roundings)
and the least-squared-error scale search, on random weights; KL and perplexity-ratio statistics on toy inputs."""

from __future__ import annotations

import math
import os
import sys

import torch

from shardllm.layers.quantization.fp8_utils import FP8_MAX, dequantize, quantize_per_row, quantize_with_scale

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from accuracy import Score, compare, mse_scales, redrawn_scales  # noqa: E402


def _row_err(w, s):
    return ((dequantize(quantize_with_scale(w, s), s) - w) ** 2).sum(-1)  # (N,)


def _weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 512, generator=g) * torch.rand(256, 1, generator=g)  # rows of different ranges


def test_redrawn_scales_never_clip_and_keep_e4m3_error():
    w = _weights()
    amax = w.abs().amax(-1, keepdim=True)
    def draw(seed):
        return redrawn_scales(w, torch.Generator().manual_seed(seed))

    s1, s2 = draw(1), draw(2)
    assert torch.equal(s1, draw(1)) and not torch.equal(s1, s2)  # seeded, and seeds differ
    assert bool(((s1 >= amax / FP8_MAX) & (s1 < 2 * amax / FP8_MAX)).all())  # amax maps into (224, 448]: no clip
    # e4m3's 3-bit mantissa: each value within half a step, 2^-4 of its magnitude, where it is a normal number
    q = quantize_with_scale(w, s1)
    normal = (w / s1).abs() >= 2.0 ** -6
    assert bool(((dequantize(q, s1) - w).abs() <= 2.0 ** -4 * w.abs() * 1.0001)[normal].all())
    # the same expected error as amax / 448 (a different draw of it): within a few percent overall
    base = _row_err(w, quantize_per_row(w)[1]).sum()
    assert abs(float(_row_err(w, s1).sum() / base) - 1) < 0.05


def test_mse_scale_search_never_worse_per_row_and_better_overall():
    w = _weights()
    amax_err = _row_err(w, quantize_per_row(w)[1])
    mse_err = _row_err(w, mse_scales(w, 16))
    assert bool((mse_err <= amax_err).all())  # offset 0 (amax / 448) is among the candidates
    assert float(mse_err.sum() / amax_err.sum()) < 0.95  # measured 0.88 on these rows


def test_compare_gives_ratio_standard_error_kl_and_top1():
    p = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), -1)
    q = torch.log_softmax(torch.tensor([[1.0, 0.5, -1.0], [0.0, 0.0, 1.0]]), -1)
    same = compare(Score([1.0, 2.0], p), Score([1.0, 2.0], p))
    assert same == {"ppl_vs_first": 1.0, "ppl_vs_first_se": 0.0, "kl_vs_first": 0.0, "top1_vs_first": 1.0}
    out = compare(Score([1.0, 2.0], p), Score([1.2, 2.4], q))
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert out["kl_vs_first"] == round(kl, 5) and kl > 0 and out["top1_vs_first"] == 0.5
    assert out["ppl_vs_first"] == round(math.exp(0.3), 4)
    assert out["ppl_vs_first_se"] == round(math.exp(0.3) * math.sqrt(0.02) / math.sqrt(2), 4)  # sd of (0.2, 0.4)
