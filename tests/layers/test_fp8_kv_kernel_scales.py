"""FP8 KV-cache scales inside the Triton kernels (issue 13): the KV write (plain, or fused with the rotary)
divides by k_scale / v_scale, decode and prefill attention multiply the scores by k_scale and the output by v_scale,
all loaded from the 0-dim fp32 tensors when the kernels run. Checked against the torch reference on CPU under the
interpreter (e4m3 and e5m2, non-unit scales); Attention's Triton path runs no torch op on the scales (the torch
path's four elementwise ops are gone); on CUDA (gpu), a captured graph sees scales changed after its capture and an
FP8 cache launches no more kernels than a bf16 one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from shardllm.layers import triton_ops  # noqa: E402
from shardllm.layers.attention import Attention, triton_paged  # noqa: E402
from shardllm.layers.attention.triton_paged import (  # noqa: E402
    DecodeConfig,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)
from shardllm.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu, make_case, reference, run_decode  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
K_SCALE, V_SCALE = 0.37, 3.3  # not powers of two: the multiplies round, as a checkpoint's scales would


def scales(k: float = K_SCALE, v: float = V_SCALE, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(k, device=device), torch.tensor(v, device=device)


def quantized_case(fp8, q_lens, seq_lens, seed, device="cpu", dtype=torch.float32):
    """make_case's cache stored as (x / scale).to(fp8), and its dequantized twin (fp32) for the reference."""
    q, kc, vc, meta = make_case(q_lens, seq_lens, 2, 4, 64, dtype, device, seed=seed)
    ks, vs = scales(device=device)
    kc8, vc8 = (kc.float() / ks).to(fp8), (vc.float() / vs).to(fp8)
    return q, kc8, vc8, meta, (ks, vs), (kc8.float() * ks, vc8.float() * vs)


# ---- CPU, Triton interpreter ---------------------------------------------------------------------------------------


@pytest.fixture
def exact_fp8_casts(monkeypatch):
    """The interpreter's float -> fp8 cast (triton 3.9) drops the carry of a mantissa that rounds up into the
    exponent (e4m3: 7.83 -> 4.0, not 8.0); a GPU's cvt.rn.satfinite rounds to nearest even and saturates, as torch's
    cast does. Under this fixture the interpreter casts to fp8 through torch, so stored bytes can be compared."""
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_convert_float"):  # another Triton's interpreter: its casts are its own
        pytest.skip("this Triton's interpreter has no _convert_float to correct")
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    src = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}
    orig = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if output_dtype not in fp8 or input_dtype not in src or rounding_mode != interpreter._ir.ROUNDING_MODE.RTNE:
            return orig(data, input_dtype, output_dtype, rounding_mode)
        x = torch.from_numpy(np.ascontiguousarray(data).copy()).view(src[input_dtype])  # bf16 arrives as uint16
        return x.to(fp8[output_dtype]).view(torch.uint8).numpy().reshape(data.shape)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


@cpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize(("num_splits", "config"), [  # v_scale on the output (1 split) or on the merged partials
    (1, DecodeConfig()), (4, DecodeConfig(use_dot=False, block_n=16, prefetch_pages=True)),
    (2, DecodeConfig(block_n=32, early_v=True, k_rowmajor=True))], ids=["one-split", "nodot", "earlyv-krow"])
def test_decode_kernel_applies_the_scales(fp8, num_splits, config):
    q, kc8, vc8, meta, (ks, vs), dequant = quantized_case(fp8, [1, 1, 1], [40, 17, 1], seed=5)
    ref = reference(q, *dequant, meta)
    got = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=config, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    unscaled = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=config)  # the stored values
    torch.testing.assert_close(unscaled, reference(q, kc8.float(), vc8.float(), meta), atol=2e-5, rtol=1e-4)
    assert (got - unscaled).abs().max() > 0.1


@cpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_prefill_kernel_applies_the_scales(fp8):
    q, kc8, vc8, meta, (ks, vs), dequant = quantized_case(fp8, [5, 3, 1], [20, 3, 9], seed=6)  # chunks over context
    got = paged_prefill_attention(q, kc8, vc8, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                  meta.max_query_len, 64**-0.5, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, reference(q, *dequant, meta), atol=2e-5, rtol=1e-4)


@cpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_kv_writes_divide_by_the_scales(exact_fp8_casts, fp8):
    check_kv_writes(fp8, "cpu", torch.float32)


def check_kv_writes(fp8, device, dtype):
    """write_kv_cache and the fused rotary + write store (x / scale).to(fp8): IEEE fp32 division, one rounding
    (torch's own cast of the quotient, byte for byte); the fused kernel divides the rotated k as rotary_embedding_
    leaves it."""
    g = torch.Generator().manual_seed(7)
    n, nkv, nh, d = 5, 2, 4, 32
    k, v, q = ((torch.randn(n, h, d, generator=g) * 4).to(device, dtype) for h in (nkv, nkv, nh))
    slots = torch.tensor([3, 9, -1, 0, 14], device=device)  # -1: a padding token, not written
    ks, vs = scales(device=device)
    empty = lambda: torch.zeros(4, 4, nkv, d, dtype=fp8, device=device)  # noqa: E731
    kc, vc = empty(), empty()
    write_kv_cache(k, v, kc, vc, slots, k_scale=ks, v_scale=vs)

    def expect(x, scale):
        want = torch.zeros(16, nkv, d, dtype=torch.uint8, device=device)
        keep = slots >= 0
        want[slots[keep]] = (x[keep].float() / scale).to(fp8).view(torch.uint8)
        return want.view(4, 4, nkv, d)

    assert torch.equal(kc.view(torch.uint8), expect(k, ks)) and torch.equal(vc.view(torch.uint8), expect(v, vs))
    rope = RotaryEmbedding(d, 64, 10000.0).to(device)
    positions = torch.tensor([0, 5, 7, 2, 11], device=device)
    kc, vc = empty(), empty()
    q_rot, k_rot = triton_ops.rotary_embedding_and_write_kv_(positions, q.clone(), k.clone(), v, rope.cos_sin_cache,
                                                             kc, vc, slots, k_scale=ks, v_scale=vs)
    q_ref, k_ref = triton_ops.rotary_embedding_(positions, q.clone(), k.clone(), rope.cos_sin_cache)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)  # q and k rotated, not scaled
    assert torch.equal(kc.view(torch.uint8), expect(k_ref, ks)) and torch.equal(vc.view(torch.uint8), expect(v, vs))


def test_scale_arguments_come_in_pairs_of_fp32_scalars():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="pass k_scale and v_scale together"):
        triton_ops.kv_scale_args(torch.tensor(1.0), None, x)
    with pytest.raises(ValueError, match="float32"):
        triton_ops.kv_scale_args(torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0), x)
    assert triton_ops.kv_scale_args(None, None, x) == (x, x, False)


def attention_case(fp8, use_triton: bool, q_lens, seq_lens, scale_values=(0.25, 8.0), device="cpu",
                   dtype=torch.float32, seed=0, cache_dtype=None):
    """An Attention (nh 6, nkv 2, D 64) over a random cache stored divided by the scales, and its forward's
    arguments (with a RotaryEmbedding); use_triton picks both its path and the rotary's (triton_ops.USE_TRITON)."""
    g = torch.Generator().manual_seed(seed)
    nkv, group, d = 2, 3, 64
    nh, n = nkv * group, sum(q_lens)
    _, kc, vc, meta = make_case(q_lens, seq_lens, nkv, group, d, dtype, device, seed)
    attn, rope = Attention(nh, d, nkv).to(device), RotaryEmbedding(d, 4096, 10000.0).to(device)
    attn.use_triton = use_triton
    attn.k_scale.fill_(scale_values[0])
    attn.v_scale.fill_(scale_values[1])
    cache_dtype = fp8 if cache_dtype is None else cache_dtype
    attn.kv_cache = torch.stack([(kc.float() / scale_values[0]).to(cache_dtype),
                                 (vc.float() / scale_values[1]).to(cache_dtype)])
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)]).to(device)
    qkv = (2 * torch.randn(n, (nh + 2 * nkv) * d, generator=g)).to(device, dtype)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    return attn, (q, k, v, meta, rope, positions)


def attention_step(*a, rotary_kernel: bool | None = None, **kw):
    """attention_case's forward: (out, kv_cache); rotary_kernel False: the torch rotary, then the separate KV
    write (default: as the attention)."""
    attn, args = attention_case(*a, **kw)
    rotary_kernel = attn.use_triton if rotary_kernel is None else rotary_kernel
    use_triton, triton_ops.USE_TRITON = triton_ops.USE_TRITON, rotary_kernel
    try:
        return attn(*args), attn.kv_cache
    finally:
        triton_ops.USE_TRITON = use_triton


@pytest.fixture
def attention_kernels_on_cpu(monkeypatch):
    """Attention's Triton path on CPU tensors (the kernels run interpreted), where the runner would choose it."""
    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)


@cpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize(("q_lens", "seq_lens"), [([1, 1], [37, 6]), ([4, 7], [4, 30])], ids=["decode", "prefill"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-rotary-write", "write"])
def test_attention_triton_path_equals_the_torch_reference(attention_kernels_on_cpu, exact_fp8_casts, fp8, q_lens,
                                                          seq_lens, fused):
    """Power-of-two scales (what the first step computes): the cache bytes are equal, whichever side divides the
    rotated k, and the outputs agree to fp32 rounding."""
    ref_out, ref_cache = attention_step(fp8, False, q_lens, seq_lens)
    out, cache = attention_step(fp8, True, q_lens, seq_lens, rotary_kernel=fused)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)


class ScaleOps(TorchDispatchMode):
    """Records the torch arithmetic ops run under it, and which of them read one of the given tensors."""

    ARITH = {"mul", "div", "add", "sub", "reciprocal", "true_divide", "mul_", "div_"}

    def __init__(self, *watched: torch.Tensor):
        super().__init__()
        self.ptrs = {t.data_ptr() for t in watched}
        self.arith, self.on_watched = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.ARITH:
            self.arith.append(name)
            if any(isinstance(a, torch.Tensor) and a.data_ptr() in self.ptrs for a in args):
                self.on_watched.append(name)
        return func(*args, **(kwargs or {}))


@cpu
@pytest.mark.parametrize(("q_lens", "seq_lens"), [([1, 1], [9, 3]), ([3, 2], [3, 8])], ids=["decode", "prefill"])
def test_triton_path_runs_no_torch_op_on_the_scales(attention_kernels_on_cpu, monkeypatch, q_lens, seq_lens):
    """The Triton path with an FP8 cache runs exactly the torch arithmetic of an fp32 cache (none reads a scale);
    the torch reference runs its four (k / k_scale, v / v_scale, q * k_scale, out * v_scale), which the recorder
    sees, as does the Triton path with SHARDLLM_KV_SCALES_IN_KERNELS=0 (the A/B switch), with the same output."""
    from shardllm.layers.attention import attention as attention_mod

    recorded, outs = {}, {}
    for label, triton, cache_dtype, in_kernels in (("fp8", True, None, True), ("fp32", True, torch.float32, True),
                                                   ("torch fp8", False, None, True), ("fp8 ops", True, None, False)):
        attn, args = attention_case(torch.float8_e4m3fn, triton, q_lens, seq_lens, cache_dtype=cache_dtype)
        monkeypatch.setattr(triton_ops, "USE_TRITON", triton)
        monkeypatch.setattr(attention_mod, "KV_SCALES_IN_KERNELS", in_kernels)
        with ScaleOps(attn.k_scale, attn.v_scale) as rec:
            outs[label] = attn(*args)
        recorded[label] = rec
    assert recorded["fp8"].on_watched == []
    assert recorded["fp8"].arith == recorded["fp32"].arith
    assert sorted(recorded["torch fp8"].on_watched) == ["div", "div", "mul", "mul"]
    assert sorted(recorded["fp8 ops"].on_watched) == ["div", "div", "mul", "mul"]
    torch.testing.assert_close(outs["fp8 ops"], outs["fp8"], atol=2e-5, rtol=1e-4)


# ---- CUDA -----------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize(("q_lens", "seq_lens"), [([1] * 6, [300, 1, 17, 64, 129, 5]), ([40, 7, 1], [40, 300, 9])],
                         ids=["decode", "prefill"])
def test_gpu_attention_triton_path_equals_the_torch_reference(fp8, q_lens, seq_lens):
    """bf16 on the GPU: the kernels (fused rotary write, attention with the scales) against the torch path."""
    ref_out, ref_cache = attention_step(fp8, False, q_lens, seq_lens, (0.5, 4.0), "cuda", torch.bfloat16)
    out, cache = attention_step(fp8, True, q_lens, seq_lens, (0.5, 4.0), "cuda", torch.bfloat16)
    same = (cache.view(torch.uint8) == ref_cache.view(torch.uint8)).float().mean()
    assert same > 0.999  # power-of-two scales: equal but for 1-ulp rotary roundings (bf16 on the GPU)
    torch.testing.assert_close(out, ref_out, atol=3e-2, rtol=3e-2)


@gpu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_gpu_kv_writes_divide_by_the_scales(fp8):
    check_kv_writes(fp8, "cuda", torch.bfloat16)


@gpu
@pytest.mark.timeout(60)
def test_gpu_graph_reads_scales_set_after_its_capture():
    """A decode step (KV write + attention) captured with scales 1.0 replays with the values filled in later, as
    the engine's graphs do when the first step computes the scales."""
    fp8 = torch.float8_e4m3fn
    q, kc, vc, meta = make_case([1] * 4, [50, 3, 200, 17], 2, 4, 64, torch.bfloat16, "cuda", seed=9)
    kc8, vc8 = kc.to(fp8), vc.to(fp8)
    k_new = torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16) * 6
    v_new = torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16) * 6
    ks, vs = scales(1.0, 1.0, "cuda")
    out = torch.empty_like(q)

    def step():
        write_kv_cache(k_new, v_new, kc8, vc8, meta.slot_mapping, k_scale=ks, v_scale=vs)
        paged_decode_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens, 64**-0.5, out=out, k_scale=ks,
                               v_scale=vs)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ks.fill_(0.25)
    vs.fill_(0.5)
    graph.replay()
    replayed = out.clone()
    step()  # eager, same scales
    torch.testing.assert_close(replayed, out, atol=0, rtol=0)
    written = kc8.view(-1, 2, 64)[meta.slot_mapping.long()]
    assert torch.equal(written.view(torch.uint8), (k_new.float() / 0.25).to(fp8).view(torch.uint8))
    ref = reference(q, kc8.float() * 0.25, vc8.float() * 0.5, meta)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("q_lens", "seq_lens"), [([1] * 4, [30, 7, 90, 2]), ([9, 3], [9, 40])],
                         ids=["decode", "prefill"])
def test_gpu_fp8_cache_launches_no_more_kernels_than_bf16(q_lens, seq_lens):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for label, cache in (("fp8", torch.float8_e4m3fn), ("bf16", torch.bfloat16)):
        attn, args = attention_case(torch.float8_e4m3fn, True, q_lens, seq_lens, (0.5, 4.0), "cuda",
                                    torch.bfloat16, cache_dtype=cache)
        attn(*args)  # compile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            attn(*args)
            torch.cuda.synchronize()
        counts[label] = sum(e.count for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    assert counts["fp8"] == counts["bf16"] > 0  # the kernels take the scales: no elementwise launches


@gpu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch", [1, 64, 256, 512])  # each of DECODE_CONFIGS' fp8_e4m3 buckets
def test_gpu_tuned_decode_configs_apply_the_scales(batch):
    """The tuned launch an FP8 cache takes at each batch bucket, with non-unit scales, against the dequantized
    cache."""
    fp8 = torch.float8_e4m3fn
    lens = torch.randint(1, 300, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    q, kc, vc, meta = make_case([1] * batch, lens, 8, 4, 128, torch.bfloat16, "cuda", seed=batch)
    ks, vs = scales(device="cuda")
    kc8, vc8 = (kc.float() / ks).to(fp8), (vc.float() / vs).to(fp8)
    cfg = triton_paged.decode_config(batch, 128, fp8)
    got = paged_decode_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens, 128**-0.5, k_scale=ks, v_scale=vs)
    ref = reference(q, kc8.float() * ks, vc8.float() * vs, meta)
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"{cfg}: {m}")
