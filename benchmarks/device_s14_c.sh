#!/usr/bin/env bash
# Queued by the thirteenth session (one H200, about 4 minutes; issue 13's batch-1 floor, 0.85 of the roofline, where
# per-op kernels stall at ~0.69: each launch ramps and drains, and none can load the next one's weights). The
# persistent batch-1 MLP (shardllm/layers/persistent_mlp.py, not wired into the models): norm + gate_up + SiLU-down
# in one launch with a grid barrier, the down weights' first step loaded before it. 1. Its GPU tests (one launch equal
# to two, eagerly and in a CUDA graph; a hang ends at the tests' timeout). 2. benchmarks/persistent_mlp.py: the
# engine's three launches against it, us per MLP at Llama-3-8B's shapes (then 70B's), 4 and 8 warps, the resident
# grid and 132 / 264 programs. 3. End to end in the engine (SHARDLLM_PERSISTENT_MLP=1, off by default): Llama-3-8B
# fp8 batch 1 beside the default, alternating, twice. If it wins, make it the default and build the attention
# block's twin (qkv GEMV, rotary + KV write, attention, o GEMV: the other ~40% of a layer's overhead).
#     LIMIT_S=420 bash benchmarks/device_s14_c.sh
set -u
. benchmarks/device_rows.sh
device_start 420
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_persistent_mlp.py 2>&1 | tail -4 \
  | tee -a "$OUT/summary.txt"
timeout 100 python benchmarks/persistent_mlp.py --progs 132 264 --warps 4 8 2>&1 | grep -v -i warn \
  | tee -a "$OUT/summary.txt"
timeout 60 python benchmarks/persistent_mlp.py --model llama-3-70b --layers 6 --warps 4 2>&1 | grep -v -i warn \
  | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for r in a b; do
  row 40 "b1_default_$r" ""
  row 40 "b1_persistent_mlp_$r" "SHARDLLM_PERSISTENT_MLP=1"
done
grep -h "persistent batch-1 MLP\|persistent MLP:" "$w"/err_b1_persistent_mlp_*.txt 2>/dev/null | sort | uniq -c \
  | tee -a "$OUT/summary.txt"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
