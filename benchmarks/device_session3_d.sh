#!/usr/bin/env bash
# Issues 13 and 15, two H200s (kind nvidia-h200-x2), about 9 minutes: this session's paths checked and timed.
#  1. benchmarks/fp8_attention_kernel.py (GPU 0): FP8-cache decode attention, fp16 dots beside bf16 widening, the TMA
#     kernel's variants, a bf16 cache; the fastest TMA variant per cache dtype becomes a decode-config table if it
#     beats the pointer kernel at batch 1024. At once on GPU 1: benchmarks/fused_act_quant.py.
#  2. Llama-3-8B dummy fp8 + fp8 KV, 1000 x 128/128 (max batch 1024, 16k tokens a step): new (defaults) on GPU 0
#     beside old (SHARDLLM_FP8_FUSED_ACT_QUANT=0 SHARDLLM_GRAPH_LM_HEAD=0 SHARDLLM_FP8_ATTN_F16_DOT=0) on GPU 1.
#  3. the GPU test suite (benchmarks/device_gpu_suite.sh, 330 s limit).
#  4. with the TMA table (if any) beside without; tp = 2 batch-1 with the LM head in the graph (1) and eager (0).
#   bash benchmarks/device_session3_d.sh      results: $OUT/d.jsonl, logs under $OUT
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u; t0=$SECONDS
b() {  # b NAME "ENV=.. ENV=.." FLAGS...   one throughput row into $out/d.jsonl
  local name=$1 envs=$2; shift 2
  line=$(env $envs timeout ${T:-100} python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy \
         --json "$@" 2> "$out/err_$name.txt" | tail -1)
  [ -z "$line" ] && { echo "$name: no output"; tail -3 "$out/err_$name.txt"; return; }
  python - "$name" "$envs" "$line" "$out/d.jsonl" <<'PY'
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
echo "== 1. kernels"
CUDA_VISIBLE_DEVICES=0 timeout 75 python benchmarks/fp8_attention_kernel.py --cases 1024x192 500x1500 \
  2> "$out/err_kernel.txt" > "$out/kernel.jsonl" &
CUDA_VISIBLE_DEVICES=1 timeout 60 python benchmarks/fused_act_quant.py > "$out/fused_kernels.txt" 2>&1 &
wait
cat "$out/kernel.jsonl"; tail -3 "$out/err_kernel.txt"; grep -v Warning "$out/fused_kernels.txt" | tail -24
TABLE=$(python - "$out/kernel.jsonl" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.startswith("{")]
table = {}
for dt, ptr, key in (("bf16", "bf16", "bf16"), ("fp8", "fp8_f16dot", "fp8_e4m3")):
    at = {r["kernel"]: r["us"] for r in rows if r["batch"] == 1024}
    tma = {k: v for k, v in at.items() if k.startswith(dt + "_tma_")}
    if tma and ptr in at and min(tma.values()) < 0.97 * at[ptr]:
        best = min(tma, key=tma.get)  # e.g. fp8_tma_w2_s3
        w, s = best.split("_w")[1].split("_s")
        fields = {"tma": True, "num_warps": int(w)} | ({} if s == "None" else {"num_stages": int(s)})
        table |= {f"{key}/128/{b}": fields for b in (64, 256, 512)}
print(json.dumps(table, separators=(",", ":")))
PY
)
echo "TMA table: $TABLE"
echo "== 2. new beside old ($((SECONDS - t0)) s)"
T128="--num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 1024 --max_num_tokens 16384"
OLD="SHARDLLM_FP8_FUSED_ACT_QUANT=0 SHARDLLM_GRAPH_LM_HEAD=0 SHARDLLM_FP8_ATTN_F16_DOT=0"
b fp8kv_128_new "CUDA_VISIBLE_DEVICES=0" --dtype fp8 --kv_cache_dtype fp8 $T128 &
b fp8kv_128_old "CUDA_VISIBLE_DEVICES=1 $OLD" --dtype fp8 --kv_cache_dtype fp8 $T128 &
wait
echo "== 3. GPU suite ($((SECONDS - t0)) s)"
OUT="$out/suite" bash benchmarks/device_gpu_suite.sh > "$out/suite.txt" 2>&1
grep -E "GPU SUITE|FAILED|ERROR|^\[gpu_guard\]" "$out/suite.txt" | head -30
echo "== 4. TMA table, tp = 2 batch-1 ($((SECONDS - t0)) s)"
if [ "$TABLE" != "{}" ]; then
  b fp8kv_128_tma "CUDA_VISIBLE_DEVICES=0 SHARDLLM_DECODE_CONFIGS=$TABLE" --dtype fp8 --kv_cache_dtype fp8 $T128 &
  b bf16_128_tma "CUDA_VISIBLE_DEVICES=1 SHARDLLM_DECODE_CONFIGS=$TABLE" $T128 &
  wait
fi
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for s in 1 0; do b tp2_b1_head$s "SHARDLLM_GRAPH_LM_HEAD=$s" --tp_size 2 $B1; done
echo "total: $((SECONDS - t0)) s"
grep -h -i -E "Traceback|Error" "$out"/err_*.txt | sort | uniq -c | head -8
