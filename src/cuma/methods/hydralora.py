"""``hydralora``: shared A, N B heads, a router on the layer input (:mod:`cuma.tuners.hydralora`)."""

from __future__ import annotations

from torch import nn

from .common import _peft_from_fields
from .options import PROFILE_IN_PROMPT as _PIP
from .options import Option
from .registry import MethodSpec, register


def _build_hydralora(base: nn.Module, o: dict) -> nn.Module:
    from ..tuners.hydralora import HydraLoRAConfig  # registered with PEFT by the package import (cuma/__init__)

    return _peft_from_fields(HydraLoRAConfig, o, {}, base)


register(
    MethodSpec(
        name="hydralora",
        family="mixture",
        summary="shared A, N B heads, router on the layer input, dense softmax gates, no aux loss",
        paper="Tian et al., HydraLoRA: An Asymmetric LoRA Architecture (NeurIPS 2024, arXiv:2404.19245)",
        options={
            "r": Option("int", 64, "rank of the shared A / each B head"),
            "lora_alpha": Option("int", None, "LoRA alpha (default 2*r)"),
            "lora_dropout": Option("float", 0.05, "dropout on the LoRA input"),
            "num_experts": Option("int", 8, "number of B heads"),
            "target_modules": Option(
                "modules", ["q_proj", "v_proj"], "modules to adapt (the CuMA paper's comparison: q_proj, v_proj)"
            ),
            "use_rslora": Option("bool", False, "scale by alpha/sqrt(r)"),
            "router_hidden": Option(
                "int", 0, "router hidden width: 0 = linear bias-free router (HydraLoRA); 256 = the CuMA paper's count"
            ),
            "router_bias": Option("bool", None, "router biases (default: none for the linear router, yes for the MLP)"),
            "fast_path": Option("str", "off", "'off' (reference) or 'fused' (static-shape, same results)",
                                choices=("off", "fused", "triton")),
            "fast_path_compile": Option("bool", False, "run the fast path through torch.compile"),
            "init_weights": Option("bool", True, "B = 0 at init (False: random B, for tests)"),
            "layers_to_transform": Option("int_list", None, "only these layer indices"),
            "modules_to_save": Option("modules", None, "extra modules trained in full and saved with the adapter"),
            "profile_in_prompt": _PIP,
        },
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
