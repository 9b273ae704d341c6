"""Programmatic dependent launch (layers/pdl.py): off unless asked for and on sm90+ with a Triton that has it; every
kernel that can be launched with it waits for the kernel before it before touching memory; on GPUs (gpu) the
decode path's tokens are the same with it on and off, eager and with CUDA graphs, at tp 1 and 2."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers import gemv, moe_kernels, pdl, triton_ops  # noqa: E402
from shardllm.layers.attention import triton_decode_tma, triton_paged  # noqa: E402
from shardllm.layers.quantization import fp8_fused, fp8_triton  # noqa: E402
from tests.helpers import greedy_tokens_then_batch1  # noqa: E402

KERNELS = [triton_ops._fused_rmsnorm_row_kernel, triton_ops._fused_silu_and_mul_kernel,
           triton_ops._fused_rotary_kernel, gemv._gemv_kernel, gemv._splitk_reduce_kernel, triton_paged._decode_kernel,
           triton_paged._decode_reduce_kernel, triton_paged._write_kv_kernel, triton_paged._write_v_t_kernel,
           triton_decode_tma._decode_kernel_tma,
           fp8_fused._rmsnorm_quant_fp8_kernel, fp8_fused._silu_and_mul_quant_fp8_kernel,
           fp8_triton._quant_per_token_kernel, moe_kernels._moe_combine_kernel, moe_kernels._moe_route_kernel,
           moe_kernels._moe_sort_kernel]


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability (the hardware boundary), PDL switched on."""
    def make(capability: tuple[int, int]):
        monkeypatch.setattr(pdl, "ENABLED", True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.version, "hip", None)
        pdl.supported.cache_clear()
    yield make
    pdl.supported.cache_clear()


def test_on_by_default_never_off_the_gpu_and_switched_off_by_zero(monkeypatch):
    assert pdl.ENABLED is True  # SHARDLLM_PDL unset in the test environment
    assert pdl.launch_args(torch.device("cpu")) == {}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.launch_args(torch.device("cuda", 0)) == {}


def test_on_for_hopper_and_later_only(fake_gpu, monkeypatch):
    if not pdl._triton_has_launch_pdl():
        pytest.skip("this Triton has no launch_pdl")
    fake_gpu((9, 0))
    assert pdl.launch_args(torch.device("cuda", 0)) == {"USE_PDL": True, "launch_pdl": True}
    fake_gpu((8, 9))  # Ada: no griddepcontrol
    assert pdl.launch_args(torch.device("cuda", 0)) == {}
    fake_gpu((9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports 9.x on MI300
    pdl.supported.cache_clear()
    assert pdl.launch_args(torch.device("cuda", 0)) == {}


def test_without_launch_pdl_in_triton_nothing_changes(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    monkeypatch.setattr(pdl, "_triton_has_launch_pdl", lambda: False)
    assert pdl.launch_args(torch.device("cuda", 0)) == {}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.fn.__name__ if hasattr(k, "fn") else str(k))
def test_every_pdl_kernel_waits_before_it_touches_memory(kernel):
    """A kernel launched with PDL may start while the one before it still runs: its first statement must be
    pdl_enter(USE_PDL) (the wait), with the flag off by default, or a load could read a value not yet written."""
    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    params = inspect.signature(fn).parameters
    assert "USE_PDL" in params and params["USE_PDL"].default is False
    body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # the docstring
        body = body[1:]
    if kernel is gemv._gemv_kernel:  # index arithmetic, then the wait (or, W_EARLY, its first weight tile loaded
        # between the signal and the wait: weights only)
        first = next(i for i, st in enumerate(body) if isinstance(st, ast.If) and ast.unparse(st.test) == "W_EARLY")
        before = [ast.unparse(st) for st in body[:first]]
        assert before and all(isinstance(st, (ast.Assign, ast.AnnAssign)) or ast.unparse(st).startswith(
            "tl.static_assert(") for st in body[:first])
        assert not [t for t in before if "load" in t or "store" in t or "atomic" in t or "[" in t], before
        early, (call,) = body[first].body, body[first].orelse
        assert ast.unparse(early[0]) == "pdl_launch_dependents(USE_PDL)"
        assert ast.unparse(early[-1]) == "pdl_wait(USE_PDL)"
        between = "\n".join(ast.unparse(st) for st in early[1:-1])
        assert "store" not in between and "atomic" not in between
        assert between.count("tl.load(") == 2 and between.count("tl.load(wf_ptrs") == 2, between  # EVEN_K or not
        assert "w_ptr" in between and not [p for p in ("x_ptr", "s_ptr", "y_ptr") if p in between]
        assert ast.unparse(call) == "pdl_enter(USE_PDL)"
    else:
        assert ast.unparse(body[0]) == "pdl_enter(USE_PDL)"


def _tiny_llama_tokens(path: str, on: bool, monkeypatch, **llm_kwargs) -> list:
    monkeypatch.setattr(pdl, "ENABLED", on)  # this process (tp 1)
    monkeypatch.setenv("SHARDLLM_PDL", "1" if on else "0")  # worker processes (tp 2) read it at import
    return greedy_tokens_then_batch1(path, 3, 8, **llm_kwargs)


@pytest.mark.gpu
@pytest.mark.timeout(240)  # up to four engines
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a GPU with PDL (sm90+)")
@pytest.mark.parametrize("dtype, layout", [
    ("fp8", {}), ("fp8", {"enforce_eager": True}), ("bfloat16", {}), ("bfloat16", {"enforce_eager": True}),
    # tp 2 once: its four engines took 48 s of the GPU suite per dtype (fifth session); what it adds to the one-GPU
    # cases is the all-reduce between PDL kernels, which does not depend on the dtype
    pytest.param("bfloat16", {"tensor_parallel_size": 2}, marks=pytest.mark.multi_gpu)],
    ids=["fp8-graphs", "fp8-eager", "bf16-graphs", "bf16-eager", "bf16-tp2"])
def test_gpu_tokens_equal_with_pdl_on_and_off(tiny_checkpoints, monkeypatch, dtype, layout):
    if layout.get("tensor_parallel_size", 1) > torch.cuda.device_count():
        pytest.skip("needs two GPUs")
    if not pdl.supported(torch.cuda.current_device()):
        pytest.skip("this Triton has no launch_pdl")
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.launch_args(torch.device("cuda")) == {"USE_PDL": True, "launch_pdl": True}  # so "on" launches with it
    on = _tiny_llama_tokens(tiny_checkpoints["llama"], True, monkeypatch, dtype=dtype, **layout)
    off = _tiny_llama_tokens(tiny_checkpoints["llama"], False, monkeypatch, dtype=dtype, **layout)
    assert on == off


_PTX_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from shardllm.layers import gemv, triton_ops
from shardllm.layers.quantization import fp8_fused
silu_sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "d": "i32", "stride_xn": "i32", "stride_on": "i32"}
silu = (triton_ops._fused_silu_and_mul_kernel, silu_sig, {"BLOCK": 1024, "rows_ptr": None, "HAS_ROWS": False})
# the MoE layer's row limit: a device-side row count (HAS_ROWS) read after the wait, as every other load
silu_rows = (triton_ops._fused_silu_and_mul_kernel, {**silu_sig, "rows_ptr": "*i32"}, {"BLOCK": 1024,
                                                                                       "HAS_ROWS": True})
quant_sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "d": "i32", "stride_xn": "i32",
             "stride_qn": "i32"}
quant_consts = {"BLOCK": 1024, "NUM_CHUNKS": 1, "FP8_MAX_C": 448.0, "MIN_SCALE_C": 1e-12, "xs_ptr": None,
                "ws_ptr": None, "HAS_XSCALE": False}
silu_quant = (fp8_fused._silu_and_mul_quant_fp8_kernel, quant_sig, {**quant_consts, "rows_ptr": None,
                                                                    "HAS_ROWS": False})
silu_quant_rows = (fp8_fused._silu_and_mul_quant_fp8_kernel, {**quant_sig, "rows_ptr": "*i32"},
                   {**quant_consts, "HAS_ROWS": True})
# an FP8 linear's unscaled product and its scales in place of the activation (fp8_fused.link_deferred_scale)
scaled = {k: v for k, v in quant_consts.items() if k not in ("xs_ptr", "ws_ptr", "HAS_XSCALE")}
silu_quant_scaled = (fp8_fused._silu_and_mul_quant_fp8_kernel, {**quant_sig, "xs_ptr": "*fp32", "ws_ptr": "*fp32"},
                     {**scaled, "rows_ptr": None, "HAS_ROWS": False, "HAS_XSCALE": True})
norm_sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
            "res_out_ptr": "*bf16", "eps": "fp32", "hidden": "i32", "stride_xn": "i32", "stride_rn": "i32",
            "stride_qn": "i32", "stride_ron": "i32", "xs_ptr": "*fp32", "ws_ptr": "*fp32"}
norm_quant_scaled = (fp8_fused._rmsnorm_quant_fp8_kernel, norm_sig, {**scaled, "HAS_RESIDUAL": True,
                                                                     "HAS_XSCALE": True})
names = ["x_ptr", "w_ptr", "s_ptr", "y_ptr", "M", "N", "K", "split_k", "stride_xm", "stride_wn", "stride_ym",
         "stride_ys"]
types = ["*bf16", "*fp8e4nv", "*fp32", "*bf16"] + ["i32"] * 8
gemv_consts = dict(HAS_SCALE=True, USE_DOT=False, EVEN_K=True, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, DOT_F32=False,
                   LATE_REDUCE=True, SILU_INPUT=False, W_AHEAD=True, W_EARLY=False)
# SHARDLLM_GEMV_W_EARLY: the first weight tile loaded between the signal and the wait (both forms)
early = {**gemv_consts, "W_AHEAD": False, "W_EARLY": True}
early_dot = {**early, "USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "LATE_REDUCE": False}
from shardllm.layers.attention import kv_write
v_t_sig = {"v_ptr": "*bf16", "v_cache_ptr": "*fp8e4nv", "slot_mapping_ptr": "*i64", "v_scale_ptr": "*fp32",
           "num_tokens": "i32", "stride_vn": "i32", "stride_vh": "i32", "stride_vcb": "i32", "stride_vch": "i32",
           "stride_vcd": "i32"}
v_t = (kv_write._write_v_t_kernel, v_t_sig, {"HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_SIZE": 64, "TOKENS": 32,
                                             "KV_SCALED": True})
out = {}
kernels = {"silu_and_mul": silu, "write_v_t": v_t, "silu_and_mul_rows": silu_rows, "silu_and_mul_quant": silu_quant,
           "silu_and_mul_quant_rows": silu_quant_rows, "silu_and_mul_quant_scaled": silu_quant_scaled,
           "rmsnorm_quant_scaled": norm_quant_scaled,
           "gemv": (gemv._gemv_kernel, dict(zip(names, types)), gemv_consts),
           "gemv_w_early": (gemv._gemv_kernel, dict(zip(names, types)), early),
           "gemv_w_early_dot": (gemv._gemv_kernel, dict(zip(names, types)), early_dot)}
for name, (fn, sig, consts) in kernels.items():
    consts = {**consts, "USE_PDL": True}
    sig = {**sig, **{k: "constexpr" for k in consts}}
    ptx = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "launch_pdl": True}).asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    out[name] = [ptx.find("griddepcontrol.launch_dependents"), wait, ptx.find("ld.global"),
                 ptx[:wait].count("ld.global")]
print(json.dumps(out))
"""


def test_pdl_kernels_compile_for_sm90_with_the_wait_before_every_load():
    """Compiled for an H100 / H200 on this machine (a process without TRITON_INTERPRET): with USE_PDL the PTX
    signals the next kernel and waits for the previous one before its first global load (the W_EARLY GEMV's first
    weight tile in between); the SiLU kernels compile with and without the MoE layer's row limit (rows_ptr None is
    what a launch without it specializes to)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=240)
    if r.returncode != 0:
        if "ptxas" in r.stderr and ("not found" in r.stderr or "No such file" in r.stderr):
            pytest.skip(f"no ptxas here: {r.stderr.strip().splitlines()[-1:]}")
        raise AssertionError(r.stderr[-2000:])  # a kernel that does not compile for sm90 is a failure, not a skip
    found = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (launch, wait, first_load, loads_before) in found.items():
        if name.startswith("gemv_w_early"):  # loads (of the first weight tile: the AST test above says only w's)
            # between the signal and the wait
            assert 0 <= launch < first_load < wait and loads_before >= 1, (name, launch, wait)
            continue
        assert 0 <= launch < wait < first_load, (name, launch, wait, first_load)

