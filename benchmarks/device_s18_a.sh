#!/usr/bin/env bash
# Queued by the fifteenth session (one H200, about 10 minutes; issue 13's batch-1 and 1000/1000 floors).
# SHARDLLM_DECODE_FUSED_ROTARY=1 (off): decode-only steps rotate q, k and write k, v inside the TMA decode attention
# kernel (triton_paged.NewKV, TensorRT-LLM's masked-attention design), one launch a layer fewer (the fused rotary +
# KV write took ~90 us a batch-1 token and ~0.44 ms a 512-row step, docs/benchmarks.md). CPU: bit-equal caches and
# matching attention under the interpreter, the same tokens end to end; compiles for sm90 with Triton 3.6 and 3.9
# at the same pipeline depth (155 / 142 registers against 132 / 128). 1. GPU tests of it and of the attention paths
# it touches. 2. 8B fp8 + fp8 KV, default and with it, alternating: batch 1 twice, 500 x 1000/1000 twice,
# 1000 x 128/128 once. If both gain (batch 1 by 2%+, 1000/1000 not worse), make it the default. Beside it at batch
# 1: SHARDLLM_GEMV_FUSED_NORM=1 (the residual add + RMSNorm inside the qkv / gate_up GEMVs; 6% slower in the seventh
# session, before GEMVs loaded their first weight tile ahead of the PDL wait), alone and with it.
#     LIMIT_S=590 bash benchmarks/device_s18_a.sh
set -u
. benchmarks/device_rows.sh
device_start 590
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_decode_fused_rotary.py \
  tests/layers/test_decode_attention_tma.py tests/layers/test_v_transposed_cache.py \
  tests/layers/test_attention_rotary.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
F="SHARDLLM_DECODE_FUSED_ROTARY=4096"  # every decode-only step (it ran as the switch =1, before it became a row bound)
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
N="SHARDLLM_GEMV_FUSED_NORM=1"  # last measured in the seventh session, before the early weight tile (W_EARLY)
for r in a b; do
  row 70 "b1_default_$r" ""
  row 50 "b1_fused_$r" "$F"
  row 50 "b1_fused_norm_$r" "$N"
  row 50 "b1_fused_both_$r" "$F $N"
done
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --num_requests 500 --input_len 1000 --output_len 1000"
for r in a b; do
  row 100 "1000_default_$r" ""
  row 80 "1000_fused_$r" "$F"
done
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --num_requests 1000 --input_len 128 --output_len 128"
row 60 "128_default" ""
row 60 "128_fused" "$F"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
