"""The decode kernel's launch variants (triton_paged.DecodeConfig) against the torch reference, and the tuned-config
table: the interpreter on CPU (fp32 q, fp32 or fp8 caches), bf16 / fp8 caches and CUDA-graph replay on CUDA."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers.attention import triton_paged  # noqa: E402
from shardllm.layers.attention.triton_paged import DecodeConfig, decode_config  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu, make_case, reference, run_decode  # noqa: E402

# One config per family the sweep tries (benchmarks/attention_sweep.py), each with another GQA shape
# (num_kv_heads, group, head_dim): group 1, 3 (padded to 4, or 16 for tl.dot), 4 and 8.
FAMILIES = [
    (DecodeConfig(), (2, 4, 64)),
    (DecodeConfig(block_n=16, num_warps=2, num_stages=2), (1, 8, 32)),
    (DecodeConfig(block_n=128, num_warps=8), (2, 1, 64)),
    (DecodeConfig(prefetch_pages=True, early_v=True), (1, 3, 32)),
    (DecodeConfig(k_rowmajor=True, prefetch_pages=True, block_n=32), (2, 4, 32)),
    (DecodeConfig(use_dot=False, block_n=16), (1, 4, 64)),
    (DecodeConfig(use_dot=False, block_n=8, prefetch_pages=True), (2, 1, 32)),
    (DecodeConfig(use_dot=False, block_n=32, num_splits=2, early_v=True), (1, 3, 32)),
]
FAMILY_IDS = ["current", "bn16", "bn128", "prefetch-earlyv", "krow-prefetch", "nodot", "nodot-bn8-prefetch",
              "nodot-split2-earlyv"]
SEQ_LENS = [0, 1, 17, 70, 0]  # padding rows (seq_len 0) give zeros; 70 spans pages and several tiles


@pytest.fixture
def set_table():
    """set_decode_configs for one test; the table (empty in the repo until tuned) comes back afterwards."""
    saved = dict(triton_paged.DECODE_CONFIGS)
    yield triton_paged.set_decode_configs
    triton_paged.DECODE_CONFIGS.clear()
    triton_paged.DECODE_CONFIGS.update(saved)
    triton_paged._config_cache.clear()


def check_decode(out: torch.Tensor, q, kc, vc, meta, atol: float, rtol: float) -> None:
    """Rows with context equal the reference (on the cache's values read back); padding rows are zeros."""
    live = meta.seq_lens.cpu() > 0
    torch.testing.assert_close(out.float()[live], reference(q, kc, vc, meta)[live], atol=atol, rtol=rtol)
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))


@cpu
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn], ids=["fp32", "fp8_e4m3"])
@pytest.mark.parametrize("family", range(len(FAMILIES)), ids=FAMILY_IDS)
def test_config_families_equal_the_reference(family, cache_dtype):
    cfg, heads = FAMILIES[family]
    q, kc, vc, meta = make_case([1] * len(SEQ_LENS), SEQ_LENS, *heads, seed=family)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    splits = [None] if cfg.num_splits else [1, 4]  # 4: tiles of 16 or 32 tokens leave 2-3 partitions busy at 70
    for num_splits in splits:
        out = run_decode(q, kc, vc, meta, num_splits=num_splits, config=cfg)
        check_decode(out, q, kc, vc, meta, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [dict(block_n=48), dict(block_n=8), dict(num_warps=3), dict(num_stages=0),
                                 dict(num_splits=3), dict(num_splits=64)])
def test_invalid_configs_raise_a_value_error_naming_the_field(bad):
    with pytest.raises(ValueError, match=f"DecodeConfig.{next(iter(bad))}="):
        DecodeConfig(**bad).validate()


def test_table_lookup_by_dtype_head_dim_and_batch_bucket(monkeypatch, set_table):
    set_table({})
    assert decode_config(512, 128, torch.bfloat16) == DecodeConfig()  # no entries: the original launch
    set_table({"bf16/128/1": {"num_splits": 16}, "bf16/128/64": {}, "bf16/128/512": {"block_n": 128, "num_warps": 8},
               "fp8_e4m3/128/512": {"use_dot": False, "block_n": 16}})
    assert decode_config(1, 128, torch.bfloat16) == DecodeConfig(num_splits=16)
    assert decode_config(2, 128, torch.bfloat16) == DecodeConfig()  # bucket 64
    assert decode_config(65, 128, torch.bfloat16) == DecodeConfig(block_n=128, num_warps=8)
    assert decode_config(4096, 128, torch.bfloat16) == DecodeConfig(block_n=128, num_warps=8)  # past the largest
    assert decode_config(8, 128, torch.float8_e4m3fn) == DecodeConfig(use_dot=False, block_n=16)
    assert decode_config(512, 64, torch.bfloat16) == DecodeConfig()  # another head_dim
    assert decode_config(512, 128, torch.float8_e5m2) == DecodeConfig()  # another dtype
    monkeypatch.setenv("SHARDLLM_DECODE_ATTN_TUNED", "0")
    assert decode_config(512, 128, torch.bfloat16) == DecodeConfig()


def test_entries_for_a_block_size_take_precedence_over_the_16_token_ones(set_table):
    """'dtype/head_dim/bucket/B' entries serve caches of B-token pages (a sweep at that page size); a page size
    without entries takes the 16-token entries (TMA ones without page_chunk past 16 tokens, as measured)."""
    fp8 = torch.float8_e4m3fn
    tma16 = {"tma": True, "num_warps": 2, "num_stages": 6, "page_chunk": 32}
    set_table({"fp8_e4m3/128/512": tma16, "fp8_e4m3/128/64": {"block_n": 32},
               "fp8_e4m3/128/64/64": {"num_warps": 8}, "fp8_e4m3/128/512/64": {"tma": True, "num_warps": 4}})
    assert decode_config(300, 128, fp8) == DecodeConfig(**tma16)
    assert decode_config(300, 128, fp8, 64) == DecodeConfig(tma=True, num_warps=4)
    assert decode_config(8, 128, fp8, 64) == DecodeConfig(num_warps=8)
    assert decode_config(4096, 128, fp8, 64) == DecodeConfig(tma=True, num_warps=4)  # past the largest bucket
    assert decode_config(300, 128, fp8, 32) == DecodeConfig(tma=True, num_warps=2, num_stages=4)  # no 32 entries
    assert decode_config(8, 128, fp8, 32) == DecodeConfig(block_n=32)
    assert decode_config(300, 128, torch.bfloat16, 64) == DecodeConfig()  # no bf16 entries at all
    for bad in ("fp8_e4m3/128/512/x", "fp8_e4m3/128/512/64/1", "fp8_e4m3/128", "fp8_e4m3/128/512/0",
                "fp8_e4m3/128/512/16"):  # 16-token pages have the three-part key
        with pytest.raises(ValueError, match="decode configs: key"):
            set_table({bad: {}})
    # a partial table for a page size serves only its buckets: the others keep the 16-token entries (adapted)
    set_table({"fp8_e4m3/128/1": {"block_n": 32}, "fp8_e4m3/128/512": tma16, "fp8_e4m3/128/512/32": {"num_warps": 8}})
    assert decode_config(1, 128, fp8, 32) == DecodeConfig(block_n=32)
    assert decode_config(2, 128, fp8, 32) == decode_config(4096, 128, fp8, 32) == DecodeConfig(num_warps=8)
    set_table({"fp8_e4m3/128/1": {"block_n": 32}, "fp8_e4m3/128/64/64": {"num_warps": 8}})
    assert decode_config(300, 128, fp8, 64) == DecodeConfig(num_warps=8)  # past the 16-token buckets: its largest
    assert decode_config(300, 128, fp8) == DecodeConfig(block_n=32)


@cpu
def test_launch_without_config_uses_the_table_entry(monkeypatch, set_table):
    q, kc, vc, meta = make_case([1, 1], [5, 20], 1, 4, 32)
    with pytest.raises(ValueError, match="block_n=24"):
        set_table({"fp32/32/2": {"block_n": 24}})
    triton_paged.DECODE_CONFIGS["fp32/32/2"] = {"block_n": 24}  # bypassing the check, so that the launch sees it
    triton_paged._config_cache.clear()
    with pytest.raises(ValueError, match="block_n=24"):  # the entry (invalid on purpose) reached the launcher
        run_decode(q, kc, vc, meta)
    monkeypatch.setenv("SHARDLLM_DECODE_ATTN_TUNED", "0")
    torch.testing.assert_close(run_decode(q, kc, vc, meta), reference(q, kc, vc, meta), atol=2e-5, rtol=1e-4)


# ---- CUDA --------------------------------------------------------------------------------------------------------

GPU_CONFIGS = [DecodeConfig(), DecodeConfig(block_n=128, num_warps=8, prefetch_pages=True, k_rowmajor=True),
               DecodeConfig(early_v=True, prefetch_pages=True, k_rowmajor=True),
               DecodeConfig(use_dot=False, block_n=16, num_warps=2, prefetch_pages=True)]


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8_e4m3"])
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=["current", "bn128-krow-prefetch", "earlyv-krow-prefetch",
                                                 "nodot-bn16"])
def test_gpu_configs_equal_the_reference_and_replay_in_a_graph(cfg, cache_dtype):
    seq_lens = [0, 1, 16, 17, 170, 1000, 4097, 0]
    q, kc, vc, meta = make_case([1] * len(seq_lens), seq_lens, 8, 4, 128, torch.bfloat16, "cuda", seed=5)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    # default_num_splits: 8 on an H200 (132 SMs), so partitions and their reduce; one partition is what
    # benchmarks/attention_sweep.py checks against the current launch at batch >= 64
    check_decode(run_decode(q, kc, vc, meta, config=cfg), q, kc, vc, meta, atol=2e-2, rtol=2e-2)
    lens = meta.seq_lens.clone()
    graph_out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # compiled by the eager call above
        triton_paged.paged_decode_attention(q, kc, vc, meta.block_tables, lens, 128**-0.5, out=graph_out, config=cfg)
    new = [0, 1, 9, 17, 100, 999, 2000, 0]  # no longer than before, so that the tables cover them
    lens.copy_(torch.tensor(new, dtype=torch.int32))
    graph.replay()
    meta = dataclasses.replace(meta, seq_lens=lens.clone(), max_seq_len=max(new), _ref={})
    check_decode(graph_out, q, kc, vc, meta, atol=2e-2, rtol=2e-2)


@cpu
def test_sweep_smoke_checks_times_and_tables_each_case(monkeypatch, tmp_path, capsys, set_table):
    """benchmarks/attention_sweep.py --smoke at a shrunken head shape: every row checked and timed, a table entry
    per (dtype, batch) that decode_config reads back."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import attention_sweep

    monkeypatch.setattr(attention_sweep, "NH", 4)
    monkeypatch.setattr(attention_sweep, "NKV", 1)
    monkeypatch.setattr(attention_sweep, "D", 32)
    monkeypatch.setattr(attention_sweep, "split_variants", lambda batch, device: [1])  # beside the default 4
    rows = tmp_path / "rows.jsonl"
    table = attention_sweep.main(["--smoke", "--out", str(rows)])
    assert set(table) == {"bf16/32/3", "fp8_e4m3/32/3"}
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert len(lines) == 6 and all(r["max_abs_diff"] <= 2e-2 and r["us"] > 0 for r in lines)
    assert {json.dumps(r["config"], sort_keys=True) for r in lines} == {"{}", '{"num_splits": 1}',
                                                                         '{"block_n": 128, "num_warps": 8}'}
    printed = capsys.readouterr().out
    assert printed.count("current") == 2 and "DECODE_CONFIGS = " in printed
    set_table(table)  # the printed table pastes as it is
    assert decode_config(3, 32, torch.bfloat16) == DecodeConfig(**table["bf16/32/3"])


@cpu
def test_sweep_at_larger_pages_gives_one_entry_per_bucket_keyed_by_page_size(monkeypatch, tmp_path, set_table):
    """--block_size 32 with two cases of one bucket: rows on 32-token pages, one entry a (dtype, bucket) under
    'dtype/head_dim/bucket/32', which decode_config serves to 32-token caches only."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import attention_sweep

    for name, value in (("NH", 4), ("NKV", 1), ("D", 32)):
        monkeypatch.setattr(attention_sweep, name, value)
    for cfg in attention_sweep.LARGE_PAGE_GRID:  # the grid run at these page sizes on a GPU: every entry valid
        cfg.validate()
    monkeypatch.setattr(attention_sweep, "split_variants", lambda batch, device: [])
    rows = tmp_path / "rows.jsonl"
    table = attention_sweep.main(["--smoke", "--block_size", "32", "--cases", "3x40", "3x70", "--dtypes", "bf16",
                                  "--out", str(rows)])
    assert set(table) == {"bf16/32/3/32"}
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert len(lines) == 4 and {r["ctx"] for r in lines} == {40, 70} and all("us" in r for r in lines)
    set_table(table)
    assert decode_config(3, 32, torch.bfloat16, 32) == DecodeConfig(**table["bf16/32/3/32"])
    assert decode_config(3, 32, torch.bfloat16) == DecodeConfig()  # 16-token pages: no entry


@cpu
def test_sweep_of_the_transposed_v_layout(monkeypatch, tmp_path, set_table):
    """--v_transposed: caches stored (num_blocks, nkv, D, block_size), the engine's current launch for that layout
    first (vt_current: the table's entry if one-page TMA tiles read it, else VT_DEFAULT), then VT_GRID; every row
    checked against the current launch, and the entry a TMA one the layout can take."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import attention_sweep

    from shardllm.layers.attention import triton_paged

    for name, value in (("NH", 4), ("NKV", 1), ("D", 32)):
        monkeypatch.setattr(attention_sweep, name, value)
    for cfg in attention_sweep.VT_GRID:
        cfg.validate()
        assert triton_paged._vt_launch(cfg, 64)
    monkeypatch.setattr(attention_sweep, "split_variants", lambda batch, device: [1])
    set_table({})  # no entry: the current launch is VT_DEFAULT (a pointer entry would be replaced by it too)
    assert attention_sweep.vt_current(3, torch.float8_e4m3fn, 64) == triton_paged.VT_DEFAULT
    rows = tmp_path / "rows.jsonl"
    table = attention_sweep.main(["--smoke", "--v_transposed", "--block_size", "64", "--cases", "3x100", "--dtypes",
                                  "fp8_e4m3", "--out", str(rows), "--min_gain", "-1"])  # any config beats current
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert len(lines) == 3 and all("us" in r and r["max_abs_diff"] <= 2e-2 for r in lines)
    assert lines[0]["config"] == attention_sweep.changed_fields(triton_paged.VT_DEFAULT)
    assert lines[1]["config"]["num_splits"] == 1 and lines[1]["config"]["tma"]
    entry = DecodeConfig(**table["fp8_e4m3/32/3/64"])
    assert entry.tma and triton_paged._vt_launch(entry, 64)


def test_sweep_choice_across_cases_of_one_bucket():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "attention_sweep", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "attention_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    a, b = '{"tma": true}', '{"num_warps": 8}'
    # a: best in the first case, 30% behind in the second; b: 5% behind, then best: b leads on the mean ratio
    cases = [{"{}": 100.0, a: 50.0, b: 52.5}, {"{}": 100.0, a: 65.0, b: 50.0, '{"block_n": 32}': 10.0}]
    assert sweep.choose(cases, 0.03) == DecodeConfig(num_warps=8)  # block_n 32 was not timed in every case
    assert sweep.choose([{"{}": 100.0, a: 98.0}], 0.03) == DecodeConfig()  # under min_gain: the current launch
    assert sweep.choose([{"{}": 100.0}, {a: 1.0}], 0.03) == DecodeConfig()  # nothing timed in both


def test_env_table_replaces_its_keys_and_refuses_bad_json(monkeypatch, set_table):
    from shardllm.layers.attention import decode_configs

    before = dict(decode_configs.DECODE_CONFIGS)
    monkeypatch.setenv("SHARDLLM_DECODE_CONFIGS", '{"bf16/128/4096": {"tma": true, "num_warps": 2}}')
    decode_configs._env_table()
    assert decode_configs.decode_config(3000, 128, torch.bfloat16) == DecodeConfig(tma=True, num_warps=2)
    assert {k: v for k, v in decode_configs.DECODE_CONFIGS.items() if k != "bf16/128/4096"} == before
    monkeypatch.setenv("SHARDLLM_DECODE_CONFIGS", "{bf16: 1}")
    with pytest.raises(ValueError, match="SHARDLLM_DECODE_CONFIGS is not JSON"):
        decode_configs._env_table()
    monkeypatch.setenv("SHARDLLM_DECODE_CONFIGS", '{"bf16/128/8": {"block_n": 3}}')
    with pytest.raises(ValueError, match="block_n=3"):
        decode_configs._env_table()
    monkeypatch.setenv("SHARDLLM_DECODE_CONFIGS", '[["bf16/128/8", {}]]')  # JSON, not a table
    with pytest.raises(ValueError, match="expected a table"):
        decode_configs._env_table()


@pytest.mark.parametrize("table, words", [
    ({"bf16/128/x": {}}, "batch bucket"),  # would have failed at the first decode lookup, not when set
    ({"bf16/128": {"block_n": 32}}, "dtype/head_dim/bucket"),
    ({"int8/128/1": {}}, "cache dtype"),
    ({"bf16/128/1": {"blockn": 32}}, "blockn"),
    ({"bf16/128/1": [32]}, "field"),
])
def test_a_malformed_table_is_refused_when_set(set_table, table, words):
    with pytest.raises(ValueError, match=words):
        set_table(table)
    with pytest.raises(ValueError):
        set_table([("bf16/128/1", {})])  # not a JSON object
