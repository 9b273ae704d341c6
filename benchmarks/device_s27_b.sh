#!/usr/bin/env bash
# Twenty-second session, call 2 (one H200, about 9 minutes): where the server loses its rate. Llama-3-8B fp8 + fp8
# KV (dummy weights, the stand-in tokenizer of Llama-3's size), 1000 x 128/128 under `shardllm bench serve`
# (streamed, all at once) against `bench` offline in the same call. Server rows: detokenization in Python
# (SHARDLLM_DECODE_STREAM=0, the earlier form) and by tokenizers' DecodeStream (the new default); a 0.5 ms GIL
# switch interval; uvloop as the event loop; two client processes of 500 requests each (is the client the
# bound?); one run under benchmarks/serve_profiled.py's stack sampler (where each thread's time goes).
#     bash benchmarks/pack_serve_wheels.sh   (here, first)
#     run(command="LIMIT_S=560 bash benchmarks/device_s27_b.sh", carry=[".whl_serve", ".bench_tokenizer"])
# CPU dry run (PATH=.venv/bin:$PATH): SERVE_MODEL= TOK= OFFLINE=0 N=24 bash benchmarks/device_s27_b.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
. benchmarks/serve_rows.sh
serve_setup
python -m pip install -q --no-index --find-links .whl_serve --target /tmp/uvl uvloop 2>&1 | tail -2
SERVE_MODEL=${SERVE_MODEL-"llama-3-8b --load_format dummy --dtype fp8 --kv_cache_dtype fp8"}
TOK=${TOK-"--tokenizer .bench_tokenizer"}
N=${N:-1000}
PORT=${PORT:-8123}; URL="http://127.0.0.1:$PORT"
if [ "${OFFLINE:-1}" = 1 ]; then
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --max_num_tokens 16384"
  row 150 offline_128 "" --num_requests "$N" --input_len 128 --output_len 128
fi
bench() {  # NAME PID CLIENTS NUM_PROMPTS OUTPUT_LEN
  local name=$1 pid=$2 clients=$3 n=$4 out=$5 c0=$SECONDS i
  S0=$(cpu_s "$pid")
  for i in $(seq "$clients"); do
    timeout 200 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --seed "$i" \
      --num_prompts $((n / clients)) --input_len 128 --output_len "$out" > "$w/bs_$name.$i.txt" 2> "$w/bserr_$name.$i.txt" &
  done
  wait $(jobs -p | grep -v "^$pid$") 2>/dev/null
  record "$name" "$pid" $((SECONDS - c0))
}
serve_row() {  # NAME "ENV" "WRAPPER FLAGS" CLIENTS: start, warm, 1000 x 128/128, stop
  local name=$1 envs=$2 wrap=$3 clients=${4:-1}
  [ "$(left)" -ge 75 ] || { say "$name: skipped (time)"; return; }
  serve_up "$name" "$envs" "$wrap" || return
  bench "$name" $SERVE_PID "$clients" "$N" 128
  grep -m1 -i "event loop\|uvloop" "$w/serve_$name.log" > /dev/null && say "$name: $(grep -m1 -i 'uvloop' "$w/serve_$name.log")"
  serve_down
}
serve_row py_detok "SHARDLLM_DECODE_STREAM=0" ""
serve_row stream "" ""
serve_row stream_sw05 "" "--switch_interval_ms 0.5"
serve_row stream_uvloop "PYTHONPATH=.:/tmp/uvl" ""
serve_row stream_2clients "" "" 2
serve_row stream_sampled "" "--sample_out $w/stacks_stream.txt --sample_ms 2"
[ -f "$w/stacks_stream.txt" ] && head -120 "$w/stacks_stream.txt" > "$OUT/stacks_head.txt"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
