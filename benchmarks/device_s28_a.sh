#!/usr/bin/env bash
# Twenty-third session, call 1 (one H200, about 9 minutes): the server with its engine in a process of its own
# (SHARDLLM_ENGINE_PROCESS=1, engine/core_proc.py) beside the default (the engine in a thread of the server's
# process), Llama-3-8B fp8 + fp8 KV (dummy weights, the stand-in tokenizer of Llama-3's size), `bench serve` with 8
# client processes at 1000 x 128/128 and 500 x 1000/1000. Each server first answers the same greedy request (64
# prompt ids, 48 tokens): the two texts must be equal.
#     bash benchmarks/pack_serve_wheels.sh   (here, first)
#     run(command="LIMIT_S=560 bash benchmarks/device_s28_a.sh", carry=[".whl_serve", ".bench_tokenizer"])
# CPU dry run (PATH=.venv/bin:$PATH): SERVE_MODEL= TOK= N=24 LONG=0 bash benchmarks/device_s28_a.sh
# Call 5 (the final code, the engine process alone, 128/128): FORMS=process LONG=0 LIMIT_S=280 bash ...
set -u
. benchmarks/device_rows.sh
. benchmarks/serve_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
serve_setup
SERVE_MODEL=${SERVE_MODEL-"llama-3-8b --load_format dummy --dtype fp8 --kv_cache_dtype fp8"}
TOK=${TOK-"--tokenizer .bench_tokenizer"}
N=${N:-1000}
PORT=${PORT:-8123}; URL="http://127.0.0.1:$PORT"
bench() {  # NAME CLIENTS NUM_PROMPTS INPUT_LEN OUTPUT_LEN
  local c0=$SECONDS
  S0=$(cpu_s "$SERVE_PID")
  timeout 240 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --num_clients "$2" \
    --num_prompts "$3" --input_len "$4" --output_len "$5" > "$w/bs_$1.1.txt" 2> "$w/bserr_$1.1.txt"
  record "$1" "$SERVE_PID" $((SECONDS - c0))
}
greedy() {  # NAME: one greedy completion from token ids into $w/greedy_NAME.txt
  python - "$URL" > "$w/greedy_$1.txt" 2>&1 <<'PY'
import json, sys, urllib.request as u
url = sys.argv[1]
model = json.load(u.urlopen(url + "/v1/models"))["data"][0]["id"]
body = {"model": model, "prompt": list(range(1000, 1064)), "max_tokens": 48, "temperature": 0, "ignore_eos": True}
req = u.Request(url + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
print(json.load(u.urlopen(req))["choices"][0]["text"])
PY
}
serve_row() {  # NAME "ENV" RUNS...: start, greedy, warm, each run (CLIENTS:N:IN:OUT), stop
  local name=$1 envs=$2 run c n i o; shift 2
  [ "$(left)" -ge 90 ] || { say "$name: skipped (time)"; return; }
  serve_up "$name" "$envs" "" || return
  greedy "$name"
  for run in "$@"; do
    IFS=: read -r c n i o <<< "$run"
    [ "$(left)" -ge 45 ] || { say "${name}_c${c}_${i}: skipped (time)"; continue; }
    bench "${name}_c${c}_${i}" "$c" "$n" "$i" "$o"
  done
  serve_down
}
SHORT="8:$N:128:128"; LONG_RUN=$([ "${LONG:-1}" = 1 ] && echo "8:$((N / 2)):1000:1000")
[[ "${FORMS:-process thread}" == *process* ]] && serve_row process "SHARDLLM_ENGINE_PROCESS=1" $SHORT $LONG_RUN
[[ "${FORMS:-process thread}" == *thread* ]] && serve_row thread "SHARDLLM_ENGINE_PROCESS=0" $SHORT $LONG_RUN
if [ ! -f "$w/greedy_process.txt" ] || [ ! -f "$w/greedy_thread.txt" ]; then say "greedy text: one form only"
elif cmp -s "$w/greedy_process.txt" "$w/greedy_thread.txt"; then say "greedy text: equal ($(wc -c < "$w/greedy_thread.txt") bytes)"
else say "greedy text: DIFFERENT: $(head -c 300 "$w/greedy_process.txt") | $(head -c 300 "$w/greedy_thread.txt")"; fi
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
