"""All-reduce latency on one host: NCCL beside the symmetric-memory one-shot and two-shot kernels, eager and
replayed from a CUDA graph (as decode steps run), bf16, sizes of decode steps (tokens x hidden).

    python benchmarks/all_reduce.py --world 4            # starts one process per GPU itself
    python benchmarks/all_reduce.py --world 2 --sizes_kb 16384 262144 --paths nccl   # 70B decode / prefill sizes

Prints one JSON line per (size, path, mode) with microseconds per all-reduce, from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch

SIZES_KB = [8, 32, 128, 256, 512, 1024, 2048, 4096, 8192]


def worker(rank: int, world: int, port: int, iters: int, sizes_kb: list[int] = SIZES_KB,
           paths_wanted: list[str] | None = None) -> None:
    import torch.distributed as dist

    from shardllm.distributed.fast_all_reduce import create

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    group = dist.group.WORLD
    symm = paths_wanted is None or bool({"one_shot", "two_shot", "auto"} & set(paths_wanted))
    # the symmetric buffer only where a path uses it, sized to the largest tensor (NCCL rows need none)
    fast = create("symm_mem", group, dev, torch.bfloat16, max_bytes=max(max(sizes_kb) << 10, 8 << 20)) if symm else None
    assert fast is not None or not symm, "symm_mem did not start"

    def nccl(x):
        dist.all_reduce(x, group=group)
        return x

    def one_shot(x):
        n = x.numel()
        return torch.ops.symm_mem.one_shot_all_reduce_copy(fast.buffer[:n].view(x.shape), x, "sum", fast.group_name)

    def two_shot(x):
        n = x.numel()
        buf = fast.buffer[:n].view(x.shape)
        buf.copy_(x)
        return torch.ops.symm_mem.two_shot_all_reduce_out(buf, "sum", fast.group_name, torch.empty_like(x))

    def auto(x):  # what the engine does: the fast path when it takes the tensor, else NCCL
        y = fast(x)
        return nccl(x) if y is None else y

    paths = {"nccl": nccl, "one_shot": one_shot, "two_shot": two_shot, "auto": auto}
    paths = {k: v for k, v in paths.items() if paths_wanted is None or k in paths_wanted}
    for kb in sizes_kb:
        x = torch.randn(kb * 512, device=dev, dtype=torch.bfloat16)  # kb KiB of bf16
        for name, fn in paths.items():
            for mode in ("eager", "graph"):
                chain = 20  # all-reduces per graph (a decode step of a few layers)
                try:
                    for _ in range(3):
                        fn(x)
                    torch.cuda.synchronize()
                    if mode == "graph":
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            y = x
                            for _ in range(chain):
                                y = fn(y) * (1.0 / world)  # keep the values bounded
                        g.replay()
                        torch.cuda.synchronize()
                        reps = max(iters // chain, 5)
                        dist.barrier(group=group)
                        t = time.perf_counter()
                        for _ in range(reps):
                            g.replay()
                        torch.cuda.synchronize()
                        us = (time.perf_counter() - t) / (reps * chain) * 1e6
                    else:
                        dist.barrier(group=group)
                        t = time.perf_counter()
                        for _ in range(iters):
                            fn(x)
                        torch.cuda.synchronize()
                        us = (time.perf_counter() - t) / iters * 1e6
                    err = None
                except Exception as e:  # report and go on: one path failing says nothing of the others
                    us, err = None, f"{type(e).__name__}: {str(e)[:120]}"
                    torch.cuda.synchronize()
                if rank == 0:
                    print(json.dumps({"world": world, "kib": kb, "path": name, "mode": mode,
                                      "us": None if us is None else round(us, 2), "error": err}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=0, help="GPUs (default: all)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--sizes_kb", type=int, nargs="+", default=SIZES_KB, help="all-reduce sizes in KiB of bf16")
    ap.add_argument("--paths", nargs="+", default=None, choices=["nccl", "one_shot", "two_shot", "auto"],
                    help="the paths to time (default: all)")
    ap.add_argument("--_rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--_port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    world = a.world or torch.cuda.device_count()
    if a._rank >= 0:
        worker(a._rank, world, a._port, a.iters, a.sizes_kb, a.paths)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    extra = ["--sizes_kb", *map(str, a.sizes_kb)] + (["--paths", *a.paths] if a.paths else [])
    procs = [subprocess.Popen([sys.executable, __file__, "--world", str(world), "--iters", str(a.iters),
                               "--_rank", str(r), "--_port", str(port), *extra], env=env) for r in range(world)]
    rc = [p.wait() for p in procs]
    sys.exit(max(rc))


if __name__ == "__main__":
    main()
