#!/usr/bin/env bash
# Fourteenth session (one H200, about 5 minutes; issue 13's batch-1 floor). The thirteenth session's persistent MLP
# ran at 104 us an 8B MLP against the engine's 51.5 (device_s14_c.sh): 2 programs an SM (253 registers: down's
# late-reduce tile of 16 x 1024 fp32), each loading one step at a time, its pipeline refilled at every tile. Its
# loops are now one flat (tile, K step) loop a phase, loading 1 or 2 steps ahead across tile ends, and the tiles,
# warps, steps ahead and stages are parameters. 1. The GPU tests. 2. benchmarks/persistent_mlp.py --variants: us
# per MLP against the engine's three launches (registers and residency per variant were read first from sm90
# compiles on the CPU: Triton pipelines none of these loads, so the steps loaded ahead are all that is in flight;
# late-reduce tiles of 8 x 1024 cost 200+ registers, 2 programs an SM; 8 x 512 without it 96, 5 an SM). 3. The fastest variant end to end (SHARDLLM_PERSISTENT_MLP_CONFIG)
# beside the default, Llama-3-8B fp8 batch 1, alternating, twice.
#     LIMIT_S=420 bash benchmarks/device_s15_a.sh
set -u
. benchmarks/device_rows.sh
device_start 420
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_persistent_mlp.py 2>&1 | tail -4 \
  | tee -a "$OUT/summary.txt"
timeout 200 python benchmarks/persistent_mlp.py --variants 8,512,16,1024:01:4:1:3 8,512,8,512:00:4:2:1 \
  8,512,8,512:00:2:2:1 16,512,16,512:00:4:2:1 8,1024,8,1024:00:4:2:1 8,512,8,512:00:4:1:1 32,256,32,256:00:4:2:1 \
  8,512,8,1024:01:4:2:1 8,512,4,1024:00:4:2:1 16,512,8,512:00:4:2:1 2>&1 | grep -v -i warn | tee "$w/mlp.jsonl" | tee -a "$OUT/summary.txt"
best=$(python - "$w/mlp.jsonl" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:
        pass
p = [r for r in rows if r.get("row") == "persistent" and r.get("us_per_mlp") and r.get("equal_to_two_launches")]
if p:
    r = min(p, key=lambda r: r["us_per_mlp"])
    print(f'{r["tiles"]}:{r["late"]}:{r["warps"]}:{r["ahead"]}:{r["stages"]}:{r.get("tma", 0)}')
PY
)
say "fastest persistent variant: ${best:-none}"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
if [ -n "$best" ]; then
  for r in a b; do
    row 40 "b1_default_$r" ""
    row 40 "b1_persistent_$r" "SHARDLLM_PERSISTENT_MLP=1 SHARDLLM_PERSISTENT_MLP_CONFIG=$best"
  done
  grep -h "persistent batch-1 MLP" "$w"/err_b1_persistent_*.txt 2>/dev/null | sort | uniq -c | tee -a "$OUT/summary.txt"
fi
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
