"""HydraLoRA tuner: injects HydraLoRA layers into the targeted ``nn.Linear`` modules."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._shared import RoutedTuner
from .config import HydraLoRAConfig
from .layer import HydraContext, HydraLoRALayer, Linear


class _CaptureMask:
    """Forward pre-hook on the base model: keeps the 2-D attention mask of the call for the layers' gate records.
    A callable object (not a closure) so ``copy.deepcopy`` of the model gives the copy its own context."""

    def __init__(self, ctx: HydraContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.ctx.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None


class HydraLoRAModel(RoutedTuner):
    """Creates a HydraLoRA model from a pretrained transformers model (see :class:`HydraLoRAConfig`)."""

    prefix: str = "hydralora_"
    tuner_layer_cls = HydraLoRALayer
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: HydraLoRAConfig, adapter_name: str) -> None:
        if not hasattr(self, "hydra_ctx"):
            self.hydra_ctx = HydraContext()
            self._capture_handle = model.register_forward_pre_hook(_CaptureMask(self.hydra_ctx), with_kwargs=True)

    def _prepare_adapter_config(self, peft_config: HydraLoRAConfig, model_config: dict) -> HydraLoRAConfig:
        return peft_config

    def _create_and_replace(
        self,
        config: HydraLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, HydraLoRALayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"HydraLoRA can adapt torch.nn.Linear modules only; '{current_key}' is {type(base).__name__}"
            )
        new_module = Linear(target, adapter_name, config, self.hydra_ctx)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise ValueError(
            "HydraLoRA adapters cannot be merged: the B heads are mixed per token by a router that depends on the "
            "input, so there is no single weight update to fold into the base model. Keep the adapter unmerged."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs):
        out = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        if hasattr(self, "hydra_ctx"):  # the capture hook is gone (RoutedTuner), so is its context
            del self.hydra_ctx
        return out
