"""Benchmark-local CuMA layer forwards (src/ is not changed by the benchmarks).

Each function computes what ``cuma.tuners.cuma.layer.Linear.forward`` computes for a layer with one active adapter,
one A per expert, no lora/router dropout and its own router, inside the layer's current routing call (it reads the
profile rows and padding mask from it and records the balance term in it, like the layer). ``check_same`` asserts it
(outputs and gradients, balance term included); :func:`patch_model` binds one in place of ``Linear.forward``.

``fused_router_forward`` (a prototype; the library's fast path, ``CuMAConfig(fast_path="fused")``, does not do it)
    the library's fused experts (``cuma.tuners.fused.mix_experts``: scaling folded into the gates, ``addmm`` onto the
    base output, one autograd function), plus the router's first Linear (token part) and the experts' A projection
    run as ONE GEMM on the shared input, ``x @ [W1_tok ; A_cat^T]^T`` (hidden + N*r columns): in backward one dL/dx
    GEMM instead of two. It re-implements the plain Router's forward, so it is only valid for that Router
    (``_supported`` checks the configuration).
``loop_forward`` (the authors'-style per-expert loop; the slow oracle, used by benchmarks/gpu_check.py as
    ``cuma_loop``)
    route with the layer's own router and top-k gates, then for each expert gather the tokens routed to it
    (``nonzero``: a host synchronisation per expert), apply ``B_i A_i``, scale by the gate, ``index_add`` back.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from cuma.routing import switch_balance_loss, topk_gates
from cuma.tuners import fused

NAME = "default"


def _supported(layer, need_plain_router: bool = False) -> bool:
    cfg = layer.cuma_settings[NAME]
    ok = (
        not cfg.shared_A
        and cfg.lora_dropout == 0
        and NAME not in layer._router_owner
        and not layer._router_has_followers
        and not layer.disable_adapters
        and list(layer.active_adapters) == [NAME]
    )
    if need_plain_router:
        router = layer.cuma_router[NAME]
        ok = (ok and cfg.router_dropout == 0 and type(router).forward.__qualname__ == "Router.forward"
              and getattr(router, "input_norm", "none") == "none")
    return ok


def fused_router_forward(layer, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    cfg = layer.cuma_settings[NAME]
    x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
    rows, length = x3.shape[0], x3.shape[1]
    call = layer._current_call(NAME, needs_profile=cfg.profile_dim > 0)
    router = layer.cuma_router[NAME]
    first = router.layers[0]
    w = first.weight
    hidden = w.shape[0]
    n, r, d_in = cfg.num_experts, cfg.r, layer.in_features
    a_cat = layer.cuma_A[NAME].permute(1, 0, 2).reshape(d_in, n * r)
    w_cat = torch.cat([w[:, :d_in], a_cat.t()], dim=0)  # (hidden + N*r, d_in)
    both = F.linear(x3, w_cat)  # (B, T, hidden + N*r): router pre-activation (token part) and A x, one GEMM
    pre, z = both.split([hidden, n * r], dim=-1)
    if first.bias is not None:
        pre = pre + first.bias
    if router.profile_dim:
        profile = layer._profile_for(NAME, call, rows)
        pre = pre + F.linear(profile.to(w.dtype), w[:, d_in:]).unsqueeze(1)
    out = pre
    for lin in router.layers[1:]:
        out = lin(F.relu(out))
    gates = topk_gates(out, cfg.effective_top_k)
    mask = call.mask_for(rows, length) if call is not None else None
    if call is not None and call.computes_balance and layer.training and cfg.balance_loss_coef > 0:
        call.record(cfg.balance_loss_coef * switch_balance_loss(gates, mask))
    # the experts' second half: z = x A_cat is already there, so gate it and expand onto the base output
    b = layer.cuma_B[NAME]
    g = gates.weights.reshape(-1, n) * cfg.scaling
    zg = (z.reshape(-1, n, r) * g.to(z.dtype).unsqueeze(-1)).reshape(-1, n * r)
    y = torch.addmm(result.reshape(-1, layer.out_features), zg, b.reshape(n * r, layer.out_features))
    return y.view(result.shape)


def loop_forward(layer, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    cfg = layer.cuma_settings[NAME]
    x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
    gates, _ = layer._route(NAME, x, x3)  # the layer's own routing (records the balance term)
    a, b = layer.cuma_A[NAME], layer.cuma_B[NAME]
    dtype = fused.compute_dtype(x3, a)
    flat_x = x3.reshape(-1, x3.shape[-1]).to(dtype)
    vals, idx = gates.weights.reshape(flat_x.shape[0], -1).topk(cfg.effective_top_k, dim=-1)
    delta = flat_x.new_zeros(flat_x.shape[0], layer.out_features)
    for i in range(cfg.num_experts):
        rows, slot = (idx == i).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        contrib = (flat_x.index_select(0, rows) @ a[i].to(dtype) @ b[i].to(dtype))
        contrib = contrib * (vals[rows, slot].unsqueeze(1) * cfg.scaling).to(dtype)
        delta = delta.index_add(0, rows, contrib)
    return result + delta.to(result.dtype).view(result.shape)


PROTOS = {"cuma-fused-router": fused_router_forward}


def check_same(layer, x: torch.Tensor, fn, profile=None, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert fn(layer, x) == layer(x) in value and in the gradients of x and every trainable parameter (balance term
    included), with a non-zero B (restored afterwards) so that the experts contribute."""
    assert _supported(layer, need_plain_router=fn is fused_router_forward), "unsupported layer configuration"
    b = layer.cuma_B[NAME]
    saved = b.detach().clone()
    with torch.no_grad():
        b.uniform_(-0.05, 0.05)
    params = [p for p in layer.parameters() if p.requires_grad]
    outs = []
    for f in (lambda t: layer(t), lambda t: fn(layer, t)):
        xx = x.detach().clone().requires_grad_(True)
        with layer.routing_scope.call(profile_rows=profile, records_balance=layer.training) as call:
            y = f(xx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        loss = (y * g).sum() + sum(call.balance_terms, torch.zeros(()))
        grads = torch.autograd.grad(loss, [xx, *params])
        outs.append((y.detach(), grads))
    with torch.no_grad():
        b.copy_(saved)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=rtol, atol=atol)
    for g_new, g_ref in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g_new, g_ref, rtol=rtol, atol=atol)


def patch_model(model: nn.Module, fn) -> int:
    """Bind ``fn`` as the forward of every CuMA Linear of ``model`` (instance attribute; the class is untouched).
    Returns the number of layers patched."""
    from cuma.tuners.cuma.layer import Linear as CuMALinear

    count = 0
    for module in model.modules():
        if isinstance(module, CuMALinear):
            assert _supported(module, need_plain_router=fn is fused_router_forward)
            module.forward = types.MethodType(lambda self, x, *a, **k: fn(self, x), module)
            count += 1
    return count

