"""One Mixtral-8x7B MoE layer's experts on one GPU (E = 8, top-2, H = 4096, I = 14336, random weights): route +
grouped experts per weight format, captured in a CUDA graph (us per call), beside bf16 and beside the per-expert
loop run eagerly (what static and block checkpoints ran before). One JSON line per (format, tokens)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from shardllm.layers.moe import FusedMoE, fused_experts_grouped, select_experts
from shardllm.layers.quantization import QuantizationConfig, process_weights_after_loading, quant_config_scope

FORMATS = {
    "bf16": None,
    "fp8_channel": QuantizationConfig(),  # what dtype="fp8" (online) and per-channel checkpoints run
    "fp8_tensor_static": QuantizationConfig(source="fp8", weight_strategy="tensor", is_checkpoint_fp8=True,
                                            activation_scheme="static"),
    "fp8_block": QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                                    weight_block_size=(128, 128), weight_scale_name="weight_scale_inv"),
    "fp8_block_dequantized": QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                                                weight_block_size=(128, 128), weight_scale_name="weight_scale_inv",
                                                weight_only=True),  # the fallback backend
}


def build(cfg: QuantizationConfig | None, num_experts: int, hidden: int, inter: int) -> FusedMoE:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"), quant_config_scope(cfg):
            moe = FusedMoE(num_experts, 2, hidden, inter, renormalize=True)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02, generator=g)
        for holder in (moe.w13, moe.w2):
            for e in range(num_experts):  # one expert at a time: no fp32 copy of the whole layer
                w = torch.randn(holder.weight.shape[1:], device="cuda", generator=g)
                holder.weight[e].copy_(w if cfg is None else w.to(holder.weight.dtype))
                if cfg is None:
                    holder.weight[e].mul_(0.02)
            for name, p in holder.named_parameters(recurse=False):
                if "scale" in name:
                    p.fill_(1.0 / 448 if name == "input_scale" else 0.02)
    if cfg is not None:
        process_weights_after_loading(moe)
    return moe


def timed_graph(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(5):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters // 5):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def timed_eager(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def bench_format(fmt: str, tokens: list[int], loop_at: set[int], num_experts: int, hidden: int, inter: int) -> None:
    moe = build(FORMATS[fmt], num_experts, hidden, inter)
    method = moe.quant_method
    backend = "grouped_mm (bf16)" if method is None else method.grouped_backend(torch.device("cuda"))

    def grouped(x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(moe.gate(x), 2, True)
        if method is None:
            return fused_experts_grouped(x, moe.w13.weight, moe.w2.weight, weights, ids)
        return method.apply(moe, x, weights, ids)

    for n in tokens:
        x = torch.randn(n, hidden, device="cuda").to(torch.bfloat16)
        with torch.inference_mode():
            row = {"format": fmt, "backend": backend, "tokens": n,
                   "graph_us": round(timed_graph(lambda x=x: grouped(x)), 1)}
            if method is not None and n in loop_at:
                weights, ids = select_experts(moe.gate(x), 2, True)
                row["loop_eager_us"] = round(timed_eager(
                    lambda x=x, w=weights, i=ids: method.apply_reference(moe, x, w, i)), 1)
                ref = method.apply_reference(moe, x, weights, ids).float()
                row["rel_err_vs_loop"] = round(float((grouped(x).float() - ref).abs().max() / ref.abs().max()), 5)
        print(json.dumps(row), flush=True)


def _time_tiles(a_q, a_s, w_q, w_s, offs) -> dict[str, float]:
    from shardllm.layers.quantization.fp8_moe_triton import grouped_block_fp8_mm

    out = {}
    for bm, bn in ((16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128)):
        out[f"{bm}x{bn}_us"] = round(timed_graph(lambda bm=bm, bn=bn: grouped_block_fp8_mm(
            a_q, a_s, w_q, w_s, offs, (128, 128), torch.bfloat16, bm, bn)), 1)
    return out


def sweep_block(tokens: list[int], num_experts: int, hidden: int, inter: int) -> None:
    """The block kernel alone per (BLOCK_M, BLOCK_N) at the layer's two shapes, rows spread over the experts as
    top-2 routing of random tokens spreads them; one JSON line per (shape, tokens) with us per tile choice."""
    from shardllm.layers.quantization.fp8_moe_triton import tile_config
    from shardllm.layers.quantization.fp8_utils import quantize_per_token_group

    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in {"w13": (2 * inter, hidden), "w2": (hidden, inter)}.items():
        w_q = torch.randn(num_experts, n, k, device="cuda", generator=g).to(torch.float8_e4m3fn)
        w_s = torch.full((num_experts, n // 128, k // 128), 0.02, device="cuda")
        for t in tokens:
            ids = torch.randn(t, num_experts, device="cuda", generator=g).topk(2, dim=-1).indices.reshape(-1)
            offs = torch.bincount(ids, minlength=num_experts).cumsum(0).to(torch.int32)
            a_q, a_s = quantize_per_token_group(torch.randn(2 * t, k, device="cuda", generator=g), 128)
            row = {"shape": name, "n": n, "k": k, "tokens": t, "default": list(tile_config(2 * t, num_experts))}
            print(json.dumps({**row, **_time_tiles(a_q, a_s, w_q, w_s, offs)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="1,16,64,256,2048")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--num_experts", type=int, default=8)
    ap.add_argument("--loop", default="1,256", help="token counts at which the per-expert loop is timed too")
    ap.add_argument("--sweep_block", action="store_true", help="time the block kernel's tile choices instead")
    args = ap.parse_args()
    loop_at = {int(t) for t in args.loop.split(",") if t}
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.sweep_block:
        return sweep_block(tokens, args.num_experts, args.hidden, args.inter)
    for fmt in args.formats.split(","):
        bench_format(fmt, tokens, loop_at, args.num_experts, args.hidden, args.inter)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
