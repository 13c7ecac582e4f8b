"""Behaviour shared by this project's routed tuners (CuMA, HydraLoRA, MixLoRA)."""

from __future__ import annotations

import math
import re

import torch

from peft.tuners.tuners_utils import BaseTuner


class RoutedTuner(BaseTuner):
    """Base class of the routed tuners: adapter-name-free checkpoint keys for nested modules, and removal of the
    base-model hooks that open each call's routing state (``self._call_hook_handles``) when the adapters are
    unloaded."""

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # PEFT strips an adapter name only in the last two positions of a key; routers and projections are nested
        # modules (<prefix>router.<adapter>.layers.0.weight), so strip it right after any <prefix>* attribute
        pattern = rf"(\.{re.escape(cls.prefix)}[^.]*)\.{re.escape(adapter_name)}(?=\.|$)"
        new_key, hits = re.subn(pattern, r"\1", key, count=1)
        return new_key if hits else super()._remove_adapter_name_from_key(key, adapter_name)

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs):
        out = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        for handle in getattr(self, "_call_hook_handles", None) or ():
            handle.remove()
        self._call_hook_handles = []
        return out


def init_lora_pair(a: "torch.Tensor", b: "torch.Tensor", fan_in: int, zero_b: bool = True) -> None:
    """LoRA's initialisation for packed tensors: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what kaiming-uniform with
    a=sqrt(5) gives an (r, fan_in) matrix), B = 0 so the adapter starts as the identity; ``zero_b=False`` draws B
    from the same range (tests use it to make the adapter visible)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        a.uniform_(-bound, bound)
        if zero_b:
            b.zero_()
        else:
            b.uniform_(-bound, bound)
