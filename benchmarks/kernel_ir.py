"""How deep Triton pipelines the decode-attention kernels, read from the compiled IR, on a machine without a GPU.

Needs Triton with its NVIDIA backend (installed by `make test`'s extras, or `pip install triton`), no GPU.
Compiles `_decode_kernel` (the pointer kernel) or `_decode_kernel_tma` for a CUDA target (default sm90) with
Llama-3-8B heads (32 q, 8 kv, head_dim 128, block 16) and a DecodeConfig, and prints one JSON line:
  kv_buffers / tiles_in_flight: the shared-memory buffers of the K/V tiles from the TTGIR; their leading dim is the
      tiles a program keeps in flight (1: each tile is waited for before the next is asked for);
  tma_copies / cp_async_copies: TMA and cp.async copy ops in the IR (prologue and loop together, not per
      iteration): TMA copies carry the TMA kernel's K/V pages, cp.async the pointer kernel's K/V tiles or the TMA
      kernel's page ids;
  global_loads: the PTX's global-load instructions by width (plain loads only: not TMA or cp.async);
  num_stages: the stages compiled (Triton's default, 3, where the config leaves it unset).
Pointer and integer stride arguments are marked 16-divisible, as Triton's launcher specializes them at run time;
without that the loads compile to scalars and nothing is pipelined.

Found with it (Triton 3.6 and 3.9, sm90, FP8 cache): the TMA kernel's page loop keeps ONE page in flight whatever
num_stages (the page id it loads in the loop feeds the TMA coordinate), and num_stages - 1 with page_chunk or with
prefetch_pages (the page id loaded an iteration ahead: the 64-token table entries since the tenth session); at
64-token pages the table's old launch used 165 registers and 38,948 bytes of shared memory, 16 KB of them a
page's V converted to fp16 and stored again for the P.V dot's operand layout (K's reaches its operand without); the
pointer kernel keeps num_stages - 1 tiles in flight with prefetch_pages (page ids a tile ahead), and one or two
without (a tile's page ids are loaded in the iteration that uses them); an FP8 tile is half a bf16 tile's bytes.

    python benchmarks/kernel_ir.py --cache fp8 --config '{"tma": true, "num_warps": 2, "num_stages": 4}'
    python benchmarks/kernel_ir.py --cache fp8 --block_size 64 --config '{"tma": true, "num_warps": 2, "num_stages": 3,
        "prefetch_pages": true}'
    python benchmarks/kernel_ir.py --cache fp8 --config '{"tma": true, "num_stages": 6, "page_chunk": 16}'
    python benchmarks/kernel_ir.py --cache bf16 --config '{"block_n": 32, "prefetch_pages": true}' --dump out/
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
from collections import Counter

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated: silences its 3.9 warning

from shardllm.layers.attention import triton_decode_tma, triton_paged  # noqa: E402
from shardllm.layers.attention.decode_configs import DecodeConfig, _pow2  # noqa: E402

DEFAULT_NUM_STAGES = 3  # Triton's on NVIDIA GPUs

NH, NKV, D, BS = 32, 8, 128, 16


NEW_KV_PTRS = {"k_new_ptr": "*bf16", "v_new_ptr": "*bf16", "pos_ptr": "*i64", "cs_ptr": "*fp32", "slot_ptr": "*i64"}
NEW_KV_STRIDES = ["stride_cs", "stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_kcb", "stride_kcs",
                  "stride_kch", "stride_vcb", "stride_vcs", "stride_vch", "stride_vcd"]


def compile_decode(cache: str, cfg: DecodeConfig, arch: int = 90, block_size: int = BS, v_transposed: bool = False,
                   new_kv: bool = False):
    """The compiled kernel (triton CompiledKernel) of the decode launch `cfg` over a `cache` ("bf16" / "fp8") of
    `block_size`-token pages (v_transposed: V stored (num_blocks, nkv, D, block_size), the TMA kernel's V_T;
    new_kv: the TMA kernel with the rotary and the KV write fused in, NEW_KV)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ty = {"bf16": "bf16", "fp8": "fp8e4nv"}[cache]
    fp8 = cache == "fp8"
    head = {"q_ptr": "*bf16"}
    if cfg.tma:
        fn = triton_decode_tma._decode_kernel_tma
        box = f"tensordesc<{ty}[{block_size}, 1, {D}]>"
        sig = {**head, "k_desc": box, "v_desc": f"tensordesc<{ty}[{D}, {block_size}]>" if v_transposed else box}
        tail = ["block_tables_ptr", "seq_lens_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr", "k_scale_ptr",
                "v_scale_ptr", "qk_scale", "num_heads", "num_seqs", "stride_qb", "stride_qh", "stride_bt", "stride_ob",
                "stride_oh"]
        consts = dict(GROUP=NH // NKV, GROUP_PAD=16, HEAD_DIM=D, BLOCK_SIZE=block_size,
                      PAGES=2 if cfg.block_n == 2 * block_size else 1,
                      NUM_SPLITS=1, DOT_PRECISION="tf32", KV_SCALED=fp8, F16_DOT=fp8, USE_PDL=False,
                      PAGE_CHUNK=cfg.page_chunk, PREFETCH=cfg.prefetch_pages,
                      V_T=v_transposed, NEW_KV=new_kv, FINITE_V=new_kv and v_transposed)
        if new_kv:
            sig.update({**NEW_KV_PTRS, "k_cache_ptr": f"*{ty}", "v_cache_ptr": f"*{ty}"})
            sig.update({name: "i32" for name in NEW_KV_STRIDES})
            one = "stride_vcs" if v_transposed else "stride_vcd"  # 1 at run time, which Triton specializes
            del sig[one]
            consts[one] = 1
        else:  # the arguments' defaults, as a launch without them passes
            consts.update({n: None for n in (*NEW_KV_PTRS, "k_cache_ptr", "v_cache_ptr")})
            consts.update({n: 0 for n in NEW_KV_STRIDES})
    else:
        fn = triton_paged._decode_kernel
        sig = {**head, "k_cache_ptr": f"*{ty}", "v_cache_ptr": f"*{ty}"}
        tail = ["block_tables_ptr", "seq_lens_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr", "k_scale_ptr",
                "v_scale_ptr", "qk_scale", "num_heads", "num_seqs", "stride_qb", "stride_qh", "stride_kb", "stride_ks",
                "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_bt", "stride_ob", "stride_oh"]
        consts = dict(GROUP=NH // NKV, GROUP_PAD=_pow2(NH // NKV, 16 if cfg.use_dot else 1), HEAD_DIM=D,
                      HEAD_DIM_PAD=D, BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n or 64, NUM_SPLITS=1,
                      DOT_PRECISION="tf32",
                      USE_DOT=cfg.use_dot, PREFETCH_PAGES=cfg.prefetch_pages, K_ROWMAJOR=cfg.k_rowmajor,
                      EARLY_V=cfg.early_v, KV_SCALED=fp8, F16_DOT=fp8 and cfg.use_dot, USE_PDL=False,
                      stride_vd=1)  # V's D stride: 1 in the standard layout, which Triton specializes at launch
    for name in tail:
        sig[name] = ("*i32" if name in ("block_tables_ptr", "seq_lens_ptr") else "*bf16" if name == "out_ptr"
                     else "*fp32" if name.endswith("_ptr") else "fp32" if name == "qk_scale" else "i32")
    sig.update({k: "constexpr" for k in consts})
    missing = [n for n in fn.arg_names if n not in sig]
    if missing:  # the kernel gained an argument this script does not know: say so, not as a missing backend
        raise SystemExit(f"kernel_ir.py: no type for {fn.__name__}'s arguments {missing}: add them here")
    sig = {n: sig[n] for n in fn.arg_names if n in sig}  # the kernel's order: attrs below are positional
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(sig.items())
             if t != "constexpr" and (t.startswith("*") or name.startswith("stride"))}
    options = {"num_warps": cfg.num_warps, **({} if cfg.num_stages is None else {"num_stages": cfg.num_stages})}
    return triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def registers(kernel) -> int | None:
    """Registers a thread of the compiled kernel uses, read from its cubin by the cuobjdump Triton ships (None where
    it is missing or prints no REG:)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        try:
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except OSError:
            return None
    found = re.search(r"REG:(\d+)", out)
    return int(found.group(1)) if found else None


def summarize(kernel) -> dict:
    """Tiles in flight per K/V buffer, async copies, global-load widths, shared memory (bytes) and registers (per
    thread) of a compiled decode kernel."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    buffers = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x([0-9x]+)x(f8E4M3FN|bf16)", ttgir)
    return {
        "shared_bytes": kernel.metadata.shared,
        "registers": registers(kernel),
        "kv_buffers": [f"{n} x {shape} {t}" for n, shape, t in buffers],
        "tiles_in_flight": max((int(n) for n, _, _ in buffers), default=0),
        "tma_copies": ttgir.count("async_tma_copy_global_to_local"),
        "cp_async_copies": ttgir.count("ttg.async_copy_global_to_local"),
        "global_loads": dict(Counter(re.findall(r"ld\.global[.a-z0-9]*", ptx))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", choices=["bf16", "fp8"], default="fp8", help="the KV cache's dtype (fp8: e4m3)")
    ap.add_argument("--config", default="{}", help="DecodeConfig fields as JSON, e.g. '{\"tma\": true, "
                    "\"num_stages\": 4, \"page_chunk\": 16}' (layers/attention/decode_configs.py)")
    ap.add_argument("--block_size", type=int, default=16, help="tokens a KV page (the FP8 cache's GPU default: 64)")
    ap.add_argument("--v_transposed", action="store_true",
                    help="the TMA kernel over a V cache stored (num_blocks, nkv, D, block_size)")
    ap.add_argument("--new_kv", action="store_true",
                    help="the TMA kernel with the rotary and the KV write fused in (NEW_KV, decode_fused_rotary)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--dump", default=None, help="also write the TTGIR and PTX into this folder")
    a = ap.parse_args()
    try:
        fields = json.loads(a.config)
        cfg = DecodeConfig(**fields)
        cfg.validate()
    except (ValueError, TypeError) as e:  # bad JSON, an unknown field, an invalid config
        ap.error(f"--config {a.config!r}: {e} (fields: {[f.name for f in dataclasses.fields(DecodeConfig)]})")
    if cfg.tma and a.arch < 90:
        ap.error(f"--arch {a.arch}: the TMA kernel needs sm90 or later (TMA); use --arch 90 or a pointer config")
    try:
        import triton
        from triton.backends.nvidia.compiler import CUDAOptions  # noqa: F401 - the NVIDIA backend is there
    except ImportError as e:
        raise SystemExit(f"kernel_ir.py needs Triton with its NVIDIA backend ({e}): `pip install triton`, or the "
                         f"test extras (`make test` installs them)") from None
    if a.v_transposed and not cfg.tma:
        ap.error("--v_transposed: the TMA kernel's (a config with tma: true)")
    if a.new_kv and not cfg.tma:
        ap.error("--new_kv is the TMA kernel's (NEW_KV): give a config with \"tma\": true")
    kernel = compile_decode(a.cache, cfg, a.arch, a.block_size, a.v_transposed, a.new_kv)
    print(json.dumps({"triton": triton.__version__, "cache": a.cache, "arch": a.arch, "config": fields,
                      "block_size": a.block_size, "v_transposed": a.v_transposed, "new_kv": a.new_kv,
                      "num_stages": cfg.num_stages or DEFAULT_NUM_STAGES, **summarize(kernel)}))
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        tag = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        for ext in ("ttgir", "ptx"):
            path = os.path.join(a.dump, f"decode_{a.cache}_{tag}.{ext}")
            with open(path, "w") as f:
                f.write(kernel.asm[ext])
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
