"""Benchmark-local prototypes of faster CuMA layer forwards (src/ is not changed by the benchmarks).

Both functions compute exactly what ``cuma.tuners.cuma.layer.Linear.forward`` computes for a layer with one active
adapter, one A per expert, no lora/router dropout and its own router; ``check_same`` asserts it (outputs and
gradients). They read the layer's own parameters and routing context, record the balance term the same way, and
can be bound in place of ``Linear.forward`` (see :func:`patch_model`).

``proto_forward`` (two small changes)
    1. ``scaling`` is folded into the (tokens x N) gates instead of multiplying the (tokens x out) delta: one
       full-size multiply fewer in forward and one fewer in backward.
    2. the expert output is accumulated onto the base output inside the GEMM, ``addmm(result, z, B_cat)``, instead
       of ``result + delta``: one full-size add fewer in forward.

``fused_forward`` (1 + 2, plus)
    3. the router's first Linear (token part) and the experts' A projection read the same x, so they run as ONE
       GEMM, ``x @ [W1_tok ; A_cat^T]^T`` (256 + N*r = 320 columns), instead of two; in backward that is one GEMM
       for dL/dx instead of two (and one full-size gradient accumulation into dL/dx fewer) and one GEMM for the
       weight gradients instead of two.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from cuma.routing import switch_balance_loss, topk_gates

NAME = "default"


def _supported(layer) -> bool:
    cfg = layer.cuma_settings[NAME]
    return (
        not cfg.shared_A
        and cfg.lora_dropout == 0
        and cfg.router_dropout == 0
        and NAME not in layer._router_owner
        and not layer._router_has_followers
        and not layer.disable_adapters
        and list(layer.active_adapters) == [NAME]
    )


def _record_balance(layer, gates, mask) -> None:
    cfg = layer.cuma_settings[NAME]
    if layer.training and cfg.balance_loss_coef > 0 and torch.is_grad_enabled():
        layer._balance_terms.append(cfg.balance_loss_coef * switch_balance_loss(gates, mask))


def _finish(layer, result, z, gates_w):
    """z: (B, T, N, r) expert activations, gates_w: (B, T, N). Returns result + scaling * (z * g) @ B_cat."""
    cfg = layer.cuma_settings[NAME]
    n, r = cfg.num_experts, cfg.r
    b = layer.cuma_B[NAME]
    z = z * (gates_w * cfg.scaling).to(z.dtype).unsqueeze(-1)
    out = torch.addmm(result.reshape(-1, layer.out_features), z.reshape(-1, n * r), b.reshape(n * r, layer.out_features))
    return out.view(result.shape)


def proto_forward(layer, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    cfg = layer.cuma_settings[NAME]
    x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
    gates, mask = layer._route(NAME, x, x3)
    a = layer.cuma_A[NAME]
    n, r = cfg.num_experts, cfg.r
    a_cat = a.permute(1, 0, 2).reshape(layer.in_features, n * r)
    z = (x3 @ a_cat).unflatten(-1, (n, r))
    return _finish(layer, result.reshape(*x3.shape[:-1], -1), z, gates.weights).view(result.shape)


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    cfg = layer.cuma_settings[NAME]
    x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
    rows, length = x3.shape[0], x3.shape[1]
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
    profile = layer._profile_for(NAME, rows)
    if router.profile_dim:
        pre = pre + F.linear(profile.to(w.dtype), w[:, d_in:]).unsqueeze(1)
    out = pre
    for lin in router.layers[1:]:
        out = lin(F.relu(out))
    gates = topk_gates(out, cfg.effective_top_k)
    _record_balance(layer, gates, layer._token_mask(rows, length))
    return _finish(layer, result.reshape(rows, length, -1), z.unflatten(-1, (n, r)), gates.weights).view(result.shape)


PROTOS = {"cuma-proto": proto_forward, "cuma-fused": fused_forward}


def check_same(layer, x: torch.Tensor, fn, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert fn(layer, x) == layer(x) in value and in the gradients of x and every trainable parameter, with a
    non-zero B (restored afterwards) so that the experts contribute."""
    assert _supported(layer), "prototype forwards cover one adapter, own router, no dropout, one A per expert"
    b = layer.cuma_B[NAME]
    saved = b.detach().clone()
    with torch.no_grad():
        b.uniform_(-0.05, 0.05)
    params = [p for p in layer.parameters() if p.requires_grad]
    outs = []
    for f in (lambda t: layer(t), lambda t: fn(layer, t)):
        xx = x.detach().clone().requires_grad_(True)
        layer._balance_terms.clear()
        y = f(xx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        loss = (y * g).sum() + (torch.stack(layer._balance_terms).sum() if layer._balance_terms else 0.0)
        grads = torch.autograd.grad(loss, [xx, *params])
        outs.append((y.detach(), grads))
    layer._balance_terms.clear()
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
            assert _supported(module)
            module.forward = types.MethodType(lambda self, x, *a, **k: fn(self, x), module)
            count += 1
    return count
