"""``prefix``: P-Tuning v2 as PEFT ``PrefixTuningConfig(prefix_projection=True)``; gradient checkpointing off."""

from __future__ import annotations

from torch import nn

from .common import _disable_gradient_checkpointing
from .options import PROFILE_IN_PROMPT as _PIP
from .options import Option
from .registry import MethodSpec, register


def _build_prefix(base: nn.Module, o: dict) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    # PEFT refuses prefix tuning on a model with gradient checkpointing on (and it would break: the prefix is a
    # past_key_values cache that checkpointed recomputation does not see), so it is forced off here
    _disable_gradient_checkpointing(base)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=o["num_virtual_tokens"],
        prefix_projection=True,
        encoder_hidden_size=o["encoder_hidden_size"],
    )
    return get_peft_model(base, config)


register(
    MethodSpec(
        name="prefix",
        family="prompt-learning",
        summary="P-Tuning v2: trained per-layer key/value prefixes through a reparameterising MLP",
        paper="Liu et al., P-Tuning v2 (ACL 2022, arXiv:2110.07602)",
        options={
            "num_virtual_tokens": Option("int", 32, "prefix length"),
            "encoder_hidden_size": Option("int", None, "hidden width of the prefix MLP (default: model hidden size)"),
            "profile_in_prompt": _PIP,
        },
        builder=_build_prefix,
        save_format="adapter",
        peft_type="PREFIX_TUNING",
        fixed={"prefix_projection": True},
        gradient_checkpointing_allowed=False,
        deviations=(
            "implemented as PEFT prefix tuning with prefix_projection=True (the reparameterised variant); the MLP "
            "hidden width is PEFT's default (the model hidden size) where the P-Tuning v2 code used 512",
            "gradient checkpointing forced off (PEFT refuses it for prefix tuning)",
            "no trainable reload: PEFT cannot load a prompt-learning adapter as trainable; resume with "
            "build() + load_weights()",
        ),
    )
)
