"""CuMA layer: a frozen ``nn.Linear`` plus N packed LoRA experts chosen per token by a profile-aware router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...routing import Gates, Router, log_gates, switch_balance_loss, topk_gates
from .._shared import init_lora_pair
from .config import CuMAConfig


@dataclass
class RoutingContext:
    """Per-model routing inputs of the current call, shared by every adapted layer of one tuner.

    ``profile_embeds`` is what the caller passed to forward/generate; ``rows_profile`` is the same, expanded to the
    rows the base model actually sees (beams, returned sequences, DPO's chosen+rejected concat); ``token_mask`` is
    the 2-D attention mask of that call. They stay set until the next call replaces them, because gradient
    checkpointing re-runs the layers during backward, after the forward context has exited.
    """

    profile_embeds: Optional[torch.Tensor] = None
    rows_profile: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None
    profile_proj: Optional[nn.ModuleDict] = None  # the tuner's per-adapter projections (not owned here)


class CuMALayer(BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ("cuma_A", "cuma_B", "cuma_router")
    other_param_names: tuple[str, ...] = ("cuma_settings", "cuma_dropout", "_router_owner")

    def __init__(self, base_layer: nn.Module, routing_ctx: RoutingContext, **kwargs) -> None:
        self.base_layer = base_layer
        self.cuma_A = nn.ParameterDict({})
        self.cuma_B = nn.ParameterDict({})
        self.cuma_router = nn.ModuleDict({})
        self.cuma_dropout = nn.ModuleDict({})
        self.cuma_settings: dict[str, CuMAConfig] = {}
        # adapter -> layer that owns the router this layer shares (only when router sharing is on); a plain dict so
        # the shared router is neither registered nor saved twice
        self._router_owner: dict[str, "CuMALayer"] = {}
        self._gate_cache: dict[str, tuple[torch.Tensor, Gates]] = {}
        self._router_has_followers: set[str] = set()
        self._routing_ctx = routing_ctx
        self._balance_terms: list[torch.Tensor] = []
        self._gate_log = None
        self._disable_adapters = False
        self.merged_adapters = []

        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"CuMA adapts torch.nn.Linear layers only, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def _available_adapters(self) -> set[str]:
        return {*self.cuma_A}

    def update_layer(self, adapter_name: str, config: CuMAConfig, router_owner: Optional["CuMALayer"] = None) -> None:
        n, r = config.num_experts, config.r
        self.cuma_settings[adapter_name] = config
        self.cuma_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        a_shape = (self.in_features, r) if config.shared_A else (n, self.in_features, r)
        self.cuma_A[adapter_name] = nn.Parameter(torch.empty(a_shape))
        self.cuma_B[adapter_name] = nn.Parameter(torch.empty(n, r, self.out_features))
        if router_owner is None:
            self.cuma_router[adapter_name] = Router(
                self.in_features,
                config.router_profile_dim,
                n,
                hidden=config.router_hidden,
                num_layers=config.router_layers,
                dropout=config.router_dropout,
            )
        else:
            self._router_owner[adapter_name] = router_owner
            router_owner._router_has_followers.add(adapter_name)
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        init_lora_pair(self.cuma_A[adapter_name], self.cuma_B[adapter_name], self.in_features, zero_b=init_weights)

    # ----------------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "CuMA adapters cannot be merged into the base weights: the experts are mixed per token by a router that "
            "depends on the input and the profile, so there is no single weight update to merge."
        )

    def unmerge(self) -> None:
        return None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._gate_cache.pop(adapter_name, None)
        self._router_has_followers.discard(adapter_name)

    # ----------------------------------------------------------------------------------------------------------
    def _profile_for(self, adapter_name: str, rows: int) -> Optional[torch.Tensor]:
        config = self.cuma_settings[adapter_name]
        if config.profile_dim == 0:
            return None
        ctx = self._routing_ctx
        e = ctx.rows_profile
        if e is None:
            raise ValueError(
                f"CuMA adapter '{adapter_name}' routes on the profile: pass profile_embeds=Tensor(batch, "
                f"{config.profile_dim}) to forward()/generate() (from cuma.ProfileEncoder.encode)."
            )
        if e.shape[0] != rows:
            raise ValueError(
                f"profile_embeds gives {e.shape[0]} rows but this layer sees a batch of {rows}; pass one profile "
                "row per example (or per example of one half of a chosen+rejected batch)."
            )
        proj = ctx.profile_proj[adapter_name] if ctx.profile_proj is not None and adapter_name in ctx.profile_proj else None
        if proj is not None:
            e = proj(e.to(next(proj.parameters()).dtype))
        return e

    def _token_mask(self, rows: int, length: int) -> Optional[torch.Tensor]:
        mask = self._routing_ctx.token_mask
        if mask is None or mask.shape[0] != rows or mask.shape[1] < length:
            return None
        return mask[:, -length:].bool()

    def _route(self, adapter_name: str, x: torch.Tensor, x3: torch.Tensor) -> tuple[Gates, Optional[torch.Tensor]]:
        config = self.cuma_settings[adapter_name]
        owner = self._router_owner.get(adapter_name, self)
        rows, length = x3.shape[0], x3.shape[1]
        mask = self._token_mask(rows, length)
        cached = owner._gate_cache.get(adapter_name)
        if cached is not None and cached[0] is x:
            return cached[1], mask  # a projection sharing this router already routed this exact input

        router: Router = owner.cuma_router[adapter_name]
        profile = self._profile_for(adapter_name, rows)
        w = router.layers[0].weight
        logits = router(x3.to(w.dtype), profile)
        gates = topk_gates(logits, config.effective_top_k)
        if owner._router_has_followers and adapter_name in owner._router_has_followers:
            owner._gate_cache[adapter_name] = (x, gates)
        if self.training and config.balance_loss_coef > 0 and torch.is_grad_enabled():
            owner._balance_terms.append(config.balance_loss_coef * switch_balance_loss(gates, mask))
        return gates, mask

    def _expert_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * sum_i g_i B_i A_i dropout(x), computed densely for all experts and masked by the gates."""
        config = self.cuma_settings[adapter_name]
        x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        gates, mask = self._route(adapter_name, x, x3)
        log_gates(self, gates.weights, mask)

        a = self.cuma_A[adapter_name]
        b = self.cuma_B[adapter_name]
        n, r = config.num_experts, config.r
        h = self._cast_input_dtype(self.cuma_dropout[adapter_name](x3), a.dtype)
        if config.shared_A:
            z = (h @ a).unsqueeze(-2)  # (B, T, 1, r): every expert sees the same A x
        else:
            a_cat = a.permute(1, 0, 2).reshape(self.in_features, n * r)
            z = (h @ a_cat).unflatten(-1, (n, r))  # (B, T, N, r)
        z = z * gates.weights.to(z.dtype).unsqueeze(-1)  # zero outside the kept experts
        delta = z.flatten(-2) @ b.reshape(n * r, self.out_features)
        delta = delta * config.scaling
        return delta.reshape(*x.shape[:-1], self.out_features)

class Linear(nn.Module, CuMALayer):
    """CuMA-adapted ``nn.Linear``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: CuMAConfig,
        routing_ctx: RoutingContext,
        router_owner: Optional[CuMALayer] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        CuMALayer.__init__(self, base_layer, routing_ctx)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, router_owner=router_owner)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.cuma_A:
                continue
            result = result + self._expert_delta(adapter_name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "cuma." + super().__repr__()
