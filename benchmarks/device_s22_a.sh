#!/usr/bin/env bash
# Queued by the seventeenth session (one H200, about 6 minutes). 1. Does SHARDLLM_FP8_GEMV_MAX_M=1 (chosen on
# Llama-3-8B's shapes) hold for Llama-3-70B at tp 2's per-rank shapes? `fp8_gemm.py --recipes --shapes
# llama-3-70b-tp2` at M = 1-256: the GEMV (M <= 16) against the per-tensor route and cuBLAS's row-wise kernel (one
# GPU times one rank's GEMMs). 2. Where a batch-1 / 2 / 8 fp8 decode step goes now (the GEMV at 1 row, the FP8 GEMM
# from 2), for issue 13's batch-1 floor (0.69 of the roofline against 0.85): `profile_decode.py`, PDL off so that
# each kernel's time excludes its wait, then on. 3. Batch 1 and 8 rows at the defaults.
#     LIMIT_S=400 bash benchmarks/device_s22_a.sh
set -u
. benchmarks/device_rows.sh
device_start 400
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 90 python benchmarks/fp8_gemm.py --recipes --shapes llama-3-70b-tp2 --ms 1 2 4 16 64 256 \
  > "$w/recipes_70b.jsonl" 2> "$w/recipes_70b_err.txt"
recipe_table "$w/recipes_70b.jsonl"
for pdl in 0 1; do
  SHARDLLM_PDL=$pdl timeout 120 python benchmarks/profile_decode.py --model llama-3-8b --load_format dummy \
    --dtype fp8 --kv_cache_dtype fp8 --batch_sizes 1 2 8 --input_len 128 --steps 32 \
    > "$w/profile_pdl$pdl.txt" 2>&1
  say "profile, SHARDLLM_PDL=$pdl:"; tail -60 "$w/profile_pdl$pdl.txt" >> "$OUT/summary.txt"; pack
done
for B in 1 8; do
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size $B --num_requests $B --input_len 1000 --output_len 256"
  row 40 "b${B}_default" ""
done
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
