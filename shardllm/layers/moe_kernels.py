"""The MoE layer's glue in Triton: everything around the grouped GEMMs that torch ran as a chain of elementwise,
gather, scatter and reduce kernels.

A Mixtral-8x7B fp8 decode step at batch 1024, tp = 2, on an H200 (benchmarks/profile_decode.py, fifth session) spent
17.5 ms of 37.5 in the grouped GEMMs and ~9 ms in that chain: SiLU and the multiply on strided halves, the per-token
quantization of 2k gathered rows, and the combine (weights gathered, fp32 products, a select, an index_copy back to
token order, a sum over k, a cast). Here:

- `route` (softmax top-k) and `sort_pairs` (a counting sort of the (token, slot) pairs by expert, with the
  inverse permutation) replace softmax / topk / divide and sort / searchsorted / scatter;
- `moe_combine`: one launch per layer reads each token's k expert rows from the sorted layout (through the inverse
  permutation) and writes the weighted fp32 sum in the output dtype: `combine_expert_rows` in one pass;
- the callers quantize the N tokens before the gather (per-token scales commute with selecting rows, so it equals
  quantizing the N * k gathered rows, at 1/k of the work and half the gathered bytes) and run SiLU-and-mul (with the
  FP8 quantization fused, `fp8_fused.silu_and_mul_quant`) as one kernel.

Numerics: `moe_combine` equals `combine_expert_rows` bit for bit at k <= 2 (the same fp32 products, summed in slot
order) and within fp32 rounding above. Switch: SHARDLLM_MOE_FUSED_GLUE=0 (read at import) restores the torch chain.
"""

from __future__ import annotations

import torch

from shardllm import envs
from shardllm.layers import triton_ops
from shardllm.layers.pdl import launch_args, pdl_enter
from shardllm.layers.triton_ops import HAS_TRITON, _jit, _pow2

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the kernel below only parses (its annotations are strings)
    triton = tl = None

ENABLED = envs.SHARDLLM_MOE_FUSED_GLUE
# None: the kernels on CUDA tensors; True forces them on (tests on CPU, which need TRITON_INTERPRET=1), False off.
FORCE: bool | None = None
COMBINE_BLOCK = 1024  # hidden columns per program


_PROBED: dict[tuple, bool] = {}  # (device type, index) -> whether the kernels matched their torch twins there


def applies(x: torch.Tensor) -> bool:
    """Whether the MoE layer takes the Triton glue for activations `x` (host checks and a cached probe only:
    graph-capturable). Not where triton_ops is off (attention_backend="torch": the all-torch reference path has no
    fused kernels), nor on a device where `glue_ok` found the kernels failing or disagreeing with torch."""
    if not ENABLED or FORCE is False or not HAS_TRITON:
        return False
    return FORCE is True or (x.is_cuda and triton_ops.use_triton(x) and glue_ok(x.device))


def glue_ok(device: torch.device) -> bool:
    """Whether route, sort_pairs and moe_combine run on `device` and equal select_experts, sort_by_expert and
    combine_expert_rows there (probed once per device, as fp8_triton.triton_fp8_ok, so that a Triton build that
    cannot compile or miscompiles them leaves the MoE layer on torch's ops instead of failing or serving wrong
    numbers). The first MoE forward is the engine's eager profiling run; a probe that would fall inside a CUDA graph
    capture answers False for that capture without caching (torch's ops are captured, equally correct)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    if key in _PROBED:
        return _PROBED[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    import logging

    from shardllm.layers.moe import combine_expert_rows, select_experts, sort_by_expert

    ok = False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(37, 8, device=device, generator=g) * 2
        w_ref, ids_ref = select_experts(logits, 2, True)
        w, ids = route(logits, 2, True)
        order, is_local, offs, inv = sort_pairs(ids_ref, 4, 4)  # an ep rank: half the experts local
        o_ref, l_ref, offs_ref = sort_by_expert(ids_ref, 4, 4)
        y = torch.randn(74, 96, device=device, generator=g)
        got = moe_combine(y, w_ref, order, offs, torch.float32, inv=inv)
        want = combine_expert_rows(y, w_ref, o_ref, l_ref, torch.float32)
        ok = bool(torch.equal(ids, ids_ref) and torch.allclose(w, w_ref, rtol=1e-5, atol=1e-6)
                  and torch.equal(order, o_ref) and torch.equal(offs, offs_ref) and torch.equal(is_local, l_ref)
                  and torch.allclose(got, want, rtol=1e-5, atol=1e-5))
    except Exception as e:  # a Triton that cannot compile or run them here
        logging.getLogger(__name__).warning("MoE Triton kernels unavailable (%s: %s)", type(e).__name__, e)
    if not ok:
        logging.getLogger(__name__).warning("MoE Triton kernels disagree with torch on %s: the MoE layers use "
                                            "torch's ops there", device)
    _PROBED[key] = ok
    return ok


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """order (R,) a permutation of 0..R-1 (int64) -> inv (R,) int32 with inv[order[i]] = i: the sorted row that
    holds (token, slot) pair p = token * k + slot. One scatter, no host sync."""
    inv = torch.empty(order.shape, dtype=torch.int32, device=order.device)
    return inv.scatter_(0, order, torch.arange(order.numel(), dtype=torch.int32, device=order.device))


@_jit
def _moe_combine_kernel(y_ptr, w_ptr, inv_ptr, offs_ptr, out_ptr, hidden, num_local, stride_y, stride_out,
                        K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (token n, column block): out[n, cols] = sum over slots j of w[n, j] * y[inv[n * K + j], cols] in fp32,
    a slot whose sorted row is at or past offs[num_local - 1] (another rank's expert) adding nothing."""
    pdl_enter(USE_PDL)
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < hidden
    local_rows = tl.load(offs_ptr + num_local - 1)  # rows of this rank's experts come first in the sorted layout
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        r = tl.load(inv_ptr + n * K + j)
        wt = tl.load(w_ptr + n * K + j)
        local = (r + tl.zeros([BLOCK], tl.int32)) < local_rows  # (BLOCK,): a scalar mask as a vector
        # never read another rank's rows (their values are undefined, possibly NaN): masked, then selected
        y = tl.load(y_ptr + r.to(tl.int64) * stride_y + cols, mask=col_ok & local, other=0.0).to(tl.float32)
        acc += tl.where(local, y * wt, 0.0)
    tl.store(out_ptr + n * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


if HAS_TRITON and hasattr(_moe_combine_kernel, "rewrite"):  # the interpreter: see the note in triton_ops
    _moe_combine_kernel.rewrite()


def moe_combine(y: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                out_dtype: torch.dtype, inv: torch.Tensor | None = None) -> torch.Tensor:
    """`combine_expert_rows` (layers/moe.py) in one launch.

    y (N * k, H) expert outputs in `sort_by_expert` order (rows at or past offs[-1] undefined); topk_weights (N, k)
    fp32; order (N * k,) int64 and offs (E_local,) int32 from `sort_by_expert` (or `sort_pairs`, whose inverse
    permutation `inv` saves a scatter here). Returns (N, H) in out_dtype: the
    weighted sum over each token's k slots, in fp32, slots of other ranks' experts left out.
    """
    n, k = topk_weights.shape
    hidden = y.shape[1]
    if y.shape[0] != n * k or order.shape != (n * k,) or y.stride(-1) != 1:
        raise ValueError(f"moe_combine: y {tuple(y.shape)} (contiguous rows) must hold N * k = {n * k} rows, "
                         f"order {tuple(order.shape)} as many entries")
    out = torch.empty((n, hidden), dtype=out_dtype, device=y.device)
    if n == 0 or hidden == 0:
        return out
    inv = inverse_order(order) if inv is None else inv
    w = topk_weights.to(torch.float32).contiguous()
    block = min(_pow2(hidden), COMBINE_BLOCK)
    _moe_combine_kernel[(n, triton.cdiv(hidden, block))](
        y, w, inv, offs, out, hidden, offs.numel(), y.stride(0), out.stride(0), K=k, BLOCK=block,
        num_warps=4 if block >= 512 else 1, **launch_args(y.device))
    return out


# ---- routing: softmax top-k, and the tokens' (token, slot) pairs grouped by expert -------------------------------


@_jit
def _moe_route_kernel(logits_ptr, w_ptr, ids_ptr, num_tokens, num_experts, stride_l, TOP_K: tl.constexpr,
                      K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, RENORMALIZE: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
    """BLOCK_T tokens a program: fp32 softmax over the experts, the TOP_K largest probabilities by repeated arg-max
    (ties to the lower expert id), optionally renormalized to sum to one."""
    pdl_enter(USE_PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, E_PAD)
    kk = tl.arange(0, K_PAD)
    t_ok = t < num_tokens
    e_ok = e < num_experts
    x = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride_l + e[None, :], mask=t_ok[:, None] & e_ok[None, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(t_ok[:, None], x, 0.0)  # rows past the end: finite, never stored
    p = tl.exp(x - tl.max(x, 1)[:, None])
    p = tl.where(e_ok[None, :], p, 0.0)
    p = p / tl.sum(p, 1)[:, None]
    # the key the top-k ranks by: padding experts (-1) are never picked; a NaN probability (a NaN or infinite logit
    # makes the whole row NaN) ranks above every number, as in torch.topk, so that the ids stay valid experts
    key = tl.where(e_ok[None, :], tl.where(p == p, p, 2.0), -1.0)
    w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(key, 1)
        pick = tl.min(tl.where(key == best[:, None], e[None, :], E_PAD), 1)  # the lowest id among equal maxima
        chosen = e[None, :] == pick[:, None]
        val = tl.sum(tl.where(chosen, p, 0.0), 1)  # p[pick] exactly (NaN stays NaN)
        w = tl.where(kk[None, :] == j, val[:, None], w)
        ids = tl.where(kk[None, :] == j, pick[:, None], ids)
        key = tl.where(chosen, -1.0, key)
    if RENORMALIZE:
        w = w / tl.sum(w, 1)[:, None]  # the K_PAD - TOP_K padding slots are 0
    out = t[:, None].to(tl.int64) * TOP_K + kk[None, :]
    ok = t_ok[:, None] & (kk[None, :] < TOP_K)
    tl.store(w_ptr + out, w, mask=ok)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=ok)


@_jit
def _moe_sort_kernel(ids_ptr, order_ptr, inv_ptr, offs_ptr, num_pairs, expert_start, num_local,
                     E_PAD: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One program: a stable counting sort of the num_pairs (token, slot) pairs by local expert, pairs of other
    ranks' experts last (key num_local). Pass 1 counts each key; pass 2 places each pair at its group's start plus
    the pairs of its key before it. Writes order (sorted row -> pair), inv (pair -> sorted row) and offs (group
    ends of the local experts)."""
    pdl_enter(USE_PDL)
    e = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        r = c0 + tl.arange(0, CHUNK)
        r_ok = r < num_pairs
        key = tl.load(ids_ptr + r, mask=r_ok, other=0).to(tl.int32) - expert_start
        key = tl.where((key >= 0) & (key < num_local), key, num_local)
        onehot = ((key[:, None] == e[None, :]) & r_ok[:, None]).to(tl.int32)  # (CHUNK, E_PAD)
        counts += tl.sum(onehot, 0)
    ends = tl.cumsum(counts, 0)
    tl.store(offs_ptr + e, ends, mask=e < num_local)
    base = ends - counts  # each key's first sorted row
    for c0 in range(0, num_pairs, CHUNK):
        r = c0 + tl.arange(0, CHUNK)
        r_ok = r < num_pairs
        key = tl.load(ids_ptr + r, mask=r_ok, other=0).to(tl.int32) - expert_start
        key = tl.where((key >= 0) & (key < num_local), key, num_local)
        onehot = ((key[:, None] == e[None, :]) & r_ok[:, None]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - onehot  # pairs of the same key earlier in this chunk
        pos = tl.sum(onehot * (base[None, :] + rank), 1)  # (CHUNK,)
        tl.store(order_ptr + pos, r.to(tl.int64), mask=r_ok)
        tl.store(inv_ptr + r, pos, mask=r_ok)
        base += tl.sum(onehot, 0)


if HAS_TRITON and hasattr(_moe_route_kernel, "rewrite"):  # the interpreter: see the note in triton_ops
    _moe_route_kernel.rewrite()
    _moe_sort_kernel.rewrite()

ROUTE_BLOCK_T = 16  # tokens a routing program
SORT_CELLS = 8192  # CHUNK x E_PAD of the sort's one-hot tile: (CHUNK, E_PAD) int32 values per pass step
# The counting sort is one program: it serves decode-sized steps; more pairs (a long prefill step) go to torch's
# parallel sort. [ours: a first guess; a sort of 2k pairs is 8 passes of a 512 x 16 tile]
SORT_MAX_PAIRS = 4096


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe.select_experts` in one launch: router_logits (N, E) -> (weights (N, k) fp32, expert ids (N, k) int64).

    The same fp32 softmax and top-k (weights within an ulp of torch's exp; ids equal, ties to the lower id)."""
    n, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, {num_experts}] (the number of experts)")
    w = torch.empty((n, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((n, top_k), dtype=torch.int64, device=router_logits.device)
    if n:
        logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
        _moe_route_kernel[(triton.cdiv(n, ROUTE_BLOCK_T),)](
            logits, w, ids, n, num_experts, logits.stride(0), TOP_K=top_k, K_PAD=_pow2(top_k),
            E_PAD=_pow2(num_experts), BLOCK_T=ROUTE_BLOCK_T, RENORMALIZE=renormalize, num_warps=4,
            **launch_args(router_logits.device))
    return w, ids


def sort_pairs(topk_ids: torch.Tensor, expert_start: int,
               num_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe.sort_by_expert` in one launch (a counting sort: the same stable order), plus the inverse permutation;
    above SORT_MAX_PAIRS pairs, sort_by_expert and `inverse_order` themselves.

    topk_ids (N, k) global expert ids -> (order (N * k,) int64, is_local (N * k,) bool, offs (E_local,) int32,
    inv (N * k,) int32 with inv[order[i]] = i)."""
    ids = topk_ids.reshape(-1)
    r, dev = ids.numel(), ids.device
    if r > SORT_MAX_PAIRS:
        from shardllm.layers.moe import sort_by_expert  # moe imports this module

        order, is_local, offs = sort_by_expert(topk_ids, expert_start, num_local)
        return order, is_local, offs, inverse_order(order)
    order = torch.empty(r, dtype=torch.int64, device=dev)
    inv = torch.empty(r, dtype=torch.int32, device=dev)
    offs = torch.zeros(num_local, dtype=torch.int32, device=dev)
    if r:
        e_pad = _pow2(num_local + 1)  # the local experts and one key for all others
        _moe_sort_kernel[(1,)](ids, order, inv, offs, r, expert_start, num_local, E_PAD=e_pad,
                               CHUNK=max(16, SORT_CELLS // e_pad), num_warps=4, **launch_args(dev))
    is_local = torch.arange(r, device=dev) < offs[-1]  # local rows come first
    return order, is_local, offs, inv
