"""How deep Triton pipelines the decode-attention kernels, read from the compiled IR, on a machine without a GPU.

Compiles `_decode_kernel` (the pointer kernel) or `_decode_kernel_tma` for a CUDA target (default sm90) with
Llama-3-8B heads (32 q, 8 kv, head_dim 128, block 16) and a DecodeConfig, then reports, from the TTGIR, the shared
buffers of the K/V tiles (leading dim = tiles in flight per program) and the count of async copies (cp.async / TMA),
and, from the PTX, the global-load widths. Pointer and integer stride arguments are marked 16-divisible, as Triton's
launcher specializes them at run time; without that the loads compile to scalars and nothing is pipelined.

Found with it (Triton 3.6 and 3.9, sm90): the TMA kernel's page loop keeps ONE page in flight whatever num_stages
(the page id it loads in the loop feeds the TMA coordinate), and with page_chunk num_stages - 1; the pointer kernel
keeps num_stages - 1 tiles in flight, so an FP8 cache has half the bytes in flight of a bf16 one.

    python benchmarks/kernel_ir.py --cache fp8 --config '{"tma": true, "num_warps": 2, "num_stages": 4}'
    python benchmarks/kernel_ir.py --cache fp8 --config '{"tma": true, "num_stages": 6, "page_chunk": 16}'
    python benchmarks/kernel_ir.py --cache bf16 --config '{"block_n": 32, "prefetch_pages": true}' --dump out/
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter

from shardllm.layers.attention import triton_decode_tma, triton_paged
from shardllm.layers.attention.decode_configs import DecodeConfig, _pow2

NH, NKV, D, BS = 32, 8, 128, 16


def compile_decode(cache: str, cfg: DecodeConfig, arch: int = 90):
    """The compiled kernel (triton CompiledKernel) of the decode launch `cfg` over a `cache` ("bf16" / "fp8")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ty = {"bf16": "bf16", "fp8": "fp8e4nv"}[cache]
    fp8 = cache == "fp8"
    head = {"q_ptr": "*bf16"}
    if cfg.tma:
        fn = triton_decode_tma._decode_kernel_tma
        sig = {**head, "k_desc": f"tensordesc<{ty}[{BS}, 1, {D}]>", "v_desc": f"tensordesc<{ty}[{BS}, 1, {D}]>"}
        tail = ["block_tables_ptr", "seq_lens_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr", "k_scale_ptr",
                "v_scale_ptr", "qk_scale", "num_heads", "num_seqs", "stride_qb", "stride_qh", "stride_bt", "stride_ob",
                "stride_oh"]
        consts = dict(GROUP=NH // NKV, GROUP_PAD=16, HEAD_DIM=D, BLOCK_SIZE=BS, PAGES=2 if cfg.block_n == 2 * BS else 1,
                      NUM_SPLITS=1, DOT_PRECISION="tf32", KV_SCALED=fp8, F16_DOT=fp8, USE_PDL=False,
                      PAGE_CHUNK=cfg.page_chunk)
    else:
        fn = triton_paged._decode_kernel
        sig = {**head, "k_cache_ptr": f"*{ty}", "v_cache_ptr": f"*{ty}"}
        tail = ["block_tables_ptr", "seq_lens_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr", "k_scale_ptr",
                "v_scale_ptr", "qk_scale", "num_heads", "num_seqs", "stride_qb", "stride_qh", "stride_kb", "stride_ks",
                "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_bt", "stride_ob", "stride_oh"]
        consts = dict(GROUP=NH // NKV, GROUP_PAD=_pow2(NH // NKV, 16 if cfg.use_dot else 1), HEAD_DIM=D,
                      HEAD_DIM_PAD=D, BLOCK_SIZE=BS, BLOCK_N=cfg.block_n or 64, NUM_SPLITS=1, DOT_PRECISION="tf32",
                      USE_DOT=cfg.use_dot, PREFETCH_PAGES=cfg.prefetch_pages, K_ROWMAJOR=cfg.k_rowmajor,
                      EARLY_V=cfg.early_v, KV_SCALED=fp8, F16_DOT=fp8 and cfg.use_dot, USE_PDL=False)
    for name in tail:
        sig[name] = ("*i32" if name in ("block_tables_ptr", "seq_lens_ptr") else "*bf16" if name == "out_ptr"
                     else "*fp32" if name.endswith("_ptr") else "fp32" if name == "qk_scale" else "i32")
    sig.update({k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(sig.items())
             if t.startswith("*") or name.startswith("stride")}
    options = {"num_warps": cfg.num_warps, **({} if cfg.num_stages is None else {"num_stages": cfg.num_stages})}
    return triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def summarize(kernel) -> dict:
    """Tiles in flight per K/V buffer, async copies and global-load widths of a compiled decode kernel."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    buffers = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x([0-9x]+)x(f8E4M3FN|bf16)", ttgir)
    return {
        "kv_buffers": [f"{n} x {shape} {t}" for n, shape, t in buffers],
        "tiles_in_flight": max((int(n) for n, _, _ in buffers), default=0),
        "tma_copies": ttgir.count("async_tma_copy_global_to_local"),
        "cp_async_copies": ttgir.count("ttg.async_copy_global_to_local"),
        "global_loads": dict(Counter(re.findall(r"ld\.global[.a-z0-9]*", ptx))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", choices=["bf16", "fp8"], default="fp8")
    ap.add_argument("--config", default="{}", help="DecodeConfig fields as JSON")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--dump", default=None, help="also write the TTGIR and PTX into this folder")
    a = ap.parse_args()
    cfg = DecodeConfig(**json.loads(a.config))
    cfg.validate()
    kernel = compile_decode(a.cache, cfg, a.arch)
    import triton

    print(json.dumps({"triton": triton.__version__, "cache": a.cache, "config": json.loads(a.config),
                      **summarize(kernel)}))
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(a.dump, f"decode_{a.cache}.{ext}"), "w") as f:
                f.write(kernel.asm[ext])


if __name__ == "__main__":
    main()
