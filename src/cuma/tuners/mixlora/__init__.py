from .config import MIXLORA_PEFT_TYPE, MixLoRAConfig
from .layer import Linear, MixLoRAFFN, MixLoRALayer, MixtralBalance
from .model import MixLoRAModel

__all__ = [
    "MIXLORA_PEFT_TYPE",
    "Linear",
    "MixLoRAConfig",
    "MixLoRAFFN",
    "MixLoRALayer",
    "MixLoRAModel",
    "MixtralBalance",
]
