"""Configuration of the HydraLoRA tuner (Tian et al. 2024, "HydraLoRA: An Asymmetric LoRA Architecture")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..._registry import peft_type_member
from ..fused import validate_fast_path

HYDRALORA_PEFT_TYPE = peft_type_member("HYDRALORA")  # a real PeftType member (model cards, FSDP state dicts)


@dataclass
class HydraLoRAConfig(PeftConfig):
    """Options of a HydraLoRA adapter.

    Every targeted ``nn.Linear`` keeps its frozen weight and gains one shared down-projection ``A`` (in -> r) and
    ``num_experts`` up-projection heads ``B_i`` (r -> out). A router on the layer input (no profile) mixes all heads
    with dense softmax gates: ``y = W0 x + scaling * sum_i g_i(x) B_i A dropout(x)``. There is no top-k and no
    load-balancing loss.

    ``router_hidden = 0`` (default) is the paper's router: one bias-free ``Linear(in -> N)``. ``router_hidden > 0``
    gives an MLP router ``Linear(in -> hidden) + ReLU + Linear(hidden -> N)`` with biases, one per adapted projection;
    with ``target_modules=["q_proj", "v_proj"]``, ``r=64``, 8 heads and ``router_hidden=256`` this is the configuration
    whose size (2.31% of Qwen3-8B) the CuMA paper reports for HydraLoRA.
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared A and of each B head."})
    lora_alpha: Optional[int] = field(
        default=None,
        metadata={"help": "LoRA alpha; scaling = lora_alpha / r (or / sqrt(r) with use_rslora). Default: 2 * r."},
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the input of A (not on the router input)."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rsLoRA)."})
    num_experts: int = field(default=8, metadata={"help": "Number of B heads N (the paper's 'heads')."})
    router_hidden: int = field(
        default=0,
        metadata={"help": "0 = linear bias-free router (paper); > 0 = MLP router with this hidden width."},
    )
    router_bias: Optional[bool] = field(
        default=None, metadata={"help": "Biases in the router; default: none for the linear router, yes for the MLP."}
    )
    fast_path: Literal["off", "fused", "triton"] = field(
        default="off",
        metadata={
            "help": "How the delta is computed: 'off' (reference path), 'fused' (static-shape, compile-friendly "
            "functions, same results); 'triton' runs the 'fused' experts (dense gates); see cuma.tuners.fused."
        },
    )
    fast_path_compile: bool = field(
        default=False, metadata={"help": "Run the fast path's static-shape functions through torch.compile."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (or a regex) to adapt; default the FFN gate_proj, up_proj and down_proj."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    init_weights: bool = field(
        default=True, metadata={"help": "B heads = 0 at initialisation, so the adapted model starts as the base model."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Adapt only the layers with these indices (default: every layer)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list layers_to_transform indexes (PEFT's option)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    bias: Literal["none", "all", "hydralora_only"] = field(
        default="none",
        metadata={"help": "Biases to train (PEFT's options): 'none', 'all', or 'hydralora_only' (adapted layers' own)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HYDRALORA_PEFT_TYPE
        if self.target_modules is None:
            self.target_modules = ["gate_proj", "up_proj", "down_proj"]
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.lora_alpha is None and isinstance(self.r, int):
            self.lora_alpha = 2 * self.r
        self.validate()

    @property
    def heads(self) -> int:
        """The paper's name for ``num_experts``."""
        return self.num_experts

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5) if self.use_rslora else self.lora_alpha / self.r

    @property
    def router_layers(self) -> int:
        return 1 if self.router_hidden == 0 else 2

    @property
    def router_has_bias(self) -> bool:
        return self.router_hidden > 0 if self.router_bias is None else bool(self.router_bias)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"HydraLoRAConfig: {msg}")

        need(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        need(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            f"num_experts must be an integer >= 1, got {self.num_experts!r}",
        )
        need(self.router_hidden >= 0, f"router_hidden must be >= 0 (0 = linear router), got {self.router_hidden}")
        validate_fast_path(self.fast_path, self.fast_path_compile, "HydraLoRAConfig")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(
            self.bias in ("none", "all", "hydralora_only"), f"bias must be 'none', 'all' or 'hydralora_only', got {self.bias!r}"
        )
