"""FP8 KV-cache scales inside the Triton kernels against four torch ops around them (issue 13), on one GPU.

Per layer at Llama-3-8B's attention shapes (32 q heads, 8 kv heads, head_dim 128, block_size 16, e4m3 cache), the
decode step's attention part as the engine runs it:
    old  k / k_scale, v / v_scale, q * k_scale (three torch launches), rotary + KV write, decode attention,
         out * v_scale (one more)
    new  rotary + KV write dividing by the scales, decode attention applying them (the scale tensors' pointers)
Both run `--layers` times in one CUDA graph (triton.testing.do_bench_cudagraph), so the figure is GPU time per
decode step, launch gaps included, as a graph-replayed step sees them. The outputs of the two are checked equal
(bf16 rounding) before timing. One JSON line per batch size:

    python benchmarks/kv_scale_kernels.py --batch_sizes 1 64 512 --seq_len 170 --layers 32
"""

from __future__ import annotations

import argparse
import json

import torch

NH, NKV, D, BLOCK = 32, 8, 128, 16


def make_layer(batch: int, seq_len: int, device: str = "cuda"):
    """Random q/k/v of one decode step, a contiguous paged e4m3 cache per sequence, scales 0.5 / 2.0."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    blocks = -(-seq_len // BLOCK)
    table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks).to(device)
    cache = torch.randn(2, batch * blocks, BLOCK, NKV, D, generator=g).to(device, torch.float8_e4m3fn)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    pos = (lens - 1).long()
    slots = (table[:, (seq_len - 1) // BLOCK].long() * BLOCK + (seq_len - 1) % BLOCK)
    qkv = torch.randn(batch, (NH + 2 * NKV) * D, generator=g).to(device, torch.bfloat16)
    scales = torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)
    return dict(table=table, cache=cache, lens=lens, pos=pos, slots=slots, qkv=qkv, scales=scales)


def step(layer: dict, rope_cache: torch.Tensor, in_kernels: bool) -> torch.Tensor:
    from shardllm.layers import triton_ops
    from shardllm.layers.attention.triton_paged import paged_decode_attention

    b = layer["qkv"].shape[0]
    q, k, v = (x.view(b, -1, D) for x in layer["qkv"].split([NH * D, NKV * D, NKV * D], dim=-1))
    ks, vs = layer["scales"]
    kw = {"k_scale": ks, "v_scale": vs} if in_kernels else {}
    if not in_kernels:
        k, v, q = k / ks, v / vs, q * ks
    triton_ops.rotary_embedding_and_write_kv_(layer["pos"], q, k, v, rope_cache, layer["cache"][0],
                                              layer["cache"][1], layer["slots"], **kw)
    out = paged_decode_attention(q, layer["cache"][0], layer["cache"][1], layer["table"], layer["lens"], D**-0.5,
                                 **kw)
    return out if in_kernels else out * vs


def main(argv=None) -> list[dict]:
    import triton.testing

    from shardllm.layers.rotary import RotaryEmbedding

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--seq_len", type=int, default=170)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rep_ms", type=int, default=300)
    a = ap.parse_args(argv)
    rope = RotaryEmbedding(D, a.seq_len + 1, 500000.0).cuda().cos_sin_cache
    rows = []
    for batch in a.batch_sizes:
        layer = make_layer(batch, a.seq_len)
        old, new = step(layer, rope, False), step(layer, rope, True)  # compile both; same cache bytes written
        err = float((old.float() - new.float()).abs().max())
        assert err < 5e-2, f"batch {batch}: old and new outputs differ by {err}"
        times = {}
        for name, in_kernels in (("old", False), ("new", True)):
            def run(in_kernels=in_kernels, layer=layer):
                for _ in range(a.layers):
                    step(layer, rope, in_kernels)
            times[name] = triton.testing.do_bench_cudagraph(run, rep=a.rep_ms) * 1e3  # us per graph replay
        row = {"batch": batch, "seq_len": a.seq_len, "layers": a.layers, "old_us_per_step": round(times["old"], 1),
               "new_us_per_step": round(times["new"], 1), "saved_us_per_step": round(times["old"] - times["new"], 1),
               "max_abs_diff": err, "device": torch.cuda.get_device_name()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
