"""SiLU-and-mul folded into the down projection's GEMV (shardllm/layers/gemv_silu.py) against the unfused pair the
engine runs without it (triton_ops.silu_and_mul, then the down linear's small-M path: FP8 the GEMV with
small_m_config's config, bf16 the GEMV where BF16_GEMV_TABLE has an entry, else cuBLAS), on one CUDA card. (FP8 at
M > SHARDLLM_FP8_GEMV_MAX_M, default 1, the engine quantizes and takes the FP8 GEMM instead: the M = 2 FP8 rows time
the GEMV pair as it was.)

Llama-3-8B down projections: N 4096, K 14336 (tp 1) and 7168 (tp 2), M 1 and 2, e4m3 and bf16 weights. Each time is
one CUDA graph of 20 calls replayed, the calls cycling over copies of the weight that together exceed the L2 (as
benchmarks/gemv_sweep.py), so no call reads its weight from L2. Per row: us of silu_and_mul alone, of the unfused
pair, of the fused kernel with the config the engine picks (gemv_silu._fused_config), the best of a small grid of
fused configs (--budget_s shared by the rows), the speed-up, the share of 4.2 TB/s copy bandwidth (weight bytes), and
whether fused equals silu_and_mul then the GEMV with the same config bit for bit. Ends with the JSON that
gemv_silu.FUSED_SILU_TABLES takes (the grid's best where it beat the engine's pick by 2% or more).

    python benchmarks/gemv_silu.py [--budget_s 60] [--ms 1 2] [--tp 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import time

import torch
from gemv_sweep import COPY_BW, L2_BYTES, MODELS, timed  # benchmarks/ is sys.path[0] when run as a script

from shardllm.layers import triton_ops
from shardllm.layers.gemv import GemvConfig, gemv, maybe_small_m_linear_bf16
from shardllm.layers.gemv_silu import SiluAndMulInput, _fused_config, silu_gemv
from shardllm.layers.quantization.fp8_triton import fp8_small_m_linear
from shardllm.layers.quantization.fp8_utils import quantize_per_row

HIDDEN, INTER = MODELS["llama-3-8b"][:2]


def grid(fp8: bool, m: int) -> list[GemvConfig]:
    """Fused candidates: the FMA form (late reduction, 4 / 8 warps) and the tl.dot form, split-K 1 and 2."""
    elt = 1 if fp8 else 2
    out = [GemvConfig(False, bn, bk_bytes // elt, s, warps, 3, True)
           for bn, bk_bytes, warps, s in itertools.product((4, 8, 16), (512, 1024), (4, 8), (1, 2))
           if m * bn * bk_bytes // elt // (32 * warps) <= 64]
    out += [GemvConfig(True, bn, 256, s, 4, 4) for bn, s in itertools.product((32, 64), (1, 4))]
    return out


def weights(n: int, k: int, fp8: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    copies = max(2, min(8, -(-4 * L2_BYTES // (n * k))))
    torch.manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    if not fp8:
        return [(w, None) for w in ws]
    return [(q, s.view(-1)) for q, s in map(quantize_per_row, ws)]


def unfused_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """The down linear's small-M GEMV path on a plain tensor (FP8: the engine's up to SHARDLLM_FP8_GEMV_MAX_M rows)."""
    if s is not None:
        return fp8_small_m_linear(x, w, s)
    y = maybe_small_m_linear_bf16(x, w, None)
    return torch.nn.functional.linear(x, w) if y is None else y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["fp8", "bf16"])
    ap.add_argument("--budget_s", type=float, default=60, help="seconds for the config grid, shared by the rows")
    a = ap.parse_args()
    import triton

    def stop(*_):  # `timeout` sends SIGTERM: print what was measured
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    rows = len(a.dtypes) * len(a.tp) * len(a.ms)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; N {HIDDEN}, "
          f"CUDA graphs of 20 calls over weight copies > L2", flush=True)
    print(f"{'dtype':5s} {'tp':>2s} {'M':>2s} {'silu us':>8s} {'unfused':>8s} {'fused':>8s} {'x':>6s} {'% bw':>5s} "
          f"{'grid best':>9s} {'config':30s} exact", flush=True)
    tables: dict[str, dict] = {"fp8": {}, "bf16": {}}
    ok = True
    try:
        for dtype, tp in itertools.product(a.dtypes, a.tp):
            fp8 = dtype == "fp8"
            n, k = HIDDEN, INTER // tp
            ws = weights(n, k, fp8)
            w_bytes = n * k * (1 if fp8 else 2)
            for m in a.ms:
                gate_up = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16) * 2
                x = SiluAndMulInput(gate_up)
                cfg = _fused_config(ws[0][0], m)
                fused = silu_gemv(x, *ws[0], None)
                exact = torch.equal(fused, gemv(triton_ops.silu_and_mul(gate_up), *ws[0], cfg))
                ok = ok and exact
                t_silu = timed([lambda h=gate_up: triton_ops.silu_and_mul(h)])
                t_unfused = timed([lambda w=w, h=gate_up: unfused_linear(triton_ops.silu_and_mul(h), *w) for w in ws])
                t_fused = timed([lambda w=w, x=x: silu_gemv(x, *w, None) for w in ws])
                best = (t_fused, cfg)
                deadline = time.time() + a.budget_s / rows  # compiles dominate: a share of the budget per row
                for c in grid(fp8, m):
                    if time.time() > deadline:
                        break
                    try:
                        t = timed([lambda w=w, c=c, x=x: silu_gemv(x, *w, None, c) for w in ws])
                    except Exception:  # a config Triton cannot compile (registers, shared memory)
                        continue
                    if t < best[0]:
                        best = (t, c)
                if best[0] < 0.98 * t_fused:
                    tables[dtype].setdefault(f"{n}x{k}", {})[str(m)] = [int(v) for v in best[1]]
                print(f"{dtype:5s} {tp:2d} {m:2d} {t_silu:8.2f} {t_unfused:8.2f} {t_fused:8.2f} "
                      f"{t_unfused / t_fused:5.2f}x {100 * w_bytes / (t_fused * 1e-6) / COPY_BW:5.1f} "
                      f"{best[0]:9.2f} {str([int(v) for v in best[1]]):30s} {exact}", flush=True)
            del ws
            torch.cuda.empty_cache()
    except KeyboardInterrupt:
        print("stopped (timeout)", flush=True)
    print("FUSED_SILU_TABLES", json.dumps(tables))
    print("all bit-exact" if ok else "MISMATCH: fused and silu_and_mul + GEMV differ")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
