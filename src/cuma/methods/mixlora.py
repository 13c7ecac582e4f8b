"""``mixlora``: per-FFN-block router, experts = frozen FFN + own LoRA, plain LoRA on attention
(:mod:`cuma.tuners.mixlora`)."""

from __future__ import annotations

from torch import nn

from .common import _peft_from_fields
from .options import PROFILE_IN_PROMPT as _PIP
from .options import Option
from .registry import MethodSpec, register


def _build_mixlora(base: nn.Module, o: dict) -> nn.Module:
    from ..tuners.mixlora import MixLoRAConfig  # registered with PEFT by the package import (cuma/__init__)

    return _peft_from_fields(MixLoRAConfig, o, {}, base)


register(
    MethodSpec(
        name="mixlora",
        family="mixture",
        summary="per-FFN-block router (top-2 of 8), experts = frozen FFN + own LoRA, plain LoRA on attention",
        paper="Li et al., MixLoRA: Enhancing LLMs Fine-Tuning with LoRA-based Mixture of Experts (arXiv:2404.15159)",
        options={
            "r": Option("int", 8, "LoRA rank of the attention LoRA (and of the experts unless expert_r)"),
            "lora_alpha": Option("int", None, "LoRA alpha (default 2*r)"),
            "lora_dropout": Option("float", 0.05, "dropout on the LoRA inputs"),
            "use_rslora": Option("bool", False, "scale by alpha/sqrt(r)"),
            "expert_r": Option("int", None, "rank of the expert LoRAs (default r)"),
            "expert_alpha": Option("int", None, "alpha of the expert LoRAs (default lora_alpha)"),
            "expert_dropout": Option("float", None, "dropout of the expert LoRAs (default lora_dropout)"),
            "num_experts": Option("int", 8, "FFN experts per block"),
            "top_k": Option("int", 2, "experts kept per token"),
            "router_aux_loss_coef": Option("float", 0.001, "weight of the Mixtral load-balancing loss"),
            "router_init_range": Option("float", 0.02, "std of the router initialisation"),
            "target_modules": Option(
                "modules", ["q_proj", "k_proj", "v_proj", "o_proj"], "attention projections given a plain LoRA"
            ),
            "ffn_modules": Option("modules", ["mlp"], "FFN blocks turned into mixtures of experts"),
            "init_weights": Option("bool", True, "LoRA B = 0 at init (False: random B, for tests)"),
            "layers_to_transform": Option("int_list", None, "only these layer indices"),
            "modules_to_save": Option("modules", None, "extra modules trained in full and saved with the adapter"),
            "profile_in_prompt": _PIP,
        },
        builder=_build_mixlora,
        save_format="adapter",
        peft_type="MIXLORA",
    )
)
