"""MixLoRA layers: a plain LoRA ``nn.Linear`` for attention, and the sparse mixture-of-LoRA-experts FFN block.

The FFN block replaces a Llama-style gated FFN (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``). Expert i is
the frozen FFN with its own LoRA on the three projections. For each token the router keeps the top-k experts::

    y = sum_{i in topk} w_i * [W_down h_i + s B_down,i A_down,i h_i],    h_i = act(gate_i(x)) * up_i(x)

The frozen ``W_gate x`` and ``W_up x`` are computed once per token. Because ``W_down`` is linear and the kept weights
sum to 1, ``sum_i w_i W_down h_i = W_down (h_0 + sum_i w_i (h_i - h_0))`` with ``h_0`` the frozen FFN's hidden state:
the frozen down projection also runs once per token (not once per selected expert), and the block reproduces the
base FFN bit-exactly while the LoRA B matrices are zero. The per-expert work (LoRA products and the activation) runs
only on the tokens routed to that expert, grouped with one sort per call.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...routing import gates_requested, log_gates
from ...routing_state import RoutingScope
from .._shared import init_lora_pair
from .config import MixLoRAConfig

_MERGE_ERROR = (
    "MixLoRA adapters cannot be merged into the base weights: the FFN experts are chosen per token by a router that "
    "depends on the input, so there is no single weight update to merge. Keep the adapter unmerged."
)


# ------------------------------------------------------------------------------------------------------------------
# Mixtral load-balancing term over all layers


class MixtralBalance:
    """The routing statistics of one call over every MixLoRA block of one adapter, and its Mixtral load-balancing
    term ``coef * N * sum_i f_i P_i`` (``f_i``: share of (layer, token) pairs whose top-k includes expert i, summed
    over the k slots; ``P_i``: mean router probability of expert i; both over all layers' non-pad tokens). It is not
    a sum of per-layer terms, so the blocks add their per-layer sums here (a per-call accumulator of
    :class:`cuma.routing_state.RoutingCall`) and the term is formed when the call ends."""

    def __init__(self, num_experts: int, coef: float) -> None:
        self.num_experts, self.coef = num_experts, coef
        self.counts = self.prob_sums = self.rows = None

    def add(self, counts: torch.Tensor, prob_sums: torch.Tensor, rows: torch.Tensor) -> None:
        if self.counts is None:
            self.counts, self.prob_sums, self.rows = counts, prob_sums, rows
        else:
            self.counts = self.counts + counts.to(self.counts.device)
            self.prob_sums = self.prob_sums + prob_sums.to(self.prob_sums.device)
            self.rows = self.rows + rows.to(self.rows.device)

    def term(self) -> Optional[torch.Tensor]:
        if self.counts is None:
            return None
        rows = self.rows.clamp_min(1.0)
        return self.coef * self.num_experts * torch.sum((self.counts / rows) * (self.prob_sums / rows))


# ------------------------------------------------------------------------------------------------------------------


class MixLoRALayer(BaseTunerLayer):
    """Common base (PEFT's ``tuner_layer_cls``) of the attention LoRA and the FFN mixture block."""

    @property
    def routing_scope(self) -> RoutingScope:
        """The tuner's routing scope; ``with layer.routing_scope.call(profile_rows=e): layer(x)`` runs this layer on
        its own, outside a base model (tests, benchmarks)."""
        return self._routing_scope

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(_MERGE_ERROR)

    def unmerge(self) -> None:
        return None


class Linear(nn.Module, MixLoRALayer):
    """Plain LoRA on an attention projection: ``y = W0 x + s B A dropout(x)``."""

    adapter_layer_names: tuple[str, ...] = ("mixlora_A", "mixlora_B")
    other_param_names: tuple[str, ...] = ("mixlora_settings", "mixlora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixLoRAConfig, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.mixlora_A = nn.ModuleDict({})
        self.mixlora_B = nn.ModuleDict({})
        self.mixlora_dropout = nn.ModuleDict({})
        self.mixlora_settings: dict[str, MixLoRAConfig] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MixLoRA's attention LoRA adapts torch.nn.Linear layers only, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MixLoRAConfig) -> None:
        self.mixlora_settings[adapter_name] = config
        self.mixlora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.mixlora_A[adapter_name] = nn.Linear(self.in_features, config.r, bias=False)
        self.mixlora_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.mixlora_A[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.mixlora_B[adapter_name].weight)
        else:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.mixlora_B[adapter_name].weight, -bound, bound)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.mixlora_A:
                continue
            a = self.mixlora_A[adapter_name]
            b = self.mixlora_B[adapter_name]
            h = self._cast_input_dtype(self.mixlora_dropout[adapter_name](x), a.weight.dtype)
            scaling = self.mixlora_settings[adapter_name].scaling
            result = result + (b(a(h)) * scaling).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "mixlora." + super().__repr__()


class MixLoRAFFN(nn.Module, MixLoRALayer):
    """A Llama-style gated FFN turned into a sparse mixture of LoRA experts (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = (
        "mixlora_router",
        "mixlora_gate_A",
        "mixlora_gate_B",
        "mixlora_up_A",
        "mixlora_up_B",
        "mixlora_down_A",
        "mixlora_down_B",
    )
    other_param_names: tuple[str, ...] = ("mixlora_settings", "mixlora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixLoRAConfig,
                 routing_scope: Optional[RoutingScope] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        ffn = self.get_base_layer()
        missing = [n for n in ("gate_proj", "up_proj", "down_proj") if not isinstance(getattr(ffn, n, None), nn.Linear)]
        if missing or not callable(getattr(ffn, "act_fn", None)):
            raise TypeError(
                f"MixLoRA needs a gated FFN with nn.Linear gate_proj/up_proj/down_proj and act_fn; "
                f"{type(ffn).__name__} lacks {missing or ['act_fn']}"
            )
        self.hidden_size = ffn.gate_proj.in_features
        self.intermediate_size = ffn.gate_proj.out_features
        self.mixlora_router = nn.ModuleDict({})
        self.mixlora_gate_A = nn.ParameterDict({})
        self.mixlora_gate_B = nn.ParameterDict({})
        self.mixlora_up_A = nn.ParameterDict({})
        self.mixlora_up_B = nn.ParameterDict({})
        self.mixlora_down_A = nn.ParameterDict({})
        self.mixlora_down_B = nn.ParameterDict({})
        self.mixlora_dropout = nn.ModuleDict({})
        self.mixlora_settings: dict[str, MixLoRAConfig] = {}
        # the tuner's scope: the routing call now running gives the padding mask and collects the Mixtral statistics
        self._routing_scope = routing_scope if routing_scope is not None else RoutingScope("mixlora")
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # the wrapped FFN has no weight of its own: follow its gate projection
        return super()._get_base_layer_device_and_dtype(base_layer.gate_proj)

    def update_layer(self, adapter_name: str, config: MixLoRAConfig) -> None:
        n, r = config.num_experts, config.expert_rank
        hid, inter = self.hidden_size, self.intermediate_size
        self.mixlora_settings[adapter_name] = config
        p = config.expert_lora_dropout
        self.mixlora_dropout[adapter_name] = nn.Dropout(p) if p else nn.Identity()
        self.mixlora_router[adapter_name] = nn.Linear(hid, n, bias=False)
        self.mixlora_gate_A[adapter_name] = nn.Parameter(torch.empty(n, hid, r))
        self.mixlora_gate_B[adapter_name] = nn.Parameter(torch.empty(n, r, inter))
        self.mixlora_up_A[adapter_name] = nn.Parameter(torch.empty(n, hid, r))
        self.mixlora_up_B[adapter_name] = nn.Parameter(torch.empty(n, r, inter))
        self.mixlora_down_A[adapter_name] = nn.Parameter(torch.empty(n, inter, r))
        self.mixlora_down_B[adapter_name] = nn.Parameter(torch.empty(n, r, hid))
        self.reset_parameters(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str, config: MixLoRAConfig) -> None:
        with torch.no_grad():
            self.mixlora_router[adapter_name].weight.normal_(0.0, config.router_init_range)
        for proj, fan_in in (("gate", self.hidden_size), ("up", self.hidden_size), ("down", self.intermediate_size)):
            a = getattr(self, f"mixlora_{proj}_A")[adapter_name]
            init_lora_pair(a, getattr(self, f"mixlora_{proj}_B")[adapter_name], fan_in, zero_b=config.init_weights)

    # ----------------------------------------------------------------------------------------------------------
    def _token_mask(self, call, x: torch.Tensor) -> Optional[torch.Tensor]:
        if call is None or x.dim() != 3:
            return None
        return call.mask_for(x.shape[0], x.shape[1])

    def route(self, adapter_name: str, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 router: returns (probs (T, N), kept weights renormalised to sum 1 (T, k), kept expert ids (T, k))."""
        config = self.mixlora_settings[adapter_name]
        w = self.mixlora_router[adapter_name].weight
        logits = F.linear(xf.float(), w.float())
        probs = torch.softmax(logits, dim=-1)
        top_w, top_i = probs.topk(config.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return probs, top_w, top_i

    def _record_balance(self, call, adapter_name: str, probs, top_i, mask: Optional[torch.Tensor]) -> None:
        config = self.mixlora_settings[adapter_name]
        n, k = config.num_experts, config.top_k
        if mask is None:
            weights = torch.ones(probs.shape[0], device=probs.device, dtype=torch.float32)
        else:
            weights = mask.reshape(-1).to(device=probs.device, dtype=torch.float32)
        counts = torch.zeros(n, device=probs.device, dtype=torch.float32)
        counts = counts.scatter_add(0, top_i.reshape(-1), weights.repeat_interleave(k))
        prob_sums = (probs * weights.unsqueeze(-1)).sum(0)
        stats = call.accumulator(("mixtral", adapter_name), lambda: MixtralBalance(n, config.router_aux_loss_coef))
        stats.add(counts, prob_sums, weights.sum())

    def _moe(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        config = self.mixlora_settings[adapter_name]
        ffn = self.get_base_layer()
        n, k, s = config.num_experts, config.top_k, config.expert_scaling
        xf = x.reshape(-1, x.shape[-1])

        call = self._routing_scope.current()
        # computed in a checkpoint recompute too (it must save what the forward saved); only the forward records
        records = call is not None and call.computes_balance and self.training and config.router_aux_loss_coef > 0
        # the first pass of a reentrant checkpoint runs under no_grad: the balance statistics still need their graph
        grad = torch.enable_grad() if records and not torch.is_grad_enabled() else nullcontext()
        with grad:
            probs, top_w, top_i = self.route(adapter_name, xf)
        mask = self._token_mask(call, x)
        if records:
            with grad:
                self._record_balance(call, adapter_name, probs, top_i, mask)
        if gates_requested(self):
            dense = torch.zeros_like(probs).scatter(-1, top_i, top_w)
            log_gates(self, dense.reshape(*x.shape[:-1], n), mask, call)

        # frozen projections, once per token
        g0 = ffn.gate_proj(xf)
        u0 = ffn.up_proj(xf)
        h0 = ffn.act_fn(g0) * u0

        # group the (token, slot) pairs by expert with one sort
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        counts = torch.bincount(flat, minlength=n).tolist()

        drop = self.mixlora_dropout[adapter_name]
        ga, gb = self.mixlora_gate_A[adapter_name], self.mixlora_gate_B[adapter_name]
        ua, ub = self.mixlora_up_A[adapter_name], self.mixlora_up_B[adapter_name]
        da, db = self.mixlora_down_A[adapter_name], self.mixlora_down_B[adapter_name]
        xs = self._cast_input_dtype(xf, ga.dtype)[tok]
        g0s, u0s = g0[tok], u0[tok]
        dh_parts, down_parts = [], []
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            sl = slice(start, start + c)
            start += c
            xe, g0e, u0e = xs[sl], g0s[sl], u0s[sl]
            g = g0e + (((drop(xe) @ ga[e]) @ gb[e]) * s).to(g0e.dtype)
            u = u0e + (((drop(xe) @ ua[e]) @ ub[e]) * s).to(u0e.dtype)
            he = ffn.act_fn(g) * u
            # h_i - h_0 on this expert's tokens; exactly 0 while the gate/up LoRA B are 0
            dh_parts.append(he - ffn.act_fn(g0e) * u0e)
            down_parts.append((drop(self._cast_input_dtype(he, da.dtype)) @ da[e]) @ db[e] * s)

        # back from expert order to (token, slot) order with a gather (no atomic adds: deterministic on GPU too),
        # then the gate-weighted sum over the k slots
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.numel(), device=order.device)
        w = top_w.unsqueeze(-1)
        dh = torch.cat(dh_parts)[unsort].unflatten(0, (-1, k))
        down = torch.cat(down_parts)[unsort].unflatten(0, (-1, k))

        h = (h0.float() + (dh.float() * w).sum(1)).to(h0.dtype)
        y = ffn.down_proj(h)
        y = (y.float() + (down.float() * w).sum(1)).to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or x.numel() == 0:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.mixlora_router]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(
                f"MixLoRA blocks run one adapter at a time, but {active} are active here; use set_adapter(name)"
            )
        return self._moe(active[0], x)

    def __repr__(self) -> str:
        return "mixlora." + super().__repr__()
