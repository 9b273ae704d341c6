"""`shardllm deploy kubernetes` refuses what would fail in the cluster, naming the flag and the fix: a startup
timeout under one probe period, Kubernetes names and sizes the API server refuses, a --max_seq_len or --pp_partition
serve refuses, non-finite floats, and a shipped config's name without --load_format dummy (as `shardllm serve` does,
with its message). Valid values still render manifests that validate."""

from __future__ import annotations

import socket

import pytest
import yaml

from shardllm.entrypoints import cli
from shardllm.entrypoints.deploy import main, render_yaml
from tests.deploy.validate import manifest_errors

L70 = ["llama-3-70b", "--load_format", "dummy", "--tp_size", "4"]


def deploy_error(argv: list[str], capsys) -> str:
    """`shardllm deploy kubernetes ARGV`'s one error line (exit status 1)."""
    rc = main(["kubernetes", *argv])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("shardllm deploy: error: ")
    return line


@pytest.mark.parametrize("flags, message", [
    (["--startup_timeout", "0"], "--startup_timeout must be at least 10 s (the startup probe's period), got 0"),
    (["--startup_timeout", "-1"], "--startup_timeout must be at least 10 s"),
    (["--startup_timeout", "9"], "--startup_timeout must be at least 10 s"),
    (["--namespace", "UPPER"], "--namespace 'UPPER' must be a Kubernetes namespace name"),
    (["--namespace", "a_b"], "--namespace 'a_b' must be a Kubernetes namespace name"),
    (["--namespace", "x" * 64], "must be a Kubernetes namespace name: at most 63"),
    (["--hf_token_secret", ":"], "--hf_token_secret ':': '' is not a Secret name"),
    (["--hf_token_secret", ":token"], "--hf_token_secret ':token': '' is not a Secret name"),
    (["--api_key_secret", "Keys:serve"], "--api_key_secret 'Keys:serve': 'Keys' is not a Secret name"),
    (["--api_key_secret", "keys:a:b"], "--api_key_secret 'keys:a:b': 'a:b' is not a key of a Secret"),
    (["--ray_token_secret", "ray token"], "--ray_token_secret 'ray token': 'ray token' is not a Secret name"),
    (["--cache_pvc", "Models"], "--cache_pvc 'Models' must be the name of a PersistentVolumeClaim"),
    (["--cache_size", "abc"], "--cache_size 'abc' must be a Kubernetes quantity above 0"),
    (["--cache_size", "100GB"], "--cache_size '100GB' must be a Kubernetes quantity"),
    (["--cache_size", "0Gi"], "--cache_size '0Gi' must be a Kubernetes quantity above 0"),
    (["--shm_size=-1Gi"], "--shm_size '-1Gi' must be a Kubernetes quantity"),
    (["--pp_size", "2", "--pp_partition", "1,1"],
     "pp_partition=[1, 1] must give 2 stages (pp_size) of at least 1 layer each, summing to the model's 80 layers"),
    (["--pp_size", "2", "--pp_partition", "80"], "pp_partition=[80] must give 2 stages"),
    (["--pp_size", "81"], "pipeline_parallel_size=81 exceeds the model's 80 layers"),
    (["--max_seq_len", "100000"], "max_seq_len=100000 exceeds the model's context of 8192 tokens"),
    # a Deployment the API server takes, but whose pods are refused (no image) or never pulled
    (["--image", ""], "--image '' must be an image reference without spaces"),
    (["--image", "shardllm :0.1.0"], "--image 'shardllm :0.1.0' must be an image reference without spaces"),
    (["--image", " shardllm:0.1.0"], "must be an image reference without spaces"),
])
def test_values_that_would_fail_in_the_cluster_are_refused(flags, message, capsys):
    assert message in deploy_error([*L70, *flags], capsys)


def test_a_partition_of_a_model_not_on_this_machine_is_checked_for_its_stages(capsys):
    line = deploy_error(["some-org/some-model", "--pp_size", "2", "--pp_partition", "40,0"], capsys)
    assert "pp_partition=[40, 0] must give 2 stages (pp_size) of at least 1 layer each" in line
    assert main(["kubernetes", "some-org/some-model", "--pp_size", "2", "--pp_partition", "40,40"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--max_seq_len", "0"], "argument --max_seq_len/--max-seq-len/--max-model-len: must be an integer >= 2, got 0"),
    (["--cpu_kv_cache_gb", "inf"], "argument --cpu_kv_cache_gb/--cpu-kv-cache-gb: expected a finite number"),
    (["--cpu_kv_cache_gb", "nan"], "argument --cpu_kv_cache_gb/--cpu-kv-cache-gb: expected a finite number"),
    (["--kv_cache_free_gpu_memory_fraction", "0"], "must be in (0, 1], got 0"),
    (["--shutdown_timeout=-5"], "argument --shutdown_timeout/--shutdown-timeout: must be a number >= 0, got -5"),
    (["--pp_partition", "40,x"], "argument --pp_partition/--pp-partition: expected layer counts"),
    (["--gpu_memory_utilization", "0.9"], "--gpu_memory_utilization is vLLM's share of the whole GPU"),
])
def test_serve_flags_serves_parser_refuses_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["kubernetes", *L70, *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err


@pytest.mark.parametrize("text, message", [
    ("max_seq_len: 0\n", "max_seq_len must be an integer >= 2, got 0"),
    ("cpu_kv_cache_gb: .inf\n", "cpu_kv_cache_gb must be a finite number"),
    ("shutdown_timeout: -5\n", "shutdown_timeout must be a number of seconds >= 0, got -5"),
])
def test_config_file_values_are_refused_too(tmp_path, text, message, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert message in deploy_error([*L70, "--config", str(cfg)], capsys)


@pytest.mark.parametrize("model", ["llama-3-70b", "mixtral-8x7b"])
def test_a_shipped_config_name_without_dummy_is_refused_as_serve_refuses_it(model, capsys):
    """`shardllm serve llama-3-70b` is an unknown model (a shipped config is a model only with --load_format dummy):
    deploy exited 0 and rendered a pod that fails at start. Same rule, same message."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_rc = cli.main(["serve", model, "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"])
    serve_line = capsys.readouterr().err.strip().splitlines()[-1]
    line = deploy_error([model, "--tp_size", "2"], capsys)
    assert serve_rc == 1 and f"unknown model '{model}'" in serve_line
    assert line.split("error: ", 1)[1] == serve_line.split("error: ", 1)[1]
    assert main(["kubernetes", model, "--load_format", "dummy", "--tp_size", "2"]) == 0
    capsys.readouterr()


def test_a_bad_load_format_is_refused_with_serves_message(capsys):
    line = deploy_error(["some-org/some-model", "--load_format", "pickle"], capsys)
    assert "unknown load_format 'pickle': choose one of ['auto', 'safetensors', 'gguf', 'dummy']" in line


def test_repo_ids_and_pod_paths_are_left_to_the_pod(capsys):
    for model in ("meta-llama/Meta-Llama-3-70B-Instruct", "/models/llama-70b", "/models/m.gguf"):
        assert main(["kubernetes", model, "--tp_size", "4"]) == 0, capsys.readouterr().err
    capsys.readouterr()


def test_valid_kubernetes_values_render_manifests_that_validate():
    argv = ["kubernetes", *L70, "--namespace", "llm-prod", "--hf_token_secret", "hf:", "--api_key_secret",
            "serve.keys:api_key-1.v2", "--cache_size", "1.5Ti", "--shm_size", "32G", "--startup_timeout", "10",
            "--cache_pvc", "models.rwx", "--max_seq_len", "8192", "--pp_size", "1", "--pp_partition", "80"]
    docs = list(yaml.safe_load_all(render_yaml(argv)))
    assert [e for d in docs for e in manifest_errors(d)] == []
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["failureThreshold"] == 1
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}  # "hf:": the default key
    assert env["SHARDLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "serve.keys", "key": "api_key-1.v2"}
    for size in ("500Gi", "100G", "1e9", "512M", "0.5Ti"):
        assert main(["kubernetes", *L70, "--cache_size", size, "--shm_size", size]) == 0
