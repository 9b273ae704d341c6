#!/usr/bin/env bash
# Queued by the twelfth session (kind nvidia-h200-x2, about 9 minutes; issue 13's 70B tp 2 floor). At 70B tp 2 NCCL
# was 16% of a batch-1024 decode step (16 MiB all-reduces at 84 us: ~190 GB/s of bus bandwidth, where NVLink between
# two H200s carries more) and each 16k-token prefill step holds 160 all-reduces of 256 MiB. 1. NCCL's all-reduce at
# those sizes under a few NCCL settings (benchmarks/all_reduce.py, eager and in a CUDA graph). 2. Llama-3-70B fp8 +
# fp8 KV tp 2, 1000 x 128/128 with the setting that would save the most over a run (decode 134 x 128 calls at 16 MiB,
# prefill 160 x 8 at 256 MiB, graph timings) beside the default; the symmetric-memory one-shot / two-shot kernels at
# 16 MiB (thirteenth session: SHARDLLM_SYMM_MEM_MAX_MB lets their buffer pass 8 MiB), and 70B with all_reduce
# symm_mem and a 32 MiB buffer if they beat NCCL there by 10%.
#     LIMIT_S=540 bash benchmarks/device_s13_c.sh
set -u
. benchmarks/device_rows.sh
device_start 540
for v in default NCCL_PROTO=Simple NCCL_PROTO=LL128 NCCL_MIN_NCHANNELS=32 NCCL_MIN_NCHANNELS=32,NCCL_PROTO=Simple \
         NCCL_BUFFSIZE=16777216; do
  envs=$([ "$v" = default ] && echo "" || echo "$v" | tr ',' ' ')
  env $envs timeout 90 python benchmarks/all_reduce.py --world 2 --sizes_kb 16384 262144 --paths nccl --iters 100 \
    2> "$w/ar_err.txt" | sed "s/^{/{\"env\": \"$v\", /" >> "$w/ar.jsonl"
done
# the symmetric-memory kernels at the decode size, with a buffer past their 8 MiB default (SHARDLLM_SYMM_MEM_MAX_MB)
timeout 90 python benchmarks/all_reduce.py --world 2 --sizes_kb 16384 --paths one_shot two_shot --iters 100 \
  2> "$w/ar_symm_err.txt" | sed 's/^{/{"env": "symm_mem", /' >> "$w/ar.jsonl"
symm=$(python - "$w/ar.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
g = {(r["env"], r["path"]): r["us"] for r in rows if r["mode"] == "graph" and r["kib"] == 16384 and r["us"]}
best = min((g[k], k[1]) for k in g if k[0] == "symm_mem") if any(k[0] == "symm_mem" for k in g) else None
print("yes" if best and ("default", "nccl") in g and best[0] < 0.9 * g[("default", "nccl")] else "no")
PY
)
say "symm_mem beats NCCL at 16 MiB by 10%+: $symm"
pick=$(python - "$w/ar.jsonl" <<'PY' | tee -a "$OUT/summary.txt" | tail -1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
t = {}
for r in rows:
    if r["mode"] == "graph" and r["us"] is not None:
        t.setdefault(r["env"], {})[r["kib"]] = r["us"]
    print(r["env"], r["kib"], r["mode"], r["us"], r["error"] or "")
run_s = {e: (17152 * d[16384] + 1280 * d[262144]) / 1e6 for e, d in t.items() if {16384, 262144} <= set(d)}
for e, s in sorted(run_s.items(), key=lambda kv: kv[1]):
    print(f"{e}: {s:.2f} s of all-reduce over a run")
print(min(run_s, key=run_s.get) if run_s else "default")
PY
)
pack
T128="--num_requests 1000 --input_len 128 --output_len 128"
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8 --tp_size 2"
row 150 70b_tp2_default "" $T128
if [ "$symm" = yes ]; then row 150 70b_tp2_symm_mem "SHARDLLM_SYMM_MEM_MAX_MB=32" $T128 --all_reduce symm_mem; fi
if [ "$pick" != default ]; then row 150 "70b_tp2_nccl_tuned" "$(echo "$pick" | tr ',' ' ')" $T128; fi
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
