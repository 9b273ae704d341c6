"""The `shardllm` command: `serve` (the OpenAI-compatible server) and `generate` (offline, one shot).

Engine flags map 1:1 onto the `LLM` arguments; `--config FILE.yaml` holds the same arguments by their
`LLM` names, and flags given on the command line override it. `shardllm-serve` is `shardllm serve`.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import signal
import sys
from typing import Any

from shardllm import envs
from shardllm.entrypoints.arg_types import (
    VLLM_HINTS,
    _layer_counts,
    _names,
    add_vllm_hints,
    finite_float,
    fraction,
    int_at_least,
    non_negative_float,
    positive_float,
    vllm_hint,
)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Operator limits of the server (run_server's keyword arguments), passed on when given.
LIMIT_KEYS = ("max_request_body_bytes", "max_seqs_per_request", "timeout_keep_alive", "request_read_timeout")
SERVER_KEYS = ("host", "port", "served_model_name", "api_key", "log_level", "shutdown_timeout", "api_key_file",
               "api_server_count", *LIMIT_KEYS)
# Commands with flags of their own, dispatched in main() before argparse; listed in `shardllm --help`.
OWN_FLAG_COMMANDS = {
    "bench": "offline throughput benchmark, layout sweeps, `bench serve` load generator (shardllm bench --help)",
    "plan": "which tp x pp x replicas to run on these GPUs, and why (shardllm plan --help)",
    "doctor": "check this host's GPU set-up and a running server's metrics (shardllm doctor --help)",
    "deploy": "print Kubernetes manifests that run `shardllm serve` (shardllm deploy --help)",
    "envs": "the SHARDLLM_* environment variables: default, current value, what each is for (shardllm envs --help)",
}
SERVER_DEFAULTS = {"host": "localhost", "port": 8000, "log_level": "info", "shutdown_timeout": 30.0}
# The deployment guide's short names, accepted in YAML too.
YAML_SYNONYMS = {"tp_size": "tensor_parallel_size", "pp_size": "pipeline_parallel_size",
                 "ep_size": "expert_parallel_size"}


def _int_or_auto(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {v!r}") from None


def _port(v: str) -> int:
    try:
        port = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {v!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 1..65535, got {port}")
    return port


def check_bind(host: str, port: int, reuse_port: bool = False, join: bool = False):
    """Bind (host, port) before the model loads, so that a bad address or a port in use fails in a second rather
    than after minutes of loading, and keep it: the server listens on this socket. (Binding and releasing left the
    port free while the engine started, and the engine's own ephemeral listeners, such as the rendezvous store,
    could take it.) `reuse_port`: SO_REUSEPORT, so that several API servers bind the same address (each process
    its own socket; the kernel spreads connections over them); the address must still be free, unless `join` (the
    other API servers joining the first). Returns the bound socket.socket; raises ValueError naming the fix."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    if reuse_port and not join:  # a port another server listens on, with SO_REUSEPORT or not, is refused
        check_bind(host, port).close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror}): give an address of this machine "
                         "(0.0.0.0 for all of them)") from None
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host, or "
                         "stop what uses the port") from None
    return sock


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                   help="checkpoint dir, .gguf file or Hugging Face repo id (default: the embedded model)")
    g = p.add_argument_group("engine (the LLM arguments)")

    def add(*names: str, **kw: Any) -> None:
        if "dest" in kw and f"--{kw['dest']}" not in names:
            names = (*names, f"--{kw['dest']}")  # the LLM argument's own name works too
        if kw.get("type") in (int, float):
            kw.setdefault("metavar", "N" if kw["type"] is int else "F")
        g.add_argument(*_names(*names), default=argparse.SUPPRESS, **kw)

    add("--model", dest="model", help="the model, as a flag (same as the positional MODEL)")
    add("--config", dest="config", metavar="FILE.yaml", help="YAML of LLM arguments; flags override it")
    add("--tp_size", "--tensor-parallel-size", "-tp", dest="tensor_parallel_size", type=_int_or_auto, metavar="N|auto",
        help="tensor parallel size (GPUs per pipeline stage); auto: the smallest that fits (`shardllm plan`)")
    add("--pp_size", "--pipeline-parallel-size", "-pp", dest="pipeline_parallel_size", type=int,
        help="pipeline parallel size (stages)")
    add("--ep_size", "--expert-parallel-size", "-ep", dest="expert_parallel_size", type=int,
        help="expert parallel size (MoE; divides tp_size)")
    add("--pp_partition", dest="pp_partition", type=_layer_counts, metavar="N,N,...",
        help="layers per pipeline stage, e.g. 40,40 (default: even split)")
    add("--max_batch_size", "--max-num-seqs", dest="max_batch_size", type=int,
        help="most sequences in a step (default: 1024 on a GPU of 70 GiB or more, not A100s; else 256)")
    add("--max_num_tokens", "--max-num-batched-tokens", dest="max_num_tokens", type=int,
        help="token budget of one step (default: serve 8192; generate 16384 on a GPU of 70 GiB or more, "
             "not A100s, else 8192)")
    add("--max_seq_len", "--max-model-len", dest="max_seq_len", type=int_at_least(2), metavar="N",
        help="longest prompt + output")
    add("--dtype", help="auto | bfloat16 (bf16) | float16 (fp16) | float32 | fp8 (FP8 linears, = --quantization fp8)")
    add("--quantization", dest="quantization", help="fp8: FP8 weights and activations for every linear but "
        "the LM head (FP8 checkpoints are detected without it)")
    add("--kv_cache_dtype", help="auto | fp8 | fp8_e4m3 | fp8_e5m2 (FP8: twice a bf16 cache's tokens per GiB)")
    add("--kv_cache_free_gpu_memory_fraction", type=fraction, metavar="F",
        help="share of free GPU memory for the KV cache, in (0, 1]")
    add("--cpu_kv_cache_gb", type=positive_float, metavar="F", help="KV cache size on CPU, in GiB")
    add("--device", choices=("auto", "cuda", "cpu"), help="where to run (auto: cuda when there is a GPU)")
    add("--load_format", help="auto | safetensors | gguf | dummy")
    add("--tokenizer", help="tokenizer path or repo id, when not the model's")
    add("--seed", type=int, help="base random seed")
    add("--block_size", type=int,
        help="tokens per KV cache block (default 16; 64 with an e4m3 FP8 KV cache on an sm90+ GPU)")
    add("--enable_prefix_caching", action=argparse.BooleanOptionalAction, help="reuse KV of shared prefixes")
    add("--enforce_eager", action="store_const", const=True, help="no CUDA graphs")
    add("--async_scheduling", action=argparse.BooleanOptionalAction,
        help="schedule step k+1 while step k runs (default: on without a pipeline, off with one)")
    add("--all_reduce", choices=("nccl", "symm_mem"),
        help="tensor-parallel all-reduce: nccl (default) or symm_mem (PyTorch's P2P kernels for small tensors)")
    add("--distributed_executor_backend", choices=("uni", "mp", "ray"),
        help="uni (one rank in-process), mp (a process per GPU on this host) or ray (actors on a Ray cluster)")
    add("--num_workers", type=int,
        help="nodes of the Ray cluster to spread tp_size x pp_size over (implies the ray backend)")
    add("--ray_address", help="the Ray cluster to attach to (default $RAY_ADDRESS, else a local one)")
    add("--trust_remote_code", action="store_const", const=True, help="allow model code from the hub")
    add("--log_level", choices=LOG_LEVELS, help="logging level (default info)")
    add_vllm_hints(g)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardllm", description="shardllm: serve one LLM across many GPUs.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,bench,deploy,plan,doctor,envs}")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server", allow_abbrev=False,
                           description="Run the OpenAI-compatible server (no MODEL: the embedded default).")
    _add_engine_args(serve)
    g = serve.add_argument_group("server")
    for names, kw in [(("--host",), dict(help="address to bind (default $SHARDLLM_HOST, else localhost)")),
                      (("--port",), dict(type=_port, help="port (default 8000)")),
                      (("--served_model_name",), dict(help="the model's name in the API (default: MODEL)")),
                      (("--api_key",), dict(help="require 'Authorization: Bearer KEY' on /v1/* "
                                                 "(or set SHARDLLM_API_KEY)")),
                      (("--shutdown_timeout",), dict(type=non_negative_float, metavar="S",
                                                     help="seconds running requests get to finish on SIGTERM or "
                                                          "SIGINT (Ctrl-C; default 30)")),
                      (("--api_server_count",), dict(type=int, metavar="N", help="HTTP processes sharing the "
                                                     "engine (default 1; at high token rates one process's core is "
                                                     "the bound)")),
                      (("--api_key_file",), dict(metavar="PATH", help="read the API key from this file (keeps it "
                                                                      "out of `ps`)")),
                      (("--max_request_body_bytes",), dict(type=int, metavar="N", help="larger bodies get 413 "
                                                                                       "(default 4 MiB)")),
                      (("--max_seqs_per_request",), dict(type=int, metavar="N", help="most sequences (prompts x n) "
                                                                                     "in one request (default 256)")),
                      (("--timeout_keep_alive",), dict(type=finite_float, metavar="S", help="close a connection "
                                                       "idle this long (default 5)")),
                      (("--request_read_timeout",), dict(type=finite_float, metavar="S", help="close a connection "
                                                         "whose request has not fully arrived in this time (default "
                                                         "30)"))]:
        g.add_argument(*_names(*names), default=argparse.SUPPRESS, **kw)

    gen = sub.add_parser("generate", help="generate text offline and print it", allow_abbrev=False,
                         description="Generate for each --prompt (or each line of stdin) and print the text.")
    _add_engine_args(gen)
    g = gen.add_argument_group("sampling")
    g.add_argument("-p", "--prompt", action="append", default=[], help="a prompt (repeat for several)")
    g.add_argument(*_names("--max_tokens"), type=int, default=64, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="F",
                   help="sampling temperature (default 0: greedy)")
    g.add_argument(*_names("--top_p"), type=fraction, default=1.0, metavar="F",
                   help="nucleus sampling mass, in (0, 1] (default 1: all)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    for name, text in OWN_FLAG_COMMANDS.items():  # for --help only: main() runs them before this parser
        if name not in sub.choices:
            sub.add_parser(name, help=text, add_help=False)
    return parser


def _engine_keys() -> set[str]:
    from shardllm.config import EngineConfig

    return set(inspect.signature(EngineConfig.create).parameters)


def load_yaml_config(path: str, allowed: set[str]) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must be a mapping of LLM arguments, got {type(data).__name__}")
    data = {YAML_SYNONYMS.get(k, k): v for k, v in data.items()}
    unknown = sorted(set(data) - allowed)
    for key in unknown:
        if key in VLLM_HINTS:
            raise ValueError(f"{path}: {vllm_hint(key, prefix='')}")
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {path}: use the LLM argument names {sorted(allowed)}")
    return data


def resolve_settings(args: argparse.Namespace, server: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine kwargs, server settings): the YAML file first, the flags given over it."""
    engine_keys = _engine_keys()
    allowed = engine_keys | {"log_level"} | (set(SERVER_KEYS) if server else set())
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    settings = load_yaml_config(args.config, allowed) if getattr(args, "config", None) else {}
    settings.update({k: v for k, v in given.items() if k in allowed})
    engine = {k: v for k, v in settings.items() if k in engine_keys}
    rest = {k: v for k, v in settings.items() if k not in engine_keys}
    if server:
        if envs.SHARDLLM_HOST:  # set by the container image (deploy/docker): bind 0.0.0.0 there
            rest.setdefault("host", envs.SHARDLLM_HOST)
        for k, v in SERVER_DEFAULTS.items():
            rest.setdefault(k, v)
    if server and rest.get("api_key_file"):
        if rest.get("api_key"):
            raise ValueError("give --api_key or --api_key_file, not both")
        rest["api_key"] = read_api_key_file(rest["api_key_file"])
    if server and not rest.get("api_key"):
        rest["api_key"] = envs.SHARDLLM_API_KEY
    for k in LIMIT_KEYS:  # checked before the model loads
        v = rest.get(k)
        if v is not None and (not _is_number(v) or not v > 0 or (k.startswith("max_") and not isinstance(v, int))):
            kind = "an integer >= 1" if k.startswith("max_") else "a number of seconds > 0"
            raise ValueError(f"{k} must be {kind}, got {v!r}")
    v = rest.get("shutdown_timeout")
    if server and not (_is_number(v) and v >= 0):
        raise ValueError(f"shutdown_timeout must be a number of seconds >= 0, got {v!r}")
    v = rest.get("api_server_count", 1)  # (not in SERVER_DEFAULTS: `deploy` writes the flags that were given)
    if server and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"api_server_count must be an integer >= 1, got {v!r}")
    if server and v > 1 and not envs.SHARDLLM_ENGINE_PROCESS:
        raise ValueError(f"api_server_count {v} needs the engine in a process of its own: unset "
                         "SHARDLLM_ENGINE_PROCESS=0, or serve with --api_server_count 1")
    from shardllm.config import check_max_seq_len

    check_max_seq_len(engine.get("max_seq_len"))  # EngineConfig.create's rule, before a port is bound or a manifest
    v = engine.get("cpu_kv_cache_gb")  # as the flag's type, for a --config file's value
    if v is not None and not (_is_number(v) and v > 0):
        raise ValueError(f"cpu_kv_cache_gb must be a finite number > 0 (GiB), got {v!r}")
    return engine, rest


def _is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_api_key_file(path: str) -> str:
    """The key in `path`: its text without surrounding whitespace. ValueError if unreadable or empty."""
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read --api_key_file {path}: {e.strerror}") from None
    if not key:
        raise ValueError(f"--api_key_file {path} is empty: put the key in it")
    return key


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(message: str) -> int:
    print(f"shardllm: error: {message}", file=sys.stderr)
    return 1


def _engine_failed(e: Exception, what: str, log_level_flag: bool = True) -> int:
    """An engine that failed to start or to run for another reason than a setting (a worker that died or did not
    answer, out of memory, a bug): its message on one line, the traceback at debug level (--log_level debug)."""
    logging.getLogger(__name__).debug("%s", what, exc_info=e)
    hint = " (--log_level debug logs the traceback)" if log_level_flag else ""
    return _fail(f"{what}: {type(e).__name__}: {e}{hint}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(args: argparse.Namespace) -> int:
    from shardllm.config import check_settings_without_model

    try:
        engine_kwargs, opts = resolve_settings(args, server=True)
        check_settings_without_model(engine_kwargs)  # a bad setting is named before the port is checked
    except (ValueError, TypeError) as e:
        return _fail(str(e))
    _setup_logging(opts["log_level"])
    try:
        sock = check_bind(opts["host"], opts["port"], reuse_port=opts.get("api_server_count", 1) > 1)
    except ValueError as e:
        return _fail(str(e))
    try:
        return _serve_on(sock, engine_kwargs, opts)
    finally:
        sock.close()


def _serve_on(sock, engine_kwargs: dict, opts: dict) -> int:
    api_server_count = opts.get("api_server_count", 1)  # (not a server default: `deploy` writes only flags given)
    try:
        from shardllm.engine.async_llm import AsyncLLM
        from shardllm.entrypoints.openai.run import run_server
    except ImportError as e:
        return _fail(f"{e}: the server needs its extras, `pip install 'shardllm[server]'`")
    # A signal while the model loads stops the start cleanly; uvicorn takes the signals over once it runs.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:  # the server's step budget unless given: shorter prefill chunks between decode steps than LLM()'s 16384
        # on large GPUs (vLLM's server default is 8192 too)
        engine_kwargs = {"max_num_tokens": 8192, **engine_kwargs}
        if envs.SHARDLLM_ENGINE_PROCESS:
            from shardllm.engine.async_mp import ProcessAsyncLLM

            llm = ProcessAsyncLLM.from_kwargs(api_server_count=api_server_count, **engine_kwargs)
        else:
            llm = AsyncLLM.from_kwargs(**engine_kwargs)
    except (ValueError, TypeError, NotImplementedError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        logging.getLogger(__name__).info("interrupted while loading the model")
        return 0
    except Exception as e:  # a worker that died or hung (WorkerError), CUDA out of memory, ...
        return _engine_failed(e, "the engine failed to start")
    finally:
        signal.signal(signal.SIGTERM, previous)
    server_kwargs = dict(served_model_name=opts.get("served_model_name"), api_key=opts["api_key"],
                         log_level=opts["log_level"], shutdown_timeout=opts["shutdown_timeout"],
                         **{k: opts[k] for k in LIMIT_KEYS if k in opts})
    more = {}

    def stop_all() -> None:
        if "api_servers" in more:
            more["api_servers"].terminate()
            more["api_servers"].wait(10)
        llm.shutdown()

    try:
        if api_server_count > 1:  # API servers 1..N-1 in processes of their own; this one is 0
            from shardllm.entrypoints.openai.api_servers import APIServers, log_prefix, prefix_log_lines

            more = dict(log_prefix=log_prefix(0),
                        api_servers=APIServers(llm, opts["host"], sock.getsockname()[1], server_kwargs))
            prefix_log_lines(log_prefix(0))  # (after the others took the format unprefixed)
        return run_server(llm, host=opts["host"], port=opts["port"], sock=sock, **server_kwargs, **more)
    except ValueError as e:  # a limit out of range
        stop_all()
        return _fail(str(e))
    except BaseException:  # Ctrl-C before uvicorn took the signals, a failure to start the others, ...: nothing
        stop_all()  # may be left running (the engine would wait on its pipe, and this process's exit on it)
        raise


def generate(args: argparse.Namespace) -> int:
    try:
        engine_kwargs, opts = resolve_settings(args, server=False)
    except ValueError as e:
        return _fail(str(e))
    _setup_logging(opts.get("log_level", "warning"))
    prompts = list(args.prompt)
    if not prompts:
        if sys.stdin.isatty():
            return _fail("give at least one --prompt, or prompts on stdin (one per line)")
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not prompts:
            return _fail("no prompt: give --prompt TEXT, or prompts on stdin (one per line)")
    from shardllm import LLM, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        llm = LLM(**engine_kwargs)
    except (ValueError, TypeError, NotImplementedError) as e:
        return _fail(str(e))
    except Exception as e:  # a worker that died or hung (WorkerError), out of memory, ...
        return _engine_failed(e, "the engine failed to start")
    try:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
    except (ValueError, TypeError) as e:
        return _fail(str(e))
    except Exception as e:  # a worker that died or did not answer in SHARDLLM_STEP_TIMEOUT s, ...
        return _engine_failed(e, "generation failed")
    finally:
        llm.shutdown()
    for prompt, out in zip(prompts, outs):
        print(f"### {prompt}\n{out.outputs[0].text}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmarks keep their own flags (trtllm-bench style); `bench serve` too
        from shardllm.bench import main as bench_main

        try:
            return bench_main(argv[1:])
        except (ValueError, TypeError, NotImplementedError) as e:  # a flag the engine refuses: its message
            return _fail(str(e))
        except Exception as e:  # the engine failed: a worker that died or hung (WorkerError), out of memory, ...
            return _engine_failed(e, "the benchmark failed", log_level_flag=False)
    if argv[:1] in (["plan"], ["doctor"]):  # operator tools with their own flags: no engine, no model load
        from shardllm.entrypoints import doctor, plan

        return {"plan": plan.main, "doctor": doctor.main}[argv[0]](argv[1:])
    if argv[:1] == ["envs"]:  # the SHARDLLM_* variables' table (shardllm/envs.py)
        return envs.main(argv[1:])
    if argv[:1] == ["deploy"]:  # `shardllm deploy kubernetes MODEL [serve's flags]`: manifests on stdout
        from shardllm.entrypoints.deploy import main as deploy_main

        return deploy_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"serve": serve, "generate": generate}[args.command](args)
    except KeyboardInterrupt:
        return 0


def serve_main() -> None:
    """`shardllm-serve ...` is `shardllm serve ...`."""
    sys.exit(main(["serve", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
