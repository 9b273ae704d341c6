"""Bad input to `shardllm serve / generate / bench` is one error line naming the flag (argparse's usage error, exit
2, or `shardllm: error:`, exit 1), never a traceback: nan / inf and out-of-range floats, a negative
--shutdown_timeout, vLLM's --gpu_memory_utilization, bad --config values, and an engine that fails to start or to
run (a worker that does not answer: WorkerError)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from shardllm.entrypoints import cli
from shardllm.executor.multiproc import WorkerError
from tests.helpers import cli_usage_error as usage_error


@pytest.mark.parametrize("command", [["serve"], ["generate", "-p", "hi"], ["bench"]])
@pytest.mark.parametrize("flag", ["--cpu_kv_cache_gb", "--kv_cache_free_gpu_memory_fraction"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "abc"])
def test_engine_float_flags_refuse_nan_and_inf_naming_the_flag(command, flag, value, capsys):
    line = usage_error([*command, f"{flag}={value}"], capsys)  # (-inf as a separate word reads as a flag)
    assert f"argument {flag}" in line and repr(value) in line, line


@pytest.mark.parametrize("command, flag, value, message", [
    (["serve"], "--cpu_kv_cache_gb", "0", "must be a number > 0"),
    (["generate", "-p", "hi"], "--cpu_kv_cache_gb", "-1", "must be a number > 0"),
    (["serve"], "--kv_cache_free_gpu_memory_fraction", "0", "must be in (0, 1]"),
    (["bench"], "--kv_cache_free_gpu_memory_fraction", "1.5", "must be in (0, 1]"),
    (["serve"], "--shutdown_timeout", "-5", "must be a number >= 0"),
    (["serve"], "--shutdown_timeout", "inf", "expected a finite number"),
    (["serve"], "--timeout_keep_alive", "nan", "expected a finite number"),
    (["serve"], "--request_read_timeout", "inf", "expected a finite number"),
    (["serve"], "--max_seq_len", "0", "must be an integer >= 2"),
    (["serve"], "--pp_partition", "40,x", "expected layer counts separated by commas"),
    (["generate", "-p", "hi"], "--temperature", "nan", "expected a finite number"),
    (["generate", "-p", "hi"], "--temperature", "-1", "must be a number >= 0"),
    (["generate", "-p", "hi"], "--top_p", "0", "must be in (0, 1]"),
    (["bench"], "--layout_timeout", "inf", "expected a finite number"),
    (["bench"], "--max_seq_len", "0", "must be an integer >= 2"),
    (["bench", "serve"], "--request_timeout", "nan", "expected a finite number"),
    (["bench", "serve"], "--request_timeout", "0", "must be a number > 0"),
])
def test_out_of_range_flags_are_usage_errors_naming_the_flag(command, flag, value, message, capsys):
    line = usage_error([*command, flag, value], capsys)
    assert f"argument {flag}" in line and message in line, line


def test_zero_shutdown_timeout_is_still_accepted():
    args = cli.build_parser().parse_args(["serve", "--shutdown_timeout", "0"])
    assert cli.resolve_settings(args, server=True)[1]["shutdown_timeout"] == 0.0


@pytest.mark.parametrize("command", [["serve"], ["generate", "-p", "hi"], ["bench"]])
@pytest.mark.parametrize("flag", [["--gpu_memory_utilization", "0.5"], ["--gpu-memory-utilization", "0.9"],
                                  ["--gpu_memory_utilization"]])
def test_vllms_gpu_memory_utilization_gets_the_hint(command, flag, capsys):
    line = usage_error([*command, *flag], capsys)
    assert "--gpu_memory_utilization is vLLM's share of the whole GPU" in line
    assert "use --kv_cache_free_gpu_memory_fraction" in line and "unrecognized arguments" not in line


def test_vllms_gpu_memory_utilization_in_a_config_file_gets_the_hint(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gpu_memory_utilization: 0.9\n")
    assert cli.main(["serve", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shardllm: error: ") and "gpu_memory_utilization is vLLM's share" in err
    assert "use kv_cache_free_gpu_memory_fraction" in err


@pytest.mark.parametrize("text, message", [
    ("shutdown_timeout: -1\n", "shutdown_timeout must be a number of seconds >= 0, got -1"),
    ("shutdown_timeout: .nan\n", "shutdown_timeout must be a number of seconds >= 0"),
    ("timeout_keep_alive: .inf\n", "timeout_keep_alive must be a number of seconds > 0"),
    ("request_read_timeout: .nan\n", "request_read_timeout must be a number of seconds > 0"),
    ("max_seq_len: 0\n", "max_seq_len must be an integer >= 2, got 0"),
    ("max_seq_len: 1.5\n", "max_seq_len must be an integer >= 2, got 1.5"),
    ("cpu_kv_cache_gb: .inf\n", "cpu_kv_cache_gb must be a finite number"),
    ("cpu_kv_cache_gb: 0\n", "cpu_kv_cache_gb must be a finite number > 0"),
])
def test_config_file_values_are_checked_before_the_model_loads(tmp_path, text, message, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert cli.main(["serve", "--device", "cpu", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shardllm: error: ") and message in err and "Traceback" not in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_reports_an_engine_that_fails_to_start_in_one_line(monkeypatch, capsys):
    import shardllm

    def failing_llm(**kwargs):
        raise WorkerError("worker rank 0 did not answer within 1s (hung?)")

    monkeypatch.setattr(shardllm, "LLM", failing_llm)
    assert cli.main(["generate", "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("shardllm: error: the engine failed to start: WorkerError: worker rank 0 did not answer "
                           "within 1s (hung?) (--log_level debug logs the traceback)")


def test_generate_reports_a_worker_that_fails_mid_run_and_shuts_the_engine_down(monkeypatch, capsys, caplog):
    import shardllm

    shut = []

    class HangingLLM:
        def __init__(self, **kwargs):
            pass

        def generate(self, *a, **kw):
            raise WorkerError("worker rank 1 died (exit code -9)")

        def shutdown(self):
            shut.append(True)

    monkeypatch.setattr(shardllm, "LLM", HangingLLM)
    with caplog.at_level("DEBUG", logger="shardllm.entrypoints.cli"):
        assert cli.main(["generate", "-p", "hi", "--log_level", "debug"]) == 1
    err = capsys.readouterr().err
    assert "shardllm: error: generation failed: WorkerError: worker rank 1 died (exit code -9)" in err
    assert "Traceback" not in err and shut == [True]
    assert any(r.exc_info and r.exc_info[0] is WorkerError for r in caplog.records)  # the traceback, at debug level


def test_serve_reports_an_engine_that_fails_to_start_in_one_line(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    from shardllm.engine.async_llm import AsyncLLM
    from shardllm.engine.async_mp import ProcessAsyncLLM

    def fail(**kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(AsyncLLM, "from_kwargs", staticmethod(fail))
    monkeypatch.setattr(ProcessAsyncLLM, "from_kwargs", staticmethod(fail))  # SHARDLLM_ENGINE_PROCESS=1's
    assert cli.main(["serve", "--host", "127.0.0.1", "--port", str(_free_port()), "--log_level", "warning"]) == 1
    err = capsys.readouterr().err
    assert ("shardllm: error: the engine failed to start: RuntimeError: CUDA error: out of memory" in err
            and "Traceback" not in err), err


def test_bench_reports_an_engine_failure_in_one_line(monkeypatch, capsys):
    from shardllm.bench import throughput

    def fail(a):
        raise WorkerError("worker rank 0 did not answer within 60s (hung?)")

    monkeypatch.setattr(throughput, "run", fail)
    assert cli.main(["bench", "--num_requests", "1", "--input_len", "4", "--output_len", "2"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("shardllm: error: the benchmark failed: WorkerError: worker rank 0 did not answer within "
                           "60s (hung?)")


def _shardllm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardllm.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


GENERATE_TP3 = ["generate", "--prompt", "hi", "--tp_size", "3", "--device", "cpu", "--max_tokens", "2",
                "--cpu_kv_cache_gb", "0.05", "--max_seq_len", "128"]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_zero_or_negative_step_timeout_is_named_not_a_worker_traceback(value):
    """SHARDLLM_STEP_TIMEOUT=0 started the workers and failed with a WorkerError traceback ("did not answer within
    0s"): the variable is refused, by name, where the executor reads it."""
    proc = _shardllm(*GENERATE_TP3, env={"SHARDLLM_STEP_TIMEOUT": value})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"shardllm: error: SHARDLLM_STEP_TIMEOUT='{value}' is not a valid float (must be a number > 0 (inf: no "
            "limit))" in proc.stderr), proc.stderr[-3000:]


def test_a_worker_that_does_not_answer_is_one_error_line():
    """The tester's case with a timeout the parser takes but the workers cannot meet: a WorkerError from the
    executor is `shardllm: error: ...`, exit status 1, no traceback."""
    proc = _shardllm(*GENERATE_TP3, env={"SHARDLLM_STEP_TIMEOUT": "0.001"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "shardllm: error: the engine failed to start: WorkerError: worker rank" in last, proc.stderr[-3000:]
