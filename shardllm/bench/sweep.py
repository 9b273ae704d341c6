"""`shardllm bench --sweep`: run several layouts one after the other and print the guide's scaling table.

Each layout runs in its own Python process (`python -m shardllm.bench.sweep`, settings on stdin, one JSON line
back), so that an out-of-memory layout, a hung process group or a crashed worker ends that row only, and every
layout starts with empty GPUs. Scaling efficiency follows the deployment guide's tables: a layout's output tok/s
per GPU relative to that of the smallest layout (fewest GPUs) of the same model and dtype that fit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

# sweep key -> the benchmark's argument it sets
SWEEP_KEYS = {"tp": "tp_size", "tp_size": "tp_size", "pp": "pp_size", "pp_size": "pp_size", "ep": "ep_size",
              "ep_size": "ep_size", "dtype": "dtype"}
_INT_KEYS = ("tp_size", "pp_size", "ep_size")
RESULT_PREFIX = "SHARDLLM_BENCH_RESULT "
# What a layout that does not fit raises: CUDA's allocator (also inside a worker's traceback text), and the
# engine's check that the KV cache left after the weights holds at least one max_seq_len sequence.
_OOM_MARKERS = ("OutOfMemoryError", "out of memory", "the KV cache holds")


def parse_sweep(specs: list[str]) -> list[dict[str, Any]]:
    """Layouts named by `--sweep` values, in order, duplicates dropped.

    "tp=1,2,4" gives three layouts; "tp=4,pp=2" one (a bare value continues the list of the key before it);
    "tp=1,2,dtype=bf16,fp8" every combination (four). Returns dicts of benchmark argument -> value
    (tp_size, pp_size, ep_size: int >= 1; dtype: str). Raises ValueError naming the bad part and the keys.
    """
    layouts: list[dict[str, Any]] = []
    for spec in specs:
        values: dict[str, list] = {}
        key = None
        for part in (p.strip() for p in spec.split(",")):
            if "=" in part:
                name, _, part = (x.strip() for x in part.partition("="))
                if name not in SWEEP_KEYS:
                    raise ValueError(f"--sweep {spec!r}: unknown key {name!r}; use tp, pp, ep or dtype "
                                     "(e.g. --sweep \"tp=1,2,4\" or --sweep \"tp=4,pp=2\")")
                key = SWEEP_KEYS[name]
                if key in values:
                    raise ValueError(f"--sweep {spec!r}: {name} is given twice")
                values[key] = []
            elif key is None:
                raise ValueError(f"--sweep {spec!r}: expected KEY=VALUE first, e.g. tp=1,2")
            if not part:
                raise ValueError(f"--sweep {spec!r}: empty value")
            if key in _INT_KEYS:
                try:
                    v = int(part)
                except ValueError:
                    v = 0
                if v < 1:
                    raise ValueError(f"--sweep {spec!r}: {key.removesuffix('_size')} must be an integer >= 1, "
                                     f"got {part!r}")
                part = v
            values[key].append(part)
        for combo in itertools.product(*values.values()):
            layout = dict(zip(values, combo))
            if layout not in layouts:
                layouts.append(layout)
    return layouts


def layout_args(a: argparse.Namespace, layout: dict[str, Any]) -> argparse.Namespace:
    d = {k: v for k, v in vars(a).items() if k not in ("sweep", "plot", "json", "layout_timeout")}
    d.update(layout)
    return argparse.Namespace(**d)


def layout_name(tp: int, pp: int, ep: int) -> str:
    """"tp=2 pp=2", "pp=2", "tp=1" (the sizes above 1, or tp=1 for one GPU)."""
    return " ".join(f"{k}={v}" for k, v in (("tp", tp), ("pp", pp), ("ep", ep)) if v > 1) or "tp=1"


def check_layouts(layouts: list[argparse.Namespace]) -> list[str | None]:
    """For each layout, None when it can be tried, or why this host cannot run it (more GPUs than visible).
    Sets `dtype_name` on each layout, which names its rows' group: the dtype asked for (or the one "auto"
    resolves to), with a quantization or KV-cache dtype that differs from it ("bf16+fp8", "fp8+kv:fp8").

    Raises ValueError when the model cannot be split that way (or another setting is wrong): that is the
    user's to fix before anything runs, and the message names the layout and the fix.
    """
    import torch

    from shardllm.bench.throughput import llm_kwargs
    from shardllm.config import EngineConfig

    out: list[str | None] = []
    for la in layouts:
        kw = llm_kwargs(la)
        world = la.tp_size * la.pp_size
        device = kw["device"] if kw["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        la.dtype_name = la.dtype
        if device == "cuda" and world > torch.cuda.device_count():
            out.append(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
            continue
        try:
            config = EngineConfig.create(**kw)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise ValueError(f"layout {layout_name(la.tp_size, la.pp_size, la.ep_size)} dtype={la.dtype}: "
                             f"{e}") from None
        if la.dtype == "auto":
            la.dtype_name = str(config.model_config.dtype).removeprefix("torch.")
        quantization, kv_dtype = getattr(la, "quantization", None), getattr(la, "kv_cache_dtype", "auto")
        if quantization and quantization != la.dtype:  # e.g. bf16+fp8: fp8 linears, bf16 elsewhere
            la.dtype_name += f"+{quantization}"
        if kv_dtype and kv_dtype != "auto":
            la.dtype_name += f"+kv:{kv_dtype}"
        out.append(None)
    return out


def classify_failure(e: BaseException) -> str:
    """"OOM" when the layout did not fit in memory, else "error"."""
    while e is not None:
        if type(e).__name__ == "OutOfMemoryError" or any(m in str(e) for m in _OOM_MARKERS):
            return "OOM"
        e = e.__cause__ or e.__context__
    return "error"


def _row_base(la: argparse.Namespace) -> dict[str, Any]:
    return {"model": la.model or "default", "dtype": getattr(la, "dtype_name", la.dtype), "tp": la.tp_size,
            "pp": la.pp_size, "ep": la.ep_size, "gpus": la.tp_size * la.pp_size,
            "layout": layout_name(la.tp_size, la.pp_size, la.ep_size)}


def _last_line(text: str, limit: int = 300) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    line = lines[-1] if lines else text
    return line if len(line) <= limit else line[:limit] + "..."


def run_layout(la: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One layout in a fresh process; returns its row (status ok, OOM, error or timeout): the benchmark's
    result fields (`shardllm.bench.throughput.run`) under the layout's own model, dtype and sizes."""
    row = _row_base(la)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shardllm.bench.sweep"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(json.dumps(vars(la)), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return {**row, "status": "timeout", "error": f"stopped after {timeout:.0f} s (--layout_timeout)"}
    except BaseException:  # Ctrl-C: the child is in its own session and did not get the signal
        _kill_group(proc)
        raise
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), **row}
    return {**row, "status": "error", "error": f"the benchmark process exited with code {proc.returncode} "
                                               "without a result (see its log above)"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def add_efficiency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set `speedup` (output tok/s over the base's) and `efficiency` (tok/s per GPU over the base's) on each
    row that ran; the base is the row with the fewest GPUs, first in sweep order, among the rows of the same
    model and dtype whose status is ok (the guide's "scaling efficiency"). Rows that did not run get None.
    Computed from the rows' own `output_tok_s` and `output_tok_s_per_gpu`, so the table can be checked by hand.
    """
    bases: dict[tuple, dict] = {}
    for r in rows:
        if r.get("status") == "ok":
            key = (r["model"], r["dtype"])
            if key not in bases or r["gpus"] < bases[key]["gpus"]:
                bases[key] = r
    for r in rows:
        base = bases.get((r["model"], r["dtype"])) if r.get("status") == "ok" else None
        r["base_layout"] = base["layout"] if base else None
        r["speedup"] = round(r["output_tok_s"] / base["output_tok_s"], 3) if base else None
        r["efficiency"] = round(r["output_tok_s_per_gpu"] / base["output_tok_s_per_gpu"], 3) if base else None
    return rows


COLUMNS = [("model", "model"), ("dtype", "dtype"), ("GPUs", "gpus"), ("tp", "tp"), ("pp", "pp"), ("ep", "ep"),
           ("output tok/s", "output_tok_s"), ("per GPU", "output_tok_s_per_gpu"), ("TPOT p50 ms", "tpot_ms_p50"),
           ("TTFT p50 ms", "ttft_ms_p50"), ("efficiency", "efficiency")]
FIGURES = {key for _, key in COLUMNS[6:]}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The guide's table as aligned text; a row that did not run shows its status where the figures go."""
    cells = []
    for r in rows:
        line = []
        for _, key in COLUMNS:
            v = r.get(key)
            if r.get("status") != "ok" and key in FIGURES:  # the guide's "OOM | - | -"
                line.append(r.get("status", "error") if key == "output_tok_s" else "-")
            elif v is None:
                line.append("-")
            elif key == "efficiency":
                line.append(f"{v:.0%}")
            elif key in ("output_tok_s", "output_tok_s_per_gpu"):
                line.append(f"{v:,.0f}" if v >= 100 else f"{v:,.1f}")
            elif key == "model":
                line.append(os.path.basename(str(v).rstrip("/")) or str(v))
            else:
                line.append(str(v))
        cells.append(line)
    heads = [h for h, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    text = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    for c in cells:
        text.append("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    notes = [f"{r['layout']} {r['dtype']}: {r['status']}: {r['error']}" for r in rows if r.get("error")]
    bases = {(os.path.basename(str(r["model"]).rstrip("/")), r["dtype"]): r["base_layout"] for r in rows
             if r.get("base_layout")}
    if bases:
        notes.append("efficiency: output tok/s per GPU relative to the fewest GPUs that fit: "
                     + "; ".join(f"{m} {d} {layout}" for (m, d), layout in bases.items()))
    return "\n".join(text + notes)


def run_sweep(a: argparse.Namespace, log=sys.stderr) -> list[dict[str, Any]]:
    """Every layout of `a.sweep` (or the flags' one layout), one after the other; rows with efficiency.

    Raises ValueError for a bad --sweep or a layout the model cannot split, before anything runs.
    """
    layouts = [layout_args(a, la) for la in (parse_sweep(a.sweep) or [{}])]
    reasons = check_layouts(layouts)
    rows = []
    for i, (la, why) in enumerate(zip(layouts, reasons)):
        name = f"{layout_name(la.tp_size, la.pp_size, la.ep_size)} dtype={la.dtype}"
        if why is not None:
            print(f"[sweep {i + 1}/{len(layouts)}] {name}: skipped, {why}", file=log, flush=True)
            rows.append({**_row_base(la), "status": "invalid", "error": why})
            continue
        print(f"[sweep {i + 1}/{len(layouts)}] {name}", file=log, flush=True)
        t = time.perf_counter()
        row = run_layout(la, a.layout_timeout)
        print(f"[sweep {i + 1}/{len(layouts)}] {name}: {row['status']} in {time.perf_counter() - t:.0f} s",
              file=log, flush=True)
        rows.append(row)
    return add_efficiency(rows)


def run_sweep_cli(a: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    try:
        layouts = parse_sweep(a.sweep)
    except ValueError as e:
        ap.error(str(e))
    if a.plot:  # matplotlib and a writable path, before the layouts run
        from shardllm.bench.plot import check_plot_path, require_matplotlib

        try:
            require_matplotlib()
            check_plot_path(a.plot)
        except (ImportError, ValueError) as e:
            ap.error(str(e))
    try:
        rows = run_sweep(a)
    except ValueError as e:
        ap.error(str(e))
    if a.plot and not any(r["status"] == "ok" for r in rows):
        print(f"plot: {a.plot} not written: no layout ran", file=sys.stderr)
    elif a.plot:
        from shardllm.bench.plot import plot_scaling

        plot_scaling(rows, a.plot)
        print(f"plot: {a.plot}", file=sys.stderr)
    if a.json:
        print(json.dumps({"layouts": len(layouts) or 1, "rows": rows}))
    else:
        print(format_table(rows))
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _child() -> None:
    """One layout: settings (a JSON Namespace) on stdin, the result row on stdout after RESULT_PREFIX."""
    from shardllm.bench.throughput import run

    a = argparse.Namespace(**json.loads(sys.stdin.read()))
    try:
        row = {"status": "ok", **run(a)}
    except Exception as e:
        row = {"status": classify_failure(e), "error": _last_line(f"{type(e).__name__}: {e}")}
    print(RESULT_PREFIX + json.dumps(row), flush=True)


if __name__ == "__main__":
    _child()
