"""One decode-attention launch to profile with Nsight Compute (issue 13: why the FP8 cache reads at ~3.4 TB/s where
the bf16 cache reads at ~4.3): builds a case as benchmarks/fp8_attention_kernel.py does (Llama-3-8B heads, a cache
larger than L2, scattered blocks), runs the chosen launch `--warmup` times and then once more; profile that last
launch with ncu's --launch-skip (benchmarks/device_s7_b.sh does):

    ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section InstructionStats \\
        python benchmarks/ncu_decode_attention.py --cache fp8 --block_size 64 --case 512x1500 \\
        --config '{"tma": true, "num_warps": 2, "num_stages": 4}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from fp8_attention_kernel import case  # noqa: E402

from shardllm.layers.attention.triton_paged import DecodeConfig, paged_decode_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", choices=("fp8", "bf16"), default="fp8")
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--case", default="512x1500", help="BATCHxCONTEXT")
    ap.add_argument("--config", default='{"tma": true, "num_warps": 2, "num_stages": 4}', help="DecodeConfig JSON")
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    batch, ctx = (int(x) for x in a.case.lower().split("x"))
    dtype = torch.float8_e4m3fn if a.cache == "fp8" else torch.bfloat16
    q, kc, vc, tables, lens, scales = case(batch, ctx, dtype, torch.Generator().manual_seed(0), a.block_size)
    cfg = DecodeConfig(**json.loads(a.config))
    for _ in range(a.warmup + 1):
        paged_decode_attention(q, kc, vc, tables, lens, 128**-0.5, config=cfg, k_scale=scales[0], v_scale=scales[1])
    torch.cuda.synchronize()
    kv_bytes = 2 * int(lens.sum()) * 8 * 128 * kc.element_size()
    print(json.dumps({"cache": a.cache, "block_size": a.block_size, "case": a.case, "config": json.loads(a.config),
                      "kv_bytes": kv_bytes}))


if __name__ == "__main__":
    main()
