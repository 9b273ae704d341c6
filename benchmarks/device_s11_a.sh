#!/usr/bin/env bash
# Queued by the tenth session for the next one (one H200, about 4 minutes; issue 13). The TMA decode kernel over a V
# cache stored transposed, (num_blocks, nkv, D, block_size): in the sm90 IR (benchmarks/kernel_ir.py --v_transposed)
# V then reaches the P.V dot without the fp16 copy of each page in shared memory (38.9 instead of 55.3 KB at 3
# stages, 128 registers instead of 165). The engine does not store V that way yet: this times the kernel alone
# (fp8_attention_kernel.py --v_transposed) beside the table's launch at 64-token pages, after the GPU tests of the
# TMA kernel (the transposed layout's among them). If it wins at 512 x 1500 (the 1000/1000 decode), the engine's
# cache layout, KV writers and prefill kernel follow (docs/benchmarks.md, tenth session).
#     LIMIT_S=300 bash benchmarks/device_s11_a.sh
set -u
. benchmarks/device_rows.sh
device_start 300
export CUDA_VISIBLE_DEVICES=0
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_decode_attention_tma.py 2>&1 | tail -3 \
  | tee -a "$OUT/summary.txt"
P='"tma": true, "num_warps": 2, "prefetch_pages": true'
timeout 150 python benchmarks/fp8_attention_kernel.py --cases 512x1500 1024x192 256x1000 64x1000 --block_sizes 64 \
  --v_transposed --configs "[{$P, \"num_stages\": 3}, {$P, \"num_stages\": 4}, {$P, \"num_stages\": 2},
  {\"tma\": true, \"num_warps\": 4, \"prefetch_pages\": true, \"num_stages\": 3}]" \
  2>&1 | tee "$w/kernel.jsonl" | tee -a "$OUT/summary.txt"
pack
