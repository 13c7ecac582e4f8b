"""Prompting baselines without training: ``vanilla``, ``persona`` and ``fewshot`` (shots chosen by
:func:`cuma.evaluate.fewshot.select_fewshot`)."""

from __future__ import annotations

from torch import nn

from .options import Option
from .registry import MethodSpec, register


def _build_prompting(base: nn.Module, o: dict) -> nn.Module:
    for p in base.parameters():
        p.requires_grad_(False)
    return base.eval()


register(
    MethodSpec(
        name="vanilla",
        family="prompting",
        summary="the untouched base model, question only",
        paper="prompting baseline",
        options={},
        builder=_build_prompting,
        save_format="none",
        prompting_only=True,
        prompt_mode="vanilla",
        fixed={"profile_in_prompt": False},
    )
)
register(
    MethodSpec(
        name="persona",
        family="prompting",
        summary="the untouched base model with the profile sentence in the system prompt",
        paper="persona-prompting baseline",
        options={"profile_in_prompt": Option("bool", True, "always on for persona", choices=(True,))},
        builder=_build_prompting,
        save_format="none",
        prompting_only=True,
        prompt_mode="persona",
    )
)
register(
    MethodSpec(
        name="fewshot",
        family="prompting",
        summary="the untouched base model with k answered examples from training records of the same country",
        paper="few-shot in-context baseline",
        options={
            "k": Option("int", 5, "number of shots"),
            "seed": Option("int", 0, "seed of the shot selection"),
            "key": Option("str", "country", "record field that must match for same-group shots"),
            "profile_in_prompt": Option("bool", False, "also put the profile sentence in the system prompt"),
        },
        builder=_build_prompting,
        save_format="none",
        prompting_only=True,
        prompt_mode="fewshot",
        deviations=(
            "shots fall back to random training records (seeded) when the target's country has fewer than k",
        ),
    )
)
