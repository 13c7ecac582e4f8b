from .config import CUMA_PEFT_TYPE, CuMAConfig
from .layer import CuMALayer, Linear
from .model import CuMAModel, fit_profile_center

__all__ = ["CUMA_PEFT_TYPE", "CuMAConfig", "CuMALayer", "CuMAModel", "Linear", "fit_profile_center"]
