#!/usr/bin/env bash
# Fourth session, call 5 (kind nvidia-h200-x2, about 5 minutes): this session's new defaults checked and timed.
#   1. GPU 0: the GPU tests of the paths whose defaults changed (fp16 dots and TMA entries for FP8-cache attention,
#      the fused SiLU GEMV at M = 1, the nearest-shape FP8 GEMV configs) and the worker / model GPU paths.
#      GPU 1 at once: benchmarks/gemv_sweep.py --model llama-3-70b (fp8, M = 1, tp 1 and 2): the best config per
#      70B shape beside the one the nearest-shape rule picks.
#   2. Llama-3-70B fp8 batch-1 TPOT with the nearest-shape configs (default) beside SHARDLLM_GEMV_NEAREST_SHAPE=0:
#      tp 1 (the two rows at once, one per GPU), then tp 2 (one after the other);
#   3. Llama-3-8B batch-1 bf16 (GPU 0) beside fp8 (GPU 1) with the defaults.
# Results in $OUT/results.tgz and $OUT/summary.txt.   LIMIT_S=480 bash benchmarks/device_s4_c.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-480}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b
say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)"
tests=(tests/layers/test_decode_attention_tma.py tests/layers/test_fp8_attention_f16_dot.py tests/layers/test_fp8_gpu.py
       tests/layers/test_fp8_kv_cache.py tests/layers/test_fp8_kv_kernel_scales.py tests/layers/test_fp8_kv_scales.py
       tests/layers/test_triton_attention.py tests/layers/test_gemv.py tests/layers/test_gemv_silu.py
       tests/layers/test_gemv_norm.py tests/layers/test_fp8_fused_act_quant.py tests/worker/test_gpu_paths.py
       tests/worker/test_graph_lm_head_gpu.py)
( CUDA_VISIBLE_DEVICES=0 timeout 200 python -m pytest -q -m gpu -p no:cacheprovider -rfE "${tests[@]}" \
    > "$w/tests.txt" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 150 python benchmarks/gemv_sweep.py --model llama-3-70b --dtypes fp8 --ms 1 \
    --tp 1 2 --budget_s 90 --out "$w/gemv70b.jsonl" > "$w/gemv70b.txt" 2>&1 ) &
wait
say "$(tail -3 "$w/tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/tests.txt" | head -10 | tee -a "$OUT/summary.txt"
grep -vE "^\{" "$w/gemv70b.txt" | tail -25 >> "$OUT/summary.txt"
CUDA_VISIBLE_DEVICES=1 timeout 60 python - "$w/gemv70b.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
import torch
sys.path.insert(0, "benchmarks")
from gemv_sweep import timed, weights
from shardllm.layers.gemv import gemv
from shardllm.layers.quantization.fp8_triton import small_m_config
x = None
for line in open(sys.argv[1]):
    r = json.loads(line)
    n, k = r["n"], r["k"]
    pick = small_m_config(n, k, 1)
    ws, args = weights(n, k, True, torch.device("cuda"))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    us = timed([lambda wa=wa: gemv(x, *wa, pick) for wa in args])
    print("70b tp", r.get("tp"), r.get("layer"), f"{n}x{k}", "best", r.get("best_us"), r.get("best"),
          "| nearest-shape pick", round(us, 2), [int(v) for v in pick], "| previous", r.get("fp8_previous_us"))
PY
say "(part 1: $((SECONDS - t0)) s)"; pack
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
MODEL_FLAGS="--model llama-3-70b"
T=100 b 70b_fp8_b1_tp1_nearest "CUDA_VISIBLE_DEVICES=0" --dtype fp8 $B1 &
T=100 b 70b_fp8_b1_tp1_generic "CUDA_VISIBLE_DEVICES=1 SHARDLLM_GEMV_NEAREST_SHAPE=0" --dtype fp8 $B1 & wait; pack
T=90 b 70b_fp8_b1_tp2_nearest "" --dtype fp8 --tp_size 2 $B1; pack
[ $(( limit - (SECONDS - t0) )) -gt 130 ] && { T=90 b 70b_fp8_b1_tp2_generic "SHARDLLM_GEMV_NEAREST_SHAPE=0" \
  --dtype fp8 --tp_size 2 $B1; pack; }
MODEL_FLAGS="--model llama-3-8b"
if [ $(( limit - (SECONDS - t0) )) -gt 50 ]; then
  T=45 b 8b_bf16_b1 "CUDA_VISIBLE_DEVICES=0" $B1 & T=45 b 8b_fp8_b1 "CUDA_VISIBLE_DEVICES=1" --dtype fp8 $B1 & wait
fi
say "total: $((SECONDS - t0)) s"; pack
