#!/usr/bin/env bash
# The next session's first call (kind nvidia-h200-x2, about 8-9 minutes; LIMIT_S guards the later parts).
#   1. programmatic dependent launch (SHARDLLM_PDL, layers/pdl.py; never run on a GPU yet): its GPU tests (tokens
#      equal with it on and off: graphs, eager, tp 2), then batch-1 TPOT with it on (GPU 0) beside off (GPU 1):
#      Llama-3-8B fp8 and bf16, then tp = 2 bf16 on and off one after the other (issue 13: fp8 batch-1 at 85% of the
#      roofline, now 66%; issue 15: bf16 at 90%, now 87%; tp = 2 <= 2.35 ms, now 3.1);
#   2. Llama-3-70B fp8 batch-1 on one GPU with its own GEMV entries (20.79 ms with the nearest-shape configs), beside
#      Llama-3-8B bf16 1000 x 128/128 on the other; then 8B bf16 tp = 2 and pp = 2 (issue 15's scaling rows);
#   3. decode-step profiles at batch 1024 (benchmarks/profile_decode.py): 8B fp8 + fp8 KV beside 8B bf16, then
#      Mixtral-8x7B fp8 tp = 2 (16,223 out tok/s against TensorRT-LLM's 27,451 on 2 x H100), then 8B bf16 tp = 2.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=500 bash benchmarks/device_s5_a.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-500}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b
say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)"
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/layers/test_pdl.py > "$w/pdl_tests.txt" 2>&1
say "pdl tests: $(tail -1 "$w/pdl_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/pdl_tests.txt" | head | tee -a "$OUT/summary.txt"
pack
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
T128="--num_requests 1000 --input_len 128 --output_len 128"
MODEL_FLAGS="--model llama-3-8b"
for dt in fp8 bfloat16; do
  T=60 b "8b_${dt}_b1_pdl" "CUDA_VISIBLE_DEVICES=0 SHARDLLM_PDL=1" --dtype $dt $B1 &
  T=60 b "8b_${dt}_b1_nopdl" "CUDA_VISIBLE_DEVICES=1 SHARDLLM_PDL=0" --dtype $dt $B1 & wait
done
T=60 b 8b_bf16_tp2_b1_pdl "SHARDLLM_PDL=1" --tp_size 2 $B1
T=60 b 8b_bf16_tp2_b1_nopdl "SHARDLLM_PDL=0" --tp_size 2 $B1; pack
say "(part 1: $((SECONDS - t0)) s)"
MODEL_FLAGS="--model llama-3-70b"
[ "$(left)" -gt 130 ] && T=100 b 70b_fp8_b1_tp1 "CUDA_VISIBLE_DEVICES=0" --dtype fp8 $B1 &
MODEL_FLAGS="--model llama-3-8b"
[ "$(left)" -gt 130 ] && T=100 b 8b_bf16_tp1 "CUDA_VISIBLE_DEVICES=1" $T128 &
wait; pack
[ "$(left)" -gt 90 ] && { T=80 b 8b_bf16_tp2 "" --tp_size 2 $T128; pack; }
[ "$(left)" -gt 90 ] && { T=80 b 8b_bf16_pp2 "" --pp_size 2 $T128; pack; }
say "(part 2: $((SECONDS - t0)) s)"
p() {  # name timeout args...: one profile, its JSON lines and the rank files under $w
  local name=$1 t=$2; shift 2
  [ "$(left)" -gt "$t" ] || { say "$name: skipped (time)"; return; }
  timeout "$t" python benchmarks/profile_decode.py --load_format dummy --input_len 128 --batch_sizes 1024 --steps 8 \
    --top 20 --out_dir "$w/ranks_$name" "$@" > "$w/prof_$name.jsonl" 2> "$w/prof_$name.err"
  say "$name rc=$? $(grep -c '^{' "$w/prof_$name.jsonl") lines; $(grep -E 'Error|error:' "$w/prof_$name.err" | head -2)"
}
CUDA_VISIBLE_DEVICES=0 p 8b_fp8kv 110 --model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 &
CUDA_VISIBLE_DEVICES=1 p 8b_bf16 110 --model llama-3-8b --dtype bf16 & wait; pack
p mixtral_fp8_tp2 120 --model mixtral-8x7b --dtype fp8 --tp_size 2; pack
p 8b_bf16_tp2 90 --model llama-3-8b --dtype bf16 --tp_size 2; pack
python benchmarks/profile_decode.py --summary "$w"/prof_*.jsonl >> "$OUT/summary.txt" 2>&1
say "total: $((SECONDS - t0)) s"; pack
