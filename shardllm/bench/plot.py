"""The scaling plot of a sweep: output tok/s and scaling efficiency against GPUs, one line per model, dtype and
kind of parallelism (tp, pp, ...), the one-GPU layout starting every line of its model and dtype.

    shardllm bench ... --sweep "tp=1,2" --sweep "pp=2" --plot scaling.png
    python -m shardllm.bench.plot bf16.json fp8.json -o scaling.png     # rows of several `--json` runs
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'shardllm[plot]'") from None


def check_plot_path(path: str, flag: str = "--plot") -> None:
    """ValueError naming `flag` where `path` cannot be written (its directory missing or not writable, a directory
    itself, a file type matplotlib does not write): checked before a benchmark runs, not after it. Needs
    matplotlib (require_matplotlib)."""
    from matplotlib.backend_bases import FigureCanvasBase

    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory: give a file name, e.g. {os.path.join(path, 'scaling.png')}")
    if not os.path.isdir(directory):
        raise ValueError(f"{flag} {path}: the directory {directory} does not exist: create it or choose another path")
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable (permission denied): choose another path")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if ext and ext not in supported:
        raise ValueError(f"{flag} {path}: matplotlib does not write .{ext} files: use .png, .pdf or .svg "
                         f"(or {', '.join('.' + e for e in sorted(supported) if e not in ('png', 'pdf', 'svg'))})")


def parallel_kind(row: dict[str, Any]) -> str:
    """"tp", "pp", "tp pp", "tp ep", ...: the sizes above 1; "" for one GPU."""
    return " ".join(k for k in ("tp", "pp", "ep") if row[k] > 1)


def scaling_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """label ("model dtype kind") -> {"layouts", "gpus", "output_tok_s", "efficiency"}, ordered by GPUs.

    Only rows with status ok; a one-GPU row joins every line of its model and dtype (the line's start), or
    makes a line of its own ("... 1 GPU") when it is the only row.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status", "ok") == "ok":
            groups.setdefault((os.path.basename(str(r["model"]).rstrip("/")), r["dtype"]), []).append(r)
    series: dict[str, dict[str, list]] = {}
    for (model, dtype), group in groups.items():
        singles = [r for r in group if parallel_kind(r) == ""]
        kinds = list(dict.fromkeys(parallel_kind(r) for r in group if parallel_kind(r)))
        for kind in kinds or ["1 GPU"]:
            members = singles + [r for r in group if parallel_kind(r) == kind]
            members.sort(key=lambda r: r["gpus"])
            series[f"{model} {dtype} {kind}"] = {
                "layouts": [r.get("layout", "") for r in members], "gpus": [r["gpus"] for r in members],
                "output_tok_s": [r["output_tok_s"] for r in members],
                "efficiency": [r.get("efficiency") for r in members]}
    return series


def plot_scaling(rows: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Write the PNG at `path`; returns what was drawn: {"series": scaling_series(rows), "failed": [(label,
    gpus, status)]} (layouts that did not run are marked on the GPU axis). Raises ImportError without
    matplotlib."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    series = scaling_series(rows)
    failed = [(f"{r['layout']} {r['dtype']}", r["gpus"], r["status"]) for r in rows if r.get("status", "ok") != "ok"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_tput, ax_eff = fig.subplots(1, 2)
    named = set()  # a one-GPU point starts several lines: name it once
    for label, s in series.items():
        ax_tput.plot(s["gpus"], s["output_tok_s"], marker="o", label=label)
        for x, y, name in zip(s["gpus"], s["output_tok_s"], s["layouts"]):
            if (x, y, name) not in named:
                named.add((x, y, name))
                ax_tput.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if any(e is not None for e in s["efficiency"]):
            ax_eff.plot(s["gpus"], [100 * e if e is not None else float("nan") for e in s["efficiency"]],
                        marker="o", label=label)
    for name, gpus, status in failed:
        ax_tput.plot([gpus], [0], marker="x", color="red", linestyle="none")
        ax_tput.annotate(f"{name}: {status}", (gpus, 0), textcoords="offset points", xytext=(4, 6), fontsize=7,
                         color="red")
    gpu_ticks = sorted({g for s in series.values() for g in s["gpus"]} | {g for _, g, _ in failed})
    for ax, ylabel, title in ((ax_tput, "output tok/s", "Throughput"),
                              (ax_eff, "efficiency, % (tok/s per GPU vs fewest GPUs)", "Scaling efficiency")):
        ax.set_xlabel("GPUs")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(gpu_ticks or [1])
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    ax_tput.set_ylim(bottom=0)
    ax_eff.set_ylim(bottom=0)
    fig.savefig(path, dpi=120)
    return {"series": series, "failed": failed}


def load_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a `shardllm bench --sweep ... --json` output ({"rows": [...]}) or of one `--json` run."""
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip().startswith("{")]
    if not lines:
        raise ValueError(f"{path}: no JSON line found (give the output of `shardllm bench ... --json`)")
    data = json.loads(lines[-1])
    if "rows" in data:
        return data["rows"]
    from shardllm.bench.sweep import layout_name

    return [{"status": "ok", "layout": layout_name(data["tp"], data["pp"], data["ep"]), **data}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardllm.bench.plot", description="Plot the rows of one or "
                                 "more `shardllm bench --json` outputs (efficiency recomputed over all of them).")
    ap.add_argument("files", nargs="+")
    ap.add_argument("-o", "--output", default="scaling.png")
    a = ap.parse_args(argv)
    from shardllm.bench.sweep import add_efficiency, format_table

    try:
        require_matplotlib()
        check_plot_path(a.output, "-o")
        rows = [r for p in a.files for r in load_rows(p)]
    except (ImportError, ValueError, OSError, KeyError) as e:
        ap.error(str(e))
    add_efficiency(rows)
    plot_scaling(rows, a.output)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
