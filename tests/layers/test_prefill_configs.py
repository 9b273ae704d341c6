"""The prefill attention kernel's launch variants (triton_prefill.PrefillConfig: tile rows, context tile, warps,
stages, the causal split) give the torch oracle's attention, over fp32 16-token pages and an FP8 cache of 64-token
pages in both V layouts, for fresh prompts, a chunk over cached context and a decode row in one launch; bad
SHARDLLM_PREFILL_CONFIG values fail naming the field and the fix."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers.attention import triton_prefill  # noqa: E402
from shardllm.layers.attention.triton_prefill import PrefillConfig, parse_prefill_config  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu, make_case, reference  # noqa: E402

CONFIGS = [PrefillConfig(), PrefillConfig(rows=64), PrefillConfig(rows=256), PrefillConfig(block_n=32),
           PrefillConfig(block_n=128), PrefillConfig(split_causal=True), PrefillConfig(rows=256, block_n=32,
                                                                                      split_causal=True),
           PrefillConfig(num_warps=4, num_stages=2, split_causal=True), triton_prefill.STANDARD,
           triton_prefill.V_T_LONG]
IDS = ["default", "rows64", "rows256", "n32", "n128", "split", "rows256-n32-split", "w4-s2-split", "standard",
       "vt-long"]
Q_LENS, SEQ_LENS = [70, 45, 1], [70, 130, 33]  # a fresh prompt, a chunk over 85 cached tokens, a decode row


def transposed_view(v_cache: torch.Tensor) -> torch.Tensor:
    """The same values stored (num_blocks, nkv, D, block_size), seen as (num_blocks, block_size, nkv, D)."""
    return v_cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


@cpu
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("layout", ["fp32-16", "e4m3-64", "e4m3-64-vt"])
def test_every_launch_variant_gives_the_oracles_attention(monkeypatch, config, layout):
    import tests.layers.test_triton_attention as attn_tests

    block_size = 16 if layout == "fp32-16" else 64
    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", block_size)
    q, kc, vc, meta = make_case(Q_LENS, SEQ_LENS, 2, 4, 64)
    if layout != "fp32-16":
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    want = reference(q, kc, vc, meta)
    if layout.endswith("-vt"):
        vc = transposed_view(vc)
        assert vc.stride(-1) == block_size
    got = triton_prefill.paged_prefill_attention(q, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                                 meta.max_query_len, q.shape[-1] ** -0.5, config=config)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


@gpu
@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", ["e4m3-64", "e4m3-64-vt", "bf16-16"])
def test_every_launch_variant_on_gpu(monkeypatch, layout):
    """The same on CUDA with bf16 queries at Llama-3's head shape (8 kv heads, group 4, head_dim 128)."""
    import tests.layers.test_triton_attention as attn_tests

    block_size = 16 if layout == "bf16-16" else 64
    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", block_size)
    q, kc, vc, meta = make_case([300, 45, 1], [300, 530, 33], 8, 4, 128, torch.bfloat16, "cuda")
    if layout != "bf16-16":
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    want = reference(q, kc, vc, meta)
    if layout.endswith("-vt"):
        vc = transposed_view(vc)
    for config in CONFIGS:
        got = triton_prefill.paged_prefill_attention(q, kc, vc, meta.query_start_loc, meta.seq_lens,
                                                     meta.block_tables, meta.max_query_len, q.shape[-1] ** -0.5,
                                                     config=config)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2, msg=lambda m, c=config: f"{c}: {m}")


@cpu
@pytest.mark.parametrize("vt,q_len,want", [(False, 600, "STANDARD"), (True, 600, "V_T_LONG"), (True, 70, "V_T_SHORT")])
def test_the_kernel_launches_the_engines_choice(monkeypatch, vt, q_len, want):
    """Without a config argument paged_prefill_attention launches prefill_config(its V layout, max_query_len)."""
    import tests.layers.test_triton_attention as attn_tests

    tp = triton_prefill
    monkeypatch.setattr(tp, "PREFILL_CONFIG", None)
    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", 64)
    q, kc, vc, meta = make_case([q_len], [q_len], 1, 1, 16)
    if vt:
        vc = transposed_view(vc)
    launched = []
    real = tp._prefill_kernel
    monkeypatch.setattr(tp, "_prefill_kernel", type("Spy", (), {"__getitem__": lambda self, grid: lambda *a, **k: (
        launched.append((k["BLOCK_N"], k["SPLIT_CAUSAL"], k["num_warps"])), real[grid](*a, **k))})())
    tp.paged_prefill_attention(q, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_tables, q_len, 0.25)
    cfg = getattr(tp, want)
    assert launched == [(cfg.block_n, cfg.split_causal, cfg.num_warps or 8)]


def test_the_tile_rows_follow_the_config(monkeypatch):
    monkeypatch.setattr(triton_prefill, "PREFILL_CONFIG", None)  # SHARDLLM_PREFILL_CONFIG set outside: not here
    assert triton_prefill.prefill_block_q(1000, 4, PrefillConfig(rows=256)) == 64
    assert triton_prefill.prefill_block_q(1000, 4) == 32 == triton_prefill.prefill_block_q(1000, 4, PrefillConfig())
    assert triton_prefill.prefill_block_q(5, 4, PrefillConfig(rows=256)) == 8  # short chunks: fewer tokens
    assert triton_prefill.prefill_block_q(1, 8, PrefillConfig(rows=16)) == 2  # at least 16 rows


@pytest.mark.parametrize("text,field", [('{"rows": 96}', "rows"), ('{"block_n": 512}', "block_n"),
                                        ('{"num_warps": 3}', "num_warps"), ('{"num_stages": 9}', "num_stages"),
                                        ('{"num_warps": 4.0}', "num_warps"), ('{"num_stages": true}', "num_stages"),
                                        ('{"split_causal": 1}', "split_causal"), ('{"tile": 64}', "fields"),
                                        ("rows=256", "JSON")])
def test_bad_configs_fail_naming_the_field(text, field):
    with pytest.raises(ValueError, match="SHARDLLM_PREFILL_CONFIG") as e:
        parse_prefill_config(text)
    assert field in str(e.value)


def test_the_engine_launch_follows_the_v_layout_and_chunk_length(monkeypatch):
    """Without SHARDLLM_PREFILL_CONFIG: STANDARD for (N, D) V tiles, the transposed layout's by the step's longest
    chunk; with it: that launch for every step (the variable is read at import, so PREFILL_CONFIG stands in)."""
    tp = triton_prefill
    monkeypatch.setattr(tp, "PREFILL_CONFIG", None)
    assert tp.prefill_config(False, 1) == tp.prefill_config(False, 4096) == tp.STANDARD
    assert tp.prefill_config(True, tp.V_T_LONG_FROM - 1) == tp.V_T_SHORT
    assert tp.prefill_config(True, tp.V_T_LONG_FROM) == tp.V_T_LONG != tp.V_T_SHORT
    given = parse_prefill_config('{"rows": 64}')
    monkeypatch.setattr(tp, "PREFILL_CONFIG", given)
    assert {tp.prefill_config(v, n) for v in (False, True) for n in (1, 4096)} == {given}
    assert tp.prefill_block_q(1000, 4) == 16  # 64 rows / group 4


def test_a_blank_or_missing_config_is_the_default():
    assert parse_prefill_config(None) == parse_prefill_config("  ") == PrefillConfig()
    assert parse_prefill_config('{"rows": 256, "split_causal": true}') == PrefillConfig(rows=256, split_causal=True)


@cpu
def test_sweep_smoke_checks_and_times_each_layout(monkeypatch, capsys):
    """benchmarks/prefill_sweep.py --smoke at a shrunken head shape: the default and the causal split, both cache
    layouts, each checked against the default launch, and a SHARDLLM_PREFILL_CONFIG line per layout."""
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import prefill_sweep

    monkeypatch.setattr(prefill_sweep, "NH", 4)
    monkeypatch.setattr(prefill_sweep, "NKV", 1)
    monkeypatch.setattr(prefill_sweep, "D", 32)
    rows = prefill_sweep.main(["--smoke"])
    assert [(r["layout"], r["config"]["split_causal"]) for r in rows] == [("vt", False), ("vt", True),
                                                                          ("standard", False), ("standard", True)]
    assert all(r["max_diff"] <= 1e-3 and r["us"] > 0 for r in rows)
    assert capsys.readouterr().out.count("SHARDLLM_PREFILL_CONFIG=") == 2
    # a chunk after cached context: the case named as given, its output checked against the default launch's
    rows = prefill_sweep.main(["--smoke", "--cases", "1x40+90", "--layouts", "vt"])
    assert {r["case"] for r in rows} == {"1x40+90"} and all(r["max_diff"] <= 1e-3 for r in rows)
    assert prefill_sweep.parse_case("2x4096+4096") == (2, 4096, 4096) and prefill_sweep.parse_case("16x1000") == (
        16, 1000, 0)
    for bad in ("16", "0x5", "2x4+x", "ax3"):
        with pytest.raises(ValueError, match="--cases"):
            prefill_sweep.parse_case(bad)
