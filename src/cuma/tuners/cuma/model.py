"""CuMA tuner: injects CuMA layers, owns the profile projection and feeds ``profile_embeds`` to the layers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._shared import RoutedTuner
from .config import CuMAConfig
from .layer import CuMALayer, Linear, RoutingContext

# projection groups that may share one router: they read the same input tensor inside one block
_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")
# keywords with which generate() (transformers 5: `cache`; older: `past_key_values`) calls the base model
_GENERATION_KWARGS = ("cache", "past_key_values")


def build_profile_projection(config: CuMAConfig) -> Optional[nn.Module]:
    """The optional trainable projection of the frozen profile embedding (0, 1 or 2 layers)."""
    if config.profile_proj_layers == 0:
        return None
    out = config.profile_proj_dim or config.profile_dim
    if config.profile_proj_layers == 1:
        return nn.Sequential(nn.Linear(config.profile_dim, out))
    return nn.Sequential(nn.Linear(config.profile_dim, config.router_hidden), nn.GELU(), nn.Linear(config.router_hidden, out))


class _CaptureCallInputs:
    """Forward pre-hook on the base model: records the padding mask of the call and expands the profile rows to the
    batch the base model sees. A callable object rather than a closure so that ``copy.deepcopy`` of the model (TRL
    does this for reference models) gives the copy its own routing context."""

    def __init__(self, ctx: RoutingContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        ctx = self.ctx
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ctx.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        e = ctx.profile_embeds
        if e is None or ref is None:
            ctx.rows_profile = e
            return None
        rows = ref.shape[0]
        if e.shape[0] == rows:
            ctx.rows_profile = e
        elif rows % e.shape[0] == 0:
            times = rows // e.shape[0]
            if any(kwargs.get(k) is not None for k in _GENERATION_KWARGS):
                # generation: transformers expands each row in place for beams / returned sequences
                ctx.rows_profile = e.repeat_interleave(times, dim=0)
            else:
                # a whole-multiple batch outside generation is a concatenation (DPO: chosen then rejected)
                ctx.rows_profile = e.repeat(times, 1)
        else:
            raise ValueError(
                f"profile_embeds has {e.shape[0]} rows but the batch has {rows}: give one profile row per example"
            )
        return None


class CuMAModel(RoutedTuner):
    """Creates a CuMA model from a pretrained transformers model (see :class:`CuMAConfig`)."""

    prefix: str = "cuma_"
    tuner_layer_cls = CuMALayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: CuMAConfig, adapter_name: str) -> None:
        if not hasattr(self, "routing_ctx"):
            self.cuma_profile_proj = nn.ModuleDict({})
            self.routing_ctx = RoutingContext(profile_proj=self.cuma_profile_proj)
            self._capture_handle = model.register_forward_pre_hook(_CaptureCallInputs(self.routing_ctx), with_kwargs=True)
            self._router_owners: dict[tuple, CuMALayer] = {}

    def _ensure_projection(self, config: CuMAConfig, adapter_name: str) -> None:
        if adapter_name in self.cuma_profile_proj:
            return
        proj = build_profile_projection(config)
        if proj is not None:
            first = next(self.model.parameters(), None)
            if first is not None and first.device.type != "meta":
                proj = proj.to(first.device)
            self.cuma_profile_proj[adapter_name] = proj

    def _router_group(self, config: CuMAConfig, key: str) -> Optional[tuple[str, str]]:
        parent, _, leaf = key.rpartition(".")
        if config.share_router_qkv and leaf in _QKV:
            return parent, "qkv"
        if config.share_router_gate_up and leaf in _GATE_UP:
            return parent, "gate_up"
        return None

    def _create_and_replace(
        self,
        config: CuMAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        self._ensure_projection(config, adapter_name)
        group = self._router_group(config, current_key)
        owner = None
        if group is not None:
            owner = self._router_owners.get((adapter_name, *group))
        if isinstance(target, CuMALayer):
            target.update_layer(adapter_name, config, router_owner=owner)
            new_module = target
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"CuMA can adapt torch.nn.Linear modules only; '{current_key}' is {type(base).__name__}"
                )
            new_module = Linear(target, adapter_name, config, self.routing_ctx, router_owner=owner)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        if group is not None and owner is None:
            self._router_owners[(adapter_name, *group)] = new_module

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name, proj in self.cuma_profile_proj.items():
            proj.requires_grad_(name in self.active_adapters)

    # -------------------------------------------------------------------------------------------- adapters
    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, proj in self.cuma_profile_proj.items():
            proj.requires_grad_(name in names and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.cuma_profile_proj:
            del self.cuma_profile_proj[adapter_name]
        for key in [k for k in self._router_owners if k[0] == adapter_name]:
            del self._router_owners[key]

    def _check_merge_allowed(self):
        raise ValueError(
            "CuMA adapters cannot be merged: the experts are mixed per token by a profile-aware router, so there is "
            "no single weight update to fold into the base model. Keep the adapter unmerged."
        )

    # ----------------------------------------------------------------------------------------------- forward
    def _active_profile_dims(self) -> dict[str, int]:
        return {
            name: self.peft_config[name].profile_dim
            for name in self.active_adapters
            if name in self.peft_config and self.peft_config[name].profile_dim > 0
        }

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Receives ``profile_embeds`` from ``PeftModel.forward``/``generate`` and hands it to the layers.

        The profile stays on the routing context after the call (gradient-checkpointing recompute needs it) and is
        replaced, or cleared, by the next call.
        """
        e = kwargs.get("profile_embeds")
        if e is not None:
            if not isinstance(e, torch.Tensor) or e.dim() != 2:
                shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise ValueError(f"profile_embeds must be a 2-D tensor (batch, profile_dim), got {shape}")
            for name, dim in self._active_profile_dims().items():
                if e.shape[-1] != dim:
                    raise ValueError(
                        f"profile_embeds has width {e.shape[-1]} but adapter '{name}' was built with "
                        f"profile_dim={dim}; encode profiles with the encoder the adapter was trained with"
                    )
            device = next(self.model.parameters()).device
            e = e.to(device)
        self.routing_ctx.profile_embeds = e
        self.routing_ctx.rows_profile = None
        yield
