"""Runs a module as `python -m` would, logging every Triton kernel specialization the process meets for the first
time (an in-memory cache miss: a compile, or a load from Triton's disk cache) to stderr, with the seconds since start
and how long it took. Finds which kernel variants a run compiles after its start-up (the lines after the engine's
"kernel warm-up:" line; `late_compiles` in benchmarks/device_rows.sh counts them).

    python benchmarks/triton_compile_log.py shardllm.bench.throughput --load_format dummy ... 2> err.txt
    grep '^triton-compile' err.txt

Line: `triton-compile T_START_S DURATION_S NAME[launch options] constants={..} signature={..} attrs={..}`: the
constexpr values, the arguments' types and Triton's specialization attrs (argument index -> e.g. tt.divisibility 16:
a pointer 16-byte aligned, an int divisible by 16). Uses
`triton.knobs.runtime.jit_cache_hook` / `jit_post_compile_hook` (Triton >= 3.4); the hooks return False, so kernels
compile and run as without them.
"""

from __future__ import annotations

import runpy
import sys
import time

_T0 = time.perf_counter()
_started: dict[str, tuple[float, str]] = {}


def _describe(repr: str, compile: dict) -> str:
    """The kernel's name and launch options, then its specialization: the constexpr values, the signature's types
    and the arguments Triton assumed aligned / divisible by 16 or equal to 1 (Triton's attrs)."""
    head = repr.split("](")[0] + "]"
    consts = {k: v for k, v in (compile.get("constants") or {}).items() if v is not None}
    sig = compile.get("signature") or {}
    attrs = (compile.get("configs") or [{}])[0]
    return f"{head} constants={consts} signature={dict(sig)} attrs={attrs}"


def _on_miss(*, key, repr, compile=None, **_) -> bool:
    _started[str(key)] = (time.perf_counter(), _describe(repr, compile or {}))
    return False


def _on_compiled(*, key, repr, compile=None, **_) -> bool:
    t, text = _started.pop(str(key), (time.perf_counter(), _describe(repr, compile or {})))
    now = time.perf_counter()
    print(f"triton-compile {t - _T0:9.3f} {now - t:7.3f} {text}", file=sys.stderr, flush=True)
    return False


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/triton_compile_log.py MODULE [ARGS...]")
    from triton import knobs

    if not hasattr(knobs.runtime, "jit_cache_hook"):
        sys.exit("triton_compile_log.py needs Triton >= 3.4 (triton.knobs.runtime.jit_cache_hook)")
    knobs.runtime.jit_cache_hook = _on_miss
    knobs.runtime.jit_post_compile_hook = _on_compiled
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
