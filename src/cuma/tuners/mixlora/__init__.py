from .config import MIXLORA_PEFT_TYPE, MixLoRAConfig
from .layer import Linear, MixLoRABalance, MixLoRAContext, MixLoRAFFN, MixLoRALayer
from .model import MixLoRAModel

__all__ = [
    "MIXLORA_PEFT_TYPE",
    "Linear",
    "MixLoRABalance",
    "MixLoRAConfig",
    "MixLoRAContext",
    "MixLoRAFFN",
    "MixLoRALayer",
    "MixLoRAModel",
]
