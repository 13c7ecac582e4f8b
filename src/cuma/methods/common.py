"""Helpers shared by the builders: target-module checks, gradient-checkpointing switches, parameter counts, and
building a PEFT model from a config class whose fields are named like the options."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Iterator, Mapping

from torch import nn


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of the ``nn.Linear`` modules of ``model`` (``q_proj``, ``v_proj``, ``lm_head``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def check_target_modules(model: nn.Module, targets, method: str = "") -> None:
    """Raise ValueError naming each target module that matches nothing in ``model`` and listing the Linear module
    names that exist. ``targets``: list of names (PEFT semantics: a full name or a ``.``-suffix), a regex string
    (full match on module names) or ``"all-linear"``."""
    if targets is None or targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    where = f" (method {method!r})" if method else ""
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise ValueError(
                f"target_modules regex {targets!r}{where} matches no module of {type(model).__name__}; "
                f"Linear modules that exist: {', '.join(linear_module_names(model))}"
            )
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"target module {', '.join(repr(t) for t in missing)}{where} not found in {type(model).__name__}; "
            f"Linear modules that exist: {', '.join(linear_module_names(model))}"
        )


# --------------------------------------------------------------------------------------------------------------
# builders


def gradient_checkpointing_on(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` has gradient (activation) checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _disable_gradient_checkpointing(model: nn.Module) -> None:
    if not gradient_checkpointing_on(model):
        return
    for attr in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        fn = getattr(model, attr, None)
        if callable(fn):
            fn()
            break
    for m in model.modules():  # anything the model-level switch did not reach
        if getattr(m, "gradient_checkpointing", False) is True:
            m.gradient_checkpointing = False


def _count(model: nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` property on every model it wraps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
