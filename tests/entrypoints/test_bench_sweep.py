"""`shardllm bench --sweep`: one row per layout (each in its own engine), efficiency from the rows' own figures,
an out-of-memory layout as an OOM row without ending the sweep, the plot as a PNG, clear errors for bad input."""

import json
import struct

import pytest

from shardllm.bench.plot import plot_scaling, scaling_series
from shardllm.bench.sweep import add_efficiency, format_table, parse_sweep
from shardllm.entrypoints import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The tiny Llama (2 layers, 2 kv heads of 16, fp32) needs 8 KiB of KV per 16-token block on one rank and 4 KiB
# at tp = 2 or pp = 2. 16,428 bytes per rank: 2 blocks at tp = 1 (16 tokens, short of max_seq_len = 5 + 7 + 8),
# 4 blocks at tp = 2 and at pp = 2 (48 tokens): tp = 1 does not fit, as in the guide's "1 GPU: OOM" rows.
KV_GB_TP1_OOM = str(16428 / 2**30)


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def test_sweep_tp_pp_with_an_oom_layout(tiny_checkpoints, tmp_path, capsys):
    png = tmp_path / "scaling.png"
    rc = cli.main(["bench", "--model", tiny_checkpoints["llama"], "--device", "cpu", "--dtype", "float32",
                   "--num_requests", "6", "--input_len", "5", "--output_len", "7", "--cpu_kv_cache_gb",
                   KV_GB_TP1_OOM, "--sweep", "tp=1,2", "--sweep", "pp=2", "--plot", str(png), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    rows = json.loads(captured.out.strip().splitlines()[-1])["rows"]
    assert [(r["tp"], r["pp"], r["ep"], r["gpus"]) for r in rows] == [(1, 1, 1, 1), (2, 1, 1, 2), (1, 2, 1, 2)]
    oom, tp2, pp2 = rows
    # the layout that does not fit says so and the sweep went on
    assert oom["status"] == "OOM" and "KV cache holds 16 tokens" in oom["error"], oom
    assert oom["efficiency"] is None and "output_tok_s" not in oom
    for r in (tp2, pp2):
        assert r["status"] == "ok" and r["output_tokens"] == 6 * 7 and r["dtype"] == "float32"
        assert r["output_tok_s_per_gpu"] == pytest.approx(r["output_tok_s"] / 2, abs=0.06)
        assert r["tpot_ms_p50"] > 0 and r["ttft_ms_p50"] > 0 and r["base_layout"] == "tp=2"
    # efficiency against the fewest GPUs that fit (tp=2, first of the two-GPU rows), from the rows' own figures
    assert tp2["efficiency"] == 1.0 and tp2["speedup"] == 1.0
    assert pp2["efficiency"] == pytest.approx(pp2["output_tok_s_per_gpu"] / tp2["output_tok_s_per_gpu"], abs=1e-3)
    assert pp2["speedup"] == pytest.approx(pp2["output_tok_s"] / tp2["output_tok_s"], abs=1e-3)
    assert tp2["kv_blocks"] == 4 and pp2["kv_blocks"] == 4  # the budget the OOM row was measured against
    width, height = png_size(png)
    assert width > 400 and height > 200
    table = format_table(rows).splitlines()
    assert table[1].split()[:7] == ["llama", "float32", "1", "1", "1", "1", "OOM"] and table[1].split()[7:] == ["-"] * 4
    assert table[2].split()[-1] == "100%" and table[3].split()[-1] == f"{pp2['efficiency']:.0%}"


def test_a_layout_past_its_timeout_is_stopped_and_reported(tiny_checkpoints, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "none.png"
    rc = cli.main(["bench", "--model", tiny_checkpoints["llama"], "--device", "cpu", "--input_len", "5",
                   "--output_len", "7", "--sweep", "tp=2", "--layout_timeout", "0.5", "--json", "--plot", str(png)])
    out = capsys.readouterr()
    [row] = json.loads(out.out.strip().splitlines()[-1])["rows"]
    assert rc == 1 and row["status"] == "timeout" and "--layout_timeout" in row["error"] and row["efficiency"] is None
    assert not png.exists() and "not written: no layout ran" in out.err  # no plot of nothing


def test_sweep_bad_input_is_a_clear_error(tiny_checkpoints, capsys):
    base = ["bench", "--model", tiny_checkpoints["llama"], "--device", "cpu", "--input_len", "5", "--output_len", "7"]
    cases = [(["--sweep", "tq=1,2"], "unknown key 'tq'; use tp, pp, ep or dtype"),
             (["--sweep", "tp=0"], "tp must be an integer >= 1, got '0'"),
             (["--sweep", "tp=1,3"], "layout tp=3 dtype=auto: tensor_parallel_size=3 does not divide the model's 4 "
                                     "attention heads"),
             (["--sweep", "pp=3"], "pipeline_parallel_size=3 exceeds the model's 2 layers"),
             (["--sweep", "tp=2,ep=2"], "expert_parallel_size=2 applies to mixture-of-experts models only")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main([*base, *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, (args, err)
        assert "[sweep" not in err  # checked before any layout ran


def test_parse_sweep():
    assert parse_sweep(["tp=1,2,4"]) == [{"tp_size": 1}, {"tp_size": 2}, {"tp_size": 4}]
    assert parse_sweep(["tp=4,pp=2"]) == [{"tp_size": 4, "pp_size": 2}]
    assert parse_sweep(["tp=1,2", "tp=2", "pp=2"]) == [{"tp_size": 1}, {"tp_size": 2}, {"pp_size": 2}]
    assert parse_sweep(["tp=1,2, dtype=bf16,fp8"]) == [
        {"tp_size": 1, "dtype": "bf16"}, {"tp_size": 1, "dtype": "fp8"},
        {"tp_size": 2, "dtype": "bf16"}, {"tp_size": 2, "dtype": "fp8"}]
    assert parse_sweep(["tp_size=2,ep=2"]) == [{"tp_size": 2, "ep_size": 2}]
    for bad, message in [("1,2", "expected KEY=VALUE first"), ("tp=", "empty value"), ("tp=1,,2", "empty value"),
                         ("tp=x", "integer >= 1"), ("tp=1,tp=2", "tp is given twice"), ("gpus=2", "unknown key")]:
        with pytest.raises(ValueError, match=message):
            parse_sweep([bad])


def _row(model, dtype, tp, pp, tok_s, status="ok"):
    r = {"model": model, "dtype": dtype, "tp": tp, "pp": pp, "ep": 1, "gpus": tp * pp, "status": status,
         "layout": f"tp={tp} pp={pp}"}
    if status == "ok":
        r.update(output_tok_s=tok_s, output_tok_s_per_gpu=round(tok_s / (tp * pp), 1))
    return r


def test_efficiency_against_the_smallest_layout_that_fits_per_model_and_dtype():
    rows = add_efficiency([_row("m", "bf16", 1, 1, 1000.0), _row("m", "bf16", 2, 1, 1800.0),
                           _row("m", "bf16", 1, 2, 1500.0), _row("m", "fp8", 1, 1, None, "OOM"),
                           _row("m", "fp8", 4, 1, 5000.0), _row("m", "fp8", 2, 1, 3000.0)])
    assert [r["efficiency"] for r in rows] == [1.0, 0.9, 0.75, None, 0.833, 1.0]
    assert [r["speedup"] for r in rows] == [1.0, 1.8, 1.5, None, 1.667, 1.0]
    assert [r["base_layout"] for r in rows] == ["tp=1 pp=1"] * 3 + [None, "tp=2 pp=1", "tp=2 pp=1"]


def test_plot_series_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = add_efficiency([_row("/x/llama", "bf16", 1, 1, 1000.0), _row("/x/llama", "bf16", 2, 1, 1800.0),
                           _row("/x/llama", "bf16", 4, 1, 3000.0), _row("/x/llama", "bf16", 1, 2, 1500.0),
                           _row("/x/llama", "fp8", 1, 1, None, "OOM"), _row("/x/llama", "fp8", 2, 1, 3000.0)])
    drawn = plot_scaling(rows, str(tmp_path / "p.png"))
    assert drawn["series"] == scaling_series(rows)
    s = drawn["series"]
    assert sorted(s) == ["llama bf16 pp", "llama bf16 tp", "llama fp8 tp"]
    assert s["llama bf16 tp"]["gpus"] == [1, 2, 4] and s["llama bf16 tp"]["output_tok_s"] == [1000.0, 1800.0, 3000.0]
    assert s["llama bf16 tp"]["efficiency"] == [1.0, 0.9, 0.75]
    assert s["llama bf16 pp"]["gpus"] == [1, 2] and s["llama bf16 pp"]["efficiency"] == [1.0, 0.75]
    assert s["llama fp8 tp"]["gpus"] == [2] and drawn["failed"] == [("tp=1 pp=1 fp8", 1, "OOM")]
    assert png_size(tmp_path / "p.png")[0] > 400
