#!/usr/bin/env bash
# Seventh session, third call (kind nvidia-h200-x2, about 6 minutes): issue 15's rows with this session's defaults
# (PDL on), old beside new where a switch selects the old path, one after another on the same two GPUs.
#   1. where tp = 2 batch-1 decode goes (3.05 ms in the fifth session; aim 2.35): a decode-step profile at batch 1,
#      both ranks (the 64 all-reduces, the GEMVs at half width, the host);
#   2. 8B bf16 batch-1: 1 GPU and tp 2, PDL on (default) and off;
#   3. 8B bf16 1000 x 128/128: 1 GPU, tp 2, pp 2 (aims 1.85x and 1.7x of the 1-GPU row).
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=420 bash benchmarks/device_s7_c.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 420
timeout 100 python benchmarks/profile_decode.py --load_format dummy --input_len 128 --batch_sizes 1 --steps 16 \
  --top 25 --out_dir "$w/ranks_tp2_b1" --model llama-3-8b --tp_size 2 > "$w/prof_tp2_b1.jsonl" 2> "$w/prof_tp2_b1.err"
say "profile tp2 b1: rc=$?"
python benchmarks/profile_decode.py --summary "$w/prof_tp2_b1.jsonl" >> "$OUT/summary.txt" 2>&1; pack
MODEL_FLAGS="--model llama-3-8b"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
T128="--num_requests 1000 --input_len 128 --output_len 128"
row 45 b1_tp1 "CUDA_VISIBLE_DEVICES=0" $B1
row 45 b1_tp2 "" --tp_size 2 $B1
row 45 b1_tp2_nopdl "SHARDLLM_PDL=0" --tp_size 2 $B1
row 60 t128_tp1 "CUDA_VISIBLE_DEVICES=0" $T128
row 60 t128_tp2 "" --tp_size 2 $T128
row 60 t128_pp2 "" --pp_size 2 $T128
python - "$w/rows.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = {r["row"]: r for r in map(json.loads, open(sys.argv[1])) if "output_tok_s" in r}
one = rows.get("t128_tp1", {}).get("output_tok_s")
for name in ("t128_tp2", "t128_pp2"):
    if one and name in rows:
        print(f'{name}: {rows[name]["output_tok_s"]:,.0f} = {rows[name]["output_tok_s"] / one:.3f}x the 1-GPU row')
PY
say "total: $((SECONDS - t0)) s"; pack
