# Sourced by the device scripts that pack their results (device_next.sh, device_next_b.sh); not run by itself.
# Needs OUT (what comes back) and w (the work folder packed into $OUT/results.tgz: the device returns at most 8 files).
#   pack                      re-pack $w into $OUT/results.tgz
#   say TEXT                  print and append to $OUT/summary.txt
#   b NAME "ENV=.." FLAGS...  one `python -m shardllm.bench.throughput --load_format dummy --json` row (T: its
#                             timeout, default 150 s; MODEL_FLAGS: flags every row gets; BENCH: the command before
#                             the flags, default `python -m shardllm.bench.throughput`) into $w/rows.jsonl
#   late_compiles NAME        with BENCH="python benchmarks/triton_compile_log.py shardllm.bench.throughput": the
#                             Triton kernels row NAME met after its start-up (the engine's "kernel warm-up" line, or
#                             its graph capture's; count, seconds, names); the driver process only (tp 1)
#   row TIMEOUT NAME ENVS ..  b with T=TIMEOUT, then pack, if the time left (limit - (SECONDS - t0)) covers TIMEOUT;
#                             else a line saying it was skipped (needs limit and t0)
#   left                      the seconds left: limit - (SECONDS - t0)
#   recipe_table FILE         `fp8_gemm.py --recipes` JSON lines in FILE, one summary line each (every *_us timing,
#                             then the *_rel_err errors), into the summary
#   phase_rows                the rows so far, one line each: out tok/s, elapsed, prefill phase (ttft max) and
#                             decode-phase TPOT, into the summary
#   device_start LIMIT        a script's start: the device's environment (NVLink multicast off, PYTHONPATH=.), OUT and
#                             w made, limit = $LIMIT_S or LIMIT, t0, and the GPUs and date as the summary's first line
phase_rows() {
  python - "$w/rows.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "output_tok_s" in r:
        print(f'{r["row"]:<24} {r["output_tok_s"]:>9,.0f} tok/s  elapsed {r["elapsed_s"]:6.2f} s  prefill phase '
              f'{r.get("ttft_ms_max", 0) / 1e3:5.2f} s  decode-phase TPOT {r.get("decode_phase_tpot_ms")} ms  '
              f'steps {r.get("steps")}')
PY
}
recipe_table() {
  python - "$1" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        us = "  ".join(f"{k[:-3]} {v}" for k, v in r.items() if k.endswith("_us"))
        err = " / ".join(f"{k[:-8]} {v}" for k, v in r.items() if k.endswith("_rel_err"))
        print(f'{r["layer"]:<8} M {r["m"]:>4}  {us}  err: {err}')
PY
}
pack() { tar -czf "$OUT/results.tgz" -C "$w" . 2>/dev/null; }
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
b() {
  local name=$1 envs=$2; shift 2
  line=$(env $envs timeout ${T:-150} ${BENCH:-python -m shardllm.bench.throughput} --load_format dummy --json ${MODEL_FLAGS:-} \
         "$@" 2> "$w/err_$name.txt" | tail -1)
  [ -z "$line" ] && { say "$name: no output: $(tail -2 "$w/err_$name.txt" | tr '\n' ' ')"; return; }
  python - "$name" "$envs" "$line" "$w/rows.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
name, envs, line, path = sys.argv[1:]
try:
    d = json.loads(line)
except ValueError:
    d = {"error": line[-300:]}
d.update(row=name, env=envs[:400])
open(path, "a").write(json.dumps(d) + "\n")
print(name, {k: d.get(k) for k in ("output_tok_s", "output_tok_s_per_gpu", "tpot_ms_p50", "fraction_of_roofline",
                                   "batch_size", "max_num_tokens", "weights_gib_per_rank", "error")})
PY
}
late_compiles() {
  local f="$w/err_$1.txt" mark="kernel warm-up:"
  grep -q "$mark" "$f" || mark="captured"
  grep -q "$mark" "$f" || { say "$1: no start-up marker in its log (eager? tp > 1?): late compiles not counted"; return; }
  awk -v m="$mark" 'index($0, m){c=1; n=0; s=0; delete k; next} c && /^triton-compile/{n++; s+=$3; split($4, a, "[");
       k[a[1]]++} END {printf "%s: %d kernels after start-up, %.2f s:", row, n, s; for (x in k) printf " %s x%d", x,
       k[x]; print ""}' row="$1" "$f" | tee -a "$OUT/summary.txt"
}
left() { echo $(( limit - (SECONDS - t0) )); }
row() {
  local t=$1; shift
  if [ "$(left)" -ge "$t" ]; then T=$t b "$@"; pack; else say "$1: skipped (time)"; fi
}
device_start() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
  OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
  limit=${LIMIT_S:-$1}; t0=$SECONDS
  say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)"
}
