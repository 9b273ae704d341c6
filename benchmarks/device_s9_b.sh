#!/usr/bin/env bash
# Ninth session (one H200, about 5 minutes): FP8 q.k in the TMA decode kernel (DecodeConfig.fp8_qk: q quantized to
# e4m3 per head in the kernel, the K page read by the dot as stored). Its GPU tests, then the kernel at 64-token pages
# (benchmarks/fp8_attention_kernel.py --configs: us per layer and the output's difference from the fp16-dot launch),
# then 8B fp8 + fp8 KV 500 x 1000/1000 with the table's large-batch entries as they are and with fp8_qk.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=330 bash benchmarks/device_s9_b.sh
# fp8_qk exists only at commit 4ca1636 (measured slower at large batches, not adopted, removed after it): run this
# script from a checkout of that commit.
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 330
export CUDA_VISIBLE_DEVICES=0
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_decode_attention_tma.py -k fp8_qk 2>&1 \
  | tail -2 | tee -a "$OUT/summary.txt"
W2='"tma": true, "num_warps": 2'
timeout 100 python benchmarks/fp8_attention_kernel.py --cases 512x1500 512x170 64x1000 --block_sizes 64 --configs \
  "[{$W2, \"num_stages\": 4}, {$W2, \"num_stages\": 4, \"fp8_qk\": true}, {$W2, \"num_stages\": 3, \"fp8_qk\": true},
    {\"tma\": true, \"num_warps\": 4, \"num_stages\": 4, \"fp8_qk\": true}, {$W2, \"num_stages\": 2, \"fp8_qk\": true}]" \
  2>&1 | tee "$w/kernel.jsonl" | tee -a "$OUT/summary.txt"
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
QK='{"fp8_e4m3/128/256/64":{"tma":true,"num_warps":2,"num_stages":4,"fp8_qk":true},"fp8_e4m3/128/512/64":{"tma":true,"num_warps":2,"num_stages":4,"fp8_qk":true}}'
row 80 1000_table "" $T1000
row 80 1000_fp8_qk "SHARDLLM_DECODE_CONFIGS=$QK" $T1000
phase_rows
pack
