#!/usr/bin/env bash
# Queued by the thirteenth session (one H200, about 9 minutes; issue 13's 500 x 1000/1000 margin: 17,230-17,988 across
# cards against 17,744). A 1000/1000 decode step is 53-60% decode attention (HBM-bound, ~4.0 TB/s) and ~30% FP8 GEMMs
# (tensor-core-bound); the two-micro-batch overlap at tp 1 lost 1-2% because each cuBLAS GEMM holds every SM to its
# end. SHARDLLM_TP_OVERLAP_SM_CARVEOUT=N makes the GEMMs inside the overlap leave N SMs to the other half's attention.
# 1. Is the carveout honored by torch._scaled_mm (row-wise) here: us a call at M = 256 / 16384 x 28672 x 4096 for
# carveouts 0 / 33 / 66 (a GEMM slower by about the SMs it gives up: honored). 2. 8B fp8 + fp8 KV, 500 x 1000/1000:
# the default; the overlap at tp 1; the overlap with carveouts 16 / 32 / 48; then the default and the best again.
#     LIMIT_S=560 bash benchmarks/device_s14_a.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 90 python - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import torch
dev = torch.device("cuda", 0)
print("SMs", torch.cuda.get_device_properties(dev).multi_processor_count)
for m in (256, 16384):
    a = torch.randn(m, 4096, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(28672, 4096, device=dev).to(torch.float8_e4m3fn).t()
    sa, sb = torch.ones(m, 1, device=dev), torch.ones(1, 28672, device=dev)
    for c in (None, 33, 66):
        torch._C._set_sm_carveout_experimental(c)
        f = lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)
        for _ in range(3): f()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); s.record()
        for _ in range(20): f()
        e.record(); torch.cuda.synchronize()
        print(f"M={m} carveout={c}: {s.elapsed_time(e) / 20 * 1e3:.1f} us")
    torch._C._set_sm_carveout_experimental(None)
PY
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
OV="SHARDLLM_TP_OVERLAP=1 SHARDLLM_TP_OVERLAP_AT_TP1=1"
row 75 1000_default "" $T1000
row 75 1000_overlap "$OV" $T1000
row 75 1000_overlap_c16 "$OV SHARDLLM_TP_OVERLAP_SM_CARVEOUT=16" $T1000
row 75 1000_overlap_c32 "$OV SHARDLLM_TP_OVERLAP_SM_CARVEOUT=32" $T1000
row 75 1000_overlap_c48 "$OV SHARDLLM_TP_OVERLAP_SM_CARVEOUT=48" $T1000
best=$(python - "$w/rows.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if r.get("output_tok_s") and r["row"].startswith("1000_overlap")]
print(max(rows, key=lambda r: r["output_tok_s"])["env"] if rows else "")
PY
)
say "best overlap row: ${best:-none}"
row 75 1000_default_b "" $T1000
[ -n "$best" ] && row 75 1000_best_b "$best" $T1000
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
