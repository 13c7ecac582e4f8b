"""``fft``: full fine-tuning, every base weight trainable, saved as a full model."""

from __future__ import annotations

from torch import nn

from .options import PROFILE_IN_PROMPT as _PIP
from .registry import MethodSpec, register


def _build_fft(base: nn.Module, o: dict) -> nn.Module:
    for p in base.parameters():
        p.requires_grad_(True)
    return base


register(
    MethodSpec(
        name="fft",
        family="full",
        summary="full fine-tuning: every base weight trainable, saved as a full model",
        paper="full fine-tuning baseline of the CuMA paper",
        options={"profile_in_prompt": _PIP},
        builder=_build_fft,
        save_format="full",
    )
)
