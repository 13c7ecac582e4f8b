"""Configuration of the MixLoRA tuner (Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with
LoRA-based Mixture of Experts")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..._registry import peft_type_member

MIXLORA_PEFT_TYPE = peft_type_member("MIXLORA")  # a real PeftType member (model cards, FSDP state dicts)

# the projections of a Llama-style gated FFN that the experts adapt; they must not be targeted as attention LoRA
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MixLoRAConfig(PeftConfig):
    """Options of a MixLoRA adapter.

    Each decoder FFN block (``ffn_modules``, default the ``mlp`` of Llama/Qwen2/Qwen3/Mistral) becomes a sparse
    mixture of ``num_experts`` experts. Expert i is the frozen FFN with its own LoRA on gate/up/down::

        expert_i(x) = down_i(act(gate_i(x)) * up_i(x)),   gate_i(x) = W_gate x + s B_gate,i A_gate,i x   (etc.)

    A bias-free fp32 router ``Linear(hidden -> N)`` (init N(0, router_init_range)) picks the ``top_k`` experts per
    token (softmax, top-k, renormalised). The attention projections in ``target_modules`` get one plain LoRA each.
    The Mixtral load-balancing term over the router logits of all layers, times ``router_aux_loss_coef``, is what
    :func:`cuma.pop_balance_loss` returns after a training forward.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of the attention LoRA (and of the experts by default)."})
    lora_alpha: Optional[int] = field(
        default=None,
        metadata={"help": "LoRA alpha; scaling = lora_alpha / r (or / sqrt(r) with use_rslora). Default: 2 * r."},
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA inputs."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rsLoRA)."})
    expert_r: Optional[int] = field(default=None, metadata={"help": "Rank of the expert LoRAs (default: r)."})
    expert_alpha: Optional[int] = field(default=None, metadata={"help": "Alpha of the expert LoRAs (default: lora_alpha)."})
    expert_dropout: Optional[float] = field(
        default=None, metadata={"help": "Dropout of the expert LoRAs (default: lora_dropout)."}
    )
    num_experts: int = field(default=8, metadata={"help": "Experts N per FFN block."})
    top_k: int = field(default=2, metadata={"help": "Experts kept per token."})
    router_aux_loss_coef: float = field(
        default=0.001, metadata={"help": "Weight of the Mixtral load-balancing term (0 disables it)."}
    )
    router_init_range: float = field(default=0.02, metadata={"help": "Std of the normal router initialisation."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Attention projections that get a plain LoRA (names or a regex); default q/k/v/o_proj. "
                  "An empty list adapts only the FFN blocks."},
    )
    ffn_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Names of the FFN blocks turned into mixtures (each needs gate_proj, up_proj, down_proj, "
                  "act_fn); default ['mlp']."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    init_weights: bool = field(
        default=True, metadata={"help": "LoRA B = 0 at initialisation, so the adapted model starts as the base model."}
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
    bias: Literal["none", "all", "mixlora_only"] = field(
        default="none",
        metadata={"help": "Biases to train (PEFT's options): 'none', 'all', or 'mixlora_only' (adapted layers' own)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MIXLORA_PEFT_TYPE
        if self.target_modules is None:
            self.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else self.target_modules
        )
        if self.ffn_modules is None:
            self.ffn_modules = ["mlp"]
        elif isinstance(self.ffn_modules, str):
            self.ffn_modules = [self.ffn_modules]
        self.ffn_modules = list(self.ffn_modules)
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.lora_alpha is None and isinstance(self.r, int):
            self.lora_alpha = 2 * self.r
        self.validate()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5) if self.use_rslora else self.lora_alpha / self.r

    @property
    def expert_rank(self) -> int:
        return self.expert_r or self.r

    @property
    def expert_scaling(self) -> float:
        alpha = self.expert_alpha if self.expert_alpha is not None else self.lora_alpha
        r = self.expert_rank
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    @property
    def expert_lora_dropout(self) -> float:
        return self.lora_dropout if self.expert_dropout is None else self.expert_dropout

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"MixLoRAConfig: {msg}")

        need(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        need(self.expert_r is None or self.expert_r > 0, f"expert_r must be positive, got {self.expert_r!r}")
        need(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        need(1 <= self.top_k <= self.num_experts, f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(0.0 <= self.expert_lora_dropout < 1.0, f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        need(self.router_aux_loss_coef >= 0, f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        need(self.router_init_range > 0, f"router_init_range must be > 0, got {self.router_init_range}")
        need(len(self.ffn_modules) > 0, "ffn_modules must name at least one FFN block")
        if isinstance(self.target_modules, set):
            clash = sorted(self.target_modules & set(FFN_PROJECTIONS))
            need(
                not clash,
                f"target_modules {clash} are FFN projections: MixLoRA adapts them through the experts of "
                f"ffn_modules={self.ffn_modules}, not with a plain LoRA",
            )
        need(
            self.bias in ("none", "all", "mixlora_only"), f"bias must be 'none', 'all' or 'mixlora_only', got {self.bias!r}"
        )
