#!/usr/bin/env bash
# Fifteenth session (one H200, about 4 minutes; issue 13's 500 x 1000/1000 margin). The two-micro-batch overlap at
# tp 1 lost even with a cuBLAS SM carveout: the decode attention's grid (one program an item, 6 waves) still took
# every SM. The TMA decode kernel now takes a persistent grid (`programs`). 1. GPU tests of the TMA decode kernel
# (the refactor into _tma_item and the persistent grid). 2. benchmarks/overlap_sm_split.py: half a 512 x 1500 decode
# step's attention and FP8 GEMMs, alone, serial, and on two streams with attention on P programs and the GEMMs
# leaving c SMs; whether two overlapped halves beat the unsplit step.
#     LIMIT_S=300 bash benchmarks/device_s17_a.sh
set -u
. benchmarks/device_rows.sh
device_start 300
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_decode_attention_tma.py \
  tests/layers/test_v_transposed_cache.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
timeout $(( $(left) - 10 )) python benchmarks/overlap_sm_split.py 2>&1 | grep -v -i warn | tee -a "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"
