#!/usr/bin/env bash
# Issue 15: the LM head inside the decode CUDA graph. Kind nvidia-h200-x2, about 3.5 minutes (EXTRA=1: +2 minutes).
#   bash benchmarks/device_graph_head.sh          results: $OUT/graph_head.jsonl and a table on stdout
# 1. the GPU tests (graph-with-head tokens equal eager / head-less graphs, tp = 1 and tp = 2);
# 2. batch-1 TPOT of Llama-3-8B dummy, SHARDLLM_GRAPH_LM_HEAD=0 (old: head eager) beside =1 (new): bf16 tp = 1,
#    fp8 tp = 1 (the two one-GPU rows of a switch run at once, bf16 on GPU 0 and fp8 on GPU 1, so each old/new pair
#    shares its GPU), bf16 tp = 2 one after the other;
# 3. EXTRA=1: bf16 1000 x 128/128 at the default max batch 256, old then new on GPU 0 (no loss at large batches,
#    and the memory peak with the 64 MiB logits buffer).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
t0=$SECONDS

echo "== 1. GPU tests"
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_graph_lm_head_gpu.py 2>&1 | tail -6
echo "tests: $((SECONDS - t0)) s"

echo "== 2. batch-1 TPOT, switch 0 (head eager) and 1 (head in the graph)"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row() {  # row NAME "ENV=.. ENV=.." FLAGS...
  local name=$1 envs=$2; shift 2
  local line
  line=$(env $envs timeout ${ROW_TIMEOUT:-120} python -m shardllm.bench.throughput --model llama-3-8b \
         --load_format dummy --json "$@" 2> "$out/err_$name.txt" | tail -1)
  if [ -z "$line" ]; then echo "{\"row\": \"$name\", \"error\": \"no output\"}" >> "$out/graph_head.jsonl"
    echo "$name: no output"; tail -3 "$out/err_$name.txt"; return; fi
  python - "$name" "$envs" "$line" "$out/graph_head.jsonl" <<'PY'
import json, sys
name, envs, line, path = sys.argv[1:]
try:
    d = json.loads(line)
except ValueError:
    d = {"error": line[-300:]}
d.update(row=name, env=envs)
open(path, "a").write(json.dumps(d) + "\n")
PY
}
for s in 0 1; do
  row bf16_tp1_head$s "SHARDLLM_GRAPH_LM_HEAD=$s CUDA_VISIBLE_DEVICES=0" $B1 &
  row fp8_tp1_head$s "SHARDLLM_GRAPH_LM_HEAD=$s CUDA_VISIBLE_DEVICES=1" --dtype fp8 $B1 &
  wait
done
for s in 0 1; do row bf16_tp2_head$s "SHARDLLM_GRAPH_LM_HEAD=$s" --tp_size 2 $B1; done
if [ "${EXTRA:-0}" = 1 ]; then
  for s in 0 1; do
    row bf16_tp1_1000_head$s "SHARDLLM_GRAPH_LM_HEAD=$s CUDA_VISIBLE_DEVICES=0" --num_requests 1000 --input_len 128 \
      --output_len 128
  done
fi
grep -h "captured" "$out"/err_*head1.txt | sort | uniq -c | head -4  # which buckets held the head
grep -h -i -E "Traceback|Error" "$out"/err_*.txt | sort | uniq -c | head -8

python - "$out/graph_head.jsonl" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows[d["row"]] = d
print(f"{'row':<22}{'tpot p50 ms':>12}{'of roofline':>12}{'out tok/s':>11}{'peak GiB':>10}   new/old")
for name, d in rows.items():
    if "error" in d:
        print(f"{name:<22}  {d['error'][:80]}")
        continue
    old = rows.get(name.replace("head1", "head0"), {})
    ratio = ""
    if name.endswith("head1") and old.get("tpot_ms_p50"):
        key = "output_tok_s" if "1000" in name else "tpot_ms_p50"
        ratio = f"{old[key] / d[key]:.3f}x" if key == "tpot_ms_p50" else f"{d[key] / old[key]:.3f}x"
    print(f"{name:<22}{d.get('tpot_ms_p50', 0):>12}{d.get('fraction_of_roofline', ''):>12}"
          f"{d.get('output_tok_s', 0):>11}{max(d.get('peak_gib_per_rank') or [0]):>10}   {ratio}")
PY
echo "total: $((SECONDS - t0)) s"
