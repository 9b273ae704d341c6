"""FP8 (e4m3fn) quantization math and the scaled GEMM, with a plain torch reference beside each fast path.

Scales are fp32 dequantization multipliers ("inverse scales"): x ~= q.float() * scale. A dynamic scale is
amax / 448, floored at 1 / (448 * 512) so that an all-zero row or block gets a finite scale (vLLM's floor).
GEMM contract (torch._scaled_mm): out = (A_q * scale_a) @ (W_q * scale_b)^T, A (M, K) row-major, W (N, K).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from shardllm import envs

logger = logging.getLogger(__name__)
# torch._scaled_mm's use_fast_accum for row-wise GEMMs of K <= FAST_ACCUM_MAX_K (SHARDLLM_FP8_FAST_ACCUM_MAX_K):
# Hopper's FP8 tensor cores then accumulate without the periodic promotion to fp32 (CUTLASS's FP8FastAccum
# schedules), whose error grows with K. Measured on an H200 (tenth session, `benchmarks/fp8_gemm.py --recipes`,
# Llama-3-8B shapes): M = 16384 gate_up 3443 -> 2880 us, qkv 660 -> 593; max error against the fp32 twin over the
# output's max 2.3e-3 -> 4.7-6.6e-3 at K = 4096 but 2.3e-3 -> 1.1-1.3e-2 at K = 14336 (down proj, whose time gained
# 1-6%): large K stays exact. End to end, 1000 x 128/128 fp8 + fp8 KV out tok/s, exact -> this default: 8B 27,976 ->
# 29,373, 70B on one H200 3,611 -> 3,845 (docs/benchmarks.md, tenth session).
FAST_ACCUM_MAX_K = envs.SHARDLLM_FP8_FAST_ACCUM_MAX_K
# Row-wise GEMMs with at most TENSORWISE_MAX_OUTPUT output elements (M x N; SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT, 0:
# none) run as cuBLAS's per-tensor kernel with unit scales, then one launch applying the row and column scales
# (scaled_mm_rowwise_by_tensorwise). cuBLAS's row-wise kernel is slow for few rows (H200, seventeenth session,
# `benchmarks/fp8_gemm.py --recipes --ms 16 32 64 256 512 1024`, us, row-wise -> this route; fast accumulation and
# the bf16 product: o 4096x4096 M 16 13.1 -> 7.3, M 64 13.0 -> 8.5, M 256 13.4 -> 11.4, M 512 14.5 -> 17.0; qkv
# 6144x4096 M 64 13.3 -> 9.4, M 256 13.8 -> 14.6; gate_up 28672x4096 M 16 36.2 -> 34.2, M 64 38.0 -> 35.6, M 256
# 50.4 -> 56.4; exact accumulation and the fp32 product: down 4096x14336 M 64 36.7 -> 21.1, M 256 37.4 -> 31.5): the
# output's traffic takes the gain back past ~2^20 elements.
TENSORWISE_MAX_OUTPUT = envs.SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT
# That route's unscaled product goes out in bf16 for a bf16 output and is scaled in place: half an fp32
# intermediate's traffic, one more rounding; about 1% faster decode at 8-64 rows, within noise on the throughput
# runs (seventeenth session). SHARDLLM_FP8_TENSORWISE_FP32=1, and fp16 / fp32 outputs always: through fp32.
TENSORWISE_FP32 = envs.SHARDLLM_FP8_TENSORWISE_FP32

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = clamp(x / scale, +-448) in e4m3fn; `scale` broadcasts against x (fp32)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K) e4m3fn, scale (..., 1) fp32), one scale per row: per output channel for a
    weight (N, K), per token for activations (M, K)."""
    scale = _scale_of(x.abs().amax(dim=-1, keepdim=True))
    return quantize_with_scale(x, scale), scale


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q e4m3fn, scale () fp32), one scale for the whole tensor."""
    scale = _scale_of(x.abs().amax())
    return quantize_with_scale(x, scale), scale


def quantize_per_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (q (N, K) e4m3fn, scale (ceil(N/bn), ceil(K/bk)) fp32), one scale per bn x bk block; edge
    blocks are zero-padded for their amax (the DeepSeek-V3 / HF "fp8" checkpoint layout)."""
    bn, bk = block
    n, k = w.shape
    pn, pk = -(-n // bn) * bn, -(-k // bk) * bk
    padded = F.pad(w.float(), (0, pk - k, 0, pn - n))
    blocks = padded.view(pn // bn, bn, pk // bk, bk)
    scale = _scale_of(blocks.abs().amax(dim=(1, 3)))  # (N/bn, K/bk)
    return quantize_with_scale(w, expand_block_scale(scale, (n, k), block)), scale


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Block scales (ceil(N/bn), ceil(K/bk)) -> one scale per element (N, K)."""
    n, k = shape
    bn, bk = block
    return scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), K % group == 0 -> (q (M, K), scale (M, K / group)): the 1 x 128 activation groups of the
    block recipe (DeepSeek-V3 report, arXiv 2412.19437 sec 3.3.1)."""
    m, k = x.shape
    xg = x.float().view(m, k // group, group)
    scale = _scale_of(xg.abs().amax(dim=-1))  # (M, K / group)
    return quantize_with_scale(xg, scale[..., None]).view(m, k), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """fp32 values of an e4m3fn tensor: per-row/per-tensor `scale` broadcasts, block scales expand first."""
    if block is not None:
        scale = expand_block_scale(scale, tuple(q.shape[-2:]), block)
    return q.float() * scale


# ---- GEMM backends ---------------------------------------------------------------------------------------------
_PROBED: dict[tuple, frozenset] = {}
_UNIT_SCALE: dict[tuple, torch.Tensor] = {}  # () fp32 1.0 on each probed device


def fp8_recipes(device: torch.device) -> frozenset:
    """Which torch._scaled_mm recipes run on `device`: a subset of {"tensorwise", "tensorwise_f32", "rowwise",
    "block"} ("tensorwise_f32": the per-tensor recipe with an fp32 output, scaled_mm_rowwise_by_tensorwise's).

    Probed once per device with tiny calls (rowwise and block need cuBLASLt/CUTLASS support that depends on
    the GPU and the build); the CPU's emulated _scaled_mm does tensorwise and rowwise.
    """
    key = (device.type, device.index)
    if key in _PROBED:
        return _PROBED[key]
    ok = set()
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        _PROBED[key] = frozenset()
        return _PROBED[key]
    m, n, k = 32, 128, 256
    a = torch.ones(m, k, device=device).to(FP8_DTYPE)
    b = torch.ones(n, k, device=device).to(FP8_DTYPE)
    out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trials = {
        "tensorwise": (torch.ones((), device=device), torch.ones((), device=device)),
        "rowwise": (torch.ones(m, 1, device=device), torch.ones(1, n, device=device)),
        "block": (torch.ones(k // 128, m, device=device).t(), torch.ones(n // 128, k // 128, device=device).t()),
    }
    trials["tensorwise_f32"] = trials["tensorwise"]  # the per-tensor recipe into fp32 (_UNIT_SCALE's use)
    for name, (sa, sb) in trials.items():
        try:
            y = torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.float32 if name.endswith("f32") else out_dtype)
            if float(y[0, 0]) == float(k):
                ok.add(name)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            logger.debug("_scaled_mm %s recipe unavailable on %s: %s", name, device, e)
    _UNIT_SCALE[key] = trials["tensorwise"][0]  # made here, eagerly: a CUDA graph's capture cannot make it
    _PROBED[key] = frozenset(ok)
    logger.info("FP8 GEMM recipes on %s: %s", device, sorted(ok) or "none")
    return _PROBED[key]


_WARNED = [False]


def weight_only_fallback(device: torch.device, cfg) -> bool:
    """True where the device has no FP8 GEMM: an FP8 checkpoint then runs weight-only (dequantized in the
    matmul, with a warning); online dtype='fp8' there is refused, since it would only lose accuracy."""
    if device.type != "cuda" or fp8_recipes(device):
        return False
    if not cfg.is_checkpoint_fp8:
        raise ValueError("dtype='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper "
                         "or later): use dtype='bfloat16' on this GPU")
    if not _WARNED[0]:
        _WARNED[0] = True
        logger.warning("this GPU has no FP8 GEMM: the FP8 checkpoint runs weight-only (weights dequantized to "
                       "%s in each matmul), slower than bf16 weights", "the model's dtype")
    return True


def cpu_weight_f32(owner: torch.nn.Module, w_q: torch.Tensor) -> torch.Tensor | None:
    """On CPU, `w_q` in fp32, converted once and kept on `owner` (not a parameter): torch's emulated _scaled_mm
    converts the whole weight on every call, about 30x the matmul for a decode step. Same values: an e4m3 number
    is exact in fp32. None on GPUs."""
    if w_q.is_cuda:
        return None
    cached = owner.__dict__.get("_fp8_w_f32")
    if cached is None or cached.shape != w_q.shape:
        cached = w_q.float()
        owner.__dict__["_fp8_w_f32"] = cached
    return cached


class ScaledProduct:
    """An FP8 GEMM's (M, N) output before its row-wise scales: its value is round((product * row_scale) *
    col_scale) to product's dtype, what fp8_triton.scale_rows_cols stores. The per-tensor route returns one where
    asked (scaled_mm_rowwise's `defer`) so that the kernel reading the output next applies the scales as it loads
    it, one launch fewer (the RMSNorm / SiLU-and-mul quantizers of fp8_fused.py: `link_deferred_scale` says which
    linears may defer); any other reader calls `value()`.

    product: (M, N) bf16 with contiguous rows (the unscaled integer-grid product); row_scale: (M, 1) fp32, the
    tokens' scales; col_scale: (N,) fp32, the weight's channel scales; both contiguous."""

    __slots__ = ("product", "row_scale", "col_scale", "_scaled")

    def __init__(self, product: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor):
        self.product, self.row_scale, self.col_scale = product, row_scale, col_scale
        self._scaled = False

    @property
    def shape(self) -> torch.Size:
        return self.product.shape

    @property
    def scaled(self) -> bool:
        """Whether value() has run: `product` then holds the scaled values (a reader must not scale them again)."""
        return self._scaled

    def value(self) -> torch.Tensor:
        """The scaled (M, N) tensor, written into `product` in place on the first call (later calls return it)."""
        if not self._scaled:
            apply_row_col_scales(self.product, self.row_scale, self.col_scale, self.product.dtype, in_place=True)
            self._scaled = True
        return self.product


def apply_row_col_scales(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                         in_place: bool = False) -> torch.Tensor:
    """(acc.float() * x_scale * w_scale).to(out_dtype): the per-tensor route's epilogue (acc (M, N), x_scale
    (M, 1), w_scale (1, N) or (N,) fp32). fp8_triton.scale_rows_cols (one launch) on a GPU whose FP8 Triton kernels
    passed their probe, torch ops elsewhere; `in_place` (out_dtype acc's): written into acc."""
    if acc.is_cuda and _epilogue_kernel_ok(acc.device):
        from shardllm.layers.quantization.fp8_triton import scale_rows_cols

        return scale_rows_cols(acc, x_scale.contiguous(), w_scale.contiguous(), out_dtype, in_place=in_place)
    y = (acc.float() * x_scale * w_scale.reshape(1, -1)).to(out_dtype)
    return acc.copy_(y) if in_place else y


def scaled_mm_rowwise(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, w_f32: torch.Tensor | None = None,
                      fp32_product: bool | None = None, defer: bool = False) -> torch.Tensor | ScaledProduct:
    """x_q (M, K), w_q (N, K) e4m3fn; x_scale (M, 1), w_scale (1, N) fp32 -> (M, N) out_dtype.

    torch._scaled_mm's row-wise recipe where the device has it (fast accumulation up to K = FAST_ACCUM_MAX_K), or,
    for M x N <= TENSORWISE_MAX_OUTPUT, its per-tensor one and a scale epilogue
    (scaled_mm_rowwise_by_tensorwise: faster there); else the same product unfused (fp8 x fp8 in fp32, then both
    scales): what a build without the recipe, or a pre-Hopper GPU, can run. `w_f32`: w_q already in fp32 (the CPU
    path, `cpu_weight_f32`). `fp32_product`: the per-tensor route's (None: TENSORWISE_FP32; True for test oracles).
    `defer`: where the route runs with its bf16 product scaled in place (a bf16 out_dtype, no fp32_product), a
    ScaledProduct instead of the tensor (the scales not applied yet); elsewhere the tensor.
    """
    if w_f32 is not None:
        return ((x_q.float() @ w_f32.t()) * x_scale * w_scale).to(out_dtype)
    recipes = fp8_recipes(x_q.device)
    n = w_q.shape[0]
    if (TENSORWISE_MAX_OUTPUT > 0 and x_q.shape[0] * n <= TENSORWISE_MAX_OUTPUT
            and _route_recipe(out_dtype, fp32_product) in recipes and _epilogue_kernel_ok(x_q.device)):
        return scaled_mm_rowwise_by_tensorwise(x_q, w_q, x_scale, w_scale, out_dtype,
                                               use_fast_accum=x_q.shape[1] <= FAST_ACCUM_MAX_K,
                                               fp32_product=fp32_product, defer=defer)
    if "rowwise" in recipes:
        return torch._scaled_mm(x_q, w_q.t(), x_scale, w_scale, out_dtype=out_dtype,
                                 use_fast_accum=x_q.shape[1] <= FAST_ACCUM_MAX_K)
    y = torch.mm(x_q.to(out_dtype), w_q.to(out_dtype).t()).float()
    return (y * x_scale * w_scale).to(out_dtype)


def scaled_mm_rowwise_by_tensorwise(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor,
                                    w_scale: torch.Tensor, out_dtype: torch.dtype, use_fast_accum: bool = False,
                                    fp32_product: bool | None = None, defer: bool = False
                                    ) -> torch.Tensor | ScaledProduct:
    """scaled_mm_rowwise's product in two launches: torch._scaled_mm's per-tensor recipe with unit scales (the
    integer-grid product of the e4m3 values, accumulated as the tensor cores do) into bf16 or fp32 (below), then
    (product * x_scale * w_scale).to(out_dtype) (fp8_triton.scale_rows_cols on a GPU with Triton, torch ops
    elsewhere). Shapes as scaled_mm_rowwise's; needs the per-tensor recipe of that product dtype ("tensorwise" /
    "tensorwise_f32", fp8_recipes). The results agree with the fused row-wise kernel's to out_dtype's last bit or
    so (two bits with the bf16 product).
    fp32_product False (the default, TENSORWISE_FP32; SHARDLLM_FP8_TENSORWISE_FP32=1 sets it): a bf16 out_dtype's
    product goes out in bf16 and is scaled in place: half the intermediate's bytes, one rounding more (|error| <= 1
    ulp of bf16 more: the unscaled product, |x| <= 448^2 K, is far inside bf16's range, not fp16's: fp16 and fp32
    outputs always take the fp32 product). `defer` with that bf16 in-place form: the ScaledProduct instead (no
    second launch); with the fp32 product, the tensor. ValueError on a device without FP8 GEMMs."""
    key = (x_q.device.type, x_q.device.index)
    if key not in _UNIT_SCALE:
        fp8_recipes(x_q.device)
    one = _UNIT_SCALE.get(key)
    if one is None:  # a GPU without FP8 GEMMs: its probe stops before the trials
        raise ValueError(f"{x_q.device} has no FP8 GEMM (compute capability >= 8.9 needed): use bf16 weights")
    inter = _route_product_dtype(out_dtype, fp32_product)
    acc = torch._scaled_mm(x_q, w_q.t(), one, one, out_dtype=inter, use_fast_accum=use_fast_accum)
    if defer and inter == out_dtype == torch.bfloat16:
        return ScaledProduct(acc, x_scale.contiguous(), w_scale.contiguous().view(-1))
    return apply_row_col_scales(acc, x_scale, w_scale, out_dtype, in_place=inter == out_dtype)


def _route_product_dtype(out_dtype: torch.dtype, fp32_product: bool | None) -> torch.dtype:
    """The dtype of scaled_mm_rowwise_by_tensorwise's unscaled product: bf16 for a bf16 output unless fp32 is asked
    (fp32_product, else TENSORWISE_FP32); fp32 otherwise (an fp16 one too: the product reaches 448^2 K, past fp16's
    65504)."""
    fp32 = TENSORWISE_FP32 if fp32_product is None else fp32_product
    return out_dtype if not fp32 and out_dtype == torch.bfloat16 else torch.float32


def _route_recipe(out_dtype: torch.dtype, fp32_product: bool | None) -> str:
    """The fp8_recipes entry the per-tensor route needs for that product dtype."""
    return "tensorwise_f32" if _route_product_dtype(out_dtype, fp32_product) == torch.float32 else "tensorwise"


_EPILOGUE_OK: dict[tuple, bool] = {}


def _epilogue_kernel_ok(device: torch.device) -> bool:
    """Off CUDA, True (the torch epilogue); on CUDA, whether the FP8 Triton kernels passed their start-up probe
    (fp8_triton.triton_fp8_ok): without them the row-wise recipe stays faster than a torch epilogue. A dict lookup
    after the first call a device (each routed GEMM asks twice: scaled_mm_rowwise, then the route's epilogue)."""
    key = (device.type, device.index)
    ok = _EPILOGUE_OK.get(key)
    if ok is None:
        if device.type != "cuda":
            ok = True
        else:
            from shardllm.layers.quantization.fp8_triton import triton_fp8_ok

            ok = triton_fp8_ok(device)
        _EPILOGUE_OK[key] = ok
    return ok


_BLOCK_OK = [True]  # cleared for the process when cuBLAS refuses a block-scaled shape the probe did not try


def block_fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int],
                     out_dtype: torch.dtype) -> torch.Tensor:
    """x (M, K) unquantized -> (M, N): x quantized per token in 1 x bk groups (K zero-padded to whole groups
    for the amax), then `scaled_mm_block` against w_q (N, K) with its block scales."""
    bk = block[1]
    k = x.shape[1]
    pad = -k % bk
    x_q, x_scale = quantize_per_token_group(F.pad(x, (0, pad)) if pad else x, bk)  # (M, K + pad), (M, K / bk)
    return scaled_mm_block(x_q[:, :k] if pad else x_q, w_q, x_scale, w_scale, block, out_dtype)


def cublas_block_scale_layout_ok(n: int, k: int) -> bool:
    """Whether torch._scaled_mm's block recipe hands cuBLASLt W's 128x128 scales as cuBLASLt reads them.

    cuBLASLt reads the scales of W (N, K) with a leading dimension of L4 = round_up(ceil(K / 128), 4) between
    128-row blocks (the cuBLAS docs' "scaling factors layouts"; pytorch PR 166752, whose _scaled_mm_v2 checks it);
    torch._scaled_mm (v1) accepts only a stride of ceil(K / 128) there and passes the pointer on unchecked. The two
    agree when ceil(K / 128) % 4 == 0 or W has one row block; otherwise cuBLASLt silently reads other blocks' scales
    (and, past the last expert of a stacked tensor, memory that is no scale: issue 13, H200, K = 384)."""
    return -(-k // 128) % 4 == 0 or n <= 128


def _scaled_mm_block_padded(x_q: torch.Tensor, w_q: torch.Tensor, x_scale_cm: torch.Tensor, w_scale: torch.Tensor,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """The 1x128 x 128x128 recipe through torch.nn.functional.scaled_mm (torch._scaled_mm_v2), W's scales padded to
    L4 columns so that their layout is cuBLASLt's: (L4, N / 128) with strides (1, L4). x_scale_cm: (M, K / 128)
    column-major."""
    scale_b = F.pad(w_scale, (0, -w_scale.shape[1] % 4)).t()  # (L4, N/128), strides (1, L4); pad never read
    st = F.ScalingType
    return F.scaled_mm(x_q, w_q.t(), x_scale_cm, st.BlockWise1x128, scale_b, st.BlockWise128x128,
                       output_dtype=out_dtype)


_PADDED_OK: dict[tuple, bool] = {}


def _padded_block_ok(device: torch.device) -> bool:
    """`_scaled_mm_block_padded` runs on `device` and equals the dequantized product at a shape whose scales need
    the padding (K / 128 = 3, two row blocks, random scales): probed once per device, eagerly."""
    key = (device.type, device.index)
    if key not in _PADDED_OK:
        ok = False
        if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
            try:
                g = torch.Generator(device=device).manual_seed(0)
                x_q, x_s = quantize_per_token_group(torch.randn(16, 384, device=device, generator=g), 128)
                w_q, w_s = quantize_per_block(torch.randn(256, 384, device=device, generator=g), (128, 128))
                w_s = w_s * torch.rand(w_s.shape, device=device, generator=g).add(0.5)  # blocks told apart
                y = _scaled_mm_block_padded(x_q, w_q, x_s.t().contiguous().t(), w_s, torch.bfloat16).float()
                ref = (x_q.float() * x_s.repeat_interleave(128, dim=1)) @ dequantize(w_q, w_s, (128, 128)).t()
                ok = bool(((y - ref).abs().max() <= 1e-2 * ref.abs().max()).item())  # misread scales: >= 10%
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                logger.debug("scaled_mm v2 block recipe unavailable on %s: %s", device, e)
        _PADDED_OK[key] = ok
        logger.info("cuBLAS block-scaled FP8 GEMM with K / 128 not a multiple of 4 on %s: %s", device,
                    "scaled_mm v2 with padded scales" if ok else "dequantized product")
    return _PADDED_OK[key]


def scaled_mm_block(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """Block recipe: x_q (M, K) with x_scale (M, K / bk) per 1 x bk group; w_q (N, K) with w_scale
    (ceil(N / bn), ceil(K / bk)) per bn x bk block. cuBLASLt's 1x128 x 128x128 recipe where probed to run
    (bn = bk = 128, N and K multiples of 128; through torch._scaled_mm where its scale layout is cuBLASLt's, else
    scaled_mm v2 with padded scales where probed right: `cublas_block_scale_layout_ok`), else the dequantized
    product in fp32 (the reference)."""
    bn, bk = block
    n, k = w_q.shape
    if ("block" in fp8_recipes(x_q.device) and _BLOCK_OK[0] and bn == bk == 128 and n % 128 == 0
            and k % 128 == 0 and (cublas_block_scale_layout_ok(n, k) or _padded_block_ok(x_q.device))):
        m, x_q0, x_scale0 = x_q.shape[0], x_q, x_scale
        pad = -m % 16  # the probe's M = 32 ran, M = 33 was refused (H200, cuBLAS 13): pad the rows [ours: a guess]
        if pad:
            x_q = torch.cat([x_q, x_q.new_zeros(pad, k)])
            x_scale = torch.cat([x_scale, x_scale.new_ones(pad, x_scale.shape[1])])
        v1 = cublas_block_scale_layout_ok(n, k)
        try:  # scale_a outer-dim-major (column-major (M, K/128)), scale_b the transpose of (N/128, K/128)
            if v1:
                y = torch._scaled_mm(x_q, w_q.t(), x_scale.t().contiguous().t(), w_scale.t(), out_dtype=out_dtype)
            else:
                y = _scaled_mm_block_padded(x_q, w_q, x_scale.t().contiguous().t(), w_scale, out_dtype)
            return y[:m] if pad else y
        except RuntimeError as e:  # H200 + cuBLAS 13 refused (M=33, N=768, K=1024) though the probe passed
            if v1:
                _BLOCK_OK[0] = False
            else:
                _PADDED_OK[(x_q.device.type, x_q.device.index)] = False
            logger.warning("cuBLAS block-scaled FP8 GEMM failed (%s); using the dequantized product", e)
            x_q, x_scale = x_q0, x_scale0
    x = x_q.float() * x_scale.repeat_interleave(bk, dim=1)[:, :k]
    return (x @ dequantize(w_q, w_scale, block).t()).to(out_dtype)
