#!/usr/bin/env bash
# Fifth session, call 3 (kind nvidia-h200-x2, about 7 minutes; LIMIT_S guards the later rows):
#   1. the MoE Triton glue (layers/moe_kernels.py, SHARDLLM_MOE_FUSED_GLUE): its GPU tests (grouped FP8 and bf16 MoE
#      against the expert loop, CUDA graphs of the layer, a tiny Mixtral's tokens);
#   2. Mixtral-8x7B tp = 2, 1000 x 128/128: fp8 with the glue beside fp8 without it (16,223 last session), bf16 with
#      it; fp8 with ep = 2; then a decode-step profile of fp8 with the glue (the next target);
#   3. issue 15's tp = 2 scaling (8B bf16, 1000 x 128/128, 29,042 in call 1): NCCL's default protocol (RING_LL at
#      8 MiB in call 1's profile) beside NCCL_PROTO=Simple and the symmetric-memory all-reduce;
#   4. PDL batch-1 A/B on the same GPU (call 1 compared two cards): 8B fp8 on GPU 0, bf16 on GPU 1, on then off.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=470 bash benchmarks/device_s5_c.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-470}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b, row
T128="--num_requests 1000 --input_len 128 --output_len 128"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/layers/test_fp8_moe_gpu.py tests/models/test_moe.py \
  > "$w/moe_tests.txt" 2>&1
say "moe gpu tests: $(tail -1 "$w/moe_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/moe_tests.txt" | head | tee -a "$OUT/summary.txt"
pack
row 120 mixtral_fp8_tp2_glue "" --model mixtral-8x7b --dtype fp8 --tp_size 2 $T128
row 120 mixtral_fp8_tp2_noglue "SHARDLLM_MOE_FUSED_GLUE=0" --model mixtral-8x7b --dtype fp8 --tp_size 2 $T128
row 120 mixtral_bf16_tp2_glue "" --model mixtral-8x7b --tp_size 2 $T128
row 120 mixtral_fp8_tp2_ep2_glue "" --model mixtral-8x7b --dtype fp8 --tp_size 2 --ep_size 2 $T128
say "(part 2: $((SECONDS - t0)) s)"
row 80 8b_bf16_tp2_nccl "" --model llama-3-8b --tp_size 2 $T128
row 80 8b_bf16_tp2_simple "NCCL_PROTO=Simple" --model llama-3-8b --tp_size 2 $T128
row 80 8b_bf16_tp2_symm "" --model llama-3-8b --tp_size 2 --all_reduce symm_mem $T128
say "(part 3: $((SECONDS - t0)) s)"
if [ $(( limit - (SECONDS - t0) )) -ge 130 ]; then
  MODEL_FLAGS="--model llama-3-8b"
  ( T=60 b 8b_fp8_b1_pdl "CUDA_VISIBLE_DEVICES=0 SHARDLLM_PDL=1" --dtype fp8 $B1
    T=60 b 8b_fp8_b1_nopdl "CUDA_VISIBLE_DEVICES=0 SHARDLLM_PDL=0" --dtype fp8 $B1 ) &
  ( T=60 b 8b_bf16_b1_pdl "CUDA_VISIBLE_DEVICES=1 SHARDLLM_PDL=1" $B1
    T=60 b 8b_bf16_b1_nopdl "CUDA_VISIBLE_DEVICES=1 SHARDLLM_PDL=0" $B1 ) & wait; pack
  MODEL_FLAGS=""
fi
if [ $(( limit - (SECONDS - t0) )) -ge 100 ]; then
  timeout 100 python benchmarks/profile_decode.py --load_format dummy --input_len 128 --batch_sizes 1024 --steps 8 \
    --top 25 --out_dir "$w/ranks_mixtral" --model mixtral-8x7b --dtype fp8 --tp_size 2 > "$w/prof_mixtral.jsonl" \
    2> "$w/prof_mixtral.err"
  python benchmarks/profile_decode.py --summary "$w"/prof_mixtral.jsonl >> "$OUT/summary.txt" 2>&1
fi
say "total: $((SECONDS - t0)) s"; pack
