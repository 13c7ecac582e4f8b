"""The fast path of the routed layers: a static-shape routed delta (router, gates, experts).

Selected per adapter by ``fast_path`` in :class:`cuma.CuMAConfig` and :class:`cuma.HydraLoRAConfig`
(recorded in ``adapter_config.json``):

``"off"`` (default)
    The reference path of the layer (``CuMALayer._expert_delta``, ``HydraLoRALayer._delta``), unchanged.
``"fused"``
    The same mathematics as pure tensor functions with static shapes and no host synchronisation, so that
    ``torch.compile`` captures one layer's routed delta, forward and backward, as one graph each:

    * :func:`route_topk` / :func:`route_dense`: router logits (the tuner's own :class:`cuma.routing.Router`, called as
      a black box), fp32 softmax, top-k with renormalisation (:func:`cuma.routing.topk_gates`), and the Switch balance
      term (:func:`cuma.routing.switch_balance_loss`), returned as a tensor instead of being recorded;
    * :func:`mix_experts`: the gate-and-experts step, ``base + sum_i (s g_i) B_i A_i h``, as one autograd function
      (:class:`GatedExperts`): the LoRA scaling ``s`` is folded into the (tokens x N) gates instead of multiplying the
      (tokens x out) delta, the delta is accumulated onto the base layer's output inside the GEMM (``addmm``), and
      only ``h``, ``A h`` and the gates are saved for backward (autograd would also keep the gated ``A h``, another
      tokens x N*r tensor).

    The Python-side parts stay outside these functions: finding the current call (a ContextVar), its profile rows and
    padding mask, recording the balance term, the router-sharing cache and :func:`cuma.record_gates`.
``"triton"``
    Routing as in ``"fused"``; the gate-and-experts step of top-k routing (k < N) in the Triton kernels of
    :mod:`cuma.kernels.routed_lora`, which compute only the k selected experts per token (tokens grouped by expert with
    one sort on the device, no host synchronisation) and apply the gates inside the expand GEMM. Needs a CUDA device
    (or ``TRITON_INTERPRET=1``, Triton's CPU interpreter, which the tests use); elsewhere, and for dense gates
    (soft routing, HydraLoRA), it runs the ``"fused"`` experts.

``fast_path_compile=True`` additionally runs the static-shape functions (routing and, for ``"fused"``, the experts)
through ``torch.compile``; it is off by default because compiling costs time at the first call of every new shape.

Forward values and every gradient equal the reference path's to floating-point rounding (tests:
tests/test_fast_path.py, fp32, 1e-5).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch

from ..routing import Gates, gates_requested, log_gates, switch_balance_loss, topk_gates

FAST_PATHS = ("off", "fused", "triton")


def validate_fast_path(fast_path: str, fast_path_compile: bool, owner: str) -> None:
    if fast_path not in FAST_PATHS:
        raise ValueError(f"{owner}: fast_path must be one of {FAST_PATHS}, got {fast_path!r}")
    if fast_path_compile not in (True, False):
        raise ValueError(f"{owner}: fast_path_compile must be True or False, got {fast_path_compile!r}")


# ------------------------------------------------------------------------------------------------------ routing


def route_topk(
    router: torch.nn.Module,
    x3: torch.Tensor,
    profile: Optional[torch.Tensor],
    top_k: int,
    mask: Optional[torch.Tensor] = None,
    balance_coef: Optional[float] = None,
):
    """Router logits -> top-k gates (fp32, renormalised) -> optional balance term ``coef * N sum_i f_i P_i``.

    Returns ``(weights, probs, selected, term)``: dense (B, T, N) gates with zeros outside the kept experts, the full
    probabilities, the kept-expert mask and the weighted balance term (None when ``balance_coef`` is None). The same
    operations as the reference path (``CuMALayer._route``), with static shapes throughout."""
    logits = router(x3.to(router.layers[0].weight.dtype), profile)
    gates = topk_gates(logits, top_k)
    term = balance_coef * switch_balance_loss(gates, mask) if balance_coef is not None else None
    return gates.weights, gates.probs, gates.selected, term


def route_dense(router: torch.nn.Module, x3: torch.Tensor) -> torch.Tensor:
    """HydraLoRA's gates: dense fp32 softmax over all heads, (B, T, N)."""
    logits = router(x3.to(router.layers[0].weight.dtype))
    return torch.softmax(logits.float(), dim=-1)


# ------------------------------------------------------------------------------------------------------ experts


class GatedExperts(torch.autograd.Function):
    """``out = base + ((h @ A_cat) * g_rep) @ B_cat`` with ``g_rep`` each expert's gate repeated over its r columns.

    h (M, d); a (d, N*r) or, with one shared A, (d, r); b (N*r, out); g (M, N), the LoRA scaling already folded in;
    base (M, out) or None. All tensors in one dtype (the caller casts). Saves h, A h and g; the gated ``A h`` is
    recomputed in backward (one elementwise product)."""

    @staticmethod
    def forward(ctx, h, a, b, g, base, num_experts: int, shared: bool):
        n = num_experts
        z = h @ a  # (M, N*r), or (M, r) with a shared A
        zg = _gate(z, g, n, shared)
        out = zg @ b if base is None else torch.addmm(base, zg, b)
        ctx.save_for_backward(h, a, b, g, z)
        ctx.num_experts, ctx.shared, ctx.has_base = n, shared, base is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        h, a, b, g, z = ctx.saved_tensors
        n, shared = ctx.num_experts, ctx.shared
        need_h, need_a, need_b, need_g, need_base = ctx.needs_input_grad[:5]
        dh = da = db = dg = None
        dzg = dout @ b.t()  # (M, N*r): dL/d(gated A h)
        m = dzg.shape[0]
        if need_g:
            zz = z.unsqueeze(-2) if shared else z.unflatten(-1, (n, -1))
            dg = (dzg.unflatten(-1, (n, -1)) * zz).sum(-1)
        if need_h or need_a:
            dz = dzg.unflatten(-1, (n, -1)) * g.unsqueeze(-1)
            dz = dz.sum(-2) if shared else dz.reshape(m, -1)
            if need_h:
                dh = dz @ a.t()
            if need_a:
                da = h.t() @ dz
        if need_b:
            db = _gate(z, g, n, shared).t() @ dout
        return dh, da, db, dg, (dout if need_base else None), None, None


def _gate(z: torch.Tensor, g: torch.Tensor, n: int, shared: bool) -> torch.Tensor:
    """(M, N*r) gated activations: expert i's r columns times g_i; with a shared A, z (M, r) is repeated per expert."""
    if shared:
        return (g.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
    return (z.unflatten(-1, (n, -1)) * g.unsqueeze(-1)).flatten(-2)


def compute_dtype(h: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    """The dtype the reference path's expert matmuls run in: autocast's when autocast is on for h's device, else the
    adapter's (the reference casts the input to the adapter's dtype)."""
    device = h.device.type
    if device in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return param.dtype


def mix_experts(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``base + scaling * sum_i g_i B_i A_i h`` for dense gates ``weights`` (..., N) (zeros outside the kept experts).

    h (..., d); a: packed experts (N, d, r) or one shared A (d, r); b (N, r, out); base (..., out) or None; ``dtype``:
    the compute dtype (default: :func:`compute_dtype`). Returns (..., out) in that dtype."""
    n, r, out_features = b.shape
    dtype = dtype or compute_dtype(h, a)
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1]).to(dtype)
    shared = a.dim() == 2
    a_cat = a if shared else a.permute(1, 0, 2).reshape(a.shape[1], n * r)
    g = (weights.reshape(-1, n) * scaling).to(dtype)
    base2 = base.reshape(-1, out_features).to(dtype) if base is not None else None
    with torch.autocast(h.device.type, enabled=False) if h.device.type in ("cuda", "cpu") else _null():
        out = GatedExperts.apply(h2, a_cat.to(dtype), b.reshape(n * r, out_features).to(dtype), g, base2, n, shared)
    return out.reshape(*lead, out_features)


def mix_experts_topk(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
    probs: torch.Tensor,
    top_k: int,
    scaling: float,
    base: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """:func:`mix_experts` for top-k gates through the Triton kernels (only the k kept experts per token).

    The kept experts are ``probs.topk(top_k)``, the same call (so the same indices, ties included) that made
    ``weights``; their gates are gathered from ``weights`` so that gradients flow to the same place."""
    from ..kernels import routed_lora

    n, r, out_features = b.shape
    dtype = dtype or compute_dtype(h, a)
    lead = h.shape[:-1]
    idx = probs.detach().reshape(-1, n).topk(top_k, dim=-1).indices
    w = (weights.reshape(-1, n).gather(-1, idx) * scaling).to(dtype)
    h2 = h.reshape(-1, h.shape[-1]).to(dtype)
    base2 = base.reshape(-1, out_features).to(dtype) if base is not None else None
    with torch.autocast(h.device.type, enabled=False) if h.device.type in ("cuda", "cpu") else _null():
        out = routed_lora.topk_lora_experts(h2, a.to(dtype), b.to(dtype), idx, w, base2)
    return out.reshape(*lead, out_features)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------------ compile


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, one per function for the whole process (layers share it; parameters are inputs)."""
    return torch.compile(fn)


def _maybe_compiled(fn: Callable, on: bool) -> Callable:
    return compiled(fn) if on else fn


_TRITON_FALLBACK_WARNED = False


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton experts can run on tensors of ``device`` (CUDA with Triton, or Triton's CPU interpreter)."""
    from ..kernels import routed_lora

    return routed_lora.available(device)


def _warn_triton_fallback(device: torch.device) -> None:
    global _TRITON_FALLBACK_WARNED
    if not _TRITON_FALLBACK_WARNED:
        _TRITON_FALLBACK_WARNED = True
        warnings.warn(
            f"fast_path='triton' needs Triton on a CUDA device (or TRITON_INTERPRET=1); tensors are on {device}, so "
            "the 'fused' experts run instead (same results)",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------ layer forwards


def cuma_forward(layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` plus CuMA adapter ``adapter_name``'s routed delta, through the fast path of its config.

    The routing (``layer._route``: current call, profile rows, padding mask, balance term, router sharing) runs the
    static-shape :func:`route_topk` when the config's fast path is on; the experts run here."""
    config = layer.cuma_settings[adapter_name]
    x3 = x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, features)
    gates, mask = layer._route(adapter_name, x, x3)
    if gates_requested(layer):
        log_gates(layer, gates.weights, mask, layer._routing_scope.current())
    a = layer.cuma_A[adapter_name]
    b = layer.cuma_B[adapter_name]
    h = layer._cast_input_dtype(layer.cuma_dropout[adapter_name](x3), a.dtype)
    r3 = result.reshape(*x3.shape[:-1], result.shape[-1])
    delta = _experts(config, h, a, b, gates, r3)
    return _onto(result, r3, delta)


def hydralora_forward(layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` plus HydraLoRA adapter ``adapter_name``'s delta (dense softmax gates, one shared A)."""
    config = layer.hydralora_settings[adapter_name]
    x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
    router = layer.hydralora_router[adapter_name]
    probs = _maybe_compiled(route_dense, config.fast_path_compile)(router, x3)
    if gates_requested(layer):
        call = layer._routing_scope.current()
        mask = call.mask_for(x3.shape[0], x3.shape[1]) if call is not None else None
        log_gates(layer, probs, mask, call)
    a = layer.hydralora_A[adapter_name]
    b = layer.hydralora_B[adapter_name]
    h = layer._cast_input_dtype(layer.hydralora_dropout[adapter_name](x3), a.dtype)
    r3 = result.reshape(*x3.shape[:-1], result.shape[-1])
    gates = Gates(weights=probs, probs=probs, selected=torch.ones_like(probs, dtype=torch.bool), top_k=probs.shape[-1])
    delta = _experts(config, h, a, b, gates, r3)
    return _onto(result, r3, delta)


def _experts(config, h, a, b, gates: Gates, r3: torch.Tensor) -> torch.Tensor:
    """base (when its dtype is the compute dtype) + the experts' delta; ``_onto`` adds the base otherwise."""
    dtype = compute_dtype(h, a)
    base = r3 if r3.dtype == dtype else None
    n = b.shape[0]
    if config.fast_path == "triton" and gates.top_k < n:
        if triton_usable(h.device):
            return mix_experts_topk(h, a, b, gates.weights, gates.probs, gates.top_k, config.scaling, base, dtype)
        _warn_triton_fallback(h.device)
    fn = _maybe_compiled(mix_experts, config.fast_path_compile)
    return fn(h, a, b, gates.weights, config.scaling, base, dtype)


def _onto(result: torch.Tensor, r3: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if r3.dtype == out.dtype:
        return out.reshape(result.shape)  # the base output was accumulated inside the GEMM
    return result + out.to(result.dtype).reshape(result.shape)
