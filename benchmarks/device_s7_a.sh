#!/usr/bin/env bash
# Seventh session, first call (one H200, about 9 minutes):
#   1. the opt-in fused add + RMSNorm GEMV at batch 1 (SHARDLLM_GEMV_FUSED_NORM, never timed): GPU tests, then 8B
#      batch-1 on / off in fp8 and bf16 (benchmarks/device_s6_f.sh, cut from the sixth session by its budget);
#   2. where 8B fp8 + fp8 KV 500 x 1000/1000 loses against 17,744: the sixth session's rows spent ~9 s of ~32 in the
#      phase where prompts are still prefilled (ttft p99 9.2 s). Rows at --max_num_tokens 16384 (default) / 8192 /
#      32768 with the phase split (ttft_ms_max, decode_phase_tpot_ms), then a step profile of three prefill-phase
#      steps (SHARDLLM_PROFILE_STEPS=14:3: the bench's warm-up takes the first ~9 execute_model calls).
#   3. Llama-3-70B fp8 + fp8 KV, one GPU, 1000 x 128/128.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=580 bash benchmarks/device_s7_a.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-580}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b, row
say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)"
export CUDA_VISIBLE_DEVICES=0
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/layers/test_gemv_norm.py > "$w/norm_tests.txt" 2>&1
say "gemv_norm gpu tests: $(tail -1 "$w/norm_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/norm_tests.txt" | head | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 40 8b_fp8_b1_norm_on "SHARDLLM_GEMV_FUSED_NORM=1" --dtype fp8 $B1
row 40 8b_fp8_b1_norm_off "SHARDLLM_GEMV_FUSED_NORM=0" --dtype fp8 $B1
row 40 8b_bf16_b1_norm_on "SHARDLLM_GEMV_FUSED_NORM=1" $B1
row 40 8b_bf16_b1_norm_off "SHARDLLM_GEMV_FUSED_NORM=0" $B1
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
for mnt in 16384 8192 32768; do
  row 75 "fp8kv_1000_mnt$mnt" "" --max_num_tokens $mnt $T1000
done
python - "$w/rows.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "ttft_ms_max" in r:
        print(f'{r["row"]:<24} {r["output_tok_s"]:>9,.0f} tok/s  elapsed {r["elapsed_s"]:6.2f} s  prefill phase '
              f'{r["ttft_ms_max"] / 1e3:5.2f} s  decode-phase TPOT {r["decode_phase_tpot_ms"]:6.2f} ms  steps {r["steps"]}')
PY
row 80 fp8kv_1000_prefill_profile "SHARDLLM_PROFILE_DIR=$w/prefill SHARDLLM_PROFILE_STEPS=14:3 SHARDLLM_PROFILE_TOP=25" $T1000
python - "$w/prefill/rank0.json" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
for st in d["steps"]:
    print({k: st.get(k) for k in ("index", "num_seqs", "num_tokens", "decode", "wall_us", "gpu_busy_us", "outside_us")})
a = d["all"]
print("mean step:", {k: a.get(k) for k in ("wall_us", "gpu_busy_us", "gpu_idle_us", "phases_us")})
for k in a["top_kernels"]:
    print(f'  {k["us_per_step"]:10.1f} us x{k["calls_per_step"]:<6} {k["name"][:90]}')
PY
# 3. Llama-3-70B fp8 + fp8 KV on this one GPU, 1000 x 128/128 (TensorRT-LLM's floor 3,803; 3,454 in the fourth
#    session, not re-measured since)
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8"
row 150 70b_fp8kv_tp1_128 "" --num_requests 1000 --input_len 128 --output_len 128
say "total: $((SECONDS - t0)) s"; pack
