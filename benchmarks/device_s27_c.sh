#!/usr/bin/env bash
# Twenty-second session, call 4 (one H200, about 7 minutes): the server's rate with the client no longer the bound
# (call 3: one client process parsed ~9,000 events/s and was). Llama-3-8B fp8 + fp8 KV (dummy, the stand-in
# tokenizer), `bench serve --num_clients 1 / 4 / 8` at 1000 x 128/128 and 8 clients at 500 x 1000/1000, beside
# `bench` offline; the Python detokenizer (SHARDLLM_DECODE_STREAM=0) with 8 clients; one 8-client run under the
# stack sampler.
#     run(command="LIMIT_S=480 bash benchmarks/device_s27_c.sh", carry=[".whl_serve", ".bench_tokenizer"])
# Call 5 (after the chunk-envelope and lagging-reader changes): OFFLINE=0 ROWS=short LIMIT_S=100 bash ...
set -u
. benchmarks/device_rows.sh
device_start 480
export CUDA_VISIBLE_DEVICES=${GPU:-0}
. benchmarks/serve_rows.sh
serve_setup
SERVE_MODEL=${SERVE_MODEL-"llama-3-8b --load_format dummy --dtype fp8 --kv_cache_dtype fp8"}
TOK=${TOK-"--tokenizer .bench_tokenizer"}
N=${N:-1000}
PORT=${PORT:-8123}; URL="http://127.0.0.1:$PORT"
if [ "${OFFLINE:-1}" = 1 ]; then
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --max_num_tokens 16384"
  row 150 offline_128 "" --num_requests "$N" --input_len 128 --output_len 128
  row 150 offline_1k "" --num_requests $((N / 2)) --input_len 1000 --output_len 1000
fi
bench() {  # NAME PID CLIENTS NUM_PROMPTS INPUT_LEN OUTPUT_LEN: CLIENTS processes of one `bench serve --num_clients`
  local name=$1 pid=$2 clients=$3 n=$4 in=$5 out=$6 c0=$SECONDS
  S0=$(cpu_s "$pid")
  timeout 240 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --num_clients "$clients" \
    --num_prompts "$n" --input_len "$in" --output_len "$out" > "$w/bs_$name.1.txt" 2> "$w/bserr_$name.1.txt"
  record "$name" "$pid" $((SECONDS - c0))
}
serve_row() {  # NAME "ENV" "WRAPPER FLAGS" RUNS...: start, warm, each run (CLIENTS:N:IN:OUT), stop
  local name=$1 envs=$2 wrap=$3 run c n i o; shift 3
  [ "$(left)" -ge 75 ] || { say "$name: skipped (time)"; return; }
  serve_up "$name" "$envs" "$wrap" || return
  for run in "$@"; do
    IFS=: read -r c n i o <<< "$run"
    [ "$(left)" -ge 45 ] || { say "${name}_c${c}_${i}: skipped (time)"; continue; }
    bench "${name}_c${c}_${i}" $SERVE_PID "$c" "$n" "$i" "$o"
  done
  serve_down
}
# ROWS=short (call 5): only the default server with 8 clients at 128/128
serve_row stream "" "" $([ "${ROWS:-}" = short ] && echo "8:$N:128:128" || echo "1:$N:128:128 4:$N:128:128 8:$N:128:128 8:$((N / 2)):1000:1000")
[ "${ROWS:-}" = short ] || serve_row py_detok "SHARDLLM_DECODE_STREAM=0" "" "8:$N:128:128"
[ "${ROWS:-}" = short ] || serve_row sampled "" "--sample_out $w/stacks.txt --sample_ms 2" "8:$N:128:128"
[ -f "$w/stacks.txt" ] && cp "$w/stacks.txt" "$OUT/stacks.txt"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
