from .config import HYDRALORA_PEFT_TYPE, HydraLoRAConfig
from .layer import HydraLoRALayer, Linear
from .model import HydraLoRAModel

__all__ = ["HYDRALORA_PEFT_TYPE", "HydraLoRAConfig", "HydraLoRALayer", "HydraLoRAModel", "Linear"]
