#!/usr/bin/env bash
# Seventh session, second call (one H200, about 7 minutes): where 8B fp8 + fp8 KV 500 x 1000/1000 loses against
# TensorRT-LLM's 17,744 (15,839 in the sixth session): ~9 s of ~32 went to the phase in which prompts are still
# prefilled (ttft p99 9.2 s). Rows at --max_num_tokens 16384 (default) / 8192 / 32768 with the phase split
# (ttft_ms_max, decode_phase_tpot_ms), then a step profile of three prefill-phase steps (SHARDLLM_PROFILE_STEPS=14:3:
# the bench's warm-up takes the first ~9 execute_model calls).
# Then Nsight Compute on one FP8-cache and one bf16-cache decode-attention launch (benchmarks/ncu_decode_attention.py).
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=450 bash benchmarks/device_s7_b.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 450
export CUDA_VISIBLE_DEVICES=0
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
for mnt in 16384 8192 32768; do
  row 75 "fp8kv_1000_mnt$mnt" "" --max_num_tokens $mnt $T1000
done
phase_rows
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
# Nsight Compute on one decode-attention launch at 512 x 1500 (if ncu reads counters on this machine): the FP8
# cache at 64-token pages (3.41 TB/s) beside the bf16 cache at 16 (4.3): which pipe or stall holds the FP8 kernel
if command -v ncu > /dev/null && [ "$(left)" -ge 90 ]; then
  for spec in "fp8 64" "bf16 16"; do
    set -- $spec
    timeout 80 ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section InstructionStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      python benchmarks/ncu_decode_attention.py --cache $1 --block_size $2 --case 512x1500 \
      --config '{"tma": true, "num_warps": 2, "num_stages": 4}' > "$w/ncu_$1_$2.txt" 2>&1
    say "ncu $1 $2: rc=$? $(grep -c . "$w/ncu_$1_$2.txt") lines"; pack
  done
else
  say "ncu: not run ($(command -v ncu || echo 'not on PATH'); $(left) s left)"
fi
say "total: $((SECONDS - t0)) s"; pack
