"""CuMA layer: a frozen ``nn.Linear`` plus N packed LoRA experts chosen per token by a profile-aware router."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...routing import (Gates, Router, gates_requested, log_gates, rms_normalise, switch_balance_loss, topk_gates,
                        weights_key)
from ...routing_state import RoutingCall, RoutingScope
from .. import fused
from .._shared import init_lora_pair
from .config import CuMAConfig


def as_batch(x: torch.Tensor) -> torch.Tensor:
    """The layer input as (batch, tokens, features): its leading dimension is the batch the profile rows must match
    (a 2-D input, as in models without a sequence axis, is one token per example)."""
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


class CuMALayer(BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ("cuma_A", "cuma_B", "cuma_router")
    other_param_names: tuple[str, ...] = ("cuma_settings", "cuma_dropout", "_router_owner")

    @property
    def routing_scope(self) -> RoutingScope:
        """The tuner's routing scope; ``with layer.routing_scope.call(profile_rows=e): layer(x)`` runs this layer on
        its own, outside a base model (tests, benchmarks)."""
        return self._routing_scope

    def __init__(self, base_layer: nn.Module, routing_scope: RoutingScope, **kwargs) -> None:
        self.base_layer = base_layer
        self.cuma_A = nn.ParameterDict({})
        self.cuma_B = nn.ParameterDict({})
        self.cuma_router = nn.ModuleDict({})
        self.cuma_dropout = nn.ModuleDict({})
        self.cuma_settings: dict[str, CuMAConfig] = {}
        # adapter -> layer that owns the router this layer shares (only when router sharing is on); a plain dict so
        # the shared router is neither registered nor saved twice
        self._router_owner: dict[str, "CuMALayer"] = {}
        self._router_has_followers: set[str] = set()
        # the tuner's scope: where this layer finds the routing call now running (profile rows, mask, terms)
        self._routing_scope = routing_scope
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
                input_norm=config.router_input_norm,
                profile_gain_init=config.router_profile_gain,
                token_init_scale=config.router_token_init_scale,
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
        self._router_has_followers.discard(adapter_name)

    # ----------------------------------------------------------------------------------------------------------
    def _current_call(self, adapter_name: str, needs_profile: bool) -> Optional[RoutingCall]:
        call = self._routing_scope.current()
        if call is None and needs_profile:
            raise ValueError(
                f"CuMA adapter '{adapter_name}' routes on the profile but this layer runs outside a call of its model "
                "(no profile_embeds reached it): call the PeftModel (forward/generate) with profile_embeds, or wrap a "
                "direct layer call in `with layer._routing_scope.call(profile_rows=...)`"
            )
        return call

    def _profile_for(self, adapter_name: str, call: Optional[RoutingCall], rows: int,
                     device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
        config = self.cuma_settings[adapter_name]
        if config.profile_dim == 0:
            return None
        e = call.profile_for(rows, device) if call is not None else None
        if e is None:
            raise ValueError(
                f"CuMA adapter '{adapter_name}' routes on the profile: pass profile_embeds=Tensor(batch, "
                f"{config.profile_dim}) to forward()/generate() (from cuma.ProfileEncoder.encode)."
            )
        # the subtraction runs in every layer, not cached per call (a checkpoint recompute must save what its forward
        # saved); the fitted centre and basis are buffers of the tuner (ProfileStats), saved with the adapter weights
        if config.router_profile_center == "train":
            stats = self._routing_scope.profile_stats
            stats = stats[adapter_name] if stats is not None and adapter_name in stats else None
            if stats is None or stats.center is None:
                raise ValueError(
                    f"CuMA adapter '{adapter_name}' has router_profile_center='train' but no fitted profile_center: "
                    "call cuma.fit_profile_center(model, profile_embeds) with the training profiles' embeddings "
                    "before the first forward (cuma train sft / dpo / grpo do it)"
                )
            e = e - stats.center.to(device=e.device, dtype=e.dtype)
            if config.router_profile_subspace > 0:
                if stats.basis is None:
                    raise ValueError(
                        f"CuMA adapter '{adapter_name}' has router_profile_subspace={config.router_profile_subspace} "
                        "but no fitted profile_basis: call cuma.fit_profile_center(model, profile_embeds) with the "
                        "training profiles' embeddings before the first forward (cuma train sft / dpo / grpo do it)"
                    )
                basis = stats.basis.to(device=e.device, dtype=e.dtype)
                e = (e @ basis.T) @ basis  # the part of the centred profile on the training profiles' directions
        projections = self._routing_scope.profile_proj
        proj = projections[adapter_name] if projections is not None and adapter_name in projections else None
        if proj is not None:
            e = proj(e.to(next(proj.parameters()).dtype))
        return e

    def _route(self, adapter_name: str, x: torch.Tensor, x3: torch.Tensor) -> tuple[Gates, Optional[torch.Tensor]]:
        config = self.cuma_settings[adapter_name]
        owner = self._router_owner.get(adapter_name, self)
        rows, length = x3.shape[0], x3.shape[1]
        call = self._current_call(adapter_name, needs_profile=config.profile_dim > 0)
        mask = call.mask_for(rows, length) if call is not None else None
        shared_key = (id(owner), adapter_name)
        if call is not None:
            cached = call.shared_gates.get(shared_key)
            if cached is not None and cached[0] is x:
                return cached[1], mask  # a projection sharing this router already routed this exact input

        router: Router = owner.cuma_router[adapter_name]
        balance = call is not None and call.computes_balance and self.training and config.balance_loss_coef > 0
        # the first pass of a reentrant checkpoint runs under no_grad: the balance term still needs its graph to the
        # router. A recompute computes the term again (it must save what the forward saved) but does not record it.
        grad = torch.enable_grad() if balance and not torch.is_grad_enabled() else nullcontext()
        with grad:
            profile = self._profile_for(adapter_name, call, rows, x3.device)
            if config.fast_path != "off":  # the static-shape routing of the fast path (cuma.tuners.fused)
                route = fused.compiled(fused.route_topk) if config.fast_path_compile else fused.route_topk
                k = config.effective_top_k
                w, probs, sel, term = route(router, x3, profile, k, mask, config.balance_loss_coef if balance else None)
                gates = Gates(weights=w, probs=probs, selected=sel, top_k=min(k, w.shape[-1]))
                if balance:
                    call.record(term)
            else:
                logits = router(x3.to(router.layers[0].weight.dtype), profile)
                gates = topk_gates(logits, config.effective_top_k)
                if balance:
                    call.record(config.balance_loss_coef * switch_balance_loss(gates, mask))
        if call is not None and adapter_name in owner._router_has_followers:
            call.shared_gates[shared_key] = (x, gates)
        return gates, mask

    def _expert_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * sum_i g_i B_i A_i dropout(x), computed densely for all experts and masked by the gates."""
        config = self.cuma_settings[adapter_name]
        x3 = as_batch(x)
        gates, mask = self._route(adapter_name, x, x3)
        if gates_requested(self):
            log_gates(self, gates.weights, mask, self._routing_scope.current())

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


    # ------------------------------------------------------------------------------------- inference (no grad)
    # Eval-mode calls without gradients (serving, evaluation, generate) take a leaner route to the same function:
    # the router's profile part once per call and row instead of once per token (Router.profile_part), the routers'
    # and experts' weights in the layout the matmuls want (cached until a parameter changes), the LoRA scaling folded
    # into B, the delta accumulated onto the base output inside the GEMM, and no padding mask unless gates are
    # recorded. Training and gradient calls keep the reference path above (tests/test_fast_path.py compares both).

    def _infers(self, config: CuMAConfig, x: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled() and not self.training and config.fast_path != "triton"
                and not config.fast_path_compile and not torch.is_autocast_enabled(x.device.type))

    def _inference_experts(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_cat (in, N*r) or the shared A (in, r), scaling * B_cat (N*r, out))`` in ``dtype``, cached until a
        parameter changes."""
        config = self.cuma_settings[adapter_name]
        a, b = self.cuma_A[adapter_name], self.cuma_B[adapter_name]
        key = (weights_key(a, b), dtype, config.scaling)
        cache = self.__dict__.setdefault("_cuma_inference_cache", {})
        hit = cache.get(adapter_name)
        if key[0] is not None and hit is not None and hit[0] == key:
            return hit[1]
        n, r = config.num_experts, config.r
        a_cat = a.detach() if config.shared_A else a.detach().permute(1, 0, 2).reshape(self.in_features, n * r)
        b_cat = b.detach().reshape(n * r, self.out_features) * config.scaling
        out = (a_cat.to(dtype).contiguous(), b_cat.to(dtype).contiguous())
        if key[0] is not None:
            cache[adapter_name] = (key, out)
        return out

    def _profile_part(self, adapter_name: str, router: Router, call: Optional[RoutingCall], rows: int,
                      device: torch.device) -> Optional[torch.Tensor]:
        """The router's per-row profile term for this call: computed by the first layer of the call that needs it
        and kept in the call (RoutingCall.derived), so never seen by another call."""
        if call is None:
            return router.profile_part(self._profile_for(adapter_name, call, rows, device))
        if self.cuma_settings[adapter_name].profile_dim:
            call.profile_for(rows, device)  # matches (and checks) this call's rows even when the parts are reused
        derived = call.derived
        key = ("profile_part", id(router), rows, device)
        part = derived.get(key)
        if part is None:
            pkey = ("profile", adapter_name, rows, device)
            if pkey not in derived:
                derived[pkey] = self._profile_for(adapter_name, call, rows, device)
            e = derived[pkey]
            if e is not None and router.input_norm == "balanced":
                # the balanced norm of the profile is the same for every router of the adapter: once per call
                nkey = ("profile_normalised", adapter_name, rows, device, router.layers[0].weight.dtype)
                if nkey not in derived:
                    derived[nkey] = rms_normalise(e.to(router.layers[0].weight.dtype))
                part = router.profile_part(derived[nkey], normalised=True)
            else:
                part = router.profile_part(e)
            derived[key] = part
        return part

    def _infer(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` + this adapter's routed delta, for an eval-mode call without gradients."""
        config = self.cuma_settings[adapter_name]
        owner = self._router_owner.get(adapter_name, self)
        x3 = as_batch(x)
        rows = x3.shape[0]
        call = self._current_call(adapter_name, needs_profile=config.profile_dim > 0)
        shared_key = (id(owner), adapter_name)
        cached = call.shared_gates.get(shared_key) if call is not None else None
        if cached is not None and cached[0] is x:
            weights = cached[1].weights  # a projection sharing this router already routed this exact input
        else:
            router: Router = owner.cuma_router[adapter_name]
            logits = router.infer(x3, self._profile_part(adapter_name, router, call, rows, x3.device))
            probs = torch.softmax(logits.float(), dim=-1)
            k = config.effective_top_k
            if k >= probs.shape[-1]:
                weights = probs
            else:  # topk_gates' operations, without the kept-expert mask (only the balance term reads it)
                vals, idx = probs.topk(k, dim=-1)
                weights = torch.zeros_like(probs).scatter_(-1, idx, vals / vals.sum(dim=-1, keepdim=True))
            if call is not None and adapter_name in owner._router_has_followers:
                call.shared_gates[shared_key] = (x, Gates(weights=weights, probs=probs, selected=None, top_k=k))
        if gates_requested(self):
            mask = call.mask_for(rows, x3.shape[1]) if call is not None else None
            log_gates(self, weights, mask, call)
        a_cat, b_cat = self._inference_experts(adapter_name, self.cuma_A[adapter_name].dtype)
        h = self._cast_input_dtype(x3, a_cat.dtype)
        z = h @ a_cat
        g = weights.to(z.dtype)
        if config.shared_A:
            zg = (g.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
        else:
            zg = (z.unflatten(-1, (config.num_experts, config.r)) * g.unsqueeze(-1)).flatten(-2)
        zg = zg.reshape(-1, zg.shape[-1])
        if result.dtype == zg.dtype and result.is_contiguous():
            return torch.addmm(result.reshape(-1, self.out_features), zg, b_cat).reshape(result.shape)
        return result + (zg @ b_cat).to(result.dtype).reshape(result.shape)


class Linear(nn.Module, CuMALayer):
    """CuMA-adapted ``nn.Linear``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: CuMAConfig,
        routing_scope: Optional[RoutingScope] = None,
        router_owner: Optional[CuMALayer] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        CuMALayer.__init__(self, base_layer, routing_scope if routing_scope is not None else RoutingScope("cuma"))
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, router_owner=router_owner)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.cuma_A:
                continue
            config = self.cuma_settings[adapter_name]
            if self._infers(config, x):
                result = self._infer(adapter_name, x, result)
                continue
            if config.fast_path != "off":
                result = fused.cuma_forward(self, adapter_name, x, result)
                continue
            result = result + self._expert_delta(adapter_name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "cuma." + super().__repr__()
