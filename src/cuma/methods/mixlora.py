"""``mixlora``: per-FFN-block router, experts = frozen FFN + own LoRA, plain LoRA on attention
(:mod:`cuma.tuners.mixlora`)."""

from __future__ import annotations

from torch import nn

from ..tuners.mixlora import MixLoRAConfig
from .options import PROFILE_IN_PROMPT as _PIP
from .options import options_from_config
from .registry import MethodSpec, get_spec, peft_from_config, register


def _build_mixlora(base: nn.Module, o: dict) -> nn.Module:
    return peft_from_config(get_spec("mixlora"), o, base)


register(
    MethodSpec(
        name="mixlora",
        family="mixture",
        summary="per-FFN-block router (top-2 of 8), experts = frozen FFN + own LoRA, plain LoRA on attention",
        paper="Li et al., MixLoRA: Enhancing LLMs Fine-Tuning with LoRA-based Mixture of Experts (arXiv:2404.15159)",
        options={**options_from_config(MixLoRAConfig), "profile_in_prompt": _PIP},
        config_cls=MixLoRAConfig,
        builder=_build_mixlora,
        save_format="adapter",
        peft_type="MIXLORA",
    )
)
