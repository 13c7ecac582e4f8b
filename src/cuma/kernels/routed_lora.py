"""The fused gate-and-experts step of top-k routing in Triton: only the k kept LoRA experts of each token.

    out = base + sum_{j < k} w[t, j] * B_{e(t,j)} A_{e(t,j)} h[t]          (w: kept gates, LoRA scaling folded in)

The dense path (:func:`cuma.tuners.fused.mix_experts`) multiplies every token by all N experts and zeroes N - k of
them with the gates; here the (token, expert) slots are sorted by expert on the device (``argsort``; the segment
offsets come from ``searchsorted``, so nothing is read on the host) and two kernels (:mod:`._triton_kernels`) do

* forward: ``z = h @ A_e`` per slot (one plain GEMM instead with a shared A), then ``w * z @ B_e`` per slot, the gate
  applied inside the expand kernel, each slot written to its (token, j) row; the k rows of a token are summed;
* backward: ``dz = dY @ B_e^T`` per slot, the gate gradient ``<dz, z>``, ``dh = (w dz) @ A_e^T`` per slot, and the
  per-expert weight gradients ``dA_e = h^T (w dz)``, ``dB_e = (w z)^T dY`` over each expert's segment.

Saved for backward: the slot activations ``z`` (k*r per token, against 2*N*r for the dense path) and the slot order.
Expert FLOPs are k/N of the dense path's. Correctness: tests/test_fast_path.py through ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional

import torch


def available(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: Triton installed, and a CUDA device (compiled kernels) or a
    CPU device under ``TRITON_INTERPRET=1``."""
    try:
        from . import _triton_kernels as tk
    except Exception:  # noqa: BLE001 - Triton missing or broken: the caller falls back
        return False
    device = torch.device(device)
    if tk.interpreting():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _precision(*tensors: torch.Tensor) -> str:
    if all(t.dtype == torch.float32 for t in tensors) and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def segment_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    experts: torch.Tensor,
    in_rows: Optional[torch.Tensor] = None,
    out_rows: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Y[out_rows[s]] = scale[s] * (X[in_rows[s]] @ W[experts[s]]) for the S slots (``experts`` sorted ascending).

    x (M, K) any strides; w (E, K, N) any strides (a transposed view works); returns ``out`` (default a new
    (S, N) tensor in x's dtype)."""
    from . import _triton_kernels as tk

    S = experts.shape[0]
    K, N = w.shape[1], w.shape[2]
    if out is None:
        out = torch.empty(S, N, device=x.device, dtype=x.dtype)
    if S == 0:
        return out
    bm, bn, bk = 64, _pow2(N), _pow2(K)
    grid = (tk.triton.cdiv(S, bm), tk.triton.cdiv(N, bn))
    dummy = experts
    tk.kernel("segment_matmul")[grid](
        x, w, out,
        in_rows if in_rows is not None else dummy, out_rows if out_rows is not None else dummy, experts,
        scale if scale is not None else x,
        S, K, N,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        HAS_IN_ROWS=in_rows is not None, HAS_OUT_ROWS=out_rows is not None, HAS_SCALE=scale is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(x, w),
    )
    return out


def segment_wgrad(
    x: torch.Tensor,
    y: torch.Tensor,
    offsets: torch.Tensor,
    x_rows: Optional[torch.Tensor] = None,
    y_rows: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """dW[e] = sum_{s in [offsets[e], offsets[e+1])} (x_scale[s] X[x_rows[s]])^T Y[y_rows[s]], shape (E, K, N)."""
    from . import _triton_kernels as tk

    E = offsets.shape[0] - 1
    K, N = x.shape[1], y.shape[1]
    dw = torch.empty(E, K, N, device=x.device, dtype=out_dtype or x.dtype)
    bs, bk, bn = 32, _pow2(K), _pow2(N)
    grid = (E, tk.triton.cdiv(K, bk), tk.triton.cdiv(N, bn))
    dummy = offsets
    tk.kernel("segment_wgrad")[grid](
        x, y, dw,
        x_rows if x_rows is not None else dummy, y_rows if y_rows is not None else dummy,
        x_scale if x_scale is not None else x, offsets,
        K, N,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        HAS_X_ROWS=x_rows is not None, HAS_Y_ROWS=y_rows is not None, HAS_X_SCALE=x_scale is not None,
        BLOCK_S=bs, BLOCK_K=bk, BLOCK_N=bn, PRECISION=_precision(x, y),
    )
    return dw


def sort_slots(idx: torch.Tensor, num_experts: int):
    """(token, kept expert) slots of ``idx`` (M, k) sorted by expert, on the device: returns
    ``order`` (S,) flat slot ids t*k + j in expert order, ``tokens`` (S,) their tokens, ``experts`` (S,) int32
    ascending, ``offsets`` (E + 1,) int32 segment starts."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts = flat[order].to(torch.int32)
    bounds = torch.arange(num_experts + 1, device=idx.device, dtype=torch.int32)
    offsets = torch.searchsorted(experts, bounds).to(torch.int32)
    return order, order // k, experts, offsets


class TopKLoRAExperts(torch.autograd.Function):
    """See the module docstring. h (M, d); a (N, d, r) or shared (d, r); b (N, r, out); idx (M, k) long;
    w (M, k) kept gates (scaling folded in); base (M, out) or None. One dtype throughout (the caller casts)."""

    @staticmethod
    def forward(ctx, h, a, b, idx, w, base):
        m, k = idx.shape
        n, r, out_features = b.shape
        shared = a.dim() == 2
        order, tokens, experts, offsets = sort_slots(idx, n)
        w_s = w.reshape(-1)[order].contiguous()
        if shared:
            z_tok = h @ a
            z_s = z_tok[tokens]
        else:
            z_s = segment_matmul(h, a, experts, in_rows=tokens)
        y = torch.empty(m * k, out_features, device=h.device, dtype=h.dtype)
        segment_matmul(z_s, b, experts, scale=w_s, out_rows=order, out=y)
        y = y.view(m, k, out_features)
        out = y.sum(1) if base is None else base + y.sum(1)
        ctx.save_for_backward(h, a, b, z_s, w_s, order, tokens, experts, offsets)
        ctx.k, ctx.shared = k, shared
        return out

    @staticmethod
    def backward(ctx, dout):
        h, a, b, z_s, w_s, order, tokens, experts, offsets = ctx.saved_tensors
        k, shared = ctx.k, ctx.shared
        need_h, need_a, need_b, _, need_w, need_base = ctx.needs_input_grad
        m = h.shape[0]
        dh = da = db = dw = None
        dout = dout.contiguous()
        # dL/d(w z) per slot: dY[t] @ B_e^T (B_e^T as a strided view, no copy)
        dzg = segment_matmul(dout, b.transpose(1, 2), experts, in_rows=tokens)
        if need_w:
            dw_s = (dzg.float() * z_s.float()).sum(-1)
            dw = torch.empty(m * k, device=dw_s.device, dtype=dw_s.dtype)
            dw[order] = dw_s
            dw = dw.view(m, k).to(w_s.dtype)
        if need_h or need_a:
            dz = dzg * w_s.unsqueeze(-1)
            if shared:
                dz_tok = torch.empty(m * k, dz.shape[1], device=dz.device, dtype=dz.dtype)
                dz_tok[order] = dz
                dz_tok = dz_tok.view(m, k, -1).sum(1)
                if need_h:
                    dh = dz_tok @ a.t()
                if need_a:
                    da = h.t() @ dz_tok
            else:
                if need_h:
                    y = segment_matmul(dz, a.transpose(1, 2), experts, out_rows=order,
                                       out=torch.empty(m * k, h.shape[1], device=h.device, dtype=h.dtype))
                    dh = y.view(m, k, -1).sum(1)
                if need_a:
                    da = segment_wgrad(h, dz, offsets, x_rows=tokens, out_dtype=a.dtype)
        if need_b:
            db = segment_wgrad(z_s, dout, offsets, y_rows=tokens, x_scale=w_s, out_dtype=b.dtype)
        return dh, da, db, None, dw, (dout if need_base else None)


def topk_lora_experts(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``base + sum_j w[:, j] * B_{idx[:, j]} A_{idx[:, j]} h`` through the Triton kernels (see the module docstring)."""
    return TopKLoRAExperts.apply(h, a, b, idx, w, base)
