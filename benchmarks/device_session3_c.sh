#!/usr/bin/env bash
# Issues 13 and 15, two H200s (kind nvidia-h200-x2), about 9 minutes. This session's new paths on the GPU, old beside
# new, every row its own engine (Llama-3-8B dummy):
#  1. in parallel: GPU 0 the TMA decode kernel (tests, kernel timings, the decode-config sweep of both cache dtypes,
#     whose table the later rows use through SHARDLLM_DECODE_CONFIGS) and the fused FP8 activation quantization tests;
#     GPU 1 the LM head in the decode graph (tests) with batch-1 TPOT, switch 0 and 1, and the fused kernels' timings;
#  2. throughput, pairs at once (new on GPU 0, old on GPU 1): fp8 + fp8 KV at 1000 x 128/128 (max batch 1024, 16k
#     tokens a step), fp8 with the bf16 cache, fp8 + fp8 KV 500 x 1000/1000, bf16;
#  3. tp = 2: the LM head tests, batch-1 head 0 / 1, 1000 x 128/128 bf16 (beside part 2's one-GPU row).
#   bash benchmarks/device_session3_c.sh       results: $OUT/c.jsonl and logs
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u; t0=$SECONDS
b() {  # b NAME "ENV=.. ENV=.." FLAGS...   one throughput row into $out/c.jsonl
  local name=$1 envs=$2; shift 2
  line=$(env $envs timeout ${T:-120} python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy \
         --json "$@" 2> "$out/err_$name.txt" | tail -1)
  [ -z "$line" ] && { echo "$name: no output"; tail -3 "$out/err_$name.txt"; return; }
  python - "$name" "$envs" "$line" "$out/c.jsonl" <<'PY'
import json, sys
name, envs, line, path = sys.argv[1:]
try:
    d = json.loads(line)
except ValueError:
    d = {"error": line[-300:]}
d.update(row=name, env=envs[:300])
open(path, "a").write(json.dumps(d) + "\n")
print(name, {k: d.get(k) for k in ("output_tok_s", "tpot_ms_p50", "fraction_of_roofline", "batch_size", "elapsed_s",
                                   "error")}, flush=True)
PY
}
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_decode_attention_tma.py \
    tests/layers/test_fp8_attention_f16_dot.py tests/layers/test_fp8_fused_act_quant.py 2>&1 | tail -5
  timeout 80 python benchmarks/fp8_attention_kernel.py --cases 1024x192 500x1500 2> "$out/err_kernel.txt" \
    > "$out/kernel.jsonl"; echo "kernel rc=$?"
  timeout 100 python benchmarks/attention_sweep.py --budget_s 60 --out "$out/attention_rows.jsonl" \
    > "$out/attention_sweep.txt" 2>&1; echo "sweep rc=$?"
  grep "^DECODE_CONFIGS = " "$out/attention_sweep.txt" | sed 's/^DECODE_CONFIGS = //' | tr -d ' ' > "$out/table.json"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_graph_lm_head_gpu.py 2>&1 | tail -4
  timeout 60 python benchmarks/fused_act_quant.py > "$out/fused_kernels.txt" 2>&1; echo "fused kernels rc=$?"
  B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
  for s in 0 1; do b bf16_b1_head$s "SHARDLLM_GRAPH_LM_HEAD=$s" $B1; b fp8_b1_head$s "SHARDLLM_GRAPH_LM_HEAD=$s" --dtype fp8 $B1; done
}
echo "== 1. kernels and tests (GPU 0) | graph head and batch-1 (GPU 1)"
gpu0 > "$out/part1_gpu0.txt" 2>&1 &
gpu1 > "$out/part1_gpu1.txt" 2>&1 &
wait
cat "$out/part1_gpu0.txt"; cat "$out/kernel.jsonl"; grep -v "^{" "$out/attention_sweep.txt" | grep -E "^b=|sweep" | tail -10
cat "$out/part1_gpu1.txt"; grep -v Warning "$out/fused_kernels.txt" | tail -8
echo "part 1: $((SECONDS - t0)) s"
TABLE=$(cat "$out/table.json" 2>/dev/null); [ -z "$TABLE" ] && TABLE='{}'
echo "table: $TABLE"
NEW="SHARDLLM_DECODE_CONFIGS=$TABLE"
OLD="SHARDLLM_FP8_FUSED_ACT_QUANT=0 SHARDLLM_GRAPH_LM_HEAD=0"
T128="--num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 1024 --max_num_tokens 16384"
echo "== 2. throughput (new on GPU 0, old on GPU 1)"
pair() {  # pair NAME FLAGS...
  local name=$1; shift
  b ${name}_new "CUDA_VISIBLE_DEVICES=0 $NEW" "$@" & b ${name}_old "CUDA_VISIBLE_DEVICES=1 $OLD" "$@" & wait
}
pair fp8kv_128 --dtype fp8 --kv_cache_dtype fp8 $T128
pair fp8_128 --dtype fp8 $T128
T=150 pair fp8kv_1000 --dtype fp8 --kv_cache_dtype fp8 --num_requests 500 --input_len 1000 --output_len 1000 \
  --max_batch_size 512 --max_num_tokens 16384
b bf16_128_mb256 "CUDA_VISIBLE_DEVICES=0 $NEW" --num_requests 1000 --input_len 128 --output_len 128 &
b bf16_128_mb1024 "CUDA_VISIBLE_DEVICES=1 $NEW" $T128 & wait
echo "part 2: $((SECONDS - t0)) s"
echo "== 3. tp = 2"
unset CUDA_VISIBLE_DEVICES
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_graph_lm_head_gpu.py -k tp2 2>&1 | tail -3
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for s in 0 1; do b tp2_b1_head$s "SHARDLLM_GRAPH_LM_HEAD=$s $NEW" --tp_size 2 $B1; done
b tp2_128_mb256 "$NEW" --tp_size 2 --num_requests 1000 --input_len 128 --output_len 128
b tp2_128_mb1024 "$NEW" --tp_size 2 $T128
echo "total: $((SECONDS - t0)) s"
grep -h -i -E "Traceback|Error" "$out"/err_*.txt | sort | uniq -c | head -8
