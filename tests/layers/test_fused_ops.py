"""Fused Triton RMSNorm / SiluAndMul / rotary (alone, or with the KV-cache write) against the torch layers: CPU
under the interpreter, CUDA (gpu)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardllm.layers import triton_ops  # noqa: E402
from shardllm.layers.activation import SiluAndMul  # noqa: E402
from shardllm.layers.layernorm import RMSNorm  # noqa: E402
from shardllm.layers.rotary import RotaryEmbedding  # noqa: E402

# The kernels run on CPU tensors only if TRITON_INTERPRET=1 was set before triton_ops' import (tests/conftest.py).
INTERPRET = isinstance(triton_ops._fused_rmsnorm_row_kernel, InterpretedFunction)
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton_ops' import")


def gpu(fn):
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA, no interpreter")
    return pytest.mark.gpu(skip(fn))


HALF_DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture
def torch_path(monkeypatch):
    """Forces the layers onto their torch reference (the default on CPU; needed on CUDA)."""
    monkeypatch.setattr(triton_ops, "USE_TRITON", False)


def tol(dtype: torch.dtype, device: str, roundings: int = 2) -> dict:
    """fp32: tight. bf16/fp16: the documented bound, as a relative tolerance in units of eps (one ulp).

    The kernels round where torch does, but their fp32 math differs slightly (reduction order, exp), so a
    rounded intermediate (the normalised x, silu(gate)) may land on the neighbour of torch's value: one
    ulp there, up to two in the output after the multiply (`roundings=2`); rotary rounds once (one ulp).
    The interpreter casts fp32 to bf16 by truncation (triton/runtime/interpreter.py, cast_impl), not to
    nearest even as the GPU does, so on CPU bf16 allows three.
    """
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    ulps = 3 if dtype == torch.bfloat16 and device == "cpu" else roundings
    return dict(atol=1e-5, rtol=ulps * torch.finfo(dtype).eps)


def assert_sum_equal(res: torch.Tensor, ref: torch.Tensor, device: str) -> None:
    """x + residual is rounded once, as torch does: equal, but for the interpreter's bf16 truncation."""
    if res.dtype == torch.bfloat16 and device == "cpu":
        torch.testing.assert_close(res, ref, atol=0, rtol=torch.finfo(res.dtype).eps)
    else:
        assert torch.equal(res, ref)


def make_norm(hidden: int, dtype: torch.dtype, device: str, g: torch.Generator, eps: float = 1e-5) -> RMSNorm:
    norm = RMSNorm(hidden, eps, dtype=dtype).to(device)
    norm.weight.data.copy_(1 + 0.5 * torch.randn(hidden, generator=g))
    return norm


def qkv_views(n: int, nh: int, nkv: int, d: int, dtype: torch.dtype, device: str, g: torch.Generator):
    """q (n, nh, d), k, v (n, nkv, d): strided views of one fused (n, (nh + 2 nkv) d) projection output."""
    qkv = (2 * torch.randn(n, (nh + 2 * nkv) * d, generator=g)).to(device, dtype)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    return qkv, q.view(n, nh, d), k.view(n, nkv, d), v.view(n, nkv, d)


# ---- checks shared by the CPU and the GPU tests --------------------------------------------------------------------


def check_rms_norm(n: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    norm = make_norm(hidden, dtype, device, g)
    x = (3 * torch.randn(n, hidden, generator=g)).to(device, dtype)
    residual = torch.randn(n, hidden, generator=g).to(device, dtype)
    x0, r0 = x.clone(), residual.clone()
    ref = norm._norm(x)
    ref_out, ref_res = norm._norm(x + residual), x + residual
    torch.testing.assert_close(triton_ops.rms_norm(x, norm.weight, norm.eps), ref, **tol(dtype, device))
    out, res = triton_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    assert_sum_equal(res, ref_res, device)
    torch.testing.assert_close(out, ref_out, **tol(dtype, device))
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # out of place


def check_qk_norm_strided(n: int, nh: int, nkv: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """Qwen3's q/k norm: RMSNorm over the head dim of (N, heads, D) views with the qkv row stride."""
    g = torch.Generator().manual_seed(seed)
    norm = make_norm(d, dtype, device, g, eps=1e-6)
    qkv, q, k, _ = qkv_views(n, nh, nkv, d, dtype, device, g)
    qkv0 = qkv.clone()
    for t in (q, k):
        assert n == 1 or not t.is_contiguous()
        out = triton_ops.rms_norm(t, norm.weight, norm.eps)
        assert out.shape == t.shape and out.is_contiguous()
        torch.testing.assert_close(out, norm._norm(t), **tol(dtype, device))
    assert torch.equal(qkv, qkv0)


def check_silu_and_mul(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, 2 * d, generator=g)).to(device, dtype)
    ref = torch.nn.functional.silu(x[:, :d]) * x[:, d:]
    out = triton_ops.silu_and_mul(x)
    assert out.shape == (n, d) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol(dtype, device))


def check_rotary(n: int, nh: int, nkv: int, d: int, dtype: torch.dtype, device: str, seed: int = 0,
                 max_position: int = 512, scaling: dict | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(d, max_position, 10000.0, scaling).to(device)
    qkv, q, k, v = qkv_views(n, nh, nkv, d, dtype, device, g)
    positions = torch.randint(0, max_position, (n,), generator=g).to(device)
    positions[0] = max_position - 1  # the last row of the cache
    q0, v0 = q.clone(), v.clone()
    ref_q, ref_k = _torch_rotary(rope, positions, q, k)
    ptrs = q.data_ptr(), k.data_ptr()
    out_q, out_k = triton_ops.rotary_embedding_(positions, q, k, rope.cos_sin_cache)
    assert out_q is q and out_k is k and (q.data_ptr(), k.data_ptr()) == ptrs  # rotated in place
    assert not torch.equal(q, q0)
    torch.testing.assert_close(q, ref_q, **tol(dtype, device, roundings=1))
    torch.testing.assert_close(k, ref_k, **tol(dtype, device, roundings=1))
    assert torch.equal(v, v0)  # the third split is untouched


def _torch_rotary(rope: RotaryEmbedding, positions, q, k):
    """The reference on copies (the default path on CPU, forced on CUDA)."""
    old = triton_ops.USE_TRITON
    triton_ops.USE_TRITON = False
    try:
        return rope(positions, q.clone(), k.clone())
    finally:
        triton_ops.USE_TRITON = old


def paged_slots(n: int, num_blocks: int, block_size: int, g: torch.Generator) -> torch.Tensor:
    """n distinct cache slots in random order: both sides of a block boundary, the last slot, every 4th -1."""
    total = num_blocks * block_size
    edges = torch.tensor([block_size - 1, block_size, total - 1])
    rest = torch.randperm(total, generator=g)
    slots = torch.cat([edges, rest[~torch.isin(rest, edges)]])[:n]
    slots[torch.arange(n) % 4 == 3] = -1  # padding tokens: rotated, but not written
    return slots[torch.randperm(n, generator=g)]


def check_rotary_and_write_kv(n: int, nh: int, nkv: int, d: int, dtype: torch.dtype, device: str, seed: int = 0,
                              block_size: int = 16, max_position: int = 512) -> None:
    """The fused launcher against the torch rotary + index_copy_ into the caches (slots >= 0)."""
    g = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(d, max_position, 10000.0).to(device)
    qkv, q, k, v = qkv_views(n, nh, nkv, d, dtype, device, g)
    positions = torch.randint(0, max_position, (n,), generator=g).to(device)
    num_blocks = n // block_size + 3
    kv_cache = torch.randn(2, num_blocks, block_size, nkv, d, generator=g).to(device, dtype)  # as the runner's
    slots = paged_slots(n, num_blocks, block_size, g).to(device)
    keep = slots >= 0
    ref_q, ref_k = _torch_rotary(rope, positions, q, k)
    ref_cache = kv_cache.clone().view(2, -1, nkv, d)  # (2, slots, nkv, D)
    ref_cache[0].index_copy_(0, slots[keep], ref_k[keep])
    ref_cache[1].index_copy_(0, slots[keep], v[keep])
    untouched = torch.ones(ref_cache.shape[1], dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    q0, v0 = q.clone(), v.clone()

    out_q, out_k = triton_ops.rotary_embedding_and_write_kv_(positions, q, k, v, rope.cos_sin_cache,
                                                             kv_cache[0], kv_cache[1], slots)
    assert out_q is q and out_k is k  # rotated in place
    assert not torch.equal(q, q0)
    torch.testing.assert_close(q, ref_q, **tol(dtype, device, roundings=1))
    torch.testing.assert_close(k, ref_k, **tol(dtype, device, roundings=1))
    assert torch.equal(v, v0)
    cache = kv_cache.view(2, -1, nkv, d)
    assert torch.equal(cache[0, slots[keep]], k[keep])  # the very values written back to k
    torch.testing.assert_close(cache[0], ref_cache[0], **tol(dtype, device, roundings=1))
    assert torch.equal(cache[0, untouched], ref_cache[0, untouched])  # slots of no token (or of a -1) unchanged
    assert torch.equal(cache[1], ref_cache[1])  # v copied exactly, nothing else changed


# ---- CPU, Triton interpreter -------------------------------------------------------------------------------------

ALL_DTYPES = [torch.float32, *HALF_DTYPES]


@cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden", [64, 96, 128])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_rms_norm(n, hidden, dtype):
    check_rms_norm(n, hidden, dtype, "cpu")


@cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden", [96, 80])
def test_rms_norm_in_chunks(monkeypatch, hidden, dtype):
    """Rows wider than RMS_MAX_BLOCK: the two-pass path, with a ragged last chunk for 80."""
    monkeypatch.setattr(triton_ops, "RMS_MAX_BLOCK", 32)
    check_rms_norm(5, hidden, dtype, "cpu", seed=1)


@cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 3])
def test_qk_norm_on_strided_heads(n, d, dtype):
    check_qk_norm_strided(n, 8, 2, d, dtype, "cpu", seed=2)


@cpu
def test_rms_norm_promotes_like_torch():
    """An fp32 weight with bf16 x gives fp32, as `weight * x.to(bf16)` does (one bf16 rounding, truncated here)."""
    g = torch.Generator().manual_seed(3)
    norm = make_norm(64, torch.float32, "cpu", g)
    x = torch.randn(3, 64, generator=g).bfloat16()
    out = triton_ops.rms_norm(x, norm.weight, norm.eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, norm._norm(x), atol=1e-5, rtol=torch.finfo(torch.bfloat16).eps)


@cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_silu_and_mul(n, d, dtype):
    check_silu_and_mul(n, d, dtype, "cpu")


@cpu
def test_silu_and_mul_batched_3d():
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(triton_ops.silu_and_mul(x), torch.nn.functional.silu(x[..., :32]) * x[..., 32:],
                               atol=1e-5, rtol=1e-5)


@cpu
@pytest.mark.parametrize("d", [96, 80])
def test_silu_and_mul_tiles_over_d(monkeypatch, d):
    monkeypatch.setattr(triton_ops, "SILU_BLOCK", 32)  # a (rows, 3) grid, ragged last tile for 80
    check_silu_and_mul(4, d, torch.bfloat16, "cpu", seed=4)


@cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_rotary_in_place_gqa(n, d, dtype):
    check_rotary(n, 8, 2, d, dtype, "cpu", seed=n)


@cpu
def test_rotary_odd_head_counts_and_llama3_scaling():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    check_rotary(5, 6, 3, 64, torch.float32, "cpu", seed=5, scaling=scaling)  # heads padded to 8 and 4
    check_rotary(2, 4, 4, 32, torch.bfloat16, "cpu", seed=6)  # MHA


@cpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("n", "heads"), [(1, (32, 8, 128)), (7, (32, 8, 128)), (9, (4, 4, 64)), (6, (6, 2, 64))],
                         ids=["decode-32/8-d128", "32/8-d128", "mha-4/4-d64", "6/2-d64"])
def test_rotary_and_write_kv(n, heads, dtype):
    check_rotary_and_write_kv(n, *heads, dtype, "cpu", seed=n, block_size=4)  # 4: several block boundaries


@cpu
def test_empty_batch():
    w = torch.ones(64)
    x = torch.empty(0, 64)
    assert triton_ops.rms_norm(x, w, 1e-5).shape == (0, 64)
    out, res = triton_ops.fused_add_rms_norm(x, x, w, 1e-5)
    assert out.shape == res.shape == (0, 64)
    assert triton_ops.silu_and_mul(torch.empty(0, 128)).shape == (0, 64)
    q, k = torch.empty(0, 4, 64), torch.empty(0, 2, 64)
    out_q, out_k = triton_ops.rotary_embedding_(torch.empty(0, dtype=torch.long), q, k, torch.ones(8, 64))
    assert out_q is q and out_k is k
    caches, no_pos = torch.zeros(2, 3, 4, 2, 64), torch.empty(0, dtype=torch.long)
    out_q, out_k = triton_ops.rotary_embedding_and_write_kv_(no_pos, q, k, k.clone(), torch.ones(8, 64), *caches,
                                                             no_pos)
    assert out_q is q and out_k is k and not caches.any()


@cpu
def test_layers_take_the_kernels_when_forced(monkeypatch):
    """USE_TRITON switches the layers; on CPU the default (None) keeps the torch reference."""
    g = torch.Generator().manual_seed(7)
    assert triton_ops.USE_TRITON is None and not triton_ops.use_triton(torch.zeros(1))
    norm, act, rope = make_norm(64, torch.float32, "cpu", g), SiluAndMul(), RotaryEmbedding(32, 64, 10000.0)
    x, res, h = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g), torch.randn(3, 128, generator=g)
    _, q, k, _ = qkv_views(3, 4, 2, 32, torch.float32, "cpu", g)
    pos = torch.tensor([0, 5, 63])

    def run():
        qc, kc = q.clone(), k.clone()
        return norm(x), norm(x, res), act(h), rope(pos, qc, kc), (qc, kc)

    ref = run()
    monkeypatch.setattr(triton_ops, "USE_TRITON", True)
    calls = []
    monkeypatch.setattr(triton_ops, "rotary_embedding_",
                        lambda *a, f=triton_ops.rotary_embedding_: calls.append(1) or f(*a))
    out = run()
    assert calls == [1]
    torch.testing.assert_close(out[:4], ref[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[4], out[3])  # the kernel rotated the given tensors
    assert not torch.equal(ref[4][0], ref[3][0])  # the reference did not


# ---- CUDA, bf16 / fp16 -------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden", [64, 96, 2048, 4096, 5120, 8192, 16384])
@pytest.mark.parametrize("n", [1, 3, 17, 300])
def test_gpu_rms_norm(n, hidden, dtype, torch_path):
    check_rms_norm(n, hidden, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("heads", [(8, 2, 64), (32, 8, 128), (40, 8, 128), (16, 4, 256)])
@pytest.mark.parametrize("n", [1, 17, 300])
def test_gpu_qk_norm_on_strided_heads(n, heads, dtype, torch_path):
    check_qk_norm_strided(n, *heads, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("d", [96, 1024, 3584, 14336, 28672])
@pytest.mark.parametrize("n", [1, 3, 300])
def test_gpu_silu_and_mul(n, d, dtype, torch_path):
    check_silu_and_mul(n, d, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("heads", [(8, 2, 64), (32, 8, 128), (28, 4, 128), (64, 8, 128), (16, 16, 80)])
@pytest.mark.parametrize("n", [1, 17, 300])
def test_gpu_rotary(n, heads, dtype, torch_path):
    check_rotary(n, *heads, dtype, "cuda", seed=n, max_position=8192)


@gpu
@pytest.mark.parametrize("heads", [(32, 8, 128), (4, 4, 64), (6, 2, 64), (28, 4, 128), (64, 8, 128)])
@pytest.mark.parametrize("n", [1, 17, 300])
def test_gpu_rotary_and_write_kv_bf16(n, heads, torch_path):
    check_rotary_and_write_kv(n, *heads, torch.bfloat16, "cuda", seed=n, max_position=8192)


@gpu
def test_gpu_fp32_matches_tightly(torch_path):
    check_rms_norm(37, 4096, torch.float32, "cuda")
    check_silu_and_mul(37, 14336, torch.float32, "cuda")
    check_rotary(37, 32, 8, 128, torch.float32, "cuda", max_position=8192)


@gpu
def test_gpu_layers_pick_the_kernels_and_replay_in_a_cuda_graph():
    """Captured once, replayed on new inputs in the same buffers: equals the torch path each time."""
    g = torch.Generator().manual_seed(11)
    n, hidden, inter, nh, nkv, d = 8, 1024, 2816, 16, 4, 64
    dev, dt = "cuda", torch.bfloat16
    norm, qnorm = make_norm(hidden, dt, dev, g), make_norm(d, dt, dev, g)
    act, rope = SiluAndMul(), RotaryEmbedding(d, 4096, 500000.0).to(dev)
    x, res = torch.randn(2, n, hidden, generator=g).to(dev, dt)
    h = torch.randn(n, 2 * inter, generator=g).to(dev, dt)
    qkv = torch.randn(n, (nh + 2 * nkv) * d, generator=g).to(dev, dt)
    pos = torch.zeros(n, dtype=torch.long, device=dev)
    assert triton_ops.use_triton(x)

    def step():
        a, r = norm(x, res)
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        q, k = qnorm(q.view(n, nh, d)), k.view(n, nkv, d)
        q, k = rope(pos, q, k)
        return norm(a), r, act(h), q.clone(), k.clone()

    def reference():
        triton_ops.USE_TRITON = False
        try:
            qkv0 = qkv.clone()
            out = step()
            qkv.copy_(qkv0)
            return out
        finally:
            triton_ops.USE_TRITON = None

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture
        qkv0 = qkv.clone()
        step()
        qkv.copy_(qkv0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=g))
        res.copy_(torch.randn(res.shape, generator=g))
        h.copy_(torch.randn(h.shape, generator=g))
        qkv.copy_(torch.randn(qkv.shape, generator=g))
        pos.copy_(torch.randint(0, 4096, (n,), generator=g))
        ref = reference()
        graph.replay()
        torch.cuda.synchronize()
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o, r, atol=1e-5, rtol=3 * torch.finfo(dt).eps)  # q: norm, rotary
