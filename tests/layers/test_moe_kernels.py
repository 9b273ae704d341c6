"""The MoE layer's Triton glue (layers/moe_kernels.py), run by Triton's interpreter on CPU: the combine equals
combine_expert_rows (bit for bit at top_k = 2) and never reads another rank's rows; the bf16 grouped path and the
FP8 "scaled_grouped_mm" path with the glue equal their torch chains and the per-expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardllm.layers import moe_kernels
from shardllm.layers.moe import (
    combine_expert_rows,
    fused_experts_grouped,
    fused_experts_reference,
    grouped_mm,
    select_experts,
    sort_by_expert,
)
from shardllm.layers.quantization import fp8_moe
from shardllm.layers.quantization.fp8_fused import QuantizedActivation, silu_and_mul_quant
from shardllm.layers.quantization.fp8_utils import quantize_per_row
from tests.layers.test_fp8_moe_grouped import _inputs, build_moe

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (moe_kernels.HAS_TRITON and INTERPRET),
                                reason="CPU tensors need Triton with TRITON_INTERPRET=1 before its import")


@pytest.fixture
def glue(monkeypatch):
    """A function that turns the Triton glue on (True) or off (False) for CPU tensors."""
    def set_glue(on: bool) -> None:
        monkeypatch.setattr(moe_kernels, "FORCE", on)
        monkeypatch.setattr(moe_kernels, "ENABLED", True)
    return set_glue


def _sorted_rows(n: int, k: int, num_experts: int, num_local: int, expert_start: int, hidden: int, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights, ids = select_experts(torch.randn(n, num_experts, generator=g), k, renormalize=True)
    order, is_local, offs = sort_by_expert(ids, expert_start, num_local)
    y = torch.randn(n * k, hidden, generator=g).to(dtype)
    y[int(offs[-1]):] = float("nan")  # other ranks' rows: undefined after a grouped GEMM; must never be read
    return y, weights, order, is_local, offs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [(8, 0), (4, 4), (2, 0)])  # (local experts, first local): all / ep halves
def test_combine_equals_combine_expert_rows_bit_for_bit(dtype, layout):
    num_local, start = layout
    y, weights, order, is_local, offs = _sorted_rows(37, 2, 8, num_local, start, 1100, dtype)  # 2 column blocks
    ref = combine_expert_rows(y, weights, order, is_local, torch.float32)  # the fp32 sums, before the cast
    got = moe_kernels.moe_combine(y, weights, order, offs, torch.float32)
    assert got.shape == (37, 1100) and not got.isnan().any()
    assert torch.equal(got, ref)
    # cast to the rows' dtype: the interpreter truncates fp32 -> bf16 where the GPU rounds, so one ulp apart
    got = moe_kernels.moe_combine(y, weights, order, offs, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref.to(dtype), rtol=2 ** -7, atol=1e-30)
    if num_local < 8:  # tokens routed only to other ranks' experts get exact zeros
        local = is_local[torch.argsort(order)].view(37, 2)
        assert (~local.any(1)).any() and bool((got[~local.any(1)] == 0).all())


def test_combine_top_k_above_two_within_fp32_rounding():
    y, weights, order, is_local, offs = _sorted_rows(19, 4, 16, 8, 8, 64, torch.float32, seed=3)
    ref = combine_expert_rows(y, weights, order, is_local, torch.float32)
    got = moe_kernels.moe_combine(y, weights, order, offs, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    wrong = moe_kernels.moe_combine(y, weights.flip(1), order, offs, torch.float32)  # slots' weights swapped
    assert not torch.allclose(wrong, ref, rtol=1e-3, atol=1e-3)


def test_inverse_order_and_bad_shapes():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    inv = moe_kernels.inverse_order(order)
    assert inv.dtype == torch.int32 and torch.equal(order[inv.long()], torch.arange(50))
    y, weights, order, _, offs = _sorted_rows(5, 2, 8, 8, 0, 16, torch.float32)
    with pytest.raises(ValueError, match="N \\* k = 10"):
        moe_kernels.moe_combine(y[:9], weights, order, offs, torch.float32)
    assert moe_kernels.moe_combine(y[:0], weights[:0], order[:0], offs, torch.float32).shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 64, 32, 8, 2, 8, 0), (37, 64, 16, 8, 2, 2, 4), (1, 64, 32, 8, 2, 4, 4)])
def test_bf16_grouped_path_with_the_glue_equals_the_torch_chain(glue, dtype, shape):
    n, hidden, inter, num_experts, k, num_local, start = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_local, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_local, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = select_experts(torch.randn(n, num_experts, generator=g), k, renormalize=True)
    glue(False)
    chain = fused_experts_grouped(x, w13, w2, weights, ids, start)
    glue(True)
    got = fused_experts_grouped(x, w13, w2, weights, ids, start)
    # the activation may differ by one rounding in its dtype (Triton's exp; the interpreter truncates to bf16)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, chain, **tol)
    torch.testing.assert_close(got.float(), fused_experts_reference(x, w13, w2, weights, ids, start).float(), **tol)


def _emulated_scaled_grouped_mm(a_q, w_q, a_scale, w_scale, offs, out_dtype):
    """torch._scaled_grouped_mm's contract on CPU: dequantized operands, fp32 grouped GEMM; rows past offs[-1] NaN
    (undefined on the GPU), so a consumer that reads them fails the tests."""
    a = a_q.float() * a_scale[:, None]
    w = w_q.float() * w_scale[:, :, None]
    out = grouped_mm(a, w.transpose(1, 2), offs).to(out_dtype)
    out[int(offs[-1]):] = float("nan")
    return out


def _torch_silu_and_mul_quant(h):
    gate, up = h.chunk(2, dim=-1)
    q, s = quantize_per_row(F.silu(gate) * up)
    return QuantizedActivation(q, s, h.dtype)


@pytest.fixture
def scaled_grouped_on_cpu(monkeypatch):
    monkeypatch.setattr(fp8_moe, "_scaled_grouped_mm", _emulated_scaled_grouped_mm)
    monkeypatch.setattr(fp8_moe.Fp8MoEMethod, "grouped_backend", lambda self, device, dtype=None: "scaled_grouped_mm")


@pytest.mark.parametrize("fmt", ["online_channel", "channel", "tensor_static"])
@pytest.mark.parametrize("layout", [(0, 1, 1), (1, 2, 2), (1, 2, 1)])  # (tp_rank, tp, ep)
def test_fp8_glue_is_the_same_computation_as_the_torch_chain(glue, scaled_grouped_on_cpu, monkeypatch, fmt, layout):
    """With the fused SiLU-and-mul-quantize replaced by its torch twin, quantizing before the gather and the Triton
    combine change nothing: bit-equal to the unfused "scaled_grouped_mm" path (top_k = 2)."""
    tp_rank, tp_size, ep_size = layout
    moe, _, _ = build_moe(fmt, tp_rank=tp_rank, tp_size=tp_size, ep_size=ep_size)
    x, weights, ids = _inputs()
    glue(False)
    chain = moe.quant_method.apply_grouped(moe, x, weights, ids)
    glue(True)
    calls = []
    def fake(h, num_rows=None):
        calls.append(int(num_rows))
        return _torch_silu_and_mul_quant(h)

    monkeypatch.setattr(fp8_moe, "silu_and_mul_quant", fake)
    got = moe.quant_method.apply_grouped(moe, x, weights, ids)
    assert not got.isnan().any()
    assert torch.equal(got, chain)
    assert len(calls) == (0 if fmt == "tensor_static" else 1)  # static scales quantize after torch's SiLU-and-mul
    if calls:  # the row limit is this rank's rows: all of them at ep = 1, fewer at ep = 2
        assert (calls[0] == x.shape[0] * 2) == (ep_size == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [(0, 1, 1), (1, 2, 2)])
def test_fp8_glue_with_the_fused_kernel_equals_the_expert_loop(glue, scaled_grouped_on_cpu, dtype, layout):
    """The whole fused form (Triton SiLU-and-mul-quantize, Triton combine) against the per-expert loop. Loose here:
    Triton's interpreter truncates fp32 -> e4m3 where a GPU rounds, moving each element of the down GEMM's input by
    up to one e4m3 step toward zero (measured: 5.6% of the max on this layer); test_fp8_moe_gpu.py holds the GPU's
    2% bound, and test_fp8_glue_is_the_same_computation_as_the_torch_chain the exactness of everything else."""
    tp_rank, tp_size, ep_size = layout
    moe, _, _ = build_moe("online_channel", tp_rank=tp_rank, tp_size=tp_size, ep_size=ep_size)
    x, weights, ids = _inputs(n=41)
    x = x.to(dtype)
    glue(True)
    got = moe.quant_method.apply_grouped(moe, x, weights, ids).float()
    ref = moe.quant_method.apply_reference(moe, x, weights, ids).float()
    err = float((got - ref).abs().max())
    assert err <= 0.1 * float(ref.abs().max()), err
    assert float((got - ref).norm() / ref.norm()) <= (0.05 if dtype == torch.float32 else 0.08)  # bf16: truncated too
    wrong = moe.quant_method.apply_reference(moe, x, weights.flip(1), ids).float()  # what the bound can tell apart
    assert float((wrong - ref).norm() / ref.norm()) > 0.2


def test_silu_and_mul_quant_row_limit_skips_the_rows_past_it(monkeypatch):
    """The MoE path's num_rows: rows below it as without it; rows at or past it never written (the outputs are
    allocated pre-filled with a sentinel here)."""
    h = torch.randn(9, 2 * 40, generator=torch.Generator().manual_seed(2))
    full = silu_and_mul_quant(h)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda shape, dtype=None, device=None: real_empty(
        shape, dtype=dtype, device=device).fill_(-3.0))
    part = silu_and_mul_quant(h, num_rows=torch.tensor([5], dtype=torch.int32))
    assert torch.equal(part.data[:5].float(), full.data[:5].float()) and torch.equal(part.scale[:5], full.scale[:5])
    assert bool((part.data[5:].float() == -3.0).all()) and bool((part.scale[5:] == -3.0).all())


def test_glue_off_where_triton_ops_is_off(monkeypatch):
    """attention_backend="torch" turns triton_ops off process-wide (the all-torch reference path): the MoE glue too."""
    from types import SimpleNamespace

    from shardllm.layers import triton_ops

    monkeypatch.setattr(moe_kernels, "ENABLED", True)
    monkeypatch.setattr(moe_kernels, "FORCE", None)
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # applies() looks at the device only
    monkeypatch.setattr(moe_kernels, "_PROBED", {("cuda", 0): True})  # the kernels passed their probe there
    monkeypatch.setattr(triton_ops, "USE_TRITON", None)
    assert moe_kernels.applies(x)
    monkeypatch.setattr(triton_ops, "USE_TRITON", False)
    assert not moe_kernels.applies(x)
    monkeypatch.setattr(triton_ops, "USE_TRITON", None)
    monkeypatch.setattr(moe_kernels, "_PROBED", {("cuda", 0): False})  # ... and where they failed it: torch's ops
    assert not moe_kernels.applies(x)


def test_fp8_glue_quantizes_by_torch_where_the_triton_fp8_probe_failed(glue, scaled_grouped_on_cpu, monkeypatch):
    """A GPU whose Triton fails `triton_fp8_ok` (the dense layers and _quantize_rows then use torch) must not get
    the fused SiLU-and-mul-quantize either: torch's SiLU-and-mul and _quantize_rows, the same numbers as the chain."""
    monkeypatch.setattr(fp8_moe, "triton_fp8_ok", lambda device: False)
    assert not fp8_moe._fused_act_quant_ok(torch.device("cuda", 0))
    monkeypatch.setattr(fp8_moe, "triton_fp8_ok", lambda device: True)
    assert fp8_moe._fused_act_quant_ok(torch.device("cuda", 0))
    moe, _, _ = build_moe("online_channel", tp_rank=1, tp_size=2, ep_size=2)
    x, weights, ids = _inputs()
    glue(False)
    chain = moe.quant_method.apply_grouped(moe, x, weights, ids)
    glue(True)
    calls = []
    monkeypatch.setattr(fp8_moe, "silu_and_mul_quant", lambda h, num_rows=None: calls.append(h))
    monkeypatch.setattr(fp8_moe, "_fused_act_quant_ok", lambda device: False)  # the probe's answer on a CPU tensor
    got = moe.quant_method.apply_grouped(moe, x, weights, ids)
    assert not calls and torch.equal(got, chain)


def test_only_a_refused_grouped_gemm_falls_back_other_errors_propagate(glue, scaled_grouped_on_cpu, monkeypatch):
    """torch._scaled_grouped_mm refusing the call (an old build, a GPU without it) sends the layer to the
    dequantized path once and for good; any other error in the fused path (a kernel's) is raised, not hidden behind
    the slow path."""
    moe, _, _ = build_moe("online_channel")
    x, weights, ids = _inputs()
    glue(True)
    key = (x.device, x.dtype)
    monkeypatch.setitem(fp8_moe._SCALED_GROUPED_OK, key, True)

    def broken_combine(*args, **kwargs):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(moe_kernels, "moe_combine", broken_combine)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        moe.quant_method.apply_grouped(moe, x, weights, ids)
    assert fp8_moe._SCALED_GROUPED_OK[key] is True

    def refused(*args, **kwargs):
        try:
            raise RuntimeError("no FP8 grouped GEMM in this build")
        except RuntimeError as e:
            raise fp8_moe._NoScaledGroupedMM(str(e)) from e

    monkeypatch.setattr(fp8_moe, "_scaled_grouped_mm", refused)
    monkeypatch.setattr(fp8_moe.Fp8MoEMethod, "grouped_backend", lambda self, device, dtype=None:
                        "scaled_grouped_mm" if fp8_moe._SCALED_GROUPED_OK.get(key, True) else "dequantized")
    got = moe.quant_method.apply_grouped(moe, x, weights, ids)
    assert fp8_moe._SCALED_GROUPED_OK[key] is False
    ref = moe.quant_method.apply_reference(moe, x, weights, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("n, num_experts, k, renormalize", [(37, 8, 2, True), (5, 8, 2, False), (20, 60, 4, True),
                                                            (3, 16, 1, True), (1, 128, 8, False)])
def test_route_equals_select_experts(n, num_experts, k, renormalize):
    logits = torch.randn(n, num_experts, generator=torch.Generator().manual_seed(n + k)) * 3
    ref_w, ref_ids = select_experts(logits, k, renormalize)
    w, ids = moe_kernels.route(logits, k, renormalize)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape == (n, k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
    w16, ids16 = moe_kernels.route(logits.to(torch.bfloat16), k, renormalize)  # the router's dtype in a model
    assert torch.equal(ids16, select_experts(logits.to(torch.bfloat16), k, renormalize)[1])


def test_route_ties_go_to_the_lower_expert_and_bad_top_k_is_refused():
    logits = torch.zeros(2, 8)
    logits[0, [5, 2]] = 4.0  # a tie between experts 2 and 5
    _, ids = moe_kernels.route(logits, 2, True)
    assert ids[0].tolist() == [2, 5] and ids[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="top_k=9"):
        moe_kernels.route(logits, 9, True)
    w, ids = moe_kernels.route(logits[:0], 2, True)
    assert w.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("k", [2, 8])
def test_route_keeps_valid_expert_ids_for_nan_and_infinite_logits(k):
    """A NaN or +-inf logit makes its row's softmax NaN: the ids stay distinct experts in [0, E) (the expert load
    counter indexes with them; an id of E would be an out-of-bounds index on the GPU), the weights NaN as torch's."""
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    ref_w, ref_ids = select_experts(logits, k, True)
    w, ids = moe_kernels.route(logits, k, True)
    assert bool(((ids >= 0) & (ids < 8)).all())
    assert all(len(set(row)) == k for row in ids.tolist())
    assert torch.equal(w.isnan(), ref_w.isnan()) and bool(w[1:4].isnan().all())
    finite = [0, 4]
    assert torch.equal(ids[finite], ref_ids[finite])
    torch.testing.assert_close(w[finite], ref_w[finite], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n, k, num_experts, num_local, start", [
    (37, 2, 8, 8, 0), (37, 2, 8, 4, 4), (300, 2, 8, 2, 0), (130, 4, 16, 4, 8), (1, 2, 8, 4, 4), (50, 8, 128, 128, 0),
    (700, 2, 8, 8, 0)])  # the last above SORT_MAX_PAIRS (set to 1000 here): torch's sort
def test_sort_pairs_equals_sort_by_expert(monkeypatch, n, k, num_experts, num_local, start):
    monkeypatch.setattr(moe_kernels, "SORT_CELLS", 256)  # small chunks: several passes over the pairs
    monkeypatch.setattr(moe_kernels, "SORT_MAX_PAIRS", 1000)
    _, ids = select_experts(torch.randn(n, num_experts, generator=torch.Generator().manual_seed(n)), k, True)
    order, is_local, offs, inv = moe_kernels.sort_pairs(ids, start, num_local)
    ref_order, ref_local, ref_offs = sort_by_expert(ids, start, num_local)
    assert torch.equal(order, ref_order) and torch.equal(is_local, ref_local) and torch.equal(offs, ref_offs)
    assert order.dtype == torch.int64 and offs.dtype == torch.int32
    assert torch.equal(inv, moe_kernels.inverse_order(order))


def test_grouped_paths_take_the_triton_routing_and_sort(glue, monkeypatch):
    """With the glue on, the bf16 grouped path and FusedMoE's router use sort_pairs and route (not torch's)."""
    from shardllm.layers import moe as moe_mod

    def refuse(*args, **kwargs):
        raise AssertionError("torch's sort / routing was called")

    glue(True)
    monkeypatch.setattr(moe_mod, "sort_by_expert", refuse)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 32, generator=g)
    w13, w2 = torch.randn(4, 2 * 16, 32, generator=g) / 6, torch.randn(4, 32, 16, generator=g) / 4
    weights, ids = moe_kernels.route(torch.randn(9, 8, generator=g), 2, True)
    got = fused_experts_grouped(x, w13, w2, weights, ids, 4)
    torch.testing.assert_close(got, fused_experts_reference(x, w13, w2, weights, ids, 4), rtol=1e-5, atol=1e-5)
    moe, _, _ = build_moe("online_channel")
    monkeypatch.setattr(moe_mod, "select_experts", refuse)
    monkeypatch.setattr(fp8_moe, "sort_by_expert", refuse)
    monkeypatch.setattr(fp8_moe, "_scaled_grouped_mm", _emulated_scaled_grouped_mm)
    monkeypatch.setattr(fp8_moe.Fp8MoEMethod, "grouped_backend", lambda self, device, dtype=None: "scaled_grouped_mm")
    moe.reduce_results = False
    assert moe(torch.randn(7, moe.w2.weight.shape[1], generator=g)).shape == (7, moe.w2.weight.shape[1])


def test_silu_and_mul_row_limit_skips_the_rows_past_it(monkeypatch):
    """The bf16 MoE path's num_rows (triton_ops.silu_and_mul): rows below it as without it, the rest unwritten."""
    from shardllm.layers import triton_ops

    h = torch.randn(9, 2 * 40, generator=torch.Generator().manual_seed(3))
    full = triton_ops.silu_and_mul(h)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, dtype=None, device=None: real_empty(
        *shape, dtype=dtype, device=device).fill_(-3.0))
    part = triton_ops.silu_and_mul(h, num_rows=torch.tensor([4], dtype=torch.int32))
    assert torch.equal(part[:4], full[:4]) and bool((part[4:] == -3.0).all())


_SM90_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from shardllm.layers import moe_kernels as mk
out = {}
def comp(name, fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    out[name] = k.asm["ptx"].count("ld.global")
comp("combine", mk._moe_combine_kernel, {"y_ptr": "*bf16", "w_ptr": "*fp32", "inv_ptr": "*i32", "offs_ptr": "*i32",
     "out_ptr": "*bf16", "hidden": "i32", "num_local": "i32", "stride_y": "i32", "stride_out": "i32"},
     {"K": 2, "BLOCK": 1024, "USE_PDL": True})
comp("route", mk._moe_route_kernel, {"logits_ptr": "*bf16", "w_ptr": "*fp32", "ids_ptr": "*i64",
     "num_tokens": "i32", "num_experts": "i32", "stride_l": "i32"},
     {"TOP_K": 2, "K_PAD": 2, "E_PAD": 8, "BLOCK_T": 16, "RENORMALIZE": True, "USE_PDL": True})
comp("sort", mk._moe_sort_kernel, {"ids_ptr": "*i64", "order_ptr": "*i64", "inv_ptr": "*i32", "offs_ptr": "*i32",
     "num_pairs": "i32", "expert_start": "i32", "num_local": "i32"}, {"E_PAD": 16, "CHUNK": 512, "USE_PDL": True})
print(json.dumps(out))
"""


def test_moe_kernels_compile_for_sm90():
    """The kernels as a GPU compiles them (no interpreter): a kernel the interpreter runs can still fail to lower."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loads = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(loads) == {"combine", "route", "sort"} and all(n > 0 for n in loads.values())


def test_glue_probe_passes_here_and_turns_the_glue_off_where_a_kernel_disagrees(monkeypatch, caplog):
    """glue_ok runs the three kernels once per device against torch's ops: they agree under the interpreter; a kernel
    that returns wrong ids (a miscompile) or raises makes the device use torch's ops, said once in the log."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(moe_kernels, "_PROBED", {})
    assert moe_kernels.glue_ok(cpu) is True and moe_kernels._PROBED == {("cpu", None): True}
    real_route = moe_kernels.route
    monkeypatch.setattr(moe_kernels, "_PROBED", {})
    monkeypatch.setattr(moe_kernels, "route", lambda *a: (lambda w, ids: (w, ids.flip(1)))(*real_route(*a)))
    assert moe_kernels.glue_ok(cpu) is False and "disagree with torch" in caplog.text
    calls = []
    monkeypatch.setattr(moe_kernels, "route", lambda *a: calls.append(1) or real_route(*a))
    assert moe_kernels.glue_ok(cpu) is False and not calls  # cached: not probed again

    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(moe_kernels, "_PROBED", {})
    monkeypatch.setattr(moe_kernels, "sort_pairs", broken)
    assert moe_kernels.glue_ok(cpu) is False and "unavailable (RuntimeError" in caplog.text
