#!/usr/bin/env bash
# The next session's first call (kind nvidia-h200-x2, about 8 minutes; LIMIT_S guards the later parts):
#   1. MoE GPU tests (the glue's row limit at ep 2 has not run on a GPU), then Mixtral-8x7B fp8 tp 2 decode-step
#      profiles with the glue, ep 1 and ep 2 (what is left around the grouped GEMMs);
#   2. Mixtral tp 2, 1000 x 128/128: fp8 ep 1 / ep 2 (17,179 / 19,353 in the fifth session, before the row limit),
#      bf16 ep 1 / ep 2 at the default batch, to settle `plan`'s ep advice;
#   3. issue 15: 8B bf16 tp 2 with the symmetric-memory all-reduce beside NCCL (cut by time in the fifth session);
#   4. PDL batch-1 on the same card, on then off (the fifth session compared two cards): 8B fp8 on GPU 0, bf16 on 1.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=500 bash benchmarks/device_s6_a.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 500
T128="--num_requests 1000 --input_len 128 --output_len 128"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/layers/test_fp8_moe_gpu.py tests/models/test_moe.py \
  > "$w/moe_tests.txt" 2>&1
say "moe gpu tests: $(tail -1 "$w/moe_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/moe_tests.txt" | head | tee -a "$OUT/summary.txt"
for ep in ${PROFILE_EPS-1 2}; do  # PROFILE_EPS="" skips the profiles
  [ "$(left)" -gt 110 ] || break
  timeout 100 python benchmarks/profile_decode.py --load_format dummy --input_len 128 --batch_sizes 1024 --steps 8 \
    --top 25 --out_dir "$w/ranks_mixtral_ep$ep" --model mixtral-8x7b --dtype fp8 --tp_size 2 --ep_size $ep \
    > "$w/prof_mixtral_ep$ep.jsonl" 2> "$w/prof_mixtral_ep$ep.err"
  say "profile mixtral ep $ep: rc=$?"
done
python benchmarks/profile_decode.py --summary "$w"/prof_mixtral_ep*.jsonl >> "$OUT/summary.txt" 2>&1; pack
row 100 mixtral_fp8_ep1 "" --model mixtral-8x7b --dtype fp8 --tp_size 2 $T128
row 100 mixtral_fp8_ep2 "" --model mixtral-8x7b --dtype fp8 --tp_size 2 --ep_size 2 $T128
row 100 mixtral_bf16_ep1 "" --model mixtral-8x7b --tp_size 2 $T128
row 100 mixtral_bf16_ep2 "" --model mixtral-8x7b --tp_size 2 --ep_size 2 $T128
row 80 8b_bf16_tp2_symm "" --model llama-3-8b --tp_size 2 --all_reduce symm_mem $T128
row 80 8b_bf16_tp2_nccl "" --model llama-3-8b --tp_size 2 $T128
if [ "$(left)" -ge 130 ]; then
  MODEL_FLAGS="--model llama-3-8b"
  ( T=60 b 8b_fp8_b1_pdl "CUDA_VISIBLE_DEVICES=0 SHARDLLM_PDL=1" --dtype fp8 $B1
    T=60 b 8b_fp8_b1_nopdl "CUDA_VISIBLE_DEVICES=0 SHARDLLM_PDL=0" --dtype fp8 $B1 ) &
  ( T=60 b 8b_bf16_b1_pdl "CUDA_VISIBLE_DEVICES=1 SHARDLLM_PDL=1" $B1
    T=60 b 8b_bf16_b1_nopdl "CUDA_VISIBLE_DEVICES=1 SHARDLLM_PDL=0" $B1 ) & wait; pack
fi
say "total: $((SECONDS - t0)) s"; pack
