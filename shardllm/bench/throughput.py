"""Offline throughput benchmark, in the manner of trtllm-bench: random prompts of exact lengths, ignore_eos.

    python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy --input_len 128 \
        --output_len 128 --num_requests 1000 --tp_size 1
    ... --batch_size 1 --output_len 256      # per-token decode latency and the bandwidth roofline

Times in the result: ttft_ms_* from a request's arrival (all arrive at once) to its first token, tpot_ms_* its mean
time a token after the first; ttft_ms_max ends the phase in which prompts are still being prefilled (steps mix
prefill chunks with decodes), and decode_phase_tpot_ms is the TPOT of the request whose first token came last, all
of whose steps come after that phase: with num_requests <= the max batch, the pure decode step time at that batch.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def _adder(ap: argparse.ArgumentParser):
    """ap.add_argument where each --snake_case flag also answers to --kebab-case (the CLI's `_names`)."""
    from shardllm.entrypoints.arg_types import _names

    return lambda *names, **kw: ap.add_argument(*_names(*names), **kw)


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    from shardllm.entrypoints.arg_types import add_vllm_hints, fraction, int_at_least, positive_float

    add = _adder(ap)
    add("--model", default=None, help="checkpoint dir, .gguf file, Hugging Face repo id or shipped config "
        "(llama-3-8b, with --load_format dummy); default: the embedded SmolLM2-135M-Instruct")
    add("--load_format", default="auto",
        help="auto | safetensors | gguf | dummy (random weights of the model's config)")
    add("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 | fp8 (FP8 linears)")
    add("--quantization", default=None, help="fp8 (FP8 linears; same as --dtype fp8)")
    add("--kv_cache_dtype", default="auto", help="auto | fp8 | fp8_e4m3 | fp8_e5m2")
    add("--tp_size", "--tensor-parallel-size", "-tp", type=int, default=1)
    add("--pp_size", "--pipeline-parallel-size", "-pp", type=int, default=1)
    add("--ep_size", "--expert-parallel-size", type=int, default=1,
        help="expert parallel size (MoE models; divides tp_size)")
    add("--max_batch_size", "--max-num-seqs", type=int, default=None,
        help="default: the engine's (1024 on a GPU of >= 70 GiB except A100s, else 256)")
    add("--max_num_tokens", "--max-num-batched-tokens", type=int, default=None,
        help="default: the engine's (16384 on a GPU of >= 70 GiB except A100s, else 8192)")
    add("--max_seq_len", "--max-model-len", type=int_at_least(2), default=None, metavar="N",
        help="longest prompt + output (default: input_len + output_len + 8)")
    add("--block_size", type=int, default=None,
        help="tokens per KV cache block (default: the engine's: 16, 64 with an e4m3 FP8 cache on sm90+)")
    add("--kv_cache_free_gpu_memory_fraction", type=fraction, default=0.9, metavar="F",
        help="share of free GPU memory for the KV cache, in (0, 1]")
    add("--device", default="auto", help="auto | cuda | cpu")
    add("--enforce_eager", action="store_true",
        help="no CUDA graphs")
    add("--async_scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="schedule step k+1 while step k runs (default: on without a pipeline)")
    add("--attention_backend", default="auto", choices=("auto", "torch", "triton"),
        help="attention kernels (auto: Triton on GPUs)")
    add("--all_reduce", default="nccl", choices=("nccl", "symm_mem"), help="tensor-parallel all-reduce")
    add("--cpu_kv_cache_gb", type=positive_float, default=None, metavar="F",
        help="KV cache size per rank on CPU, in GiB")
    add_vllm_hints(ap)


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(model=a.model, load_format=a.load_format, dtype=a.dtype, tensor_parallel_size=a.tp_size,
                pipeline_parallel_size=a.pp_size, expert_parallel_size=a.ep_size, max_batch_size=a.max_batch_size,
                max_num_tokens=a.max_num_tokens, max_seq_len=a.max_seq_len,
                kv_cache_free_gpu_memory_fraction=a.kv_cache_free_gpu_memory_fraction, device=a.device,
                enforce_eager=a.enforce_eager, attention_backend=a.attention_backend,
                async_scheduling=a.async_scheduling, all_reduce=a.all_reduce, quantization=a.quantization,
                kv_cache_dtype=a.kv_cache_dtype,
                **({} if a.cpu_kv_cache_gb is None else {"cpu_kv_cache_gb": a.cpu_kv_cache_gb}),
                **({} if getattr(a, "block_size", None) is None else {"block_size": a.block_size}))


def llm_kwargs(a: argparse.Namespace) -> dict:
    """The `LLM` arguments of one benchmark run: the engine flags, a context just long enough, the batch cap."""
    kw = engine_kwargs(a)
    kw["max_seq_len"] = a.max_seq_len or (a.input_len + a.output_len + 8)
    if a.batch_size:
        kw["max_batch_size"] = a.batch_size
    return kw


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def decode_phase_tpot_ms(outs) -> float | None:
    """The TPOT (ms) of the request whose first token came last: every step it decodes in comes after the last
    prompt is in, so where all requests run at once (num_requests <= max_batch_size) it is the step time of pure
    decode at that batch (with more requests, that of a batch draining). None where it produced one token or none.
    `outs`: RequestOutputs with metrics.first_token_time / finished_time (s) and outputs[0].token_ids."""
    if not outs:
        return None
    last = max(outs, key=lambda o: o.metrics.first_token_time)
    n = len(last.outputs[0].token_ids)
    if n < 2:
        return None
    return round((last.metrics.finished_time - last.metrics.first_token_time) / (n - 1) * 1e3, 3)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted once each, like the roofline's reads)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * nbytes * n / (time.perf_counter() - t)


def run(a: argparse.Namespace) -> dict:
    from shardllm import LLM, SamplingParams
    from shardllm.layers.quantization.kv_cache import kv_cache_torch_dtype
    from shardllm.model_loader.size import decode_read_bytes

    kw = llm_kwargs(a)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    eng = llm.engine
    vocab = llm.config.model_config.hf_config.vocab_size
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(a.input_len)] for _ in range(a.num_requests)]
    sp = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True, detokenize=False)
    warm = [[rng.randrange(100, vocab - 100) for _ in range(a.input_len)] for _ in range(min(a.num_requests, 4))]
    warm_tokens = max(1, min(8, llm.config.scheduler_config.max_model_len - a.input_len))  # within the context
    llm.generate(warm, SamplingParams(max_tokens=warm_tokens, ignore_eos=True, detokenize=False), use_tqdm=False)
    mem_before = eng.executor.memory_report()
    steps0 = eng.stats.steps
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t
    steps = eng.stats.steps - steps0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) / max(len(o.outputs[0].token_ids) - 1, 1)
            for o in outs]
    world = a.tp_size * a.pp_size
    mem = eng.executor.memory_report()
    res = {
        "model": a.model or llm.config.model_config.model,
        "dtype": str(llm.config.model_config.dtype).replace("torch.", ""), "tp": a.tp_size,
        "quantization": getattr(llm.config.model_config.quantization, "source", None),
        "kv_cache_dtype": llm.config.cache_config.kv_cache_dtype,
        "pp": a.pp_size, "ep": a.ep_size, "gpus": world, "input_len": a.input_len, "output_len": a.output_len,
        "num_requests": a.num_requests, "batch_size": a.batch_size or llm.config.scheduler_config.max_num_seqs,
        "max_batch_size": llm.config.scheduler_config.max_num_seqs,  # the same value; "batch_size" kept for scripts
        "max_num_tokens": llm.config.scheduler_config.max_num_batched_tokens, "load_s": round(load_s, 1),
        "elapsed_s": round(elapsed, 4), "output_tokens": out_tokens, "output_tok_s": round(out_tokens / elapsed, 1),
        "output_tok_s_per_gpu": round(out_tokens / elapsed / world, 1),
        "total_tok_s": round((out_tokens + a.input_len * a.num_requests) / elapsed, 1),
        "req_s": round(a.num_requests / elapsed, 3), "steps": steps,
        "ttft_ms_p50": round(pct(ttft, 50) * 1e3, 2), "ttft_ms_p99": round(pct(ttft, 99) * 1e3, 2),
        "tpot_ms_p50": round(pct(tpot, 50) * 1e3, 3), "tpot_ms_p99": round(pct(tpot, 99) * 1e3, 3),
        "ttft_ms_max": round(max(ttft) * 1e3, 2), "decode_phase_tpot_ms": decode_phase_tpot_ms(outs),
        "weights_gib_per_rank": [round(m["weights"] / 2**30, 2) for m in mem_before],
        "kv_cache_gib_per_rank": [round(m["kv_cache"] / 2**30, 2) for m in mem_before],
        "peak_gib_per_rank": [round(m["peak"] / 2**30, 2) if "peak" in m else None for m in mem],  # None: CPU
        "kv_blocks": eng.num_blocks, "block_size": llm.config.cache_config.block_size,
        "async_scheduling": llm.config.scheduler_config.async_scheduling,
        "cuda_graphs": llm.config.device == "cuda" and not llm.config.enforce_eager,
        # the backend that ran: auto is Triton on CUDA and torch elsewhere
        "attention_backend": ("triton" if llm.config.device == "cuda" and llm.config.attention_backend != "torch"
                              else "torch"),
        # the tp all-reduce: the setting on GPUs; gloo's on the CPU whatever the setting (its only backend there)
        "all_reduce": llm.config.parallel_config.all_reduce if llm.config.device == "cuda" else "gloo",
    }
    ex = eng.executor
    if hasattr(ex, "plan_send_s") and ex.num_steps:
        res["plan_send_us_per_step"] = round(ex.plan_send_s / ex.num_steps * 1e6, 1)
    if a.batch_size == 1 and llm.config.device == "cuda":
        # roofline: a batch-1 token passes the pp stages one after another, each of whose tp ranks reads its share
        # of the weights a decode step reads (size.decode_read_bytes) and its kv heads' cache so far (kv heads
        # replicated where tp exceeds them): the time of (bytes / tp) at the copy bandwidth
        bw = measure_copy_bandwidth(torch.device("cuda", 0))
        mc = llm.config.model_config
        dense = torch.empty((), dtype=mc.dtype).element_size()
        linear = 1 if mc.quantization is not None else dense  # FP8 linears; the LM head stays `dense`
        kv_elem = kv_cache_torch_dtype(llm.config.cache_config.kv_cache_dtype, mc.dtype).itemsize
        kv_heads_rank = max(1, mc.total_num_kv_heads // a.tp_size)
        kv_per_token_rank = 2 * mc.hf_config.num_hidden_layers * kv_heads_rank * mc.head_dim * kv_elem
        avg_ctx = a.input_len + a.output_len / 2
        step_bytes = decode_read_bytes(mc.hf_config, linear, dense) / a.tp_size + kv_per_token_rank * avg_ctx
        roof_ms = step_bytes / bw * 1e3
        res.update(copy_bandwidth_tb_s=round(bw / 1e12, 3), roofline_ms_per_token=round(roof_ms, 3),
                   decode_ms_per_token=res["tpot_ms_p50"],
                   fraction_of_roofline=round(roof_ms / res["tpot_ms_p50"], 3),
                   roofline_tok_s=round(1e3 / roof_ms, 1))
    llm.shutdown()
    return res


def build_parser() -> argparse.ArgumentParser:
    from shardllm.entrypoints.arg_types import positive_float

    ap = argparse.ArgumentParser(
        prog="shardllm bench", allow_abbrev=False,
        description="shardllm offline throughput benchmark: one layout, or a sweep of layouts (--sweep) with a "
        "scaling table; `shardllm bench serve` load-tests a running server.",
        epilog='sweep: --sweep "tp=1,2,4" runs tp=1, tp=2 and tp=4 in turn; --sweep "tp=4,pp=2" is one layout; '
        "keys tp, pp, ep, dtype (several keys: every combination); repeat --sweep to add layouts.",
        usage="shardllm bench [options]  |  shardllm bench serve --url URL [options]")
    add_engine_args(ap)
    add = _adder(ap)
    add("--input_len", type=int, default=128,
        help="prompt tokens per request (random ids, exact length)")
    add("--output_len", type=int, default=128,
        help="output tokens per request (ignore_eos: exact length)")
    add("--num_requests", "--num-prompts", type=int, default=1000,
        help="requests, all submitted at once")
    add("--batch_size", type=int, default=0,
        help="cap on concurrent sequences (1: latency mode, with the bandwidth roofline on a GPU)")
    add("--seed", type=int, default=0, help="seed of the random prompts")
    add("--json", action="store_true", help="print the result as one JSON line")
    add("--sweep", action="append", default=[], metavar="KEY=V,V,...",
        help="layouts to run one after the other, each in its own engine (see below)")
    add("--plot", default=None, metavar="FILE.png",
        help="draw output tok/s and scaling efficiency against GPUs (needs matplotlib)")
    add("--layout_timeout", type=positive_float, default=3600.0, metavar="S",
        help="seconds one layout of a sweep may take before it is stopped (its row says timeout)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    for name in ("input_len", "output_len", "num_requests"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.batch_size < 0:
        ap.error(f"--batch_size must be at least 1 (or 0: no cap), got {a.batch_size}")
    if a.max_seq_len is not None and a.input_len + a.output_len > a.max_seq_len:
        ap.error(f"--input_len + --output_len = {a.input_len + a.output_len} tokens exceed --max_seq_len "
                 f"{a.max_seq_len}: raise --max_seq_len or leave it out (input_len + output_len + 8)")
    if a.sweep or a.plot:
        from shardllm.bench.sweep import run_sweep_cli

        return run_sweep_cli(a, ap)
    res = run(a)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
