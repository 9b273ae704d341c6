"""The symmetric-memory all-reduce: CPU-side config errors here; on 2+ GPUs (`pytest -m gpu`) the one-shot and
two-shot paths equal NCCL's sums for many sizes and dtypes, eagerly and replayed from a CUDA graph, and sizes
the kernels cannot take fall back to NCCL."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from shardllm import LLM


def test_symm_mem_on_cpu_is_a_clear_error(tiny_checkpoints):
    with pytest.raises(ValueError, match="all_reduce='nccl'"):
        LLM(tiny_checkpoints["llama"], device="cpu", all_reduce="symm_mem", num_kv_blocks=16)
    with pytest.raises(ValueError, match="'nccl' or 'symm_mem'"):
        LLM(tiny_checkpoints["llama"], device="cpu", all_reduce="ring", num_kv_blocks=16)


def test_symm_mem_buffer_size_is_checked(monkeypatch):
    from shardllm.distributed.fast_all_reduce import create

    dev, bf16 = torch.device("cpu"), torch.bfloat16
    with pytest.raises(ValueError, match="at least 1 MiB"):
        create("symm_mem", None, dev, bf16, max_bytes=1000)
    monkeypatch.setenv("SHARDLLM_SYMM_MEM_MAX_MB", "0.5")
    with pytest.raises(ValueError, match="SHARDLLM_SYMM_MEM_MAX_MB"):
        create("symm_mem", None, dev, bf16)
    assert create("nccl", None, dev, bf16) is None  # NCCL never reads the buffer's size
    monkeypatch.setenv("SHARDLLM_SYMM_MEM_MAX_MB", "32")
    assert create("symm_mem", None, dev, bf16) is None  # (no symmetric memory on CPU: plain NCCL/gloo)


def test_cli_accepts_all_reduce():
    from shardllm.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--all_reduce", "symm_mem"])
    assert args.all_reduce == "symm_mem"


WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    from shardllm.distributed.fast_all_reduce import create
    group = dist.group.WORLD
    fast = {dt: create("symm_mem", group, dev, dt) for dt in (torch.bfloat16, torch.float32)}
    assert all(f is not None for f in fast.values()), "symm_mem did not start"
    bad = []
    for dt, f in fast.items():
        for n in (8, 4096, 8 * 4096, 64 * 8192, 256 * 8192, 1000, 3):  # one-shot, two-shot, fallbacks
            g = torch.Generator(device=dev).manual_seed(n + rank)
            x = torch.randn(n, device=dev, dtype=dt, generator=g)
            ref = x.clone()
            dist.all_reduce(ref, group=group)
            out = f(x.clone())
            if out is None:
                continue  # NCCL's turn (odd sizes)
            tol = 1e-2 if dt == torch.bfloat16 else 1e-5
            if not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
                bad.append((str(dt), n, (out.float() - ref.float()).abs().max().item()))
        # a CUDA graph of 3 all-reduces, replayed with new inputs
        x = torch.zeros(16, 4096, device=dev, dtype=dt)
        f(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = f(f(f(x) * 0.5) * 0.5)
        for trial in range(3):
            x.copy_(torch.full_like(x, rank + 1 + trial))
            graph.replay()
            torch.cuda.synchronize()
            s = sum(r + 1 + trial for r in range(world))
            want = s * world * world * 0.25
            if not torch.allclose(y.float(), torch.full_like(y, want).float(), rtol=1e-2):
                bad.append(("graph", str(dt), trial, y.flatten()[0].item(), want))
    # a buffer past the 8 MiB default (SHARDLLM_SYMM_MEM_MAX_MB): a 16 MiB tensor (Llama-3-70B's batch-1024 decode)
    big = create("symm_mem", group, dev, torch.bfloat16, max_bytes=32 << 20)
    x = torch.randn(8 << 20, device=dev, dtype=torch.bfloat16, generator=torch.Generator(device=dev).manual_seed(rank))
    ref = x.clone()
    dist.all_reduce(ref, group=group)
    out = big(x.clone())
    if out is None or big.calls["two_shot"] != 1 or not torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2):
        bad.append(("16 MiB", None if out is None else (out.float() - ref.float()).abs().max().item(), big.calls))
    print("RESULT", rank, bad, {str(k): v.calls for k, v in fast.items()}, flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_symm_mem_all_reduce_equals_nccl_on_gpus(tmp_path):
    world = min(torch.cuda.device_count(), 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    # Output to files, not pipes: waiting on rank 0's pipe while rank 1 fills its own (64 KiB of warnings) would
    # block rank 1 before a collective that rank 0 waits in, a deadlock that only the timeout ended.
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port)], env=env,
                                          stdout=f, stderr=subprocess.STDOUT))
    # one deadline for all ranks, inside the test's timeout; whatever ends the wait (a hang, the timeout's
    # signal), no rank is left spinning in a kernel that waits for a peer that is gone
    deadline = time.monotonic() + 90
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                tails = "\n".join(f"rank {r}: {log.read_text()[-1500:]}" for r, log in enumerate(logs))
                pytest.fail(f"symm_mem all-reduce hung (eager or in a CUDA graph)\n{tails}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [log.read_text() for log in logs]
    for r, out in enumerate(outs):
        line = [x for x in out.splitlines() if x.startswith("RESULT")]
        assert line, out[-3000:]
        assert line[0].startswith(f"RESULT {r} [] "), line[0]
        assert "'one_shot': 0" not in line[0] and "'two_shot': 0" not in line[0], line[0]  # both paths ran
