"""HydraLoRA layer: a frozen ``nn.Linear`` plus one shared A and N B heads mixed by a dense softmax router."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...routing import Router, gates_requested, log_gates
from ...routing_state import RoutingScope
from .. import fused
from .._shared import init_lora_pair
from .config import HydraLoRAConfig


class HydraLoRALayer(BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ("hydralora_A", "hydralora_B", "hydralora_router")
    other_param_names: tuple[str, ...] = ("hydralora_settings", "hydralora_dropout")

    @property
    def routing_scope(self) -> RoutingScope:
        """The tuner's routing scope; ``with layer.routing_scope.call(profile_rows=e): layer(x)`` runs this layer on
        its own, outside a base model (tests, benchmarks)."""
        return self._routing_scope

    def __init__(self, base_layer: nn.Module, routing_scope: Optional[RoutingScope] = None, **kwargs) -> None:
        self.base_layer = base_layer
        self.hydralora_A = nn.ParameterDict({})
        self.hydralora_B = nn.ParameterDict({})
        self.hydralora_router = nn.ModuleDict({})
        self.hydralora_dropout = nn.ModuleDict({})
        self.hydralora_settings: dict[str, HydraLoRAConfig] = {}
        # the tuner's scope: the routing call now running gives the padding mask of recorded gates (HydraLoRA has
        # no balance loss)
        self._routing_scope = routing_scope if routing_scope is not None else RoutingScope("hydralora")
        self._disable_adapters = False
        self.merged_adapters = []

        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"HydraLoRA adapts torch.nn.Linear layers only, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features

    def update_layer(self, adapter_name: str, config: HydraLoRAConfig) -> None:
        n, r = config.num_experts, config.r
        self.hydralora_settings[adapter_name] = config
        self.hydralora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.hydralora_A[adapter_name] = nn.Parameter(torch.empty(self.in_features, r))
        self.hydralora_B[adapter_name] = nn.Parameter(torch.empty(n, r, self.out_features))
        self.hydralora_router[adapter_name] = Router(
            self.in_features,
            0,
            n,
            hidden=max(config.router_hidden, 1),
            num_layers=config.router_layers,
            bias=config.router_has_bias,
        )
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        init_lora_pair(self.hydralora_A[adapter_name], self.hydralora_B[adapter_name], self.in_features,
                       zero_b=init_weights)

    # ----------------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "HydraLoRA adapters cannot be merged into the base weights: the B heads are mixed per token by a router "
            "that depends on the input, so there is no single weight update to merge."
        )

    def unmerge(self) -> None:
        return None

    # ----------------------------------------------------------------------------------------------------------
    def gates(self, adapter_name: str, x3: torch.Tensor) -> torch.Tensor:
        """Dense fp32 softmax gates over all heads, (B, T, N). The router sees the undropped layer input."""
        router: Router = self.hydralora_router[adapter_name]
        logits = router(x3.to(router.layers[0].weight.dtype))
        return torch.softmax(logits.float(), dim=-1)

    def _delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * sum_i g_i B_i A dropout(x), computed densely: x@A once, scaled per head by the gates, @ B_cat."""
        config = self.hydralora_settings[adapter_name]
        x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        gates = self.gates(adapter_name, x3)
        if gates_requested(self):
            call = self._routing_scope.current()
            mask = call.mask_for(x3.shape[0], x3.shape[1]) if call is not None else None
            log_gates(self, gates, mask, call)

        a = self.hydralora_A[adapter_name]
        b = self.hydralora_B[adapter_name]
        n, r = config.num_experts, config.r
        h = self._cast_input_dtype(self.hydralora_dropout[adapter_name](x3), a.dtype)
        z = h @ a  # (B, T, r): the shared A, computed once
        z = gates.to(z.dtype).unsqueeze(-1) * z.unsqueeze(-2)  # (B, T, N, r)
        delta = (z.flatten(-2) @ b.reshape(n * r, self.out_features)) * config.scaling
        return delta.reshape(*x.shape[:-1], self.out_features)


class Linear(nn.Module, HydraLoRALayer):
    """HydraLoRA-adapted ``nn.Linear``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: HydraLoRAConfig,
        routing_scope: Optional[RoutingScope] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        HydraLoRALayer.__init__(self, base_layer, routing_scope)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.hydralora_A:
                continue
            if self.hydralora_settings[adapter_name].fast_path != "off":
                result = fused.hydralora_forward(self, adapter_name, x, result)
                continue
            result = result + self._delta(adapter_name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "hydralora." + super().__repr__()
