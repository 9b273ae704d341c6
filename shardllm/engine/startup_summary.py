"""The start-up summary: the layout, and per rank its GPU, weights and KV cache, measured beside the planner's
prediction (shardllm/planner.py), so that an operator sees at once what each GPU holds and how many requests fit."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger("shardllm.startup")
GiB = 1 << 30


def predict(config, gpu_memory_bytes: int):
    """The planner's estimate of this engine's layout on GPUs of `gpu_memory_bytes`."""
    from shardllm.planner import estimate, weight_dtype_of

    mc, pc, cc, sc = config.model_config, config.parallel_config, config.cache_config, config.scheduler_config
    kv_dtype = getattr(cc, "kv_cache_dtype", "auto")
    return estimate(mc.hf_config, pc.tensor_parallel_size, pc.pipeline_parallel_size,
                    weight_dtype=weight_dtype_of(mc), kv_cache_dtype=kv_dtype if kv_dtype else "auto",
                    max_seq_len=sc.max_model_len, max_num_batched_tokens=sc.max_num_batched_tokens,
                    max_num_seqs=sc.max_num_seqs, gpu_memory_bytes=gpu_memory_bytes,
                    kv_cache_free_gpu_memory_fraction=cc.kv_cache_free_gpu_memory_fraction,
                    block_size=cc.block_size, pp_partition=list(pc.pp_partition) if pc.pp_partition else None)


def summary_lines(config, num_blocks: int, reports: list[dict], placement: list | None = None) -> list[str]:
    """The summary as lines: one for the layout, one per rank, one for the KV cache as a whole, one for the
    step limits in force (max_batch_size sequences and max_num_tokens tokens a step).

    `placement`: where each rank runs under Ray (RayExecutor.placement: node id and IP, Ray's GPU ids), so that
    the nodes are counted as placed (with or without num_workers) and each rank names its node and GPU; without
    it every rank runs on this host, rank r on CUDA device r.
    """
    from shardllm.planner import weight_dtype_of

    pc, cc, sc = config.parallel_config, config.cache_config, config.scheduler_config
    tp, pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
    tokens = max(num_blocks - 1, 0) * cc.block_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if placement:
        nodes = len({p.node_id for p in placement})
        where = f"{nodes} node{'s' if nodes > 1 else ''} (Ray)"
    else:
        where = f"1 node ({socket.gethostname()})"
    lines = [f"layout: tp {tp} x pp {pp} x ep {pc.expert_parallel_size} = {pc.world_size} ranks on {where}, "
             f"weights {weight_dtype_of(config.model_config)}, KV cache {getattr(cc, 'kv_cache_dtype', 'auto')}, "
             f"device {config.device}"]
    total = min((r.get("total", 0) for r in reports), default=0)
    est = predict(config, total) if config.device == "cuda" and total else None
    for rank, rep in enumerate(reports):
        tp_rank, pp_rank = rank % tp, rank // tp
        gpu = "cpu"
        if placement:
            p = placement[rank]
            gpu = f"node {p.node_ip} ({p.node_id[:8]}) " + (
                f"GPU {p.gpu_ids[0]}" if config.device == "cuda" and p.gpu_ids else config.device)
        elif config.device == "cuda":
            entries = visible.split(",") if visible else None
            gpu = f"cuda:{rank}" + (f" (CUDA_VISIBLE_DEVICES {entries[rank]})" if entries and rank < len(entries)
                                    else "")
        line = (f"rank {rank} (tp {tp_rank}, pp {pp_rank}) {gpu}: weights {rep['weights'] / GiB:.2f} GiB, "
                f"KV cache {rep['kv_cache'] / GiB:.2f} GiB = {tokens} tokens")
        if est is not None:
            stage = est.stages[pp_rank]
            kv_pred = stage.kv_tokens * stage.kv_bytes_per_token
            line += (f"; planner predicted weights {stage.weights / GiB:.2f} GiB "
                     f"({_delta(rep['weights'], stage.weights)}), KV cache {kv_pred / GiB:.2f} GiB "
                     f"({_delta(rep['kv_cache'], kv_pred)}) = {stage.kv_tokens} tokens; peak "
                     f"{rep.get('peak', 0) / GiB:.2f} of {rep.get('total', 0) / GiB:.1f} GiB")
        lines.append(line)
    usable = max(num_blocks - 1, 0)  # block 0 is the padding block
    lines.append(f"KV cache: {num_blocks} blocks ({usable} usable) x {cc.block_size} tokens = {tokens} tokens per "
                 f"rank; max concurrency {tokens / sc.max_model_len:.2f} requests of max_seq_len {sc.max_model_len}")
    lines.append(f"step limits: {sc.max_num_seqs} sequences, {sc.max_num_batched_tokens} tokens "
                 f"(max_batch_size, max_num_tokens)")
    return lines


def _delta(measured: int, predicted: int) -> str:
    return f"{(predicted - measured) / measured:+.1%}" if measured else "n/a"


def log_startup_summary(config, num_blocks: int, executor) -> None:
    """Log the summary at INFO; a failure here is logged and never stops the engine."""
    try:
        reports = executor.memory_report()
        for line in summary_lines(config, num_blocks, reports, getattr(executor, "placement", None)):
            logger.info(line)
    except Exception:
        logger.warning("could not build the start-up summary", exc_info=True)
