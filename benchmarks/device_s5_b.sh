#!/usr/bin/env bash
# The next session's second call (kind nvidia-h200-x2, about 8 minutes, finishes before LIMIT_S): the TMA decode
# kernel with page ids in chunks (DecodeConfig.page_chunk; Triton's IR shows the plain page loop keeps one page in
# flight, page_chunk three at num_stages 4), never run on a GPU yet.
#   1. GPU 0: its GPU tests, then benchmarks/fp8_attention_kernel.py (pointer, TMA, TMA + page_chunk; both caches);
#      GPU 1 at once: the decode-config sweep with the page_chunk variants (its JSON table -> table.json), then the
#      GEMV sweep at M = 1 with the w_ahead variants (GemvConfig.w_ahead: two weight tiles in flight).
#   2. Llama-3-8B fp8 + fp8 KV with the sweep's table (GPU 0) beside the repo's (GPU 1): 1000 x 128/128 and
#      500 x 1000/1000 (max batch 512), TensorRT-LLM's 27,911 and 17,744 the floors.
# Everything in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=480 bash benchmarks/device_s5_b.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-480}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b
MODEL_FLAGS="--model llama-3-8b"; T=${T:-100}
say "$(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tr '\n' ' ') $(date -u)"
tests=(tests/layers/test_decode_attention_tma.py tests/layers/test_fp8_attention_f16_dot.py
       tests/layers/test_triton_attention.py)
part1_gpu0() {
  CUDA_VISIBLE_DEVICES=0 timeout 240 python -m pytest -q -m gpu -p no:cacheprovider -rfE "${tests[@]}" \
    > "$w/new_tests.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 200 python benchmarks/fp8_attention_kernel.py --cases 512x170 1024x192 500x1500 \
    > "$w/kernel.jsonl" 2> "$w/err_kernel.txt"
}
part1_gpu1() {
  CUDA_VISIBLE_DEVICES=1 timeout 150 python benchmarks/attention_sweep.py --budget_s 100 \
    --out "$w/attention_rows.jsonl" > "$w/attention_sweep.txt" 2>&1
  grep "^DECODE_CONFIGS = " "$w/attention_sweep.txt" | sed 's/^DECODE_CONFIGS = //' | tr -d ' ' > "$w/table.json"
  # the GEMV grid with w_ahead (two weight tiles in flight) at Llama-3-8B's shapes, M = 1, tp 1 and 2
  CUDA_VISIBLE_DEVICES=1 timeout 100 python benchmarks/gemv_sweep.py --dtypes fp8 bf16 --ms 1 --budget_s 70 \
    --out "$w/gemv_rows.jsonl" > "$w/gemv_sweep.txt" 2>&1
}
say "== 1. new paths' GPU tests, kernels | sweep"
part1_gpu0 & part1_gpu1 & wait
say "$(tail -3 "$w/new_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/new_tests.txt" | head -10 | tee -a "$OUT/summary.txt"
cat "$w/kernel.jsonl" >> "$OUT/summary.txt"; grep -E "^b=|entry" "$w/attention_sweep.txt" >> "$OUT/summary.txt"
grep -vE "^\{" "$w/gemv_sweep.txt" | tail -30 >> "$OUT/summary.txt"
TABLE=$(cat "$w/table.json" 2>/dev/null); [ -z "$TABLE" ] && TABLE='{}'
say "table: $TABLE   (part 1: $((SECONDS - t0)) s)"; pack
say "== 2. the sweep's table beside the repo's, end to end"
T128="--num_requests 1000 --input_len 128 --output_len 128"
T1000="--num_requests 500 --input_len 1000 --output_len 1000 --max_batch_size 512 --max_num_tokens 16384"
b fp8kv_128_table "CUDA_VISIBLE_DEVICES=0 SHARDLLM_DECODE_CONFIGS=$TABLE" --dtype fp8 --kv_cache_dtype fp8 $T128 &
b fp8kv_128_repo "CUDA_VISIBLE_DEVICES=1" --dtype fp8 --kv_cache_dtype fp8 $T128 & wait
T=110 b fp8kv_1000_table "CUDA_VISIBLE_DEVICES=0 SHARDLLM_DECODE_CONFIGS=$TABLE" --dtype fp8 --kv_cache_dtype fp8 $T1000 &
T=110 b fp8kv_1000_repo "CUDA_VISIBLE_DEVICES=1" --dtype fp8 --kv_cache_dtype fp8 $T1000 & wait
say "(part 2: $((SECONDS - t0)) s)"; pack
say "total: $((SECONDS - t0)) s"; pack
