# Helpers for the device scripts that time `shardllm serve` under `bench serve` (sourced after device_rows.sh,
# whose `left`, `say`, `pack`, $w and $OUT they use). Set before use: URL, PORT, SERVE_MODEL, TOK.
#   serve_setup                      fastapi / uvicorn / httpx from the carried .whl_serve where the image lacks them
#   cpu_s PID                        a process's CPU time so far (s)
#   record NAME PID WALL             bs_NAME.*.txt (one JSON line per client) summed into one row of rows.jsonl
#   serve_up NAME "ENV" "WRAPPER"    start a server (benchmarks/serve_profiled.py), wait for /health, warm it;
#                                    SERVE_PID its pid; non-zero when it did not come up (said why)
#   serve_down                       SIGINT, wait, pack
serve_setup() {
  python -c "import fastapi, uvicorn" 2>/dev/null \
    || python -m pip install -q --no-index --find-links .whl_serve fastapi uvicorn httpx 2>&1 | tail -2
}
cpu_s() { ps -o times= -p "$1" 2>/dev/null | tr -d ' '; }
record() {
  python - "$1" "$w" "$3" "$(cpu_s "$2")" "${S0:-0}" <<'PY' | tee -a "$OUT/summary.txt"
import glob, json, sys
name, w, wall, s1, s0 = sys.argv[1:]
rows = []
for path in sorted(glob.glob(f"{w}/bs_{name}.*txt")):
    lines = [l for l in open(path) if l.startswith("{")]
    rows.append(json.loads(lines[-1]) if lines else {"error": open(path.replace("bs_", "bserr_")).read()[-300:]})
d = dict(rows[0]) if rows else {"error": "no client output"}
if len(rows) > 1:
    d["output_throughput"] = round(sum(r.get("output_throughput", 0) for r in rows), 2)
    d["completed"] = sum(r.get("completed", 0) for r in rows)
    d["clients"] = len(rows)
d.update(row=name, server_cpu_s=int(s1 or 0) - int(s0 or 0), wall_s=int(wall))
open(f"{w}/rows.jsonl", "a").write(json.dumps(d) + "\n")
keys = ("completed", "failed", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms",
        "clients", "server_cpu_s", "wall_s", "error")
print(name, {k: d.get(k) for k in keys if k in d})
PY
}
serve_up() {
  local name=$1 envs=$2 wrap=$3 t=0
  env $envs python benchmarks/serve_profiled.py $wrap -- $SERVE_MODEL $TOK --max_num_tokens 16384 --port "$PORT" \
    > "$w/serve_$name.log" 2>&1 &
  SERVE_PID=$!
  until python -c "import urllib.request as u; u.urlopen('$URL/health', timeout=2)" 2>/dev/null; do
    kill -0 $SERVE_PID 2>/dev/null && [ $t -lt 240 ] || {
      say "$name: not up: $(tail -3 "$w/serve_$name.log" | tr '\n' ' ')"; kill -9 $SERVE_PID 2>/dev/null; return 1; }
    sleep 1; t=$((t + 1))
  done
  timeout 60 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --num_prompts 64 \
    --input_len 128 --output_len 32 > /dev/null 2>&1
}
serve_down() { kill -INT $SERVE_PID; wait $SERVE_PID; pack; }
