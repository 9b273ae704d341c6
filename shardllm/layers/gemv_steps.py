"""The GEMV kernel's per-step helpers (`gemv._gemv_kernel`): the load that forms its input from the previous op's
(SiLU-and-mul from gate_up) and one K step of either form, given its weight tile. Triton inlines them into the
kernel."""

import triton
import triton.language as tl


@triton.jit
def _silu_mul_load(ptrs, K, mask):
    """round(round(silu(gate)) * up) in the activation dtype, gate at `ptrs` and up K elements on: the values
    triton_ops._fused_silu_and_mul_kernel stores (the same fp32 expression, the same two roundings)."""
    gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(ptrs.dtype.element_ty).to(tl.float32)
    return (act * up).to(ptrs.dtype.element_ty)


@triton.jit
def _dot_update(acc, w, k, k_end, x_rows, m_in, K, EVEN_K: tl.constexpr, SILU_INPUT: tl.constexpr,
                DOT_F32: tl.constexpr):
    """The tl.dot form's step at columns k given its (BN, BK) weight tile w: acc + x[:, k] @ w^T."""
    x_mask = m_in if EVEN_K else m_in & (k[None, :] < k_end)
    if SILU_INPUT:
        x = _silu_mul_load(x_rows + k[None, :], K, x_mask)  # (BM, BK)
    else:
        x = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)  # (BM, BK)
    if DOT_F32:  # Triton's CPU interpreter computes bf16 dots wrongly (3.9); fp32 there
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
    return tl.dot(x, tl.trans(w.to(x.dtype)), acc)


@triton.jit
def _fma_update(acc, acc3, w3, k, k_end, x_rows, x_rows3, m_in, m_in3, K, EVEN_K: tl.constexpr,
                SILU_INPUT: tl.constexpr, LATE_REDUCE: tl.constexpr):
    """The FMA form's step at columns k given its (BM, BN, BK) weight tile w3: (acc, acc3) after its products
    (acc3: the late-reduce accumulator, else passed through)."""
    k3 = k[None, None, :]
    x_mask = m_in if EVEN_K else m_in & (k[None, :] < k_end)
    if SILU_INPUT:  # (BM, 1, BK), broadcast over BN in the product
        x3 = _silu_mul_load(x_rows + k[None, :], K, x_mask)[:, None, :]
    elif EVEN_K:
        x3 = tl.load(x_rows3 + k3, mask=m_in3, other=0.0)  # (BM, BN, BK)
    else:
        x3 = tl.load(x_rows3 + k3, mask=m_in3 & (k3 < k_end), other=0.0)
    prod = x3.to(tl.float32) * w3.to(tl.float32)
    if LATE_REDUCE:
        acc3 += prod
    else:
        acc += tl.sum(prod, axis=2)
    return acc, acc3


@triton.jit
def _early_step(acc, acc3, w, k, k_end, x_rows, x_rows3, m_in, m_in3, K, EVEN_K: tl.constexpr,
                SILU_INPUT: tl.constexpr, LATE_REDUCE: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """The step of a weight tile loaded before the PDL wait (W_EARLY), in either form: (acc, acc3) after it."""
    if USE_DOT:
        acc = _dot_update(acc, w, k, k_end, x_rows, m_in, K, EVEN_K, SILU_INPUT, DOT_F32)
    else:
        acc, acc3 = _fma_update(acc, acc3, w, k, k_end, x_rows, x_rows3, m_in, m_in3, K, EVEN_K, SILU_INPUT,
                                LATE_REDUCE)
    return acc, acc3
