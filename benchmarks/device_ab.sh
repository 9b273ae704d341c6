#!/usr/bin/env bash
# Issue 15: old and new code paths side by side, each row its own engine, Llama-3-8B dummy, one JSON line per row.
#   bash benchmarks/device_ab.sh [ROWSET]     (kind nvidia-h200-x2; ROWSET: quick | full, default quick;
#   full: 11 rows, about 7 minutes)
# A row is: name, environment switches, then the `python -m shardllm.bench.throughput` flags. Results: $OUT/ab.jsonl
# (each line: the bench's JSON plus "row" and "env"), and a table on stdout.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
M="--model llama-3-8b --load_format dummy --json"
T128="--num_requests 1000 --input_len 128 --output_len 128"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row() {  # row NAME "ENV=.. ENV=.." FLAGS...
  local name=$1 envs=$2; shift 2
  local line
  line=$(env $envs timeout ${ROW_TIMEOUT:-150} python -m shardllm.bench.throughput $M "$@" 2> "$out/err_$name.txt" | tail -1)
  if [ -z "$line" ]; then echo "{\"row\": \"$name\", \"error\": \"no output (see err_$name.txt)\"}" | tee -a "$out/ab.jsonl"
    tail -3 "$out/err_$name.txt"; return; fi
  python - "$name" "$envs" "$line" <<'PY' | tee -a "$out/ab.jsonl"
import json, sys
name, envs, line = sys.argv[1:]
try:
    d = json.loads(line)
except ValueError:
    d = {"error": line[-300:]}
d.update(row=name, env=envs)
print(json.dumps(d))
PY
}
set_=${1:-quick}
if [ "$set_" = quick ]; then
  row tp2_overlap0 "SHARDLLM_TP_OVERLAP=0" --tp_size 2 $T128
  row tp2_overlap1 "SHARDLLM_TP_OVERLAP=1" --tp_size 2 $T128
  row pp2_shared "SHARDLLM_PP_SHARED_MAX_SEQS=1" --pp_size 2 $T128
  row pp2_permb "SHARDLLM_PP_SHARED_MAX_SEQS=0" --pp_size 2 $T128
fi
if [ "$set_" = full ]; then  # issue 15's table: old (earlier worker loop and pipeline) beside new, one call
  OLD="SHARDLLM_WORKER_WAIT_FOR_PLANS=0"
  OLDPP="SHARDLLM_WORKER_WAIT_FOR_PLANS=0 SHARDLLM_PP_EXTRA_MICROBATCH=0 SHARDLLM_PP_SHARED_MAX_SEQS=1"
  row tp1_b1 "CUDA_VISIBLE_DEVICES=0" $B1 &
  row tp1 "CUDA_VISIBLE_DEVICES=1" $T128 &
  wait
  row tp2_b1_old "$OLD" --tp_size 2 $B1
  row tp2_b1_new "X=1" --tp_size 2 $B1
  row tp2_b1_new_symm "X=1" --tp_size 2 --all_reduce symm_mem $B1
  row tp2_old "$OLD" --tp_size 2 $T128
  row tp2_new "X=1" --tp_size 2 $T128
  row tp2_new_symm "X=1" --tp_size 2 --all_reduce symm_mem $T128
  row pp2_old "$OLDPP" --pp_size 2 $T128
  row pp2_new "X=1" --pp_size 2 $T128
  row pp2_new_async "X=1" --pp_size 2 --async_scheduling $T128
fi
if [ "$set_" = final ]; then  # issues 13 and 15, old beside new, one call (about 8 minutes)
  OLDK="SHARDLLM_GEMV_TABLES=0 SHARDLLM_DECODE_ATTN_TUNED=0 SHARDLLM_PDL=0"  # the kernels' earlier launches
  OLD="$OLDK SHARDLLM_WORKER_WAIT_FOR_PLANS=0"
  OLDPP="$OLD SHARDLLM_PP_EXTRA_MICROBATCH=0 SHARDLLM_PP_SHARED_MAX_SEQS=1"
  F8="--dtype fp8 --max_batch_size 512"
  one_gpu() {  # $1: GPU, $2: "new" or "old" environment
    local g=$1 tag=$2 e="CUDA_VISIBLE_DEVICES=$1"; [ "$tag" = old ] && e="$e $OLDK"
    row tp1_b1_$tag "$e" $B1; row tp1_$tag "$e" $T128
    row fp8_b1_$tag "$e" $F8 $B1; row fp8_fp8kv_$tag "$e" $F8 --kv_cache_dtype fp8 $T128
  }
  one_gpu 0 new & one_gpu 1 old & wait
  row tp2_b1_old "$OLD" --tp_size 2 $B1
  row tp2_b1_new "X=1" --tp_size 2 $B1
  row tp2_old "$OLD" --tp_size 2 $T128
  row tp2_new "X=1" --tp_size 2 $T128
  row pp2_old "$OLDPP" --pp_size 2 $T128
  row pp2_new "X=1" --pp_size 2 $T128
  row pp2_new_async "X=1" --pp_size 2 --async_scheduling $T128
fi
python - "$out/ab.jsonl" <<'PY'
import json, sys
print(f"{'row':24} {'out tok/s':>10} {'of roofline':>12} {'TPOT p50':>9}  env")
for line in open(sys.argv[1]):
    d = json.loads(line)
    tps = d.get("output_throughput") or d.get("output_tok_s")
    print(f"{d['row']:24} {tps!s:>10} {d.get('fraction_of_roofline', '')!s:>12} {d.get('tpot_ms_p50', '')!s:>9}  {d.get('env')}"
          + (f"  ERROR {d['error']}" if 'error' in d else ""))
PY
