#!/usr/bin/env bash
# The next session's first call (kind nvidia-h200-x2, about 9.5 minutes, finishes by itself before LIMIT_S):
# everything this session could not confirm on a GPU, and the figures that decide the defaults. Run it from a clean
# tree (commit first; never run git commands on the device: its .git is not this tree's).
#   1. in parallel: GPU 0 the new paths' GPU tests (TMA decode, fp16 dots, fused FP8 activation quantization, LM head
#      in the graph at tp = 1, the fused SiLU / norm GEMVs), then benchmarks/fp8_attention_kernel.py; GPU 1 the
#      decode-config sweep of both cache dtypes with the TMA variants (its JSON table -> table.json).
#   2. Llama-3-8B fp8 + fp8 KV with the sweep's table beside without, at once on the two GPUs: 1000 x 128/128 (max
#      batch 1024, 16k tokens a step) and 500 x 1000/1000 (max batch 512).
#   3. the GPU test suite with the time that is left (benchmarks/device_gpu_suite.sh, SUITE_LIMIT_S), if over 200 s;
#      else it says to run the suite as a call of its own.
# Everything lands in $OUT/results.tgz (re-packed after each part, so a cut-off run still returns what it had) and
# $OUT/summary.txt: the device returns at most 8 files.
#   LIMIT_S=540 bash benchmarks/device_next.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-540}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b
MODEL_FLAGS="--model llama-3-8b"; T=${T:-100}
say "$(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tr '\n' ' ') $(date -u)"
tests=(tests/layers/test_decode_attention_tma.py tests/layers/test_fp8_attention_f16_dot.py
       tests/layers/test_fp8_fused_act_quant.py tests/worker/test_graph_lm_head_gpu.py)
tests+=(tests/layers/test_gemv_silu.py tests/layers/test_gemv_norm.py)
part1_gpu0() {
  CUDA_VISIBLE_DEVICES=0 timeout 240 python -m pytest -q -m gpu -p no:cacheprovider -rfE "${tests[@]}" \
    > "$w/new_tests.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 80 python benchmarks/fp8_attention_kernel.py --cases 512x170 1024x192 500x1500 \
    > "$w/kernel.jsonl" 2> "$w/err_kernel.txt"
}
part1_gpu1() {
  CUDA_VISIBLE_DEVICES=1 timeout 150 python benchmarks/attention_sweep.py --budget_s 100 \
    --out "$w/attention_rows.jsonl" > "$w/attention_sweep.txt" 2>&1
  grep "^DECODE_CONFIGS = " "$w/attention_sweep.txt" | sed 's/^DECODE_CONFIGS = //' | tr -d ' ' > "$w/table.json"
}
say "== 1. new paths' GPU tests, kernels | sweep"
part1_gpu0 & part1_gpu1 & wait
say "$(tail -3 "$w/new_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/new_tests.txt" | head -10 | tee -a "$OUT/summary.txt"
cat "$w/kernel.jsonl" >> "$OUT/summary.txt"; grep -E "^b=|entry" "$w/attention_sweep.txt" >> "$OUT/summary.txt"
TABLE=$(cat "$w/table.json" 2>/dev/null); [ -z "$TABLE" ] && TABLE='{}'
say "table: $TABLE   (part 1: $((SECONDS - t0)) s)"; pack
say "== 2. the sweep's table beside the repo's, end to end"
T128="--num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 1024 --max_num_tokens 16384"
T1000="--num_requests 500 --input_len 1000 --output_len 1000 --max_batch_size 512 --max_num_tokens 16384"
b fp8kv_128_table "CUDA_VISIBLE_DEVICES=0 SHARDLLM_DECODE_CONFIGS=$TABLE" --dtype fp8 --kv_cache_dtype fp8 $T128 &
b fp8kv_128_repo "CUDA_VISIBLE_DEVICES=1" --dtype fp8 --kv_cache_dtype fp8 $T128 & wait
T=110 b fp8kv_1000_table "CUDA_VISIBLE_DEVICES=0 SHARDLLM_DECODE_CONFIGS=$TABLE" --dtype fp8 --kv_cache_dtype fp8 $T1000 &
T=110 b fp8kv_1000_repo "CUDA_VISIBLE_DEVICES=1" --dtype fp8 --kv_cache_dtype fp8 $T1000 & wait
say "(part 2: $((SECONDS - t0)) s)"; pack
left=$(( limit - (SECONDS - t0) - 20 ))
say "== 3. GPU suite, ${left} s"
if [ "$left" -gt 200 ]; then
  OUT="$w/suite" SUITE_LIMIT_S=$left bash benchmarks/device_gpu_suite.sh > "$w/suite.txt" 2>&1
  grep -E "GPU SUITE|^FAILED|^ERROR" "$w/suite.txt" | head -20 | tee -a "$OUT/summary.txt"
else
  say "too little time left for the suite: run benchmarks/device_gpu_suite.sh as its own call"
fi
say "total: $((SECONDS - t0)) s"; pack
