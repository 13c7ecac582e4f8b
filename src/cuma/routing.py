"""Routers, top-k gates and the load-balancing term shared by the mixture-of-LoRA tuners.

Everything here is a plain module or function. The per-call routing state (profile rows, padding mask, recorded
balance terms) belongs to the call that made it (:mod:`cuma.routing_state`); the functions at the bottom are what
trainers and analyses use to read it: :func:`pop_balance_loss` after a training forward, :func:`record_gates` around
calls whose gates should be kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .routing_state import take_finished


ROUTER_INPUT_NORMS = ("none", "balanced")


def rms_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / RMS(x)`` over the last dimension (computed in fp32): every vector gets per-dimension RMS 1."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), eps=eps)  # the same formula as one fused operator
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def weights_key(*tensors: Optional[torch.Tensor]) -> Optional[tuple]:
    """What a tensor derived from these parameters depends on: their storage (a move to another device or dtype, or
    a new tensor, gets a new one) and version (bumped by every in-place update: optimiser steps, ``load_state_dict``).
    None when a tensor has no version counter (created in inference mode): then nothing may be cached."""
    try:
        return tuple((t.data_ptr(), t._version, t.dtype) if t is not None else None for t in tensors)
    except RuntimeError:
        return None


class Router(nn.Module):
    """MLP over ``concat(h_t, e_d)`` that scores ``num_experts`` experts per token.

    The first Linear is applied in two parts (token part and profile part) so the (tokens x profile) concat is never
    materialised; the profile part is computed once per row and broadcast over the sequence. Mathematically this is
    exactly ``Linear(concat(h, e))``.

    ``input_norm="balanced"`` (a cuma option; the paper concatenates the raw vectors): the token part and the profile
    part are each scaled to per-dimension RMS 1 and multiplied by a learned scalar gain (``token_gain``,
    ``profile_gain``, initialised to 1 and ``profile_gain_init``) before the first Linear. Raw q_proj inputs of a
    pretrained LM have norms of 6-10 while an L2-normalised sentence embedding has norm 1, so in the raw concat the
    profile hardly moves the router. ``token_init_scale`` multiplies the first layer's token-part weights at
    initialisation (< 1: the initial routing follows the profile, so experts specialise by group from the first step).
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
        input_norm: str = "none",
        profile_gain_init: float = 1.0,
        token_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if input_norm not in ROUTER_INPUT_NORMS:
            raise ValueError(f"router input_norm must be one of {list(ROUTER_INPUT_NORMS)}, got {input_norm!r}")
        self.in_features = in_features
        self.profile_dim = profile_dim
        self.num_experts = num_experts
        self.input_norm = input_norm
        widths = [in_features + profile_dim] + [hidden] * (num_layers - 1) + [num_experts]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        if input_norm == "balanced":
            # shape (1,), not a 0-d scalar: FSDP refuses scalar parameters (adapters saved with 0-d gains still load)
            self.token_gain = nn.Parameter(torch.ones(1))
            self.profile_gain = nn.Parameter(torch.full((1,), float(profile_gain_init))) if profile_dim else None
        if token_init_scale != 1.0:
            with torch.no_grad():
                self.layers[0].weight[:, :in_features].mul_(token_init_scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("token_gain", "profile_gain"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.dim() == 0:  # saved before the gains had shape (1,)
                state_dict[prefix + name] = value.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden: torch.Tensor, profile: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden: (B, T, in) ; profile: (B, profile_dim) or None. Returns logits (B, T, N)."""
        first = self.layers[0]
        w = first.weight
        if self.input_norm == "balanced":
            hidden = rms_normalise(hidden) * self.token_gain.to(hidden.dtype)
        h = self.dropout(hidden)
        out = F.linear(h, w[:, : self.in_features], first.bias)
        if self.profile_dim:
            if profile is None:
                raise ValueError("this router routes on the profile but no profile embedding was given")
            pe = profile.to(w.dtype)
            if self.input_norm == "balanced":
                pe = rms_normalise(pe) * self.profile_gain.to(w.dtype)
            if self.training and isinstance(self.dropout, nn.Dropout):
                # one dropout mask per token, as on the literal concat (a per-row mask would drop the same profile
                # dimensions for every token of the row)
                p = F.linear(self.dropout(pe.unsqueeze(1).expand(-1, out.shape[1], -1)), w[:, self.in_features :])
                out = out + p
            else:
                out = out + F.linear(pe, w[:, self.in_features :]).unsqueeze(1)
        for layer in self.layers[1:]:
            out = layer(self.dropout(F.relu(out)))
        return out

    # ---------------------------------------------------------------------------------------- inference (no grad)
    # The same function as forward() in eval mode without gradients, arranged for serving: the first Linear is split
    # once into contiguous token and profile parts with the learned gains folded in (not sliced, copied and scaled in
    # every call), and the profile part, constant over a sequence, is computed once per call and row
    # (profile_part) instead of once per token.

    def inference_weights(self) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(W_h * token_gain, W_e * profile_gain, bias)`` of the first Linear, contiguous; cached on the module
        and rebuilt whenever a parameter changes (its version or storage). Only for calls without gradients."""
        first = self.layers[0]
        tg = getattr(self, "token_gain", None) if self.input_norm == "balanced" else None
        pg = getattr(self, "profile_gain", None) if self.input_norm == "balanced" else None
        key = weights_key(first.weight, first.bias, tg, pg)
        hit = self.__dict__.get("_inference_cache")
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        w = first.weight.detach()
        wh = w[:, : self.in_features]
        we = w[:, self.in_features :] if self.profile_dim else None
        if tg is not None:
            wh = wh * tg.detach().to(w.dtype)
        if pg is not None and we is not None:
            we = we * pg.detach().to(w.dtype)
        out = (wh.contiguous(), we.contiguous() if we is not None else None,
               first.bias.detach() if first.bias is not None else None)
        if key is not None:
            self.__dict__["_inference_cache"] = (key, out)
        return out

    def profile_part(self, profile: Optional[torch.Tensor], normalised: bool = False) -> Optional[torch.Tensor]:
        """The first Linear's profile term plus its bias for each row, ``(rows, hidden)`` (no gradients): what the
        router adds to every token of a row. ``normalised``: ``profile`` is already ``rms_normalise``-d (the same for
        every router of an adapter, so a caller computes it once)."""
        _, we, bias = self.inference_weights()
        if not self.profile_dim:
            return bias.unsqueeze(0) if bias is not None else None
        if profile is None:
            raise ValueError("this router routes on the profile but no profile embedding was given")
        pe = profile.to(we.dtype)
        if self.input_norm == "balanced" and not normalised:
            pe = rms_normalise(pe)
        return F.linear(pe, we, bias)

    def infer(self, hidden: torch.Tensor, part: Optional[torch.Tensor]) -> torch.Tensor:
        """forward() without gradients in eval mode: ``part`` is :meth:`profile_part` of this call's rows."""
        wh, _, _ = self.inference_weights()
        h = hidden.to(wh.dtype)
        if self.input_norm == "balanced":
            h = rms_normalise(h)
        out = F.linear(h, wh)
        if part is not None:
            out = out + part.unsqueeze(1)
        for layer in self.layers[1:]:
            out = layer(F.relu(out))
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
# Reading the routing state of a model's calls. Routed layers carry ``_routing_scope`` (their tuner's
# cuma.routing_state.RoutingScope); the balance terms of a finished call wait in the caller's context until popped.


def _routing_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if getattr(module, "_routing_scope", None) is not None and getattr(module, "routes", True):
            yield name, module


def _scopes(model: nn.Module) -> list:
    seen: dict[int, object] = {}
    for _, layer in _routing_layers(model):
        seen.setdefault(id(layer._routing_scope), layer._routing_scope)
    return list(seen.values())


def pop_balance_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the balance terms recorded by this thread's (or task's) finished training calls of ``model`` since
    the last pop, weighted by each adapter's coefficient, and clear them. Returns None when nothing was recorded
    (eval mode, no gradients, or no routed layer ran).

    A trainer calls :func:`clear_balance_loss` before its forward and this after it, and adds the result to the task
    loss before its own gradient-accumulation scaling. A call that raised leaves nothing; a gradient-checkpointing
    recompute records nothing (its call's terms were recorded in the forward).
    """
    total = None
    for term in take_finished(_scopes(model)):
        total = term if total is None else total + term.to(total.device)
    return total


def clear_balance_loss(model: nn.Module) -> None:
    """Drop the balance terms of ``model``'s finished calls that were not popped (e.g. from an evaluation forward
    made in train mode)."""
    take_finished(_scopes(model))


@dataclass
class GateRecord:
    """Per-layer gates recorded by :func:`record_gates`: lists of (B, T, N) tensors and the matching token masks."""

    gates: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    masks: dict[str, list[Optional[torch.Tensor]]] = field(default_factory=dict)

    def layer_names(self) -> list[str]:
        return list(self.gates)


# the records active in this thread / task: (record, {layer: name}, to_cpu)
_GATE_SINKS: ContextVar[tuple] = ContextVar("cuma_gate_records", default=())


@contextmanager
def record_gates(model: nn.Module, to_cpu: bool = True) -> Iterator[GateRecord]:
    """Record the dense gate weights of every routed layer of ``model`` for the calls made in this thread (or asyncio
    task) inside the block, e.g.::

    with record_gates(model) as rec:
        model(**batch, profile_embeds=e)
    rec.gates["base_model.model.model.layers.0.self_attn.q_proj"][0]   # (B, T, N)

    Calls made by other threads, and gradient-checkpointing recomputes, are not recorded.
    """
    record = GateRecord()
    names: dict[nn.Module, str] = {}
    for name, layer in _routing_layers(model):
        record.gates[name] = []
        record.masks[name] = []
        names[layer] = name
    token = _GATE_SINKS.set(_GATE_SINKS.get() + ((record, names, to_cpu),))
    try:
        yield record
    finally:
        _GATE_SINKS.reset(token)


def gates_requested(layer: nn.Module) -> bool:
    """Whether a :func:`record_gates` block of this context wants ``layer``'s gates (cheap; lets layers skip work)."""
    return any(layer in names for _, names, _ in _GATE_SINKS.get())


def log_gates(layer: nn.Module, gates: torch.Tensor, token_mask: Optional[torch.Tensor], call=None) -> None:
    """Called by a routed layer after routing; appends to the active :func:`record_gates` records that hold it."""
    if call is not None and call.recompute:
        return
    for record, names, to_cpu in _GATE_SINKS.get():
        name = names.get(layer)
        if name is None:
            continue
        g = gates.detach()
        m = token_mask.detach() if token_mask is not None else None
        if to_cpu:
            g = g.cpu()
            m = m.cpu() if m is not None else None
        record.gates[name].append(g)
        record.masks[name].append(m)
