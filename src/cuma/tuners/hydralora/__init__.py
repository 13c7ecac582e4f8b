from .config import HYDRALORA_PEFT_TYPE, HydraLoRAConfig
from .layer import HydraContext, HydraLoRALayer, Linear
from .model import HydraLoRAModel

__all__ = ["HYDRALORA_PEFT_TYPE", "HydraContext", "HydraLoRAConfig", "HydraLoRALayer", "HydraLoRAModel", "Linear"]
