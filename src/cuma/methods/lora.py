"""``lora`` and ``dora``: PEFT LoRA / DoRA (the paper's baseline: r=64, alpha=128, q_proj+v_proj)."""

from __future__ import annotations

from torch import nn

from .options import PROFILE_IN_PROMPT as _PIP
from .options import Option
from .registry import MethodSpec, register


def _lora_builder(use_dora: bool):
    def build_lora(base: nn.Module, o: dict) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=o["r"],
            lora_alpha=o["lora_alpha"],
            lora_dropout=o["lora_dropout"],
            target_modules=o["target_modules"],
            use_rslora=o["use_rslora"],
            use_dora=use_dora,
            init_lora_weights=o["init_weights"],
            layers_to_transform=o["layers_to_transform"],
            modules_to_save=o["modules_to_save"],
            bias="none",
        )
        return get_peft_model(base, config)

    return build_lora


_LORA_OPTIONS = {
    "r": Option("int", 64, "LoRA rank"),
    "lora_alpha": Option("int", None, "LoRA alpha (default 2*r: 128 at r=64)"),
    "lora_dropout": Option("float", 0.05, "dropout on the LoRA input"),
    "target_modules": Option("modules", ["q_proj", "v_proj"], "modules to adapt (names, regex or 'all-linear')"),
    "use_rslora": Option("bool", False, "scale by alpha/sqrt(r)"),
    "init_weights": Option("bool", True, "B = 0 at init (False: random B, for tests)"),
    "layers_to_transform": Option("int_list", None, "only these layer indices"),
    "modules_to_save": Option("modules", None, "extra modules trained in full and saved with the adapter"),
    "profile_in_prompt": _PIP,
}


register(
    MethodSpec(
        name="lora",
        family="peft",
        summary="PEFT LoRA",
        paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022, arXiv:2106.09685)",
        options=_LORA_OPTIONS,
        builder=_lora_builder(use_dora=False),
        fixed={"use_dora": False},
        save_format="adapter",
        peft_type="LORA",
    )
)
register(
    MethodSpec(
        name="dora",
        family="peft",
        summary="PEFT DoRA (LoRA with a trained magnitude vector)",
        paper="Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation (ICML 2024, arXiv:2402.09353)",
        options=_LORA_OPTIONS,
        builder=_lora_builder(use_dora=True),
        fixed={"use_dora": True},
        save_format="adapter",
        peft_type="LORA",
    )
)
