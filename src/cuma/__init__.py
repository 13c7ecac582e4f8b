"""cuma: demographic-aware mixtures of LoRA experts (CuMA) and the tools around them for pluralistic alignment."""

from __future__ import annotations

from ._registry import register_tuner
from .routing import GateRecord, clear_balance_loss, pop_balance_loss, record_gates
from .tuners.cuma import CUMA_PEFT_TYPE, CuMAConfig, CuMAModel, fit_profile_center
from .tuners.hydralora import HYDRALORA_PEFT_TYPE, HydraLoRAConfig, HydraLoRAModel
from .tuners.mixlora import MIXLORA_PEFT_TYPE, MixLoRAConfig, MixLoRAModel

__version__ = "0.1.0"

# the three routed tuners become PEFT methods at import; only CuMA's layers take profile_embeds
register_tuner(CUMA_PEFT_TYPE, CuMAConfig, CuMAModel, prefix="cuma_", takes_profile=True)
register_tuner(HYDRALORA_PEFT_TYPE, HydraLoRAConfig, HydraLoRAModel, prefix="hydralora_", takes_profile=False)
register_tuner(MIXLORA_PEFT_TYPE, MixLoRAConfig, MixLoRAModel, prefix="mixlora_", takes_profile=False)


def __getattr__(name):
    # heavier components load on first use (transformers models, the profile encoder)
    if name == "ProfileEncoder":
        from .encoder import ProfileEncoder

        return ProfileEncoder
    if name == "Profile":
        from .profiles import Profile

        return Profile
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'cuma' has no attribute {name!r}")


__all__ = [
    "CUMA_PEFT_TYPE",
    "HYDRALORA_PEFT_TYPE",
    "MIXLORA_PEFT_TYPE",
    "CuMAConfig",
    "CuMAModel",
    "GateRecord",
    "HydraLoRAConfig",
    "HydraLoRAModel",
    "MixLoRAConfig",
    "MixLoRAModel",
    "Profile",
    "ProfileEncoder",
    "clear_balance_loss",
    "fit_profile_center",
    "pop_balance_loss",
    "record_gates",
    "register_tuner",
]
