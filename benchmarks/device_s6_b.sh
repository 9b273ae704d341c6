#!/usr/bin/env bash
# The next session's second call (kind nvidia-h200-x2, about 7 minutes): larger KV pages for the FP8 cache.
# A TMA box is one page: at 16 tokens an FP8 page is 2 KiB of K per kv head, half a bf16 page, with the same fixed
# cost a page (a barrier wait, a softmax update); the FP8 cache reads at 2.2-2.55 TB/s against bf16's 3.6-4.2.
#   1. GPU 0: `fp8_attention_kernel.py --block_sizes 16 32 64` (TMA rows at each page size); GPU 1 at the same time:
#      the TMA GPU tests;
#   2. 8B fp8 + fp8 KV end to end at --block_size 16 / 32 / 64: 500 x 1000/1000 (13,721 at 16 in the fifth session;
#      floor 17,744) on GPU 0 and 1000 x 128/128 on GPU 1 (26,478; floor 27,911), side by side, one block size a pair.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=450 bash benchmarks/device_s6_b.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 450
CUDA_VISIBLE_DEVICES=0 timeout 150 python benchmarks/fp8_attention_kernel.py --cases 512x170 1024x192 500x1500 \
  --block_sizes 16 32 64 > "$w/kernel_bs.jsonl" 2> "$w/err_kernel_bs.txt" &
CUDA_VISIBLE_DEVICES=1 timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rfEs \
  tests/layers/test_decode_attention_tma.py tests/layers/test_fp8_kv_kernel_scales.py > "$w/tma_tests.txt" 2>&1 &
wait
say "tma tests: $(tail -1 "$w/tma_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/tma_tests.txt" | head | tee -a "$OUT/summary.txt"
python - "$w/kernel_bs.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if "tma" in r["kernel"] or "table" in r["kernel"]:
        print(f'{r["batch"]:>5} x {r["ctx"]:<5} {r["kernel"]:<28} {r["us"]:>8.1f} us {r["tb_s"]:>5.2f} TB/s')
PY
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
for bs in 16 32 64; do
  [ "$(left)" -ge 110 ] || { say "block_size $bs: skipped (time)"; continue; }
  T=100 b "fp8kv_1000_bs$bs" "CUDA_VISIBLE_DEVICES=0" --block_size $bs --num_requests 500 --input_len 1000 \
    --output_len 1000 &
  T=100 b "fp8kv_128_bs$bs" "CUDA_VISIBLE_DEVICES=1" --block_size $bs --num_requests 1000 --input_len 128 \
    --output_len 128 &
  wait; pack
done
say "total: $((SECONDS - t0)) s"; pack
