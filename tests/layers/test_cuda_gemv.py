"""The batch-1 FP8 GEMV in CUDA (layers/cuda_gemv.py, csrc/fp8_gemv_tma.cu): its launch plans, its NVRTC compile
for sm_90a (on the CPU where NVRTC is installed: no GPU needed), who may take it, and on a Hopper GPU its results
against the fp32 reference, in CUDA graphs under PDL, and a tiny FP8 Llama's tokens with it on and off."""

from __future__ import annotations

import pytest
import torch

from shardllm.layers import cuda_gemv
from shardllm.layers.cuda_gemv import plan

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="needs an sm90+ GPU")


@pytest.mark.parametrize("n,k,rs,nc", [(6144, 4096, 4, 4), (4096, 14336, 1, 4), (10240, 8192, 2, 4),
                                       (8192, 28672, 1, 8), (64, 128, 8, 4), (96, 1024, 8, 4)])
def test_tma_plan_fills_stages_of_whole_rows(n, k, rs, nc):
    p = plan(n, k, 132, stages=4, blocks_per_sm=1, kernel="tma")
    assert (p.rs, p.nc) == (rs, nc)
    assert p.rs * k <= cuda_gemv.STAGE_TARGET or p.rs == 1
    assert p.grid == min(132, n // rs)
    assert p.smem >= p.stages * p.rs * k + 8 * p.stages


@pytest.mark.parametrize("n,k", [(102, 4096), (4096, 4100), (4096, 4096 * 9), (0, 4096), (4096, 8)])
def test_tma_plan_refuses_shapes_the_kernel_does_not_take(n, k):
    """N not a multiple of the stage's rows, K not a multiple of a warp slice's 16-byte chunks, a slice past 8
    chunks a lane, empty or too-narrow weights."""
    assert plan(n, k, 132, stages=4, blocks_per_sm=1, kernel="tma") is None


def test_tma_plan_caps_stages_to_fit_and_grid_to_groups():
    p = plan(8192, 28672, 132, stages=16, blocks_per_sm=2, kernel="tma")
    assert p.stages * p.rs * 28672 <= 200 * 1024 and p.stages >= 2
    assert plan(16, 4096, 132, stages=4, blocks_per_sm=1, kernel="tma").grid == 4  # 4 groups of 4 rows: 4 blocks


@pytest.mark.parametrize("n,k,u,even,grid", [(6144, 4096, 8, 1, 264), (4096, 14336, 7, 1, 264),
                                             (8192, 28672, 8, 1, 264), (100, 4096, 8, 1, 13), (128, 64, 1, 0, 16),
                                             (96, 1040, 3, 0, 12)])
def test_reg_plan_takes_whole_pieces_where_it_can(n, k, u, even, grid):
    """Pieces of U chunks a lane: the largest U of 8..4 dividing K / 512, else guarded pieces; at most one warp a
    row (8 warps a block); no shared memory."""
    p = plan(n, k, 132, blocks_per_sm=2, kernel="reg")
    assert (p.kernel, p.u, p.rs, p.grid, p.smem) == ("reg", u, even, grid, 0)
    assert plan(n, k + 8, 132, blocks_per_sm=2, kernel="reg") is None  # K not a multiple of 16


def test_cpu_tensors_never_take_the_kernel(monkeypatch):
    monkeypatch.setattr(cuda_gemv, "ENABLED", True)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096).to(torch.float8_e4m3fn)
    assert not cuda_gemv.usable(x, w, torch.ones(4096), False)


def _nvrtc_or_skip():
    if cuda_gemv._nvrtc() is None:
        pytest.skip("NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12)")


@pytest.mark.parametrize("kernel,silu", [("reg", False), ("tma", False), ("tma", True)])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (8192, 28672), (128, 64)])
def test_kernel_compiles_for_sm90a_without_spills(n, k, silu, kernel):
    """NVRTC, ptxas -v: the kernel of each plan builds for sm_90a, with no local-memory spills."""
    _nvrtc_or_skip()
    p = plan(n, k, 132, stages=4, blocks_per_sm=2, kernel=kernel)
    cubin, log = cuda_gemv.compile_source("sm_90a", p.defines(silu), ptxas_verbose=True, kernel=kernel)
    assert cubin[:4] == b"\x7fELF"
    assert "0 bytes spill stores" in log and "0 bytes spill loads" in log, log


# --- on a Hopper GPU ------------------------------------------------------------------------------------------------

def _weights(n: int, k: int, seed: int = 0):
    from shardllm.layers.quantization.fp8_utils import quantize_per_row

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    q, s = quantize_per_row(w)
    return q.contiguous(), s.view(-1).float().contiguous()


def _reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x.float() @ (q.float() * s[:, None]).t()


def _silu_input(gate_up: torch.Tensor) -> torch.Tensor:
    from shardllm.layers import triton_ops

    return triton_ops.silu_and_mul(gate_up)


@pytest.mark.gpu
@hopper
@pytest.mark.timeout(120)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1024, 8192),
                                 (8192, 28672), (96, 1024), (40, 128), (24, 1040)])
@pytest.mark.parametrize("kernel,stages,bps", [("reg", 0, 1), ("reg", 0, 2), ("tma", 4, 1), ("tma", 2, 2),
                                               ("tma", 8, 1)])
def test_gpu_kernel_matches_the_fp32_reference(monkeypatch, n, k, silu, kernel, stages, bps):
    if silu and kernel == "reg":
        pytest.skip("the register form has no fused SiLU input")
    monkeypatch.setattr(cuda_gemv, "ENABLED", True)
    p = plan(n, k, torch.cuda.get_device_properties(0).multi_processor_count, stages, bps, kernel)
    monkeypatch.setattr(cuda_gemv, "_plan_for", lambda index, nn, kk: p)
    q, s = _weights(n, k)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 2 * k if silu else k, device="cuda", generator=g).to(torch.bfloat16)
    assert cuda_gemv.usable(x, q, s, silu)
    y = cuda_gemv.gemv_fp8(x, q, s, silu_input=silu, pdl=False)
    assert y.shape == (1, n) and y.dtype == torch.bfloat16
    ref = _reference(_silu_input(x) if silu else x, q, s)
    err = float((y.float() - ref).abs().max() / ref.abs().max())
    assert err < 1e-2, err


@pytest.mark.gpu
@hopper
@pytest.mark.timeout(60)
@pytest.mark.parametrize("scale", [0.0, 1e-4, 300.0])
def test_gpu_kernel_scales_x_of_any_magnitude(monkeypatch, scale):
    """x is carried in f16 scaled by 16 / max|x|: all-zero x gives zeros (no NaN), tiny and large x keep their
    relative precision (a |x| of 300 times 448 would overflow an unscaled f16 product sum)."""
    monkeypatch.setattr(cuda_gemv, "ENABLED", True)
    q, s = _weights(4096, 4096)
    x = (torch.randn(1, 4096, device="cuda") * scale).to(torch.bfloat16)
    x[0, 7] = 40 * scale  # one outlier channel
    y = cuda_gemv.gemv_fp8(x, q, s, pdl=False).float()
    ref = _reference(x, q, s)
    assert torch.isfinite(y).all()
    if scale == 0.0:
        assert not y.any()
    else:
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.gpu
@hopper
@pytest.mark.timeout(60)
def test_gpu_kernels_in_a_cuda_graph_under_pdl(monkeypatch):
    """Three dependent GEMVs (each reads the one before's output) and a torch op between them, captured with the
    PDL launch attribute and replayed with new inputs: each equals its eager result."""
    monkeypatch.setattr(cuda_gemv, "ENABLED", True)
    ws = [_weights(4096, 4096, seed) for seed in range(3)]
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)

    def chain(x):
        y = x
        for q, s in ws:
            y = cuda_gemv.gemv_fp8(y, q, s, pdl=True)
            y = y * 0.01 + 1.0  # a torch kernel between two PDL launches
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, chain(x))


@pytest.mark.gpu
@hopper
@pytest.mark.timeout(60)
def test_gpu_gemv_dispatch_falls_back_where_the_kernel_cannot_run(monkeypatch):
    """gemv.gemv takes the CUDA kernel for one bf16 row of a shape the plan takes, the Triton kernel otherwise (2
    rows, K not a multiple of 16): all within the reference's tolerance."""
    from shardllm.layers import gemv as gemv_mod
    from shardllm.layers.quantization.fp8_triton import small_m_config

    monkeypatch.setattr(cuda_gemv, "ENABLED", True)
    calls = []
    fn = cuda_gemv.gemv_fp8
    monkeypatch.setattr(cuda_gemv, "gemv_fp8", lambda *a, **kw: calls.append(a[1].shape) or fn(*a, **kw))
    for m, n, k in [(1, 4096, 4096), (2, 4096, 4096), (1, 100, 4104)]:
        q, s = _weights(n, k)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y = gemv_mod.gemv(x, q, s, small_m_config(n, k, m))
        ref = _reference(x, q, s)
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2
    assert calls == [(4096, 4096)]


@pytest.mark.gpu
@hopper
@pytest.mark.timeout(150)  # two engines with CUDA graphs
def test_gpu_tiny_fp8_llama_tokens_with_the_cuda_gemv(tiny_checkpoints, monkeypatch):
    """One sequence (batch-1 decode through the GEMV, in CUDA graphs): greedy tokens equal with the CUDA kernel
    and with the Triton GEMV, and the CUDA kernel was launched."""
    from shardllm import LLM, SamplingParams

    def tokens(enabled: bool) -> list[int]:
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            fn = cuda_gemv.gemv_fp8
            mp.setattr(cuda_gemv, "ENABLED", enabled)
            mp.setattr(cuda_gemv, "gemv_fp8", lambda *a, **kw: calls.append(1) or fn(*a, **kw))
            llm = LLM(tiny_checkpoints["llama"], dtype="fp8", num_kv_blocks=64, max_batch_size=8)
            try:
                sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
                out = llm.generate([[1, 17, 42, 99, 7, 230]], sp, use_tqdm=False)
            finally:
                llm.shutdown()
        assert bool(calls) == enabled
        return list(out[0].outputs[0].token_ids)

    assert tokens(True) == tokens(False)
