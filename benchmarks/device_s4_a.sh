#!/usr/bin/env bash
# Fourth session, call 3 (kind nvidia-h200-x2, about 6-8 minutes): the new defaults (fp16 dots over an FP8 cache in
# the pointer kernels; the TMA decode entries of DECODE_CONFIGS) beside the previous ones, and batch-1 fusions.
#   GPU 0: benchmarks/device_gemv_fused.sh with EXTRA=1 (the fused SiLU / norm GEMVs: GPU tests, kernels, batch-1 TPOT
#          of Llama-3-8B bf16 and fp8 with each switch off and on).
#   GPU 1: Llama-3-8B fp8 + fp8 KV 1000 x 128/128, new beside old ("old": SHARDLLM_FP8_ATTN_F16_DOT=0 and the fp8
#          entries of the third session's table); 500 x 1000/1000 new, pointer kernel at the 512 bucket (fp16 dots),
#          and the bf16 cache; then Llama-3-70B fp8 + fp8 KV on one GPU, 1000 x 128/128, if time is left.
# Everything in $OUT/results.tgz and $OUT/summary.txt (the device returns at most 8 files).
#   LIMIT_S=540 bash benchmarks/device_s4_a.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-540}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b
say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)"
gpu0() {
  CUDA_VISIBLE_DEVICES=0 OUT="$w/gemv" EXTRA=1 ROW_TIMEOUT=55 timeout $(( limit - 20 )) \
    bash benchmarks/device_gemv_fused.sh > "$w/gemv_fused.txt" 2>&1
}
OLD_FP8='{"fp8_e4m3/128/1":{"block_n":32},"fp8_e4m3/128/256":{"block_n":32,"early_v":true,"prefetch_pages":true},"fp8_e4m3/128/512":{"num_warps":2},"fp8_e4m3/128/64":{"block_n":32,"early_v":true,"prefetch_pages":true}}'
PTR512='{"fp8_e4m3/128/512":{"block_n":32,"early_v":true,"prefetch_pages":true}}'
T128="--num_requests 1000 --input_len 128 --output_len 128"
T1000="--num_requests 500 --input_len 1000 --output_len 1000 --max_batch_size 512"
gpu1() {
  MODEL_FLAGS="--model llama-3-8b"
  T=110 b 8b_fp8kv_128_new "CUDA_VISIBLE_DEVICES=1" --dtype fp8 --kv_cache_dtype fp8 $T128
  T=110 b 8b_fp8kv_128_old "CUDA_VISIBLE_DEVICES=1 SHARDLLM_FP8_ATTN_F16_DOT=0 SHARDLLM_DECODE_CONFIGS=$OLD_FP8" \
    --dtype fp8 --kv_cache_dtype fp8 $T128
  T=120 b 8b_fp8kv_1000_new "CUDA_VISIBLE_DEVICES=1" --dtype fp8 --kv_cache_dtype fp8 $T1000
  T=120 b 8b_fp8kv_1000_ptr512 "CUDA_VISIBLE_DEVICES=1 SHARDLLM_DECODE_CONFIGS=$PTR512" \
    --dtype fp8 --kv_cache_dtype fp8 $T1000
  [ "$(left)" -gt 130 ] && T=120 b 8b_fp8_1000_bf16kv "CUDA_VISIBLE_DEVICES=1" --dtype fp8 $T1000
  MODEL_FLAGS="--model llama-3-70b"
  [ "$(left)" -gt 150 ] && T=$(( $(left) - 15 )) b 70b_fp8kv_128_tp1 "CUDA_VISIBLE_DEVICES=1" --dtype fp8 \
    --kv_cache_dtype fp8 $T128
}
gpu0 & gpu1 & wait
say "== gemv fused (GPU 0)"; grep -vE "^\.|Warning|warn" "$w/gemv_fused.txt" | tail -60 >> "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"; pack
