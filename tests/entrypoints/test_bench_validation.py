"""`shardllm bench` checks its input before any layout runs: a --plot path that cannot be written (the whole
benchmark ran, then FileNotFoundError), lengths the context cannot hold, a negative --batch_size."""

from __future__ import annotations

import pytest

from tests.helpers import cli_usage_error as usage_error

BASE = ["bench", "--device", "cpu", "--num_requests", "1", "--input_len", "4", "--output_len", "2"]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Any benchmark run fails the test: the error must come first."""
    from shardllm.bench import sweep, throughput

    def ran(*a, **kw):
        raise AssertionError("the benchmark ran before the bad input was refused")

    monkeypatch.setattr(sweep, "run_sweep", ran)
    monkeypatch.setattr(throughput, "run", ran)


@pytest.mark.parametrize("plot, message", [
    ("/nonexistent/dir/x.png", "--plot /nonexistent/dir/x.png: the directory /nonexistent/dir does not exist"),
    ("{tmp}", "--plot {tmp} is a directory: give a file name"),
    ("{tmp}/x.foo", "--plot {tmp}/x.foo: matplotlib does not write .foo files: use .png, .pdf or .svg"),
])
def test_an_unwritable_plot_path_is_refused_before_the_benchmark_runs(plot, message, tmp_path, nothing_runs,
                                                                      capsys):
    pytest.importorskip("matplotlib")
    plot, message = plot.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert message in usage_error([*BASE, "--plot", plot], capsys)
    assert message in usage_error([*BASE, "--sweep", "tp=1", "--plot", plot], capsys)


def test_a_read_only_plot_directory_is_refused(tmp_path, nothing_runs, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    line = usage_error([*BASE, "--plot", str(tmp_path / "x.png")], capsys)  # (root may write anywhere: mocked)
    assert "not writable (permission denied)" in line


def test_the_plot_script_checks_its_output_path_first(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from shardllm.bench import plot

    rows = tmp_path / "rows.json"
    rows.write_text('{"rows": []}\n')
    with pytest.raises(SystemExit) as e:
        plot.main([str(rows), "-o", "/nonexistent/dir/x.png"])
    assert e.value.code == 2 and "-o /nonexistent/dir/x.png: the directory /nonexistent/dir does not exist" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=-1"], "--batch_size must be at least 1 (or 0: no cap), got -1"),
    (["--max_seq_len", "5"], "--input_len + --output_len = 6 tokens exceed --max_seq_len 5"),
    (["--cpu_kv_cache_gb", "inf"], "argument --cpu_kv_cache_gb/--cpu-kv-cache-gb: expected a finite number"),
    (["--kv_cache_free_gpu_memory_fraction", "nan"], "argument --kv_cache_free_gpu_memory_fraction"),
    (["--layout_timeout", "0"], "argument --layout_timeout/--layout-timeout: must be a number > 0, got 0"),
])
def test_bench_flags_are_checked_before_anything_runs(flags, message, nothing_runs, capsys):
    assert message in usage_error([*BASE, *flags], capsys)
