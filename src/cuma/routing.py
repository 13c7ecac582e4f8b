"""Routers, top-k gates and the load-balancing term shared by the mixture-of-LoRA tuners.

Everything here is a plain module or function: the per-call routing state (profile, padding mask, recorded
balance terms) lives on the model's layers and is read and cleared through the functions at the bottom.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """MLP over ``concat(h_t, e_d)`` that scores ``num_experts`` experts per token.

    The first Linear is applied in two parts (token part and profile part) so the (tokens x profile) concat is never
    materialised; the profile part is computed once per row and broadcast over the sequence. Mathematically this is
    exactly ``Linear(concat(h, e))``.
    """

    def __init__(
        self,
        in_features: int,
        profile_dim: int,
        num_experts: int,
        hidden: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.profile_dim = profile_dim
        self.num_experts = num_experts
        widths = [in_features + profile_dim] + [hidden] * (num_layers - 1) + [num_experts]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, hidden: torch.Tensor, profile: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden: (B, T, in) ; profile: (B, profile_dim) or None. Returns logits (B, T, N)."""
        first = self.layers[0]
        h = self.dropout(hidden)
        w = first.weight
        out = F.linear(h, w[:, : self.in_features], first.bias)
        if self.profile_dim:
            if profile is None:
                raise ValueError("this router routes on the profile but no profile embedding was given")
            p = F.linear(self.dropout(profile.to(w.dtype)), w[:, self.in_features :])
            out = out + p.unsqueeze(1)
        for layer in self.layers[1:]:
            out = layer(self.dropout(F.relu(out)))
        return out


@dataclass
class Gates:
    """Result of routing a batch: dense gates with zeros outside the kept experts, and the full probabilities."""

    weights: torch.Tensor  # (B, T, N) fp32, rows sum to 1, exactly k non-zeros
    probs: torch.Tensor  # (B, T, N) fp32 softmax over all experts (used by the balance term)
    selected: torch.Tensor  # (B, T, N) bool, the kept experts
    top_k: int


def topk_gates(logits: torch.Tensor, top_k: int) -> Gates:
    """Softmax in fp32, keep the top-k, renormalise the kept weights to sum to 1 (not a second softmax)."""
    probs = torch.softmax(logits.float(), dim=-1)
    n = probs.shape[-1]
    if top_k >= n:
        selected = torch.ones_like(probs, dtype=torch.bool)
        return Gates(weights=probs, probs=probs, selected=selected, top_k=n)
    top_vals, top_idx = probs.topk(top_k, dim=-1)
    top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_idx, True)
    return Gates(weights=weights, probs=probs, selected=selected, top_k=top_k)


def switch_balance_loss(gates: Gates, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer load-balancing term ``N * sum_i f_i P_i`` over non-pad tokens.

    f_i: fraction of tokens routed to expert i, divided by k (so the f_i sum to 1);
    P_i: mean router probability of expert i. Equals 1 at perfect balance.
    """
    probs = gates.probs.reshape(-1, gates.probs.shape[-1])
    selected = gates.selected.reshape(-1, probs.shape[-1]).float()
    if token_mask is not None:
        m = token_mask.reshape(-1).to(probs.dtype)
        denom = m.sum().clamp_min(1.0)
        f = (selected * m[:, None]).sum(0) / (denom * gates.top_k)
        p = (probs * m[:, None]).sum(0) / denom
    else:
        f = selected.mean(0) / gates.top_k
        p = probs.mean(0)
    return probs.shape[-1] * torch.sum(f * p)


# --------------------------------------------------------------------------------------------------------------
# Reading the per-layer routing state of a model. Layers that route implement the small protocol below
# (``_balance_terms`` list and ``_gate_log``); these functions are what trainers and analyses call.


def _routing_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if hasattr(module, "_balance_terms") and hasattr(module, "_gate_log"):
            yield name, module


def pop_balance_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the balance terms the routers recorded since the last call, weighted by each adapter's coefficient,
    and clear the buffer. Returns None when nothing was recorded (eval mode, or no routed layer ran).

    A trainer calls :func:`clear_balance_loss` before its forward and this after it, and adds the result to the task
    loss before its own gradient-accumulation scaling.
    """
    total = None
    for _, layer in _routing_layers(model):
        for term in layer._balance_terms:
            total = term if total is None else total + term.to(total.device)
        layer._balance_terms.clear()
    return total


def clear_balance_loss(model: nn.Module) -> None:
    """Drop recorded balance terms (for example those left by a gradient-checkpointing recompute)."""
    for _, layer in _routing_layers(model):
        layer._balance_terms.clear()


@dataclass
class GateRecord:
    """Per-layer gates recorded by :func:`record_gates`: lists of (B, T, N) tensors and the matching token masks."""

    gates: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    masks: dict[str, list[Optional[torch.Tensor]]] = field(default_factory=dict)

    def layer_names(self) -> list[str]:
        return list(self.gates)


@contextmanager
def record_gates(model: nn.Module, to_cpu: bool = True) -> Iterator[GateRecord]:
    """Record the dense gate weights of every routed layer for analysis, e.g.::

    with record_gates(model) as rec:
        model(**batch, profile_embeds=e)
    rec.gates["base_model.model.model.layers.0.self_attn.q_proj"][0]   # (B, T, N)
    """
    record = GateRecord()
    layers = list(_routing_layers(model))
    for name, layer in layers:
        record.gates[name] = []
        record.masks[name] = []
        layer._gate_log = (record, name, to_cpu)
    try:
        yield record
    finally:
        for _, layer in layers:
            layer._gate_log = None


def log_gates(layer: nn.Module, gates: torch.Tensor, token_mask: Optional[torch.Tensor]) -> None:
    """Called by a routed layer after routing; appends to the active :func:`record_gates` record, if any."""
    sink = layer._gate_log
    if sink is None:
        return
    record, name, to_cpu = sink
    g = gates.detach()
    m = token_mask.detach() if token_mask is not None else None
    if to_cpu:
        g = g.cpu()
        m = m.cpu() if m is not None else None
    record.gates[name].append(g)
    record.masks[name].append(m)
