#!/usr/bin/env bash
# Fifteenth session (one H200, about 6 minutes; issue 13's batch 1). Under PDL, one-row GEMV configs (4,096-28,672
# programs) lost 8% end to end though faster alone (device_s17_b/c.sh). The tables were swept kernel by kernel with
# PDL off; here each layer shape's config is varied toward fewer, larger programs, end to end under PDL, one change
# a row (SHARDLLM_GEMV_CONFIGS), the tables' row between them. 8B fp8 + fp8 KV, batch 1, TPOT p50 (two rows of one
# config on one card agree within 0.1%).
#     LIMIT_S=360 bash benchmarks/device_s17_d.sh
set -u
. benchmarks/device_rows.sh
device_start 360
export CUDA_VISIBLE_DEVICES=${GPU:-0}
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
p() { echo "{\"fp8\":{\"$1\":{\"1\":$2}}}"; }
s() { echo "{\"fp8_silu\":{\"4096x14336\":{\"1\":$1}}}"; }
row 60 tables_a ""
row 40 gate_up_16x512w4 "SHARDLLM_GEMV_CONFIGS=$(p 28672x4096 '[0,16,512,1,4,3,0]')"
row 40 gate_up_16x512w8 "SHARDLLM_GEMV_CONFIGS=$(p 28672x4096 '[0,16,512,1,8,3,0]')"
row 40 gate_up_8x1024w8 "SHARDLLM_GEMV_CONFIGS=$(p 28672x4096 '[0,8,1024,1,8,3,0]')"
row 40 down_16x1024w8 "SHARDLLM_GEMV_CONFIGS=$(s '[0,16,1024,1,8,3,1]')"
row 40 tables_b ""
row 40 down_8x2048w8 "SHARDLLM_GEMV_CONFIGS=$(s '[0,8,2048,1,8,3,0]')"
row 40 o_8x512w4 "SHARDLLM_GEMV_CONFIGS=$(p 4096x4096 '[0,8,512,1,4,3,1]')"
row 40 o_16x512w8 "SHARDLLM_GEMV_CONFIGS=$(p 4096x4096 '[0,16,512,1,8,3,1]')"
row 40 qkv_8x512w4 "SHARDLLM_GEMV_CONFIGS=$(p 6144x4096 '[0,8,512,1,4,3,1]')"
row 40 tables_c ""
row 40 gate_up_4x1024w4 "SHARDLLM_GEMV_CONFIGS=$(p 28672x4096 '[0,4,1024,1,4,3,0]')"
row 40 down_4x1024w4 "SHARDLLM_GEMV_CONFIGS=$(s '[0,4,1024,1,4,3,1]')"
row 40 qkv_16x512w8 "SHARDLLM_GEMV_CONFIGS=$(p 6144x4096 '[0,16,512,1,8,3,1]')"
row 40 tables_d ""
python - "$w/rows.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = [r["tpot_ms_p50"] for r in rows if r["row"].startswith("tables") and r.get("tpot_ms_p50")]
b = sum(base) / len(base) if base else float("nan")
print(f"tables: {base} (mean {b:.3f} ms)")
for r in rows:
    t = r.get("tpot_ms_p50")
    print(f'{r["row"]:<20} {t} ms  {(t / b - 1) * 100:+.1f}%' if t else f'{r["row"]:<20} {r.get("error")}')
PY
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
