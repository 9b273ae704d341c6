"""The small-M GEMV family (shardllm/layers/gemv.py) against its fp32 reference: both forms (tl.dot, FMA), e4m3 and
bf16 weights, split-K, N and K off the block sizes; CPU through the Triton interpreter, CUDA (gpu) with graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardllm.layers import gemv as gemv_mod  # noqa: E402
from shardllm.layers.gemv import (  # noqa: E402
    GemvConfig,
    gemv,
    gemv_reference,
    load_table,
    m_bucket,
    nearest_config,
    table_config,
)
from shardllm.layers.quantization.fp8_triton import fp8_small_m_linear, small_m_config  # noqa: E402
from shardllm.layers.quantization.fp8_utils import quantize_per_row  # noqa: E402

INTERPRET = isinstance(gemv_mod._gemv_kernel, InterpretedFunction)
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")


def gpu(fn):
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA, no interpreter")
    return pytest.mark.gpu(pytest.mark.timeout(120)(skip(fn)))


def operands(m: int, n: int, k: int, fp8: bool, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(device)
    if fp8:
        wq, ws = quantize_per_row(w)
        return x, wq, ws.view(-1)
    return x, w.to(torch.bfloat16), None


def check(x, w, s, cfg, rtol=1e-2):
    y = gemv(x, w, s, cfg)
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == x.dtype
    ref = gemv_reference(x, w, s)
    err = float((y.float() - ref).abs().max())
    assert err <= rtol * float(ref.abs().max()), (cfg, err)


# (m, n, k, config): N and K off the blocks, K slices that end mid-block, split-K past the K blocks (capped), EVEN_K
CPU_CASES = [
    (1, 40, 300, GemvConfig(False, 8, 64, 1)),
    (3, 37, 200, GemvConfig(False, 4, 32, 3)),
    (3, 21, 136, GemvConfig(False, 4, 32, 2, late_reduce=True)),
    (4, 16, 256, GemvConfig(False, 16, 64, 2, late_reduce=True)),  # EVEN_K: unmasked loads
    (2, 24, 96, GemvConfig(False, 8, 64, 8)),  # split capped to 2 slices
    (1, 33, 200, GemvConfig(True, 16, 64, 1)),
    (5, 70, 300, GemvConfig(True, 32, 32, 4)),
    (16, 48, 256, GemvConfig(True, 16, 32, 2)),  # EVEN_K, a full 16-row tile
]


@cpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
@pytest.mark.parametrize("m,n,k,cfg", CPU_CASES, ids=[f"m{c[0]}_n{c[1]}_k{c[2]}_{'dot' if c[3].use_dot else 'fma'}"
                                                       f"_split{c[3].split_k}" for c in CPU_CASES])
def test_gemv_matches_reference_cpu(fp8, m, n, k, cfg):
    x, w, s = operands(m, n, k, fp8, "cpu", seed=m * 1000 + n)
    check(x, w, s, cfg)


@cpu
def test_fp8_small_m_linear_takes_a_config_a_tuple_or_the_table(monkeypatch):
    x, w, s = operands(2, 40, 160, True, "cpu")
    ref = gemv_reference(x, w, s)
    for cfg in (GemvConfig(False, 8, 32, 2), (16, 64, 3), None):
        y = fp8_small_m_linear(x, w, s, cfg).float()
        assert float((y - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    monkeypatch.setattr(gemv_mod, "FP8_GEMV_TABLE", load_table({"40x160": {"2": [0, 8, 32, 2, 4, 3]}}))
    import shardllm.layers.quantization.fp8_triton as fp8_triton

    monkeypatch.setattr(fp8_triton, "FP8_GEMV_TABLE", gemv_mod.FP8_GEMV_TABLE)
    assert small_m_config(40, 160, 2) == GemvConfig(False, 8, 32, 2, 4, 3)
    assert small_m_config(40, 160, 3).use_dot  # M bucket 4 is not in the table: the default
    assert small_m_config(4096, 14336) == GemvConfig(True, 32, 256, 4)  # the measured default for down


def test_table_format_and_lookup():
    table = load_table({"6144x4096": {"1": [0, 8, 512, 1, 4, 3, 1], "16": [1, 32, 256, 2, 8, 4]}})
    assert table_config(table, 6144, 4096, 1) == GemvConfig(False, 8, 512, 1, 4, 3, True)
    assert table_config(table, 6144, 4096, 9) == GemvConfig(True, 32, 256, 2, 8, 4)  # 9 rows: bucket 16
    assert table_config(table, 6144, 4096, 2) is None and table_config(table, 4096, 4096, 1) is None
    assert [m_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]


@cpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
@pytest.mark.parametrize(("m", "n", "k", "cfg"), [c for c in CPU_CASES if not c[3].use_dot],
                         ids=lambda v: str(v) if not isinstance(v, GemvConfig) else "cfg")
def test_w_ahead_is_bit_equal_to_one_tile_at_a_time_cpu(fp8, m, n, k, cfg):
    """w_ahead only moves the weight loads a step earlier (two tiles in flight): the same values in the same order,
    over whole and partial K slices, split-K, and with the fused SiLU input."""
    x, w, s = operands(m, n, k, fp8, "cpu", seed=5)
    ahead = cfg._replace(w_ahead=True)
    assert torch.equal(gemv(x, w, s, ahead), gemv(x, w, s, cfg))
    gate_up = torch.randn(m, 2 * k).to(torch.bfloat16)
    assert torch.equal(gemv(gate_up, w, s, ahead, silu_input=True), gemv(gate_up, w, s, cfg, silu_input=True))


def _w_early_equals_default(device: str, cases, monkeypatch, fp8_every: int = 1) -> None:
    """Each case at SHARDLLM_GEMV_W_EARLY 1 and 2 against 0, bit for bit, fp8 and bf16 weights (bf16 rows views of
    a wider buffer whose columns past K are NaN: a read past a slice's end shows), plain and SiLU inputs; the
    kernel's W_EARLY is spied on: on where the mode says, never with w_ahead."""
    launched = []
    real = gemv_mod._gemv_kernel
    monkeypatch.setattr(gemv_mod, "_gemv_kernel", type("Spy", (), {"__getitem__": lambda self, grid: lambda *a, **kw: (
        launched.append(kw["W_EARLY"]), real[grid](*a, **kw))})())
    for i, (m, n, k, cfg) in enumerate(cases):
        for fp8 in ((True, False) if i % fp8_every == 0 else (False,)):  # bf16 rows NaN past K: every case
            x, w, s = operands(m, n, k, fp8, device, seed=7)
            if not fp8:
                wide = torch.full((n, k + 40), float("nan"), dtype=w.dtype, device=device)
                wide[:, :k] = w
                w = wide[:, :k]
            gate_up = torch.randn(m, 2 * k).to(device, torch.bfloat16)
            for silu in (False, True):
                outs = []
                for mode in ((0, 1, 2) if silu else (0, 2)):  # (1 and 2 differ only for the SiLU form)
                    monkeypatch.setattr(gemv_mod, "W_EARLY_MODE", mode)
                    launched.clear()
                    y = gemv(gate_up if silu else x, w, s, cfg, silu_input=silu)
                    early = mode == 2 or (mode == 1 and not silu)
                    assert launched == [early and not (cfg.w_ahead and not cfg.use_dot)], (mode, cfg, silu)
                    outs.append(y)
                assert torch.isfinite(outs[0].float()).all()
                for y in outs[1:]:
                    assert torch.equal(y, outs[0]), (cfg, silu, fp8)


# beside CPU_CASES: empty last K slices (K = 5 blocks over split 4: [0, 2), [2, 4), [4, 5), [5, 5) blocks), a last
# slice shorter than a block, and a w_ahead config (W_EARLY stays off there)
W_EARLY_CASES = CPU_CASES + [(1, 24, 160, GemvConfig(False, 8, 32, 4)), (3, 24, 153, GemvConfig(False, 8, 32, 4,
                                                                                                 late_reduce=True)),
                             (2, 40, 157, GemvConfig(True, 16, 32, 4)), (1, 24, 40, GemvConfig(False, 8, 32, 2)),
                             (2, 24, 200, GemvConfig(False, 8, 64, 1, w_ahead=True))]


@cpu
def test_w_early_is_bit_equal_to_the_default_cpu(monkeypatch):
    """SHARDLLM_GEMV_W_EARLY only moves the first weight tile's load before the PDL wait and runs its step first:
    the same products in the same order, for both forms, whole, partial and empty K slices, split-K, and the fused
    SiLU input."""
    _w_early_equals_default("cpu", W_EARLY_CASES, monkeypatch, fp8_every=3)  # (fp8 on a third: CI time)


def test_tables_take_an_optional_w_ahead_flag():
    table = load_table({"64x64": {"1": [0, 4, 512, 1, 4, 3, 1, 1], "2": [0, 4, 512, 1, 4, 3, 1]}})
    assert table_config(table, 64, 64, 1).w_ahead and not table_config(table, 64, 64, 2).w_ahead


def test_nearest_config_takes_the_tuned_shape_nearest_in_log_n_plus_log_k(monkeypatch):
    """An untuned shape (a Llama-3-70B layer under a table of Llama-3-8B's) takes the nearest tuned shape's config
    for its M bucket; exact entries first; none for a bucket no shape has; SHARDLLM_GEMV_NEAREST_SHAPE=0: exact only."""
    long_k, wide_n, small = [0, 16, 1024, 1, 8, 3, 1], [0, 8, 512, 1, 4, 3, 0], [0, 4, 512, 1, 4, 3, 1]
    table = load_table({"4096x14336": {"1": long_k}, "28672x4096": {"1": wide_n, "2": [1, 32, 128, 1, 4, 4, 0]},
                        "6144x4096": {"1": small}})
    cfg = lambda c: GemvConfig(bool(c[0]), *c[1:6], bool(c[6]))  # noqa: E731
    monkeypatch.delenv("SHARDLLM_GEMV_NEAREST_SHAPE", raising=False)
    assert nearest_config(table, 6144, 4096, 1) == cfg(small)  # exact
    assert nearest_config(table, 8192, 28672, 1) == cfg(long_k)  # 70B down, tp 1: long K
    assert nearest_config(table, 8192, 14336, 1) == cfg(long_k)  # 70B down, tp 2
    assert nearest_config(table, 57344, 8192, 1) == cfg(wide_n)  # 70B gate_up, tp 1: wide N
    assert nearest_config(table, 5120, 8192, 1) == cfg(long_k)  # 70B qkv, tp 2: 0.32 + 0.81 against 0.26 + 1
    assert nearest_config(table, 6144, 5000, 1) == cfg(small)  # 0 + 0.29 against 1.58 + 1.52
    assert nearest_config(table, 4096, 4096, 2) == GemvConfig(True, 32, 128, 1, 4, 4, False)  # the one M=2 shape
    assert nearest_config(table, 4096, 4096, 4) is None  # no shape has bucket 4
    assert nearest_config(load_table({}), 4096, 4096, 1) is None
    monkeypatch.setenv("SHARDLLM_GEMV_NEAREST_SHAPE", "0")
    assert nearest_config(table, 8192, 28672, 1) is None and nearest_config(table, 6144, 4096, 1) == cfg(small)


def test_small_m_config_falls_back_to_the_nearest_tuned_shape(monkeypatch):
    import shardllm.layers.quantization.fp8_triton as fp8_triton

    monkeypatch.delenv("SHARDLLM_GEMV_NEAREST_SHAPE", raising=False)
    monkeypatch.setattr(fp8_triton, "FP8_GEMV_TABLE", load_table({"4096x14336": {"1": [0, 16, 1024, 1, 8, 3, 1]}}))
    assert small_m_config(8192, 28672, 1) == GemvConfig(False, 16, 1024, 1, 8, 3, True)
    monkeypatch.setenv("SHARDLLM_GEMV_NEAREST_SHAPE", "0")
    assert small_m_config(8192, 28672, 1) == GemvConfig(True, 32, 256, 4)  # the generic tl.dot form


def test_nearest_config_never_answers_for_a_replaced_or_changed_table(monkeypatch):
    """The nearest-shape cache follows the table: a new table at a freed one's id (as tests' monkeypatched tables
    get; every table at one id here), a config replaced in place, a bucket added to a nearer shape."""
    a, b, c = [0, 4, 512, 1, 4, 3, 1], [1, 32, 256, 2, 8, 4, 0], [0, 8, 1024, 1, 4, 3, 1]
    cfg = lambda c: GemvConfig(bool(c[0]), *c[1:6], bool(c[6]))  # noqa: E731
    monkeypatch.delenv("SHARDLLM_GEMV_NEAREST_SHAPE", raising=False)
    monkeypatch.setattr(gemv_mod, "id", lambda table: 0, raising=False)
    assert nearest_config(load_table({"4096x4096": {"1": a}}), 8192, 8192, 1) == cfg(a)
    assert nearest_config(load_table({"4096x4096": {"1": b}}), 8192, 8192, 1) == cfg(b)  # same id, same length
    table = load_table({"4096x4096": {"1": a}, "8192x8192": {"2": a}})
    assert nearest_config(table, 8192, 16384, 1) == cfg(a)  # the one shape with an M = 1 entry
    table[(4096, 4096)][1] = cfg(b)
    assert nearest_config(table, 8192, 16384, 1) == cfg(b)
    table[(8192, 8192)][1] = cfg(c)
    assert nearest_config(table, 8192, 16384, 1) == cfg(c)


def test_an_empty_weight_takes_the_generic_config():
    """N or K = 0 has no log2 distance to a tuned shape: the generic tl.dot config, as before nearest_config."""
    assert nearest_config(gemv_mod.FP8_GEMV_TABLE, 0, 4096, 1) is None
    assert small_m_config(0, 4096, 1) == small_m_config(4096, 0, 1) == GemvConfig(True, 32, 256, 1)


def test_bf16_hook_is_off_on_cpu_and_for_shapes_without_an_entry():
    from shardllm.layers.linear import UnquantizedLinearMethod
    from shardllm.layers.quantization.fp8_triton import GEMV_MAX_M

    assert GEMV_MAX_M == 16
    assert (24, 32) not in gemv_mod.BF16_GEMV_TABLE  # entries only where the GPU sweep saw the GEMV beat cuBLAS
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(24, 32, dtype=torch.bfloat16), requires_grad=False)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    assert gemv_mod.maybe_small_m_linear_bf16(x, layer.weight, None) is None
    assert torch.equal(UnquantizedLinearMethod().apply(layer, x, None), F.linear(x, layer.weight))
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)  # an entry of the table, but on the CPU: cuBLAS's path
    x1 = torch.randn(1, 4096, dtype=torch.bfloat16)
    assert (4096, 4096) in gemv_mod.BF16_GEMV_TABLE and gemv_mod.maybe_small_m_linear_bf16(x1, w, None) is None


GPU_CONFIGS = [GemvConfig(False, 8, 512, 1, 4, 3), GemvConfig(False, 4, 256, 4, 4, 3, True),
               GemvConfig(True, 32, 256, 1), GemvConfig(True, 64, 128, 4)]


@gpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (3, 1000, 2056), (16, 4104, 1800)])
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"{'dot' if c.use_dot else 'fma'}{c.block_n}x{c.block_k}"
                                                           f"s{c.split_k}{'late' if c.late_reduce else ''}")
def test_gemv_matches_reference_gpu(fp8, m, n, k, cfg):
    if not cfg.use_dot and m > 4:
        pytest.skip("the FMA form is for M <= 4")
    x, w, s = operands(m, n, k, fp8, "cuda")
    check(x, w, s, cfg)


@gpu
def test_w_early_is_bit_equal_to_the_default_gpu(monkeypatch):
    """The same on CUDA, where the load is issued before griddepcontrol.wait (PDL on sm90+), at Llama-3-8B's batch-1
    table shapes and a dot-form split-K one."""
    cases = [(1, n, k, small_m_config(n, k, 1)) for n, k in ((6144, 4096), (4096, 4096), (28672, 4096))]
    _w_early_equals_default("cuda", cases + [(2, 4096, 14336, GemvConfig(True, 32, 256, 4))], monkeypatch)


def _graph_replay_matches(fn, x):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn()
    for seed in (1, 2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype))
        g.replay()
        torch.cuda.synchronize()
        expect = fn()
        assert torch.equal(y, expect)  # split-K reduce is deterministic: bit-equal to eager


@gpu
def test_gemv_is_graph_capturable_gpu():
    for fp8 in (True, False):
        x, w, s = operands(2, 2048, 4096, fp8, "cuda")
        for cfg in (GemvConfig(True, 32, 256, 4), GemvConfig(False, 8, 512, 2, 4, 3)):
            _graph_replay_matches(lambda cfg=cfg, x=x, w=w, s=s: gemv(x, w, s, cfg), x)


@gpu
def test_bf16_linear_hook_runs_the_table_config_gpu(monkeypatch):
    from shardllm.layers.linear import RowParallelLinear

    assert gemv_mod.gemv_ok(torch.device("cuda"))  # the probe, before gemv is wrapped below
    monkeypatch.setattr(gemv_mod, "BF16_GEMV_TABLE", load_table({"512x1024": {"1": [0, 8, 256, 2, 4, 3],
                                                                               "4": [1, 32, 128, 2, 4, 4]}}))
    with torch.device("cuda"):
        layer = RowParallelLinear(1024, 512, bias=True, dtype=torch.bfloat16)
    layer.weight.data.normal_(0, 0.05)
    layer.bias.data.normal_(0, 0.05)
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a: calls.append(a[-1]) or real(*a))
    for m, expect in ((1, GemvConfig(False, 8, 256, 2, 4, 3)), (3, GemvConfig(True, 32, 128, 2, 4, 4)), (2, None)):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        calls.clear()
        y = layer(x).float()
        ref = x.float() @ layer.weight.float().t() + layer.bias.float()
        assert float((y - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
        assert calls == ([expect] if expect else [])  # M = 2 has no entry: cuBLAS
