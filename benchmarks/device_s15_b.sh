#!/usr/bin/env bash
# Fourteenth session, second call (one H200, about 6 minutes; issue 13's batch-1 floor). Found on the CPU from sm90
# compiles (Triton 3.6 and 3.9): Triton pipelines no load of a loop whose loads feed no dot unless the loop asks
# (tl.range's num_stages): the persistent MLP's flat loops and the engine's own FMA GEMV loop kept one step in
# flight a program. Asked, the pointer loads become cp.async stages and the TMA form keeps num_stages - 1 boxes in
# shared memory. 1. Persistent GPU tests. 2. benchmarks/persistent_mlp.py --variants (pipelined pointer and TMA
# forms) against the engine, and the engine's rows again with SHARDLLM_GEMV_LOOP_STAGES=3 and 4. 3. Llama-3-8B fp8
# batch 1 end to end: default, LOOP_STAGES 3 and 4, the fastest persistent variant, alternating, twice. 4. With
# time left, the GEMV GPU tests at LOOP_STAGES 3.
#     LIMIT_S=420 bash benchmarks/device_s15_b.sh
set -u
. benchmarks/device_rows.sh
device_start 420
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_persistent_mlp.py 2>&1 | tail -3 \
  | tee -a "$OUT/summary.txt"
timeout 200 python benchmarks/persistent_mlp.py --variants 8,1024,8,1024:00:4:2:1 8,512,8,512:00:4:1:4 \
  8,512,8,512:00:4:1:3 8,1024,8,1024:00:4:1:3 16,512,16,512:00:4:1:4 32,256,32,256:00:4:1:6:1 \
  16,256,16,256:00:4:1:8:1 32,256,32,256:00:8:1:6:1 16,256,8,256:00:4:1:8:1 64,256,32,256:00:8:1:4:1 2>&1 \
  | grep -v -i warn | tee "$w/mlp.jsonl" | tee -a "$OUT/summary.txt"
for s in 3 4; do
  SHARDLLM_GEMV_LOOP_STAGES=$s timeout 60 python benchmarks/persistent_mlp.py --variants 8,512,8,512:00:4:1:4 2>&1 \
    | grep '"engine' | sed "s/^/loop_stages=$s /" | tee -a "$OUT/summary.txt"
done
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
for r in a b; do
  row 40 "b1_default_$r" ""
  row 40 "b1_loop3_$r" "SHARDLLM_GEMV_LOOP_STAGES=3"
  row 40 "b1_loop4_$r" "SHARDLLM_GEMV_LOOP_STAGES=4"
  [ -n "$best" ] && row 40 "b1_persistent_$r" "SHARDLLM_PERSISTENT_MLP=1 SHARDLLM_PERSISTENT_MLP_CONFIG=$best"
done
grep -h "persistent batch-1 MLP" "$w"/err_b1_persistent_*.txt 2>/dev/null | sort | uniq -c | tee -a "$OUT/summary.txt"
phase_rows
if [ "$(left)" -ge 60 ]; then
  SHARDLLM_GEMV_LOOP_STAGES=3 timeout $(( $(left) - 10 )) python -m pytest -q -m gpu -p no:cacheprovider \
    tests/layers/test_gemv.py 2>&1 | tail -3 | sed "s/^/gemv tests at loop_stages=3: /" | tee -a "$OUT/summary.txt"
fi
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
