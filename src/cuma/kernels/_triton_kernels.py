"""The two Triton kernels behind :mod:`cuma.kernels.routed_lora` (imported only when Triton is installed).

Both work on *slots*: one (token, kept expert) pair each, sorted by expert on the device, so that the rows of one
block of slots mostly share an expert and its LoRA matrix, and every expert's slots form one contiguous segment.

``segment_matmul``   Y[out_row[s]] = scale[s] * (X[in_row[s]] @ W[e_s])        for every slot s
``segment_wgrad``    dW[e] = sum over the slots s of expert e of (xscale[s] X[x_row[s]])^T Y[y_row[s]]

``segment_matmul`` is the shrink (``h @ A_e``) and the gated expand (``g * z @ B_e``: the gate is the row scale) of
the forward, and their transposes in the backward; ``segment_wgrad`` gives the per-expert weight gradients. A block of
slots that straddles experts loops over the experts it holds, masking the rows of the others (sorted slots: nearly
always one or two). Every shape is static and no value is read on the host.

The functions are written without the ``@triton.jit`` decorator and wrapped on first use, as a compiled kernel or, under
``TRITON_INTERPRET=1`` at that time, as Triton's CPU interpreter (:func:`kernel`). They call only builtins of
``triton.language`` (no ``@jit`` helpers of its standard library such as ``tl.max`` or ``tl.zeros``), so the interpreter works even
when Triton was imported before ``TRITON_INTERPRET`` was set.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl


def _segment_matmul(
    x_ptr, w_ptr, y_ptr, in_rows_ptr, out_rows_ptr, expert_ptr, scale_ptr,
    S, K, N,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    HAS_IN_ROWS: tl.constexpr, HAS_OUT_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    s_ok = offs_s < S
    experts = tl.load(expert_ptr + offs_s, mask=s_ok, other=-1)
    # slots are sorted by expert: the block's experts run from its first slot's to its last slot's
    first = pid_m * BLOCK_M
    e_lo = tl.load(expert_ptr + first)
    e_hi = tl.load(expert_ptr + tl.minimum(first + BLOCK_M, S) - 1)
    if HAS_IN_ROWS:
        rows_in = tl.load(in_rows_ptr + offs_s, mask=s_ok, other=0).to(tl.int64)
    else:
        rows_in = offs_s.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for e in range(e_lo, e_hi + 1):
        mine = s_ok & (experts == e)  # the rows of this block that belong to expert e
        w_base = w_ptr + e * stride_we
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            xt = tl.load(x_ptr + rows_in[:, None] * stride_xm + kk[None, :] * stride_xk,
                         mask=mine[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_base + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(xt, wt, input_precision=PRECISION)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + offs_s, mask=s_ok, other=0.0).to(tl.float32)
        acc = acc * sc[:, None]
    if HAS_OUT_ROWS:
        rows_out = tl.load(out_rows_ptr + offs_s, mask=s_ok, other=0).to(tl.int64)
    else:
        rows_out = offs_s.to(tl.int64)
    y = y_ptr + rows_out[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=s_ok[:, None] & n_ok[None, :])


def _segment_wgrad(
    x_ptr, y_ptr, dw_ptr, x_rows_ptr, y_rows_ptr, x_scale_ptr, offsets_ptr,
    K, N,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_we, stride_wk, stride_wn,
    HAS_X_ROWS: tl.constexpr, HAS_Y_ROWS: tl.constexpr, HAS_X_SCALE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    n_ok = offs_n < N
    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < hi
        if HAS_X_ROWS:
            xr = tl.load(x_rows_ptr + ss, mask=s_ok, other=0).to(tl.int64)
        else:
            xr = ss.to(tl.int64)
        if HAS_Y_ROWS:
            yr = tl.load(y_rows_ptr + ss, mask=s_ok, other=0).to(tl.int64)
        else:
            yr = ss.to(tl.int64)
        xt = tl.load(x_ptr + xr[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=k_ok[:, None] & s_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_S): X^T
        if HAS_X_SCALE:
            sc = tl.load(x_scale_ptr + ss, mask=s_ok, other=0.0).to(tl.float32)
            xt = (xt.to(tl.float32) * sc[None, :]).to(xt.dtype)
        yt = tl.load(y_ptr + yr[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                     mask=s_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_N)
        acc += tl.dot(xt, yt, input_precision=PRECISION)
    dw = dw_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _wrapped(name: str, interpret: bool):
    fn = {"segment_matmul": _segment_matmul, "segment_wgrad": _segment_wgrad}[name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def kernel(name: str):
    """The kernel ``name``, compiled, or interpreted on the CPU when ``TRITON_INTERPRET=1`` is set now."""
    return _wrapped(name, interpreting())


__all__ = ["kernel", "interpreting", "triton"]
