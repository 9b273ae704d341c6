#!/usr/bin/env bash
# Fifteenth session (one H200, about 7 minutes; issue 13's batch-1 floor). benchmarks/cuda_gemv_probe.py found FMA
# GEMV configs outside gemv_sweep.py's grid (one row a program, 2 KB K tiles) faster than the table's at M = 1 with
# PDL off: o 7.56 -> 7.06 us, gate_up 32.69 -> 31.65 (plain down 21.26 -> 17.56; the engine's down is the fused SiLU
# form). 1. The fused SiLU down GEMV over a wider grid (`cuda_gemv_probe.py --silu`). 2. 8B fp8 + fp8 KV batch 1,
# alternating twice: the default; o and gate_up at the new configs (SHARDLLM_GEMV_CONFIGS); those and the fused
# down's best.
#     LIMIT_S=480 bash benchmarks/device_s17_b.sh
set -u
. benchmarks/device_rows.sh
device_start 480
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 env SHARDLLM_PDL=0 python benchmarks/cuda_gemv_probe.py --silu 2>&1 | grep -v -i warn > "$w/silu.txt"
grep -v '"kernel": "triton"' "$w/silu.txt" | tee -a "$OUT/summary.txt"
grep '"kernel": "triton"' "$w/silu.txt" | python -c "
import json, sys
rows = sorted((json.loads(l) for l in sys.stdin), key=lambda r: r['us'])[:5]
for r in rows: print(r)" | tee -a "$OUT/summary.txt"
silu=$(grep '^SHARDLLM_GEMV_CONFIGS_SILU=' "$w/silu.txt" | cut -d= -f2-)
A='{"fp8":{"4096x4096":{"1":[0,1,2048,1,2,3,0]},"28672x4096":{"1":[0,1,2048,1,2,3,0]}}'
[ -n "$silu" ] && B="${A},\"fp8_silu\":${silu}}" || B="$A}"
A="$A}"
say "A=$A"; say "B=$B"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for r in a b; do
  row 90 "b1_default_$r" ""
  row 90 "b1_o_gateup_$r" "SHARDLLM_GEMV_CONFIGS=$A"
  row 90 "b1_o_gateup_down_$r" "SHARDLLM_GEMV_CONFIGS=$B"
done
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
