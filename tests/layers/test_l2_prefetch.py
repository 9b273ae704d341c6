"""L2 prefetch from the RMSNorm before a batch-1 GEMV (layers/l2_prefetch.py): the programs' shares of the bytes
cover them once; launches ask for it only at one row on sm90+; the norm kernel compiled for sm90 issues the bulk
prefetch after its PDL wait and not without it; the linker picks the GEMV-streamed weights; on GPUs (gpu) the
norm's outputs and a tiny Llama's tokens are the same with it on and off."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from shardllm.layers import l2_prefetch, triton_ops  # noqa: E402
from shardllm.layers.quantization import QuantizationConfig, quant_config_scope  # noqa: E402
from tests.helpers import greedy_tokens_then_batch1  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")


@triton.jit
def _ranges_kernel(offs_ptr, size_ptr, nbytes, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    pid = tl.program_id(0)
    offs, size = l2_prefetch.prefetch_ranges(nbytes, pid, tl.num_programs(0), CHUNK, NCHUNK)
    i = pid * NCHUNK + tl.arange(0, NCHUNK)
    tl.store(offs_ptr + i, offs)
    tl.store(size_ptr + i, size)


@cpu
@pytest.mark.parametrize("nbytes, programs", [(4 << 20, 1), (4 << 20, 132), (16, 3), (1 << 20, 7),
                                              (3 * 65536 + 48, 2), (65536, 64)])
def test_program_shares_cover_every_byte_once(nbytes, programs):
    """What each program asks for, as the norm kernel's launch arguments size it: every byte of [0, nbytes) in
    exactly one request, none past the end, each at most CHUNK bytes, a 16-byte multiple at a CHUNK multiple."""
    w = torch.zeros(max(nbytes, 16), dtype=torch.uint8)
    args = l2_prefetch.L2Prefetch(w, nbytes).launch_args(programs)
    chunk, nchunk = args["PF_CHUNK"], args["PF_NCHUNK"]
    assert nchunk & (nchunk - 1) == 0 and programs * nchunk * chunk >= nbytes
    offs = torch.zeros(programs * nchunk, dtype=torch.int64)
    size = torch.zeros(programs * nchunk, dtype=torch.int32)
    _ranges_kernel[(programs,)](offs, size, args["pf_bytes"], CHUNK=chunk, NCHUNK=nchunk)
    seen = torch.zeros(nbytes, dtype=torch.int32)
    for o, s in zip(offs.tolist(), size.tolist()):
        assert 0 <= s <= chunk and s % 16 == 0 and o % chunk == 0
        if s:
            assert o + s <= nbytes
            seen[o:o + s] += 1
    assert torch.equal(seen, torch.ones(nbytes, dtype=torch.int32))


def test_prefetch_sizes_and_bad_weights():
    w = torch.zeros(100, 64, dtype=torch.bfloat16)  # 12,800 bytes
    assert l2_prefetch.L2Prefetch(w, 1 << 30).nbytes == 12800  # at most the weight
    assert l2_prefetch.L2Prefetch(w, 1000).nbytes == 992  # a 16-byte multiple
    assert l2_prefetch.L2Prefetch(w, -5).nbytes == 0
    assert l2_prefetch.L2Prefetch(w, 1000).weight.dtype == torch.uint8  # offsets count bytes
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch.L2Prefetch(w.t(), 1000)
    with pytest.raises(ValueError, match="16-byte aligned"):
        l2_prefetch.L2Prefetch(torch.zeros(64, dtype=torch.uint8)[1:], 16)


def test_launches_ask_for_it_only_at_one_row_on_sm90(monkeypatch):
    target = l2_prefetch.L2Prefetch(torch.zeros(4 << 20, dtype=torch.uint8), 4 << 20)
    one = torch.zeros(1, 64)
    assert l2_prefetch.launch_args(target, one, 1) == (1, {})  # CPU rows
    assert l2_prefetch.launch_args(None, one, 1) == (1, {})

    class Rows:  # CUDA rows without a GPU: the hardware boundary
        is_cuda = True
        device = torch.device("cuda", 0)

        def __init__(self, n):
            self.shape = (n, 64)

    monkeypatch.setattr(l2_prefetch, "supported", lambda index: True)
    monkeypatch.setattr(l2_prefetch, "programs", lambda index: 132)  # an H200's SMs
    grid, args = l2_prefetch.launch_args(target, Rows(1), 1)
    assert grid == 132 and args["pf_rows"] == 1  # one program an SM; all but the row's only prefetch
    assert args["pf_bytes"] == 4 << 20 and args["PF_CHUNK"] == l2_prefetch.CHUNK
    assert grid * args["PF_NCHUNK"] * args["PF_CHUNK"] >= 4 << 20
    assert l2_prefetch.launch_args(target, Rows(1), 8)[0] == 132  # q/k-norm-like rows x heads: still one an SM
    assert l2_prefetch.launch_args(target, Rows(1), 200)[0] == 200
    assert l2_prefetch.launch_args(target, Rows(2), 2) == (2, {})  # batch 2 and up: not measured, not asked
    empty = l2_prefetch.L2Prefetch(torch.zeros(64, dtype=torch.uint8), 0)
    assert l2_prefetch.launch_args(empty, Rows(1), 1) == (1, {})
    monkeypatch.setattr(l2_prefetch, "supported", lambda index: False)  # before sm90
    assert l2_prefetch.launch_args(target, Rows(1), 1) == (1, {})


@triton.jit
def _no_prefetch(base_ptr, nbytes, pid, nprog, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    pass


@cpu
@pytest.mark.parametrize("hidden, block", [(64, 64), (96, 32)], ids=["one-pass", "chunked"])
def test_norm_programs_past_the_rows_only_prefetch(monkeypatch, hidden, block):
    """The norm kernel at a prefetching launch's grid (more programs than rows): the row's output and residual sum
    equal the plain launch's, and the programs past pf_rows write nothing (canary rows keep their NaNs). The PTX
    request itself is replaced by a no-op here (the interpreter runs no inline PTX); the sm90 compile test below
    checks it is issued."""
    monkeypatch.setattr(triton_ops, "prefetch_l2", _no_prefetch)
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(8, hidden, generator=g) for _ in range(2))
    w = torch.randn(hidden, generator=g)
    outs = []
    for pf in (None, dict(pf_ptr=torch.zeros(64, dtype=torch.uint8), pf_bytes=64, pf_rows=1, PF_CHUNK=16,
                          PF_NCHUNK=1)):
        out, res_out = torch.full((8, hidden), float("nan")), torch.full((8, hidden), float("nan"))
        triton_ops._fused_rmsnorm_row_kernel[(8 if pf else 1,)](
            x, r, w, out, res_out, 1e-6, hidden, 1, x.stride(0), 0, r.stride(0), out.stride(0), 0, res_out.stride(0),
            HAS_RESIDUAL=True, BLOCK=block, NUM_CHUNKS=triton.cdiv(hidden, block), **(pf or {}))
        outs.append((out, res_out))
    (out0, res0), (out1, res1) = outs
    assert torch.equal(out0[0], out1[0]) and torch.equal(res0[0], res1[0]) and not out1[0].isnan().any()
    assert out1[1:].isnan().all() and res1[1:].isnan().all()


def test_supported_needs_sm90(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, ok in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        l2_prefetch.supported.cache_clear()
        assert l2_prefetch.supported(0) is ok
    l2_prefetch.supported.cache_clear()


def _build_llama(cfg: QuantizationConfig | None):
    from transformers import LlamaConfig

    from shardllm.models.llama import LlamaForCausalLM

    hf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
    with quant_config_scope(cfg):
        return LlamaForCausalLM(hf, 64)


@pytest.mark.parametrize("cfg", [None, QuantizationConfig()], ids=["bf16", "fp8"])
def test_linker_gives_each_norm_its_gemv_weight(monkeypatch, cfg):
    """Both norms of a layer get their linear's weight (qkv after the input norm, gate_up after the post-attention
    norm), not registered as the norm's own parameter; none off the GPU or with the switch at 0."""
    from shardllm.layers.quantization import fp8_triton

    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 1)
    model = _build_llama(cfg)
    assert l2_prefetch.link_l2_prefetch(model) == 0  # CPU weights
    assert all(m.l2_prefetch is None for m in model.modules() if hasattr(m, "l2_prefetch"))
    monkeypatch.setattr(l2_prefetch, "supported", lambda index: True)
    for p in model.parameters():  # CUDA weights without a GPU (the hardware boundary): the linker asks is_cuda
        monkeypatch.setattr(type(p), "is_cuda", property(lambda self: True), raising=False)
    monkeypatch.setattr(l2_prefetch, "MAX_BYTES", 1 << 20)
    assert l2_prefetch.link_l2_prefetch(model) == 4
    layer = model.model.layers[1]
    attn_w, mlp_w = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    assert layer.input_layernorm.l2_prefetch.weight.data_ptr() == attn_w.data_ptr()
    assert layer.post_attention_layernorm.l2_prefetch.weight.data_ptr() == mlp_w.data_ptr()
    assert layer.post_attention_layernorm.l2_prefetch.nbytes == mlp_w.numel() * mlp_w.element_size() // 16 * 16
    assert {n for n, _ in layer.named_parameters()} == {n for n, _ in _build_llama(cfg).model.layers[1]
                                                         .named_parameters()}
    monkeypatch.setattr(l2_prefetch, "MAX_BYTES", 0)
    assert l2_prefetch.link_l2_prefetch(_build_llama(cfg)) == 0


_PTX_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from shardllm.layers import triton_ops
sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
       "eps": "fp32", "hidden": "i32", "heads": "i32", "stride_xn": "i32", "stride_xh": "i32", "stride_rn": "i32",
       "stride_on": "i32", "stride_oh": "i32", "stride_ron": "i32"}
out = {}
for name, pf in (("off", {"PF_CHUNK": 0, "PF_NCHUNK": 1}), ("on", {"PF_CHUNK": 16384, "PF_NCHUNK": 2})):
    consts = {"HAS_RESIDUAL": True, "BLOCK": 4096, "NUM_CHUNKS": 1, "USE_PDL": True, **pf}
    on = pf["PF_CHUNK"] > 0
    s = {**sig, **({"pf_ptr": "*u8", "pf_bytes": "i32", "pf_rows": "i32"} if on else {}),
         **{k: "constexpr" for k in consts}}
    if not on:
        consts.update(pf_ptr=None)  # what a launch without the arguments passes: pf_bytes stays an int
        s.update(pf_ptr="constexpr", pf_bytes="i32", pf_rows="i32")
    ptx = triton.compile(ASTSource(triton_ops._fused_rmsnorm_row_kernel, s, consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 8, "launch_pdl": True}).asm["ptx"]
    out[name] = [ptx.find("griddepcontrol.wait"), ptx.find("cp.async.bulk.prefetch.L2.global"),
                 ptx.count("cp.async.bulk.prefetch.L2.global")]
print(json.dumps(out))
"""


def test_norm_kernel_compiles_for_sm90_with_the_prefetch_after_its_wait():
    """Compiled for an H100 / H200 on this machine (a process without TRITON_INTERPRET)."""
    import json
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
        raise AssertionError(r.stderr[-2000:])
    found = json.loads(r.stdout.strip().splitlines()[-1])
    wait, first, count = found["on"]
    assert 0 <= wait < first and count >= 1
    assert found["off"][1:] == [-1, 0]


gpu90 = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (9, 0),
                           reason="needs an sm90+ GPU, no interpreter")


@pytest.mark.gpu
@pytest.mark.timeout(60)
@gpu90
@pytest.mark.parametrize("residual", [True, False])
def test_gpu_norm_outputs_equal_with_the_prefetch(residual):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(1, 4096, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(4096, device="cuda", generator=g).to(torch.bfloat16)
    weight = torch.randn(6144, 4096, device="cuda", generator=g).to(torch.float8_e4m3fn)
    target = l2_prefetch.L2Prefetch(weight, 4 << 20)
    assert l2_prefetch.launch_args(target, x, 1)[1]["pf_bytes"] == 4 << 20
    if residual:
        on, off = (triton_ops.fused_add_rms_norm(x, r, w, 1e-5, p) for p in (target, None))
        assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    else:
        assert torch.equal(triton_ops.rms_norm(x, w, 1e-5, target), triton_ops.rms_norm(x, w, 1e-5))
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.timeout(150)  # four engines with CUDA graphs
@gpu90
@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
def test_gpu_tiny_llama_tokens_equal_with_the_prefetch_on_and_off(tiny_checkpoints, dtype, monkeypatch):
    """Batch-1 steps replay CUDA graphs whose norms prefetch (the tiny weights: all of them)."""
    calls = []
    real = l2_prefetch.link_l2_prefetch
    monkeypatch.setattr(l2_prefetch, "link_l2_prefetch", lambda model: calls.append(real(model)) or calls[-1])
    monkeypatch.setattr(l2_prefetch, "MAX_BYTES", 4 << 20)
    on = greedy_tokens_then_batch1(tiny_checkpoints["llama"], 3, 8, dtype=dtype)
    monkeypatch.setattr(l2_prefetch, "MAX_BYTES", 0)
    off = greedy_tokens_then_batch1(tiny_checkpoints["llama"], 3, 8, dtype=dtype)
    assert calls[0] > 0 and calls[-1] == 0
    assert on == off
