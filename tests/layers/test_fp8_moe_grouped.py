"""FP8 experts on CPU: every weight format (online per channel, per-tensor static, per-channel, 128x128-style blocks)
runs the grouped path, never the per-expert loop, and equals the loop (`apply_reference`) and the dequantized twin;
the block Triton kernel, run by Triton's interpreter, equals its torch reference."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from shardllm.distributed.parallel_state import ParallelContext, get_parallel_context, set_parallel_context
from shardllm.layers.moe import FusedMoE, fused_experts_reference, select_experts
from shardllm.layers.quantization import QuantizationConfig, process_weights_after_loading, quant_config_scope
from shardllm.layers.quantization.fp8_moe import Fp8MoEMethod
from shardllm.layers.quantization.fp8_utils import dequantize, quantize_per_block, quantize_per_row, quantize_per_tensor

E, H, INTER, TOP_K = 8, 64, 48, 2  # INTER = 48: three 16-row blocks per gate / up part
BLOCK = (16, 16)
CONFIGS = {
    "online_channel": QuantizationConfig(),
    "tensor_static": QuantizationConfig(source="fp8", weight_strategy="tensor", is_checkpoint_fp8=True,
                                        activation_scheme="static"),
    "channel": QuantizationConfig(source="compressed-tensors", weight_strategy="channel", is_checkpoint_fp8=True),
    "block": QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                                weight_block_size=BLOCK, weight_scale_name="weight_scale_inv"),
}
INPUT_SCALE = 4.0 / 448


def _quantize(w: torch.Tensor, fmt: str, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale as the checkpoint stores it, dequantized fp32)."""
    if fmt == "block":
        q, s = quantize_per_block(w, block)
        return q, s, dequantize(q, s, block)
    q, s = quantize_per_tensor(w) if fmt == "tensor_static" else quantize_per_row(w)
    return q, s, dequantize(q, s)


def build_moe(fmt: str, weight_only: bool = False, tp_rank: int = 0, tp_size: int = 1, ep_size: int = 1,
              seed: int = 0, hidden: int = H, inter: int = INTER,
              block: tuple[int, int] = BLOCK) -> tuple[FusedMoE, torch.Tensor, torch.Tensor]:
    """A FusedMoE of this rank holding random experts in format `fmt`, loaded through its weight loaders on CPU;
    returns it with the dequantized weights of its local experts, w13 (E_local, 2I_local, H) and w2 (E_local, H,
    I_local). `block`: the block shape of the "block" format."""
    g = torch.Generator().manual_seed(seed)
    cfg = dataclasses.replace(CONFIGS[fmt], weight_only=weight_only,
                              weight_block_size=block if fmt == "block" else None)
    old = get_parallel_context()
    set_parallel_context(ParallelContext(tp_rank=tp_rank, tp_size=tp_size, ep_size=ep_size))
    try:
        with quant_config_scope(cfg):
            moe = FusedMoE(E, TOP_K, hidden, inter, renormalize=True)
    finally:
        set_parallel_context(old)
    moe.gate.weight.data.copy_(torch.randn(E, hidden, generator=g))
    scale_name = Fp8MoEMethod(cfg).scale_name
    w13_deq, w2_deq = [], []
    for e in range(E):
        parts = []
        for part in (0, 1):
            w = torch.randn(inter, hidden, generator=g) * 0.1
            if cfg.is_checkpoint_fp8:
                q, s, w = _quantize(w, fmt, block)
                moe.w13_loader(moe.w13.weight, q, (e, part))
                moe.w13_loader(getattr(moe.w13, scale_name), s, (e, part))
                if fmt == "tensor_static":
                    moe.w13_loader(moe.w13.input_scale, torch.tensor(INPUT_SCALE), (e, part))
            else:
                moe.w13_loader(moe.w13.weight, w, (e, part))
            parts.append(w)
        w = torch.randn(hidden, inter, generator=g) * 0.1
        if cfg.is_checkpoint_fp8:
            q, s, w = _quantize(w, fmt, block)
            moe.w2_loader(moe.w2.weight, q, e)
            moe.w2_loader(getattr(moe.w2, scale_name), s, e)
            if fmt == "tensor_static":
                moe.w2_loader(moe.w2.input_scale, torch.tensor(INPUT_SCALE), e)
        else:
            moe.w2_loader(moe.w2.weight, w, e)
        if moe.is_local_expert(e):
            n = moe.intermediate_size
            rows = slice(moe.moe_tp_rank * n, (moe.moe_tp_rank + 1) * n)
            w13_deq.append(torch.cat([parts[0][rows], parts[1][rows]]))
            w2_deq.append(w[:, rows])
    process_weights_after_loading(moe)
    if not cfg.is_checkpoint_fp8:  # online: the loaded weights are the per-channel rounding of the random ones
        local = range(moe.num_local_experts)
        w13_deq = [dequantize(moe.w13.weight[e], moe.w13.weight_scale[e][:, None]) for e in local]
        w2_deq = [dequantize(moe.w2.weight[e], moe.w2.weight_scale[e][:, None]) for e in local]
    return moe, torch.stack(w13_deq), torch.stack(w2_deq)


def _inputs(n: int = 29, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    weights, ids = select_experts(torch.randn(n, E, generator=g), TOP_K, True)
    return x, weights, ids


@pytest.fixture
def no_expert_loop(monkeypatch):
    """The per-expert loop (apply_reference and its _linear) raises if anything calls it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the per-expert loop was called")

    monkeypatch.setattr(Fp8MoEMethod, "apply_reference", refuse)
    monkeypatch.setattr(Fp8MoEMethod, "_linear", refuse)


@pytest.mark.parametrize("fmt", list(CONFIGS))
@pytest.mark.parametrize("layout", [(0, 1, 1), (1, 2, 2), (1, 2, 1)])  # (tp_rank, tp, ep): whole / EP / expert TP
def test_grouped_path_equals_the_expert_loop(fmt, layout):
    tp_rank, tp_size, ep_size = layout
    if fmt == "block" and tp_size // ep_size > 1:
        layout_ok = (INTER // 2) % BLOCK[0] == 0  # 24 rows per rank: not whole 16-row blocks, refused at build
        assert not layout_ok
        with pytest.raises(ValueError, match="raise expert_parallel_size"):
            build_moe(fmt, tp_rank=tp_rank, tp_size=tp_size, ep_size=ep_size)
        return
    moe, _, _ = build_moe(fmt, tp_rank=tp_rank, tp_size=tp_size, ep_size=ep_size)
    x, weights, ids = _inputs()
    method = moe.quant_method
    assert method.grouped_backend(x.device) == "dequantized"  # the CPU backend of the grouped path
    ref = method.apply_reference(moe, x, weights, ids)
    got = method.apply_grouped(moe, x, weights, ids)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    # same products in another summation order (grouped GEMM on dequantized fp32 values vs fp8 GEMM then scales)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    if ep_size > 1:  # a rank of the ep group: tokens routed only to the other group's experts get exact zeros
        only_other = ((ids < moe.expert_start) | (ids >= moe.expert_start + moe.num_local_experts)).all(dim=1)
        assert only_other.any() and bool((got[only_other] == 0).all())


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_weight_only_equals_the_dequantized_twin_without_the_loop(fmt, no_expert_loop):
    """Weight-only (activations unquantized): the layer's forward is the twin's fused_experts_reference on the
    dequantized weights, through the grouped path only (the loop raises if called)."""
    moe, w13, w2 = build_moe(fmt, weight_only=True, tp_rank=1, tp_size=2, ep_size=2)
    x, weights, ids = _inputs()
    got = moe.quant_method.apply(moe, x, weights, ids)
    twin = fused_experts_reference(x, w13, w2, weights, ids, moe.expert_start)
    torch.testing.assert_close(got, twin, rtol=1e-5, atol=1e-6 * float(twin.abs().max()))


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_w8a8_forward_is_close_to_the_twin_without_the_loop(fmt, no_expert_loop):
    """W8A8 (activations quantized as well) through the layer's forward: within FP8's error of the dequantized
    twin (relative L2: 0.039 per channel, 0.034 block, 0.10 static per tensor with one scale for every token,
    measured; the loop gives the same); experts in the wrong order would be off by about 1.4."""
    moe, w13, w2 = build_moe(fmt)
    x, _, _ = _inputs()
    got = moe(x)
    weights, ids = select_experts(moe.gate(x), TOP_K, True)
    twin = fused_experts_reference(x, w13, w2, weights, ids)
    err = float((got - twin).norm() / twin.norm())
    assert err < (0.15 if fmt == "tensor_static" else 0.06), err
    wrong = fused_experts_reference(x, w13.roll(1, 0), w2.roll(1, 0), weights, ids)
    assert float((got - wrong).norm() / twin.norm()) > 0.5


def test_block_triton_kernel_in_the_interpreter_equals_its_reference():
    """The grouped block-FP8 kernel (the GPU path of block checkpoints) by Triton's CPU interpreter: empty experts,
    rows of other ranks' experts past the end, K not whole groups; then a block-FP8 MoE layer's grouped path on
    it equals the expert loop."""
    pytest.importorskip("triton")
    script = r"""
import torch
from shardllm.layers.quantization.fp8_moe_triton import grouped_block_fp8_mm, grouped_block_fp8_mm_reference
from shardllm.layers.quantization.fp8_utils import quantize_per_block, quantize_per_token_group
torch.manual_seed(0)
for block, e, n, k, offs in [((16, 16), 3, 48, 40, [5, 5, 30]), ((32, 16), 4, 40, 64, [0, 3, 19, 20])]:
    r = offs[-1] + 7
    kp = -(-k // block[1]) * block[1]
    x = torch.nn.functional.pad(torch.randn(r, k), (0, kp - k))
    a_q, a_s = quantize_per_token_group(x, block[1])
    a_q = a_q[:, :k].contiguous()
    ws = [quantize_per_block(torch.randn(n, k), block) for _ in range(e)]
    w_q, w_s = torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])
    o = torch.tensor(offs, dtype=torch.int32)
    ref = grouped_block_fp8_mm_reference(a_q, a_s, w_q, w_s, o, block, torch.float32)[: offs[-1]]
    for bm in (16, 32):
        y = grouped_block_fp8_mm(a_q, a_s, w_q, w_s, o, block, torch.float32, block_m=bm, block_n=16)[: offs[-1]]
        err = float((y - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()), (block, bm, err)
# the layer's block path on that kernel (activation groups, scale names, expert-sorted rows), one rank and ep = 2
from shardllm.layers.quantization.fp8_moe import Fp8MoEMethod
from tests.layers.test_fp8_moe_grouped import _inputs, build_moe
Fp8MoEMethod.grouped_backend = lambda self, device, dtype=None: "triton_block"
for layout in ({}, dict(tp_rank=1, tp_size=2, ep_size=2)):
    moe, _, _ = build_moe("block", **layout)
    x, weights, ids = _inputs()
    ref = moe.quant_method.apply_reference(moe, x, weights, ids)
    got = moe.quant_method.apply_grouped(moe, x, weights, ids)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), layout
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
