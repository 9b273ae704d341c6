"""The `shardllm` CLI: flag aliases, --config YAML under the flags, the API key from the environment,
errors that exit 1 with a message, and `generate` end to end on the default model."""

from __future__ import annotations

import sys

import pytest

from shardllm.entrypoints import cli


def settings(argv: list[str], server: bool = True):
    return cli.resolve_settings(cli.build_parser().parse_args(argv), server=server)


@pytest.mark.parametrize("flags", [["--tp_size", "2"], ["--tensor-parallel-size", "2"], ["-tp", "2"],
                                   ["--tp-size", "2"], ["--tensor_parallel_size", "2"]])
def test_tensor_parallel_aliases(flags):
    engine, _ = settings(["serve", *flags])
    assert engine == {"tensor_parallel_size": 2}


def test_engine_and_server_flags():
    engine, opts = settings(["serve", "some/model", "-pp", "2", "--ep_size", "2", "--max_batch_size", "8",
                             "--max_num_tokens", "512", "--max_seq_len", "1024", "--dtype", "bf16",
                             "--kv_cache_free_gpu_memory_fraction", "0.5", "--device", "cpu",
                             "--cpu_kv_cache_gb", "0.5", "--no-enable_prefix_caching", "--async_scheduling",
                             "--enforce_eager", "--host", "0.0.0.0",
                             "--port", "9001", "--served_model_name", "m", "--api_key", "k", "--log_level", "debug",
                             "--api-server-count", "3"])
    assert engine == {"model": "some/model", "pipeline_parallel_size": 2, "expert_parallel_size": 2,
                      "max_batch_size": 8, "max_num_tokens": 512, "max_seq_len": 1024, "dtype": "bf16",
                      "kv_cache_free_gpu_memory_fraction": 0.5, "device": "cpu", "cpu_kv_cache_gb": 0.5,
                      "enable_prefix_caching": False, "async_scheduling": True, "enforce_eager": True}
    assert settings(["serve", "--no-async_scheduling"])[0] == {"async_scheduling": False}
    assert opts == {"host": "0.0.0.0", "port": 9001, "served_model_name": "m", "api_key": "k",
                    "log_level": "debug", "shutdown_timeout": 30.0, "api_server_count": 3}


def test_defaults_without_flags(monkeypatch):
    monkeypatch.delenv("SHARDLLM_API_KEY", raising=False)
    engine, opts = settings(["serve"])
    assert engine == {}  # no model: the embedded default
    assert opts == {"host": "localhost", "port": 8000, "log_level": "info", "shutdown_timeout": 30.0,
                    "api_key": None}


def test_config_yaml_under_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: a/b\ntensor_parallel_size: 4\nmax_batch_size: 8\nport: 9000\npp_size: 2\n")
    engine, opts = settings(["serve", "--config", str(path), "--tp_size", "2", "--model", "c/d"])
    assert engine == {"model": "c/d", "tensor_parallel_size": 2, "max_batch_size": 8, "pipeline_parallel_size": 2}
    assert opts["port"] == 9000


def test_config_yaml_errors(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("tensor_paralel_size: 2\n")
    with pytest.raises(ValueError, match="tensor_paralel_size"):
        settings(["serve", "--config", str(bad_key)])
    not_map = tmp_path / "list.yaml"
    not_map.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        settings(["serve", "--config", str(not_map)])
    with pytest.raises(ValueError, match="cannot read"):
        settings(["serve", "--config", str(tmp_path / "missing.yaml")])


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("SHARDLLM_API_KEY", "from-env")
    assert settings(["serve"])[1]["api_key"] == "from-env"
    assert settings(["serve", "--api_key", "flag"])[1]["api_key"] == "flag"


def test_bad_settings_exit_1_with_message(tmp_path, capsys):
    assert cli.main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err
    assert cli.main(["serve", "--device", "cpu", "--tp_size", "0"]) == 1
    assert "tensor_parallel_size" in capsys.readouterr().err
    # a bad setting is named even where the port is taken (it is checked first: the port check says nothing of it)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert cli.main(["serve", "--device", "cpu", "--port", port, "--host", "127.0.0.1", "--tp_size", "0"]) == 1
        assert "tensor_parallel_size" in capsys.readouterr().err
        assert cli.main(["serve", "--device", "cpu", "--port", port, "--host", "127.0.0.1",
                         "--kv_cache_dtype", "int4"]) == 1
        assert "kv_cache_dtype" in capsys.readouterr().err
        assert cli.main(["serve", "--device", "cpu", "--port", port, "--host", "127.0.0.1"]) == 1
        assert "cannot listen on 127.0.0.1:" + port in capsys.readouterr().err


def test_serve_main_is_serve(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["shardllm-serve", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.serve_main()
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--tensor-parallel-size" in out and "--api_key" in out and "--config" in out


def test_generate_on_the_default_model(capsys):
    rc = cli.main(["generate", "--device", "cpu", "--cpu_kv_cache_gb", "0.05", "--max_seq_len", "256",
                   "-p", "The capital of France is", "--max_tokens", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("### The capital of France is\n") and len(out.splitlines()[1]) > 0


def test_serve_fails_before_loading_on_a_port_in_use_or_a_bad_host(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert cli.main(["serve", "--host", "256.1.1.1", "--port", str(port)]) == 1
    assert "--host 256.1.1.1: cannot resolve it" in capsys.readouterr().err


def test_generate_without_any_prompt_is_an_error(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    assert cli.main(["generate"]) == 1
    assert "no prompt" in capsys.readouterr().err
