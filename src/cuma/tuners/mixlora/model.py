"""MixLoRA tuner: turns the FFN blocks into mixtures of LoRA experts and puts a plain LoRA on attention."""

from __future__ import annotations

import copy

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from .._shared import RoutedTuner
from .config import MixLoRAConfig
from ...routing_state import CallHooks, RoutingScope, checkpoint_layers_of
from .layer import Linear, MixLoRAFFN, MixLoRALayer


class MixLoRAModel(RoutedTuner):
    """Creates a MixLoRA model from a pretrained transformers model (see :class:`MixLoRAConfig`).

    ``cuma.pop_balance_loss(model)`` returns ``router_aux_loss_coef`` times the Mixtral load-balancing term over the
    router logits of all layers of the training forward(s) since the last call.
    """

    prefix: str = "mixlora_"
    tuner_layer_cls = MixLoRALayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: MixLoRAConfig, adapter_name: str) -> None:
        if not hasattr(self, "routing_scope"):
            self.routing_scope = RoutingScope("mixlora")
            hooks = CallHooks(self.routing_scope, checkpoint_layers=checkpoint_layers_of(model))
            self._call_hook_handles = hooks.install(model)

    def _prepare_adapter_config(self, peft_config: MixLoRAConfig, model_config: dict) -> MixLoRAConfig:
        if peft_config.target_modules == "all-linear":
            raise ValueError(
                "MixLoRA: target_modules='all-linear' is not supported; name the attention projections (the FFN "
                "projections are adapted by the experts of ffn_modules)"
            )
        return peft_config

    def _prepare_model(self, peft_config: MixLoRAConfig, model: nn.Module) -> None:
        ffn = set(peft_config.ffn_modules)
        if not any(name.rsplit(".", 1)[-1] in ffn for name, _ in model.named_modules()):
            raise ValueError(
                f"MixLoRA: ffn_modules={peft_config.ffn_modules} name no module of this model; without FFN blocks "
                "MixLoRA would reduce to plain LoRA. Name the decoder layers' FFN modules (Llama/Qwen/Mistral: 'mlp')."
            )

    @staticmethod
    def _check_target_module_exists(peft_config: MixLoRAConfig, key: str):
        ffn = set(peft_config.ffn_modules)
        parts = key.split(".")
        if any(p in ffn for p in parts[:-1]):
            return False  # inside an FFN block: its projections belong to the experts
        if parts[-1] in ffn:
            ffn_config = copy.copy(peft_config)
            ffn_config.target_modules = ffn
            return check_target_module_exists(ffn_config, key)
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(
        self,
        config: MixLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        is_ffn = current_key.rsplit(".", 1)[-1] in config.ffn_modules
        if is_ffn:
            if isinstance(target, MixLoRAFFN):
                target.update_layer(adapter_name, config)
                return
            if isinstance(target, BaseTunerLayer):
                raise ValueError(f"MixLoRA: '{current_key}' is already wrapped by another adapter type")
            try:
                new_module = MixLoRAFFN(target, adapter_name, config, self.routing_scope)
            except TypeError as err:
                raise ValueError(f"MixLoRA cannot turn '{current_key}' into a mixture of experts: {err}") from err
        else:
            if isinstance(target, Linear):
                target.update_layer(adapter_name, config)
                return
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"MixLoRA's attention LoRA adapts torch.nn.Linear modules only; '{current_key}' is "
                    f"{type(base).__name__}"
                )
            new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, MixLoRAFFN) and new_module is child.get_base_layer():
            # unloading: put the original FFN block back as it was (it has no weight of its own to re-link)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # -------------------------------------------------------------------------------------------- adapters
    def _check_merge_allowed(self):
        raise ValueError(
            "MixLoRA adapters cannot be merged: the FFN experts are chosen per token by a router that depends on the "
            "input, so there is no single weight update to fold into the base model. Keep the adapter unmerged."
        )

