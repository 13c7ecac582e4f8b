"""``hydralora``: shared A, N B heads, a router on the layer input (:mod:`cuma.tuners.hydralora`)."""

from __future__ import annotations

from torch import nn

from ..tuners.hydralora import HydraLoRAConfig
from .options import PROFILE_IN_PROMPT as _PIP
from .options import options_from_config
from .registry import MethodSpec, get_spec, peft_from_config, register


def _build_hydralora(base: nn.Module, o: dict) -> nn.Module:
    return peft_from_config(get_spec("hydralora"), o, base)


register(
    MethodSpec(
        name="hydralora",
        family="mixture",
        summary="shared A, N B heads, router on the layer input, dense softmax gates, no aux loss",
        paper="Tian et al., HydraLoRA: An Asymmetric LoRA Architecture (NeurIPS 2024, arXiv:2404.19245)",
        # the CuMA paper's HydraLoRA row: r=64 on q_proj + v_proj (the tuner's own defaults: r=8 on the FFN)
        options={**options_from_config(HydraLoRAConfig, defaults={"r": 64, "target_modules": ["q_proj", "v_proj"]}),
                 "profile_in_prompt": _PIP},
        config_cls=HydraLoRAConfig,
        builder=_build_hydralora,
        save_format="adapter",
        peft_type="HYDRALORA",
        deviations=(
            "the CuMA paper's 2.31% for HydraLoRA r=64 counts a 256-wide MLP router per projection; the faithful "
            "default is HydraLoRA's linear bias-free router (router_hidden=0); pass router_hidden=256 to match "
            "the table",
            "adapts q_proj and v_proj by default, like every adapter in the CuMA paper's comparison (HydraLoRA's own "
            "experiments and the tuner's config default adapt the FFN gate/up/down projections)",
            "r=64 (alpha 128) by default, the CuMA paper's HydraLoRA row (the tuner's own default is r=8)",
        ),
    )
)
