#!/usr/bin/env bash
# Twentieth session (one H200, about 5 minutes). Issue 13's batch-1 floor: what a persistent whole-step kernel
# would reach (benchmarks/megakernel_probe.py, benchmarks/csrc/weight_stream_chain.cu): a chain of Llama-3-8B's FP8
# GEMVs, 32 layers, a grid-wide barrier before every stage, weights streamed by a producer warp a block into a
# shared-memory ring, against the same chain through the engine's Triton GEMVs in one CUDA graph.
# 1. Two layers first (correctness; a hang ends at its timeout). 2. 32 layers, several ring shapes.
#     LIMIT_S=330 bash benchmarks/device_s25_a.sh
set -u
. benchmarks/device_rows.sh
device_start 330
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 100 python benchmarks/megakernel_probe.py --layers 2 --reps 3 --configs 10x16384x8 > "$w/small.jsonl" 2> "$w/small_err.txt"
say "small rc $?"; cat "$w/small.jsonl" >> "$OUT/summary.txt"; tail -5 "$w/small_err.txt" >> "$OUT/summary.txt"
pack
timeout $(( $(left) - 20 )) python benchmarks/megakernel_probe.py --layers 32 > "$w/chain.jsonl" 2> "$w/chain_err.txt"
say "chain rc $?"; cat "$w/chain.jsonl" >> "$OUT/summary.txt"; tail -5 "$w/chain_err.txt" >> "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
