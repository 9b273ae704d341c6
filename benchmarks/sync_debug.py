"""Runs a module as `python -m` would with torch's CUDA sync debug mode on ("warn"): every torch operation that makes
the host wait for the GPU (`.item()`, `.tolist()` of a CUDA tensor, `nonzero`, a blocking copy to the host, ...)
is counted by where shardllm called it. A sync inside a step drains the GPU's queue, and under async scheduling the
GPU then idles while the host prepares the next step. At exit prints one line per call site, most frequent first:

    sync-site COUNT FIRST_S LAST_S FILE:LINE (FUNCTION) <- CALLER ... | the warning's first words

    python benchmarks/sync_debug.py shardllm.bench.throughput --load_format dummy ... 2> err.txt
    grep '^sync-site' err.txt

Sites whose count is about the run's step count are per-step syncs. Explicit waits (events, stream.synchronize)
are not counted: torch does not flag them. Needs CUDA; a run on CPU counts nothing. Only this process is watched:
with tp or pp above 1 the model runs in worker processes, whose syncs are not seen (run tp 1 x pp 1).
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import time
import traceback
import warnings

_T0 = time.perf_counter()
_sites: dict[str, list] = {}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("shardllm", "benchmarks"))  # not .venv's libraries
_TORCH_TEXT = "called a synchronizing CUDA operation"  # torch's sync debug warning


def _site() -> str:
    """The innermost frames of shardllm/ and benchmarks/ (not this file), innermost first: where the syncing op was
    called. Source lines are not read (lookup_lines=False): a warning costs a stack walk, not file reads."""
    stack = traceback.StackSummary.extract(traceback.walk_stack(None), lookup_lines=False)  # innermost first
    frames = [f for f in stack if f.filename.startswith(_OURS) and not f.filename.endswith("sync_debug.py")]
    return " <- ".join(f"{os.path.relpath(f.filename, _ROOT)}:{f.lineno} ({f.name})" for f in frames[:3]) or "?"


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    if _TORCH_TEXT not in text:  # not torch's sync warning: shown as usual
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    now = time.perf_counter() - _T0
    entry = _sites.setdefault(_site(), [0, now, now, " ".join(text.split()[:8])])
    entry[0] += 1
    entry[2] = now


def _report() -> None:
    for site, (n, first, last, text) in sorted(_sites.items(), key=lambda kv: -kv[1][0]):
        print(f"sync-site {n:6d} {first:8.1f} {last:8.1f} {site} | {text}", file=sys.stderr, flush=True)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/sync_debug.py MODULE [ARGS...]")
    import torch

    warnings.filterwarnings("always", message=f".*{_TORCH_TEXT}")  # every occurrence counted; others as before
    warnings.showwarning = _show
    atexit.register(_report)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
