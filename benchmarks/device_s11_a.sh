#!/usr/bin/env bash
# Queued by the tenth session for the next one (one H200, about 9.5 minutes; issue 13). V stored transposed,
# (num_blocks, nkv, D, block_size): in the sm90 IR (benchmarks/kernel_ir.py --v_transposed) the TMA decode kernel then
# reads a V page as it reads K's, without the fp16 copy of each page in shared memory (38.9 instead of 55.3 KB at 3
# stages, 128 registers instead of 165). 1. GPU tests of the TMA kernel and of the transposed cache (attention and
# cache contents equal to the standard layout's). 2. The kernel alone (fp8_attention_kernel.py --v_transposed) beside
# the table's launch at 64-token pages. 3. 8B fp8 + fp8 KV end to end with SHARDLLM_KV_V_TRANSPOSED=1 (the engine's
# cache in that layout: KV writers, prefill and pointer kernels by strides, decode by the TMA path) beside the default,
# alternating. Results in $OUT/results.tgz, summary.txt.
#     LIMIT_S=560 bash benchmarks/device_s11_a.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_decode_attention_tma.py \
  tests/layers/test_v_transposed_cache.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
P='"tma": true, "num_warps": 2, "prefetch_pages": true'
timeout 120 python benchmarks/fp8_attention_kernel.py --cases 512x1500 1024x192 256x1000 64x1000 --block_sizes 64 \
  --v_transposed --configs "[{$P, \"num_stages\": 3}, {$P, \"num_stages\": 4}, {$P, \"num_stages\": 2},
  {\"tma\": true, \"num_warps\": 4, \"prefetch_pages\": true, \"num_stages\": 3}]" \
  2>&1 | tee "$w/kernel.jsonl" | tee -a "$OUT/summary.txt"
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T128="--num_requests 1000 --input_len 128 --output_len 128"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
row 75 1000_default "" $T1000
row 75 1000_vt "SHARDLLM_KV_V_TRANSPOSED=1" $T1000
row 75 1000_default_b "" $T1000
row 75 1000_vt_b "SHARDLLM_KV_V_TRANSPOSED=1" $T1000
row 50 128_default "" $T128
row 50 128_vt "SHARDLLM_KV_V_TRANSPOSED=1" $T128
phase_rows
pack
