"""`shardllm plan MODEL`: which tp x pp x replicas to run on these GPUs, and why (shardllm/planner.py).

MODEL is a checkpoint directory, a Hugging Face repo id (its config.json from the cache, or downloaded alone) or
a shipped config name (`llama-3-70b`). Without --gpus or --gpus_per_node the local GPUs are read through NVML.
Exit 0 with a recommended layout, 3 when no layout fits (the table still printed, the reason on stderr), 1 on bad
input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from shardllm.config import check_max_seq_len, large_gpu
from shardllm.entrypoints.arg_types import _names, finite_float, fraction, int_at_least
from shardllm.planner import KV_DTYPES, WEIGHT_DTYPES, GiB, Plan, check_gpu_name, gpu_spec, plan
from shardllm.utils import print_output

EXIT_NO_FIT = 3  # the plan was made and no layout fits (1: bad input, no plan; 2: argparse's usage error)
MAX_GPU_MEMORY_GIB = 1 << 20  # 1 PiB: far past any GPU, short of the float overflow of the roofline's figures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardllm plan", allow_abbrev=False,
                                description="Rank the tp x pp x replicas layouts of a model on a set of GPUs.",
                                epilog="exit status: 0 a layout is recommended; 3 none fits (the table says why each "
                                "fails, the closest one is named on stderr); 1 bad input; 2 a usage error. Without "
                                "--gpus and without local GPUs (NVML), give --gpus N (and --gpu NAME: H100 80 GiB by "
                                "default).")
    p.add_argument("model", help="checkpoint dir, Hugging Face repo id, or a shipped config (llama-3-70b, ...)")
    add = lambda *names, **kw: p.add_argument(*_names(*names), **kw)  # noqa: E731 - --snake_case and --kebab-case
    gpus = p.add_mutually_exclusive_group()  # two names of one number: both given, one would be dropped silently
    gpus.add_argument(*_names("--gpus"), type=int, help="GPUs on one node (default: the local GPUs, through NVML)")
    gpus.add_argument(*_names("--gpus_per_node"), type=int, help="GPUs per node, with --nodes")
    add("--nodes", type=int, default=1, help="nodes (pipeline stages go across them)")
    add("--gpu_memory_gib", type=finite_float, metavar="GIB",
        help="memory of one GPU in GiB (default: the local GPUs', else 80)")
    add("--gpu", help="GPU model for the bandwidth figures: H100, H200, A100; any other name is an error "
                      "(default: the local GPUs', else from the memory size)")
    add("--dtype", default="bf16", choices=sorted(WEIGHT_DTYPES), help="weight dtype (fp8: online W8A8)")
    add("--kv_cache_dtype", default="auto", type=str.lower, choices=KV_DTYPES,
        help="KV cache dtype, serve's names (auto: the activations' dtype)")
    add("--max_seq_len", type=int_at_least(2), metavar="N",
        help="longest prompt + output, >= 2 as for `serve` (default: the model's context)")
    add("--input_len", type=int_at_least(1), metavar="N", help="typical prompt tokens, for the throughput estimate")
    add("--output_len", type=int_at_least(1), metavar="N", help="typical output tokens, for the throughput estimate")
    add("--max_batch_size", type=int_at_least(1), metavar="N",
        help="most sequences in a step (default: serve's for that GPU: 1024 at >= 70 GiB except A100s, else 256)")
    add("--kv_cache_free_gpu_memory_fraction", type=fraction, default=0.9, metavar="F",
        help="as for `serve`: in (0, 1] (default 0.9)")
    add("--topology", choices=("nvlink", "pcie"), help="GPU interconnect (default: the local GPUs', else nvlink)")
    add("--json", action="store_true", help="print the plan as JSON")
    return p


def load_config(model: str):
    """The transformers config of a checkpoint dir, a GGUF file, the embedded default model (by its served name,
    or "default"), a shipped config name, or a repo id's config.json alone."""
    from transformers import AutoConfig

    from shardllm.model_loader.default_model import DEFAULT_MODEL_NAME, default_model_path
    from shardllm.model_loader.resolve import load_shipped_config, shipped_config_name

    if model in (DEFAULT_MODEL_NAME, "default"):
        model = default_model_path()
    if os.path.isdir(model):
        return AutoConfig.from_pretrained(model)
    if os.path.isfile(model) and model.endswith(".gguf"):
        from shardllm.model_loader.gguf import gguf_to_hf_config, open_gguf

        d = gguf_to_hf_config(open_gguf(model))
        return AutoConfig.for_model(d.pop("model_type"), **d)
    shipped = shipped_config_name(model)
    if shipped:
        return load_shipped_config(shipped)
    if model.count("/") != 1:
        raise ValueError(f"unknown model {model!r}: pass a checkpoint directory, a GGUF file, a Hugging Face repo id, "
                         f"{DEFAULT_MODEL_NAME} (the embedded default) or a shipped config name (llama-3-8b, "
                         "llama-3-70b, llama-3-405b, mixtral-8x7b, mixtral-8x22b)")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(model, "config.json", local_files_only=True)
    except Exception:
        try:
            path = hf_hub_download(model, "config.json")
        except Exception as e:
            raise ValueError(f"cannot find the config of {model!r} in the Hugging Face cache nor download it: {e}") \
                from None
    return AutoConfig.from_pretrained(os.path.dirname(path))


def check_lengths(args: argparse.Namespace, hf_config) -> None:
    """serve's limit on --max_seq_len (the model's context), and requests of --input_len + --output_len tokens that
    fit in it (a longer request is one serve refuses: its throughput is no estimate). ValueError naming the fix."""
    check_max_seq_len(args.max_seq_len, hf_config, "--max_seq_len")  # serve's rule and message
    model_max = check_max_seq_len(None, hf_config)  # the model's context (capped at a sliding window)
    request = (args.input_len or 0) + (args.output_len or 0)
    if args.max_seq_len is not None and request > args.max_seq_len:
        raise ValueError(f"--input_len + --output_len = {request} tokens exceed --max_seq_len {args.max_seq_len}: "
                         f"shorten them or raise --max_seq_len (at most the model's {model_max})")
    if request > model_max:
        raise ValueError(f"--input_len + --output_len = {request} tokens exceed the model's context of {model_max} "
                         "tokens: shorten them")


def local_gpus() -> dict:
    """{"count", "memory_bytes", "name", "topology", "fp8"} of this host's visible GPUs, from NVML (fp8: every one has
    FP8 tensor cores, compute capability >= 8.9, or NVML does not say)."""
    from shardllm.metrics.gpu_monitor import inspect_host

    host = inspect_host()
    if not host.get("available") or not host["gpus"]:
        raise ValueError(f"no local GPUs found ({host.get('reason') or 'NVML lists none'}): pass --gpus N "
                         "(and --gpu_memory_gib M) to plan for another machine")
    gpus = host["gpus"]
    nvlink = all(p["nvlink"] for p in host["pairs"])
    caps = [tuple(int(x) for x in g["compute_capability"].split(".")) for g in gpus if g.get("compute_capability")]
    return {"count": len(gpus), "memory_bytes": min(g["memory_total"] or 0 for g in gpus), "name": gpus[0]["name"],
            "topology": "nvlink" if nvlink else "pcie", "fp8": not caps or min(caps) >= (8, 9)}


def no_fit_message(p: Plan) -> str:
    """Why no layout is recommended, with the closest one: the one that leaves the KV cache the most memory."""
    near = max(p.candidates, key=lambda c: c.kv_budget_bytes_per_gpu, default=None)
    what = f"no layout of {p.num_gpus} x {p.gpu_memory_bytes / GiB:.0f} GiB GPUs fits {p.model or 'the model'}"
    if near is not None and near.kv_tokens >= p.max_seq_len:  # it runs, with less KV cache than the rule keeps
        what = (f"no layout of {p.num_gpus} x {p.gpu_memory_bytes / GiB:.0f} GiB GPUs leaves {p.model or 'the model'} "
                f"the KV cache share the plan asks for")
    closest = (f" (closest: tp {near.tensor_parallel_size} x pp {near.pipeline_parallel_size}: {near.reason})"
               if near is not None else "")
    weights_short = near is None or near.kv_budget_bytes_per_gpu <= 0  # the weights alone do not fit
    fixes = [] if p.weight_dtype == "fp8" or not p.gpu_fp8 else ["--dtype fp8"]  # serve refuses fp8 without FP8 cores
    if not weights_short:  # the KV cache is what is short: what shrinks it helps too
        fixes += ([] if p.kv_cache_dtype.startswith("fp8") else ["--kv_cache_dtype fp8"]) + ["a lower --max_seq_len"]
    fixes.append("more GPUs" if p.nodes == 1 else "more nodes")
    return f"{what}{closest}: use {', '.join(fixes[:-1]) + ' or ' if len(fixes) > 1 else ''}{fixes[-1]}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _expert_parallel_hint(p: Plan, best) -> str:
    """For a MoE model whose recommended (or faster) layout has tp > 1: the expert-parallel choice, which the
    roofline columns do not model (ep does not change the bytes per rank), with what was measured each way
    (docs/benchmarks.md)."""
    experts, tp = p.num_experts, best.tensor_parallel_size
    if not experts or tp < 2:
        return ""
    eps = [e for e in range(2, tp + 1) if tp % e == 0 and experts % e == 0]
    if not eps:
        return ""
    sweep, ep = ",".join(["1"] + [str(e) for e in eps]), eps[-1]
    # ep < tp: each of the ep groups' tp / ep ranks holds a slice of that group's experts (config: moe_tp = tp / ep)
    share = _n(experts // ep, "whole expert") if ep == tp else f"a 1/{tp // ep} slice of {_n(experts // ep, 'expert')}"
    return (f"  experts at tp {tp}: --ep_size {ep} gives each rank {share} "
            f"instead of a 1/{tp} slice of all {experts}; measured on H200s, Mixtral-8x7B tp 2, 1000 x 128/128 "
            f"requests: fp8 20,692 against 19,062 tok/s with ep 1 (+8.6%), bf16 15,263 against 15,718 (-2.9%): "
            f"compare both on your load with `shardllm bench --sweep ep={sweep}`")


def format_plan(p: Plan) -> str:
    gb = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    best = p.recommended
    assumed = "" if p.gpu_named else " (assumed: --gpu NAME for another)"
    lines = [f"{p.model}: {p.num_gpus} x {p.gpu}{assumed} ({p.gpu_memory_bytes / GiB:.0f} GiB) on "
             f"{_n(p.nodes, 'node')}, "
             f"{p.topology}, weights {p.weight_dtype}, KV {p.kv_cache_dtype}, max_seq_len {p.max_seq_len}, "
             f"max_batch_size {p.max_batch_size} sequences"]
    if best:
        lines.append(f"recommended: tp {best.tensor_parallel_size} x pp {best.pipeline_parallel_size} x "
                     f"{_n(best.replicas, 'replica')} ({_n(best.gpus_used, 'GPU')}): --tp_size "
                     f"{best.tensor_parallel_size} --pp_size {best.pipeline_parallel_size}")
        fitting = [c for c in p.candidates if c.fits]
        if len(fitting) > 1:
            lines.append("  why: of the layouts that fit, the fewest GPUs per replica (replicas need no all-reduce), "
                         "then tp inside NVLink and pp across nodes or PCIe")
        faster = max(fitting, key=lambda c: c.throughput_tok_s)
        if faster is not best and faster.throughput_tok_s > 1.1 * best.throughput_tok_s:
            lines.append(f"  more throughput by the roofline: tp {faster.tensor_parallel_size} x pp "
                         f"{faster.pipeline_parallel_size} x {_n(faster.replicas, 'replica')}, "
                         f"{faster.throughput_tok_s:,.0f} tok/s against {best.throughput_tok_s:,.0f} (more KV cache "
                         f"per replica at a {p.context_len}-token context); for throughput-bound serving, or pass "
                         f"--input_len / --output_len to size for your requests")
        shown = (best, faster) if faster is not best and faster.throughput_tok_s > 1.1 * best.throughput_tok_s \
            else (best,)  # the layouts named above: the hint speaks of one of them
        moe_hint = _expert_parallel_hint(p, max(shown, key=lambda c: c.tensor_parallel_size))
        if moe_hint:
            lines.append(moe_hint)
        if best.replicas > 1:  # each replica is its own server on its own GPUs, behind one load balancer
            per = best.gpus_used // best.replicas
            lines.append(f"  run {best.replicas} servers of {per} GPU(s) each (CUDA_VISIBLE_DEVICES per server, "
                         f"different --port) behind a load balancer, or `shardllm deploy kubernetes ... "
                         f"--replicas {best.replicas}` (docs/deployment.md)")
    else:
        lines.append(f"nothing fits: {no_fit_message(p)}")
    lines.append(f"{'tp':>3} {'pp':>3} {'rep':>4} {'weights/GPU':>12} {'KV/tok/GPU':>11} {'KV tokens':>10} "
                 f"{'max conc':>9} {'tok/s b=1':>10} {'tok/s max':>10}  verdict")
    for c in p.candidates:
        lines.append(f"{c.tensor_parallel_size:>3} {c.pipeline_parallel_size:>3} {c.replicas:>4} "
                     f"{gb(c.weights_bytes_per_gpu) + ' GiB':>12} {c.kv_bytes_per_token_per_gpu / 1024:>7.0f} KiB "
                     f"{c.kv_tokens:>10} {c.max_concurrency:>9.1f} {c.decode_tok_s_batch1:>10.0f} "
                     f"{c.throughput_tok_s:>10.0f}  {c.reason}")
    lines.append(f"tok/s: a decode roofline at an average context of {p.context_len} tokens (weights and KV read at "
                 f"70% of HBM peak, GEMMs at 75% of the tensor cores' peak, plus all-reduce and send times; no "
                 f"prefill; 'max': all replicas together, at the concurrency the KV cache holds), to compare layouts, "
                 f"not a measurement")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        hf_config = load_config(args.model)
        name = check_gpu_name(args.gpu) if args.gpu is not None else None
        check_lengths(args, hf_config)
        if args.gpu_memory_gib is not None and args.gpu_memory_gib < 1:
            raise ValueError(f"--gpu_memory_gib must be at least 1 (GiB of one GPU), got {args.gpu_memory_gib}")
        if args.gpu_memory_gib is not None and args.gpu_memory_gib > MAX_GPU_MEMORY_GIB:  # overflows the estimates
            raise ValueError(f"--gpu_memory_gib must be at most {MAX_GPU_MEMORY_GIB} (GiB of one GPU), got "
                             f"{args.gpu_memory_gib}")
        gpn = args.gpus_per_node if args.gpus_per_node is not None else args.gpus  # 0 is refused, not "unset"
        nodes, topology, gpu_fp8 = args.nodes, args.topology, None
        memory = int(args.gpu_memory_gib * GiB) if args.gpu_memory_gib else None
        if gpn is None:
            local = local_gpus()
            gpn, nodes, name = local["count"], 1, name or local["name"]
            memory = memory or local["memory_bytes"]
            topology = topology or local["topology"]
            gpu_fp8 = None if args.gpu is not None else local["fp8"]
        if gpn < 1:
            raise ValueError(f"--gpus / --gpus_per_node must be >= 1, got {gpn}")
        if nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {nodes}")
        gpu_memory = memory or gpu_spec(name).memory_bytes
        max_num_seqs = args.max_batch_size or (1024 if large_gpu(name, gpu_memory) else 256)  # serve's default
        result = plan(hf_config, model=args.model, gpus_per_node=gpn, nodes=nodes,
                      gpu_memory_bytes=gpu_memory, gpu_name=name,
                      topology=topology or "nvlink", weight_dtype=args.dtype,
                      kv_cache_dtype=args.kv_cache_dtype, max_seq_len=args.max_seq_len, input_len=args.input_len,
                      output_len=args.output_len, max_num_seqs=max_num_seqs,
                      kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction, gpu_fp8=gpu_fp8)
    except ValueError as e:
        print(f"shardllm plan: error: {e}", file=sys.stderr)
        return 1
    print_output(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    if result.recommended is None:  # the table (or JSON) above says why each layout failed
        print(f"shardllm plan: error: {no_fit_message(result)}", file=sys.stderr)
        return EXIT_NO_FIT
    return 0
