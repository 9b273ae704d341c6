"""The persistent batch-1 MLP (shardllm/layers/persistent_mlp.py): its two-launch form equals the engine's GEMVs
(norm-fused gate_up, SiLU-fused down) bit for bit on the CPU, and the torch reference within FP8's tolerance; on a
GPU the one-launch form with its grid barrier equals the two-launch form, eagerly and replayed from a CUDA graph,
with one tile a program and with several."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardllm.layers import persistent_mlp as pm  # noqa: E402
from shardllm.layers.gemv import GemvConfig, NormPrologue, gemv  # noqa: E402
from shardllm.layers.quantization.fp8_utils import quantize_per_row  # noqa: E402

INTERPRET = isinstance(pm._persistent_mlp_kernel, InterpretedFunction)


def operands(h: int, i: int, device: str, residual: bool, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, h, generator=g).to(device, torch.bfloat16)
    r = torch.randn(1, h, generator=g).to(device, torch.bfloat16) if residual else None
    nw = (torch.rand(h, generator=g) + 0.5).to(device, torch.bfloat16)
    wg, sg = quantize_per_row(torch.randn(2 * i, h, generator=g).to(device))
    wd, sd = quantize_per_row(torch.randn(h, i, generator=g).to(device) / 8)
    return x, r, nw, wg, sg.view(-1), wd, sd.view(-1)


def engine_path(x, r, nw, eps, wg, sg, wd, sd, tiles, late):
    """The engine's batch-1 kernels with the same tiles: the norm-fused gate_up GEMV, the SiLU-fused down GEMV."""
    bn1, bk1, bn2, bk2 = tiles
    r_out = torch.empty_like(x) if r is not None else None
    gu = gemv(x, wg, sg, GemvConfig(False, bn1, bk1, 1, 4, 3, late[0]), norm=NormPrologue(r, nw, eps, r_out))
    out = gemv(gu, wd, sd, GemvConfig(False, bn2, bk2, 1, 4, 3, late[1]), silu_input=True)
    return out, (x if r is None else r_out)


CASES = [(256, 512, (8, 128, 16, 256), (False, True), True),
         (256, 384, (4, 64, 8, 128), (True, False), False),  # 2I = 768 rows: 192 gate_up tiles of 4
         (128, 256, (16, 128, 4, 256), (False, False), True),
         (192, 160, (128, 64, 128, 32), (False, True), True)]  # neither N a multiple of its BLOCK_N: masked stores


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")
@pytest.mark.parametrize("h,i,tiles,late,res", CASES)
def test_two_launch_form_equals_the_engine_gemvs_cpu(h, i, tiles, late, res):
    x, r, nw, wg, sg, wd, sd = operands(h, i, "cpu", res, seed=h + i)
    out, r_out = pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, None, tiles, late)
    want, want_r = engine_path(x, r, nw, 1e-5, wg, sg, wd, sd, tiles, late)
    assert torch.equal(out, want) and torch.equal(r_out, want_r)
    # the torch reference, loosely: Triton's interpreter rounds fp32 to bf16 by truncation (the GPU to nearest)
    ref, ref_r = pm.reference_mlp(x, r, nw, 1e-5, wg, sg, wd, sd)
    assert torch.allclose(r_out.float(), ref_r.float(), rtol=2 ** -7, atol=0)
    assert (out.float() - ref.float()).abs().max() <= 5e-2 * ref.float().abs().max()  # (truncation: 1-3% low)


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")
@pytest.mark.parametrize("h,i,tiles,late,res", CASES[:2] + CASES[3:])
def test_fewer_programs_and_the_one_launch_form_cpu(h, i, tiles, late, res):
    """Three programs looping over the tiles (the flat loops cross tile ends, loading 1 or 2 steps ahead, or
    through TMA descriptors: rows past N and steps past a program's last are boxes out of bounds), and
    the one-launch form with its barrier at one program, equal the two-launch form; the barrier's count is back to 0
    and its generation counts the launches."""
    x, r, nw, wg, sg, wd, sd = operands(h, i, "cpu", res, seed=h + i)
    want, want_r = pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, None, tiles, late)
    for kw in (dict(ahead=1), dict(ahead=2), dict(tma=True, num_stages=4)):
        out, r_out = pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, None, tiles, late, num_progs=3, **kw)
        assert torch.equal(out, want) and torch.equal(r_out, want_r), kw
    bar = pm.new_barrier(torch.device("cpu"))
    for n in (1, 2):
        out, r_out = pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, bar, tiles, late, num_progs=1, ahead=n)
        assert torch.equal(out, want) and torch.equal(r_out, want_r)
        assert bar.tolist() == [0, n]


def test_bad_shapes_are_refused():
    x, r, nw, wg, sg, wd, sd = operands(256, 512, "cpu", True)
    with pytest.raises(ValueError, match="H % 512"):
        pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, None, (8, 512, 16, 256))
    with pytest.raises(ValueError, match="e4m3"):
        pm.persistent_mlp(x, r, nw, 1e-5, wg.float(), sg, wd, sd, None, (8, 128, 16, 256))
    with pytest.raises(ValueError, match="contiguous"):
        pm.persistent_mlp(x, r, nw, 1e-5, wg.t().contiguous().t(), sg, wd, sd, None, (8, 128, 16, 256))
    with pytest.raises(ValueError, match="two int64 words"):
        pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, torch.zeros(1, dtype=torch.int64), (8, 128, 16, 256))
    with pytest.raises(ValueError, match="num_progs=1"):
        pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, pm.new_barrier(torch.device("cpu")), (8, 128, 16, 256))
    with pytest.raises(ValueError, match="ahead=3; use 1 or 2"):
        pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, None, (8, 128, 16, 256), ahead=3)
    with pytest.raises(ValueError, match="at most 256"):
        pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, None, (8, 128, 16, 512), tma=True)
    with pytest.raises(ValueError, match="residual"):
        pm.persistent_mlp(x, r[:, :128], nw, 1e-5, wg, sg, wd, sd, None, (8, 128, 16, 256))


def test_resident_programs_follow_the_occupancy_limits(monkeypatch):
    class Props:
        major, minor = 9, 0
        multi_processor_count, max_threads_per_multi_processor = 132, 2048
        regs_per_multiprocessor, shared_memory_per_multiprocessor = 65536, 233472

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props)
    dev = torch.device("cuda", 0)
    assert pm.max_resident_programs(dev, 32, 0, 4) == 132 * 16  # threads: 2048 / 128
    assert pm.max_resident_programs(dev, 64, 0, 4) == 132 * 8  # registers: 65536 / (64 x 128)
    assert pm.max_resident_programs(dev, 65, 0, 4) == 132 * 7  # 65 registers round up to 72 a thread
    assert pm.max_resident_programs(dev, 32, 100_000, 4) == 132 * 2  # shared memory
    assert pm.max_resident_programs(dev, 32, 116_000, 4) == 132  # 1 KiB reserved a block: 2 x 117,024 > 233,472
    assert pm.max_resident_programs(dev, 16, 0, 1) == 132 * 32  # at most 32 blocks an SM


@pytest.mark.gpu
@pytest.mark.timeout(90)  # a barrier that never opens hangs: the timeout ends it
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA, no interpreter")
@pytest.mark.parametrize("res", [True, False], ids=["residual", "first-layer"])
def test_one_launch_with_its_barrier_equals_two_launches_on_gpu(res):
    h, i, tiles, late = 4096, 14336, (8, 512, 16, 1024), (False, True)  # Llama-3-8B, the engine's M = 1 tiles
    x, r, nw, wg, sg, wd, sd = operands(h, i, "cuda", res)
    want, want_r = pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, None, tiles, late)
    eng, eng_r = engine_path(x, r, nw, 1e-5, wg, sg, wd, sd, tiles, late)
    assert torch.equal(want_r, eng_r)
    assert (want.float() - eng.float()).abs().max() <= 1e-2 * eng.float().abs().max()  # (rstd's sum order)
    bar = pm.new_barrier(x.device)
    with pytest.raises(ValueError, match="cannot all be resident"):  # 1024 down tiles of 4 rows, 1024 programs
        pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, bar, (8, 512, 4, 1024), late, num_progs=1024)
    assert bar.tolist() == [0, 0]  # refused before any launch
    for n, num_progs in enumerate((None, 7, 256, 1, None)):  # as many as fit, several tiles a program, one each
        out, r_out = pm.persistent_mlp(x, r, nw, 1e-5, wg, sg, wd, sd, bar, tiles, late, num_progs=num_progs)
        torch.cuda.synchronize()
        assert torch.equal(out, want) and torch.equal(r_out, want_r), num_progs
        assert bar.tolist() == [0, n + 1], (num_progs, bar.tolist())  # any grid may follow any other
    x2 = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_r = pm.persistent_mlp(x2, r, nw, 1e-5, wg, sg, wd, sd, bar, tiles, late)
    for trial in range(3):  # the counter is never reset: every replay is its next generation
        x2.copy_(x * (trial + 1))
        graph.replay()
        torch.cuda.synchronize()
        w2, w2_r = pm.persistent_mlp(x2, r, nw, 1e-5, wg, sg, wd, sd, None, tiles, late)
        assert torch.equal(g_out, w2) and torch.equal(g_r, w2_r), trial
    assert bar.tolist() == [0, 5 + 3]  # five eager launches, three replays (the capture records, runs nothing)


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")
def test_llama_layers_take_it_at_one_row_only_cpu(tiny_checkpoints, monkeypatch):
    """SHARDLLM_PERSISTENT_MLP (forced on the CPU, tiles the tiny model's sizes divide): a batch-1 decode step's
    MLP blocks run it with the layer's own weights, norm and residual (its output close to the unfused block's:
    FP8 activations there, bf16 here, and the interpreter's truncating bf16 rounding), prefill and batch-2 steps do
    not, and generation goes on."""
    from shardllm import LLM, SamplingParams

    monkeypatch.setattr(pm, "TILES", (8, 32, 8, 64))
    monkeypatch.setattr(pm, "FORCE", True)
    seen = []
    real = pm.maybe_run

    def spy(layer, x, residual):
        out = real(layer, x, residual)
        seen.append(x.shape[0] if out is None else "fused")
        if out is not None:
            monkeypatch.setattr(pm, "FORCE", False)
            normed, res = layer.post_attention_layernorm(x, residual)
            ref = layer.mlp(normed)
            monkeypatch.setattr(pm, "FORCE", True)
            assert torch.allclose(out[1].float(), res.float(), rtol=2 ** -7, atol=0)
            assert (out[0].float() - ref.float()).abs().max() <= 0.1 * ref.float().abs().max()
        return out

    monkeypatch.setattr(pm, "maybe_run", spy)
    llm = LLM(tiny_checkpoints["llama"], device="cpu", dtype="bfloat16", quantization="fp8", num_kv_blocks=80,
              block_size=4)
    try:
        greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        two = llm.generate([[5, 9, 13, 200], [7, 3]], greedy)
        n_two = len(seen)
        one = llm.generate([[5, 9, 13, 200]], greedy)
    finally:
        llm.shutdown()
    layers = 2
    assert "fused" not in seen[:n_two] and all(len(o.outputs[0].token_ids) == 4 for o in two)
    assert seen[n_two:n_two + layers] == [4, 4]  # the prompt: 4 rows
    assert seen[n_two + layers:] == ["fused"] * (3 * layers)  # 3 decode steps of 1 row, every layer
    assert len(one[0].outputs[0].token_ids) == 4


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")
def test_not_inside_the_two_micro_batch_overlap_cpu(tiny_checkpoints, monkeypatch):
    """A batch-2 decode step split into two one-row halves (layers/microbatch_overlap.py, forced here) runs them on
    two streams: the persistent MLP, whose barrier words serve one launch at a time, stays out of both halves."""
    from shardllm import LLM, SamplingParams
    from shardllm.layers import microbatch_overlap

    monkeypatch.setattr(pm, "TILES", (8, 32, 8, 64))
    monkeypatch.setattr(pm, "FORCE", True)
    seen = []
    real = pm.maybe_run
    monkeypatch.setattr(pm, "maybe_run", lambda layer, x, r: seen.append((x.shape[0], microbatch_overlap.running()))
                        or real(layer, x, r))
    monkeypatch.setattr(microbatch_overlap, "applies", lambda meta, n, tp: meta.max_query_len == 1 and n >= 2)
    llm = LLM(tiny_checkpoints["llama"], device="cpu", dtype="bfloat16", quantization="fp8", num_kv_blocks=80,
              block_size=4)
    fused = []
    real_run = pm.persistent_mlp
    monkeypatch.setattr(pm, "persistent_mlp", lambda *a, **k: fused.append(1) or real_run(*a, **k))
    try:
        out = llm.generate([[5, 9, 13, 200], [7, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    finally:
        llm.shutdown()
    assert (1, True) in seen  # one-row halves reached it, inside the overlap
    assert not fused and all(len(o.outputs[0].token_ids) == 4 for o in out)
    assert not microbatch_overlap.running()
