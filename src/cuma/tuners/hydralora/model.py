"""HydraLoRA tuner: injects HydraLoRA layers into the targeted ``nn.Linear`` modules."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._shared import RoutedTuner
from .config import HydraLoRAConfig
from ...routing_state import CallHooks, RoutingScope, checkpoint_layers_of
from .layer import HydraLoRALayer, Linear


class HydraLoRAModel(RoutedTuner):
    """Creates a HydraLoRA model from a pretrained transformers model (see :class:`HydraLoRAConfig`)."""

    prefix: str = "hydralora_"
    tuner_layer_cls = HydraLoRALayer
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: HydraLoRAConfig, adapter_name: str) -> None:
        if not hasattr(self, "routing_scope"):
            self.routing_scope = RoutingScope("hydralora")
            hooks = CallHooks(self.routing_scope, checkpoint_layers=checkpoint_layers_of(model))
            self._call_hook_handles = hooks.install(model)

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
        new_module = Linear(target, adapter_name, config, self.routing_scope)
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
        if hasattr(self, "routing_scope"):  # the call hooks are gone (RoutedTuner), so is their scope
            del self.routing_scope
        return out
