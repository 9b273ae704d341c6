"""SiLU-and-mul folded into the down projection's weight-streaming GEMV at M = 1 (batch-1 decode): one kernel
instead of silu_and_mul + GEMV, the activation formed from gate_up in registers (`gemv.gemv(..., silu_input=True)`).

How it is wired: after loading, `link_gemv_silu(model)` gives each SiluAndMul named in the model's
`fp8_act_quant_inputs` table ({producer: the linear it feeds}, the pairs the model's code applies back to back) a
`GemvSiluTarget` for its linear when that linear's method is one the GEMV serves (unquantized, or FP8 with
per-channel weight scales and dynamic activations). SiluAndMul.forward then asks the target first; where the fused
GEMV applies it returns a `SiluAndMulInput` (gate_up, deferred) instead of a tensor, which that linear's `apply`
hands to `silu_gemv` (through gemv.DeferredGemvInput). Everywhere else (M > FUSED_SILU_MAX_M, FP8 above
SHARDLLM_FP8_GEMV_MAX_M, CPU, torch attention backend, a failed kernel probe) nothing changes.

Numerics: the activation is computed with triton_ops.silu_and_mul's fp32 expression and roundings and the GEMV is
the same kernel, so at one config the output is bit-equal to silu_and_mul then the GEMV (tests/layers/
test_gemv_silu.py; `fused_gemv_ok` checks it per weight). The config is not always the unfused path's: FP8 takes
FUSED_SILU_TABLES' (every FP8 down shape gets one, through gemv.nearest_config), and where the unfused bf16 path runs
cuBLAS (no BF16_GEMV_TABLE entry, e.g. Llama-3-8B down at tp 1) the fused path still runs the GEMV (the fused
table's, the plain table's, or a default config); there the fp32 accumulation order differs: equal within the
GEMV's own rounding, not bit-equal.

Switch: on by default at M = 1 (`SHARDLLM_GEMV_FUSED_SILU=0`, read at import, turns it off). Measured on an H200
(fourth session, `EXTRA=1 bash benchmarks/device_gemv_fused.sh`, docs/benchmarks.md): the down projection at M = 1
1.11x (bf16) and 1.00-1.06x (fp8) the unfused pair; Llama-3-8B batch-1 TPOT bf16 4.433 -> 4.322 ms, fp8 2.884 ->
2.886 ms. At M = 2 the fused kernel was slower (0.23-0.70x), so it serves M = 1 only (FUSED_SILU_MAX_M).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shardllm import envs
from shardllm.layers import gemv as gemv_mod
from shardllm.layers import triton_ops
from shardllm.layers.gemv import (
    HAS_TRITON,
    DeferredGemvInput,
    GemvConfig,
    merged_table,
    nearest_config,
    table_config,
)
from shardllm.layers.quantization import fp8_triton

__all__ = ["FUSED_SILU_MAX_M", "GemvSiluTarget", "SiluAndMulInput", "link_gemv_silu", "silu_gemv"]

ENABLED = envs.SHARDLLM_GEMV_FUSED_SILU
# None: the fused GEMV where the device checks pass (CUDA, the kernels' probes); True / False force it on (tests on
# CPU, which need TRITON_INTERPRET=1) / off.
FORCE: bool | None = None
FUSED_SILU_MAX_M = 1  # rows up to which the down projection takes gate_up (batch-1 decode; at 2 it was slower)
# Configs measured for the fused kernel ({"NxK": {"M": [...]}}, gemv.load_table's format; the JSON that
# benchmarks/gemv_silu.py prints), by weight dtype; where they have none, the plain GEMV's configs are used, else
# _DEFAULT_CONFIG. H200, fourth session (`EXTRA=1 bash benchmarks/device_gemv_fused.sh`): fp8 Llama-3-8B down at
# tp 1, M = 1, 19.97 -> 19.26 us; bf16's best at M = 1 was _DEFAULT_CONFIG (its M = 2 entries are not kept: M = 2
# is not fused).
FUSED_SILU_TABLES: dict[str, dict] = {
    "fp8": merged_table({"4096x14336": {"1": [0, 8, 1024, 1, 4, 3, 1]}, "4096x7168": {"1": [0, 8, 1024, 1, 4, 3, 1]},
                       # Llama-3-70B down at tp 1 / 2: the config its batch-1 rows ran with (13.40 ms at tp 2);
                       # the plain GEMV's best there (block_n 4) recomputes the activation 4x as often
                       "8192x28672": {"1": [0, 16, 1024, 1, 8, 3, 1]}, "8192x14336": {"1": [0, 16, 1024, 1, 8, 3, 1]}},
                      "fp8_silu"),
    "bf16": merged_table({}, "bf16_silu"),  # (both: SHARDLLM_GEMV_CONFIGS' entries over them)
}
# The FMA form with the late reduction: the config the bf16 sweep picked at M = 1 for o (4096 x 4096) and for down
# at tp 2 (4096 x 7168) on an H200 (gemv._BF16_SWEEP).
_DEFAULT_CONFIG = GemvConfig(False, 4, 512, 1, 4, 3, True)


class SiluAndMulInput(DeferredGemvInput):
    """silu(gate) * up not yet computed: gate_up (M, 2I) in the activation dtype, for the linear SiluAndMul feeds."""

    __slots__ = ("gate_up",)

    def __init__(self, gate_up: torch.Tensor):
        self.gate_up = gate_up

    def gemv(self, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        return silu_gemv(self, w, w_scale, bias)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.gate_up.shape[:-1], self.gate_up.shape[-1] // 2))

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up.dtype


def _fused_config(w: torch.Tensor, m: int) -> GemvConfig:
    """The config of the fused GEMV for w (N, K) at m rows: the fused table's for that shape or the nearest tuned
    one (gemv.nearest_config: every entry is a down projection, and the fused kernel wants wider rows a program than
    the plain GEMV, since each program recomputes the activation over K), else the plain GEMV's for that weight
    dtype (fp8_triton.small_m_config; bf16: BF16_GEMV_TABLE), else _DEFAULT_CONFIG."""
    n, k = w.shape
    fp8 = w.dtype == torch.float8_e4m3fn
    config = nearest_config(FUSED_SILU_TABLES["fp8" if fp8 else "bf16"], n, k, m)
    if config is None and fp8:
        config = fp8_triton.small_m_config(n, k, m)
    return config or table_config(gemv_mod.BF16_GEMV_TABLE, n, k, m) or _DEFAULT_CONFIG


def silu_gemv(x: SiluAndMulInput, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
              config: GemvConfig | None = None) -> torch.Tensor:
    """y (M, N) in x's dtype = (silu(gate) * up) @ (w * w_scale[:, None])^T (+ bias) in one GEMV launch (two with
    split-K). x: gate_up (M, 2K) bf16/fp16 (the engine defers M <= FUSED_SILU_MAX_M); w (N, K) e4m3 with w_scale (N,)
    fp32, or x's dtype with None; config None: `_fused_config`'s."""
    gate_up = x.gate_up.reshape(-1, x.gate_up.shape[-1])
    if gate_up.stride(-1) != 1 or gate_up.stride(0) != gate_up.shape[1]:
        gate_up = gate_up.contiguous()
    y = gemv_mod.gemv(gate_up, w, w_scale, config or _fused_config(w, gate_up.shape[0]), silu_input=True)
    if bias is not None:
        y = y + bias
    return y.view(*x.gate_up.shape[:-1], y.shape[-1])


def _linear_weights(linear: nn.Module, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(w, w_scale) of a linear whose method the fused GEMV serves (with activations of `dtype`, if given), else
    None."""
    from shardllm.layers.linear import UnquantizedLinearMethod
    from shardllm.layers.quantization.fp8 import Fp8LinearMethod

    method, w = linear.quant_method, getattr(linear, "weight", None)
    if w is None or w.dim() != 2:
        return None
    if type(method) is UnquantizedLinearMethod:
        return (w, None) if dtype is None or w.dtype == dtype else None
    if (type(method) is Fp8LinearMethod and not method.weight_only and not method.static_input
            and fp8_triton.FP8_GEMV_MAX_M > 0):  # SHARDLLM_FP8_GEMV_MAX_M=0: FP8 rows never take the GEMV
        scale = getattr(linear, "weight_scale", None)
        if w.dtype == torch.float8_e4m3fn and scale is not None and scale.numel() == w.shape[0]:
            return w, scale.view(-1)
    return None


class GemvSiluTarget:
    """The linear a SiluAndMul feeds. Not an nn.Module, so the activation does not register the linear as its
    child; `link_gemv_silu` sets it as the activation's `gemv_target`."""

    def __init__(self, linear: nn.Module):
        self.linear = linear

    def _applies(self, x: torch.Tensor) -> bool:
        """Host checks on shapes, dtypes and cached probes only (graph-capturable)."""
        if not ENABLED or FORCE is False or not HAS_TRITON:
            return False
        if x.dim() != 2 or not 0 < x.shape[0] <= FUSED_SILU_MAX_M or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        weights = _linear_weights(self.linear, x.dtype)
        if weights is None or x.shape[1] != 2 * weights[0].shape[1]:
            return False
        if weights[1] is not None and x.shape[0] > fp8_triton.FP8_GEMV_MAX_M:  # FP8 rows past it: the FP8 GEMM's
            return False
        if FORCE is True:
            return True
        if not (x.is_cuda and triton_ops.use_triton(x)):  # the unfused path's silu_and_mul kernel runs there too
            return False
        if weights[1] is None:
            return gemv_mod.gemv_ok(x.device)
        return fp8_triton.triton_fp8_ok(x.device)

    def maybe_defer(self, x: torch.Tensor) -> SiluAndMulInput | None:
        """SiluAndMulInput(x) where the linear's fused GEMV applies to gate_up x (M, 2I), else None."""
        return SiluAndMulInput(x) if self._applies(x) else None


_PROBED: dict[tuple, bool] = {}  # (kind, device, N, K, weight dtype, activation dtype) -> passed


def probe_once(key: tuple, check: Callable[[], bool], what: str, reference: str, w: torch.Tensor) -> bool:
    """`check()` once per key, for the fused GEMV's load-time probes: False where it returns False or raises (a
    Triton that cannot compile the kernel), with a warning naming `what` and the `reference` it disagrees with; the
    weight w shows its shape and dtype there."""
    if key not in _PROBED:
        import logging

        log = logging.getLogger(__name__)
        try:
            ok = bool(check())
        except Exception as e:
            ok = False
            log.warning("%s unavailable (%s: %s)", what, type(e).__name__, e)
        if not ok:
            log.warning("%s disagrees with %s for a %s %s weight: the unfused path", what, reference,
                        tuple(w.shape), w.dtype)
        _PROBED[key] = ok
    return _PROBED[key]


def fused_gemv_ok(w: torch.Tensor, w_scale: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the fused GEMV compiles and equals silu_and_mul then the GEMV, bit for bit, on this weight's
    device, shape and dtype at every M it serves, with the configs it would run (probed once per (device, N, K,
    weight dtype, activation dtype), at load time, before any CUDA graph capture). Always True off CUDA."""
    if w.device.type != "cuda" or not HAS_TRITON:
        return True

    def check() -> bool:
        g = torch.Generator(device=w.device).manual_seed(0)
        ok = True
        for m in range(1, FUSED_SILU_MAX_M + 1):
            gate_up = (torch.randn(m, 2 * w.shape[1], device=w.device, generator=g) * 2).to(dtype)
            config = _fused_config(w, m)
            fused = silu_gemv(SiluAndMulInput(gate_up), w, w_scale, None, config)
            ok = ok and torch.equal(fused, gemv_mod.gemv(triton_ops.silu_and_mul(gate_up), w, w_scale, config))
        return ok

    return probe_once(("silu", w.device.index, *w.shape, w.dtype, dtype), check, "fused SiLU GEMV",
                      "silu_and_mul + GEMV", w)


def link_producers(model: nn.Module, producer_cls: type, fused_ok: Callable, target_cls: type) -> int:
    """Hands each `producer_cls` producer in `model.fp8_act_quant_inputs` a `target_cls(linear)` as its
    `gemv_target`, where the linear's method is one the fused GEMV serves and, on CUDA, its activations are 16-bit
    and `fused_ok(w, w_scale, activation dtype)` passes for its weight. Returns the number of links."""
    from shardllm.layers.quantization import producer_linear_pairs

    linked = 0
    for producer, linear in producer_linear_pairs(model):
        weights = _linear_weights(linear) if isinstance(producer, producer_cls) else None
        if weights is None:
            continue
        w, w_scale = weights
        act_dtype = getattr(linear, "params_dtype", w.dtype)  # the linear's input and output dtype
        if w.device.type == "cuda" and not (act_dtype in (torch.bfloat16, torch.float16) and
                                            fused_ok(w, w_scale, act_dtype)):
            continue
        producer.gemv_target = target_cls(linear)
        linked += 1
    return linked


def link_gemv_silu(model: nn.Module) -> int:
    """Hands each SiluAndMul producer in `model.fp8_act_quant_inputs` ({producer: linear}, names relative to a
    decoder layer of `model.model.layers`) a GemvSiluTarget for its linear, where both exist, the linear's method
    is one the fused GEMV serves and (on CUDA) `fused_gemv_ok` passes for its weight. Call after
    `process_weights_after_loading`. Returns the number of links."""
    from shardllm.layers.activation import SiluAndMul

    return link_producers(model, SiluAndMul, fused_gemv_ok, GemvSiluTarget) if ENABLED else 0
