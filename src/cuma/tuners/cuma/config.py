"""Configuration of the CuMA tuner (demographic-aware mixture of LoRA experts)."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..._registry import peft_type_member
from ..fused import validate_fast_path

CUMA_PEFT_TYPE = peft_type_member("CUMA")  # a real PeftType member (model cards, FSDP state dicts)

# The router conditioning presets: the value each preset gives the router options left unset (None). "paper" is the
# paper's router (raw concat(h_t, e_d), default init); "fast" balances the two parts of the router input, starts from a
# profile-led routing and centres the profile input on the training profiles' mean (docs/cuma.md; the evidence for it is
# in docs/demo.md sections 1-2 and docs/notes/conditioning-default.md). Parts that read the profile apply only when the
# router has a profile input (profile_dim > 0).
CONDITIONING_PRESETS: dict[str, dict[str, object]] = {
    "paper": {"router_input_norm": "none", "router_token_init_scale": 1.0, "router_profile_center": "none"},
    "fast": {"router_input_norm": "balanced", "router_token_init_scale": 0.1, "router_profile_center": "train"},
}
PROFILE_PRESET_OPTIONS = ("router_profile_center",)  # preset parts that need a profile input
# The routers' learning rate as a multiple of the main one that goes with conditioning="fast". The learning rate is a
# training option (train.router_learning_rate), not part of the adapter: the fast configs (configs/*/cuma_*_fast.yaml)
# set router_learning_rate = FAST_ROUTER_LR_RATIO * learning_rate.
FAST_ROUTER_LR_RATIO = 3.0


@dataclass
class CuMAConfig(PeftConfig):
    """Options of a CuMA adapter.

    Every targeted ``nn.Linear`` keeps its frozen weight and gains ``num_experts`` LoRA experts. A router per
    adapted projection reads ``concat(h_t, e_d)`` (token hidden state, profile embedding) and keeps the ``top_k``
    experts per token: ``y = W0 x + scaling * sum_{i in topk} g_i B_i A_i dropout(x)``.

    Defaults are the paper's (N=8, k=2, r=8, alpha=2r, router hidden 256, lambda_aux 0.01, q_proj + v_proj, the paper's
    router: ``conditioning="paper"``). ``conditioning="fast"`` selects the router that learns who is asking within a
    small budget (see ``CONDITIONING_PRESETS``); an option given explicitly overrides its preset value, and the
    resolved values are what ``adapter_config.json`` records.

    Fitted tensors (``profile_center``, ``profile_basis``, see :func:`cuma.fit_profile_center`) are buffers of the
    model, saved in ``adapter_model.safetensors``; the two fields below only read adapters saved before that, which
    kept them as lists in ``adapter_config.json``.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of each expert."})
    lora_alpha: Optional[int] = field(
        default=None,
        metadata={"help": "LoRA alpha; scaling = lora_alpha / r (or / sqrt(r) with use_rslora). Default: 2 * r."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the expert input."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rsLoRA)."})
    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts N per adapted projection."})
    top_k: int = field(default=2, metadata={"help": "Experts kept per token; ignored when soft_routing is on."})
    soft_routing: bool = field(default=False, metadata={"help": "Dense gates over all experts (the soft ablation)."})
    shared_A: bool = field(
        default=False, metadata={"help": "One A shared by all experts (HydraLoRA-style) instead of one A per expert."}
    )
    profile_dim: int = field(
        default=384,
        metadata={"help": "Width of the profile_embeds given to forward; 0 = semantic-only routing (no profile)."},
    )
    profile_proj_layers: int = field(
        default=0, metadata={"help": "Trainable projection of the profile embedding: 0 (none), 1 or 2 layers."}
    )
    profile_proj_dim: Optional[int] = field(
        default=None, metadata={"help": "Output width of the profile projection (default: profile_dim)."}
    )
    router_hidden: int = field(default=256, metadata={"help": "Hidden width of the router MLP."})
    router_layers: int = field(default=2, metadata={"help": "Linear layers in the router (1 = linear router)."})
    router_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the router MLP."})
    conditioning: Literal["paper", "fast"] = field(
        default="paper",
        metadata={
            "help": "Router preset: 'paper' (raw concat(h_t, e_d), default init) or 'fast' (router_input_norm="
            "'balanced', router_token_init_scale=0.1, router_profile_center='train'; the centring only with a "
            "profile input). Sets the router options left unset; an option given explicitly wins. 'fast' goes "
            "with routers trained at 3x the main learning rate (train.router_learning_rate, FAST_ROUTER_LR_RATIO)."
        },
    )
    router_input_norm: Optional[Literal["none", "balanced"]] = field(
        default=None,
        metadata={
            "help": "'none': the router reads the raw concat(h_t, e_d). 'balanced': the token part and the profile "
            "part are each scaled to per-dimension RMS 1 times a learned gain, so the small profile embedding is not "
            "swamped by the hidden state. Default: set by conditioning ('paper': 'none', 'fast': 'balanced')."
        },
    )
    router_profile_gain: float = field(
        default=1.0, metadata={"help": "Initial gain of the profile part with router_input_norm='balanced'."}
    )
    router_token_init_scale: Optional[float] = field(
        default=None,
        metadata={
            "help": "Scale of the router's token-part weights at initialisation; < 1 makes the first routing follow "
            "the profile, so experts are told apart by group from the first step while B = 0. Default: set by "
            "conditioning ('paper': 1.0, 'fast': 0.1)."
        },
    )
    router_profile_center: Optional[Literal["none", "train"]] = field(
        default=None,
        metadata={
            "help": "'train': the routers read profile_embeds minus the mean embedding of the training profiles "
            "(fitted before training by cuma.fit_profile_center, which the SFT, DPO and GRPO recipes call; saved with "
            "the adapter weights), which removes the part of the embedding all profiles share. 'none': the raw "
            "profile_embeds. Default: set by conditioning ('paper': 'none', 'fast': 'train' when profile_dim > 0)."
        },
    )
    router_profile_subspace: int = field(
        default=0,
        metadata={
            "help": "k > 0 (needs router_profile_center='train'): the routers read the centred profile projected onto "
            "the k leading principal directions of the training profiles' embeddings (fitted with the centre and "
            "saved with the adapter weights), so an unseen profile is read on the directions training shaped. 0: the "
            "whole embedding."
        },
    )
    share_router_qkv: bool = field(
        default=False, metadata={"help": "One router per attention block shared by q_proj/k_proj/v_proj."}
    )
    share_router_gate_up: bool = field(
        default=False, metadata={"help": "One router per MLP block shared by gate_proj/up_proj."}
    )
    balance_loss_coef: float = field(
        default=0.01, metadata={"help": "lambda_aux: weight of the Switch load-balancing term (0 disables it)."}
    )
    fast_path: Literal["off", "fused", "triton"] = field(
        default="off",
        metadata={
            "help": "How the routed delta is computed: 'off' (reference path), 'fused' (static-shape, compile-friendly "
            "functions, same results) or 'triton' (fused routing, top-k experts in Triton kernels on CUDA); see "
            "cuma.tuners.fused."
        },
    )
    fast_path_compile: bool = field(
        default=False, metadata={"help": "Run the fast path's static-shape functions through torch.compile."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (or a regex) to adapt; default q_proj and v_proj."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    init_weights: bool = field(
        default=True, metadata={"help": "B = 0 at initialisation, so the adapted model starts as the base model."}
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
    bias: Literal["none", "all", "cuma_only"] = field(
        default="none",
        metadata={"help": "Biases to train (PEFT's options): 'none', 'all', or 'cuma_only' (adapted layers' own)."},
    )
    # adapters saved before the fitted tensors became buffers kept them here; read once, moved to the model's buffers
    # (cuma.tuners.cuma.model.ProfileStats) when the adapter is built, and never written again
    profile_center: Optional[list[float]] = field(
        default=None, metadata={"help": "Read-only: an old adapter's fitted centre (now a buffer).", "fitted": True}
    )
    profile_basis: Optional[list[list[float]]] = field(
        default=None, metadata={"help": "Read-only: an old adapter's fitted basis (now a buffer).", "fitted": True}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = CUMA_PEFT_TYPE
        if self.target_modules is None:
            self.target_modules = ["q_proj", "v_proj"]
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.lora_alpha is None and isinstance(self.r, int):
            self.lora_alpha = 2 * self.r
        if self.conditioning not in CONDITIONING_PRESETS:
            raise ValueError(
                f"CuMAConfig: conditioning must be one of {list(CONDITIONING_PRESETS)}, got {self.conditioning!r}"
            )
        for name, value in CONDITIONING_PRESETS[self.conditioning].items():
            if getattr(self, name) is None:
                if name in PROFILE_PRESET_OPTIONS and self.profile_dim == 0:
                    value = CONDITIONING_PRESETS["paper"][name]  # no profile input: the profile parts do not apply
                setattr(self, name, value)
        self.validate()

    @property
    def effective_top_k(self) -> int:
        return self.num_experts if self.soft_routing else self.top_k

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5) if self.use_rslora else self.lora_alpha / self.r

    @property
    def router_profile_dim(self) -> int:
        """Width of the profile vector the router actually sees (after the optional projection)."""
        if self.profile_dim == 0:
            return 0
        if self.profile_proj_layers > 0:
            return self.profile_proj_dim or self.profile_dim
        return self.profile_dim

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"CuMAConfig: {msg}")

        need(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        need(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        need(
            self.soft_routing or 1 <= self.top_k <= self.num_experts,
            f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}",
        )
        need(self.profile_dim >= 0, f"profile_dim must be >= 0 (0 = no profile), got {self.profile_dim}")
        need(self.profile_proj_layers in (0, 1, 2), f"profile_proj_layers must be 0, 1 or 2, got {self.profile_proj_layers}")
        need(
            not (self.profile_proj_layers and self.profile_dim == 0),
            "profile_proj_layers > 0 needs profile_dim > 0",
        )
        need(self.router_layers >= 1, f"router_layers must be >= 1, got {self.router_layers}")
        need(self.router_hidden >= 1, f"router_hidden must be >= 1, got {self.router_hidden}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(0.0 <= self.router_dropout < 1.0, f"router_dropout must be in [0, 1), got {self.router_dropout}")
        need(self.balance_loss_coef >= 0, f"balance_loss_coef must be >= 0, got {self.balance_loss_coef}")
        need(
            self.router_input_norm in ("none", "balanced"),
            f"router_input_norm must be 'none' or 'balanced', got {self.router_input_norm!r}",
        )
        need(self.router_profile_gain > 0, f"router_profile_gain must be > 0, got {self.router_profile_gain}")
        need(
            self.router_token_init_scale >= 0,
            f"router_token_init_scale must be >= 0, got {self.router_token_init_scale}",
        )
        need(
            self.router_profile_center in ("none", "train"),
            f"router_profile_center must be 'none' or 'train', got {self.router_profile_center!r}",
        )
        need(
            not (self.router_profile_center == "train" and self.profile_dim == 0),
            "router_profile_center='train' needs profile_dim > 0 (a semantic-only router reads no profile)",
        )
        if self.profile_center is not None:
            center = self.profile_center
            need(
                isinstance(center, (list, tuple))
                and len(center) == self.profile_dim
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in center),
                f"profile_center must be a list of profile_dim={self.profile_dim} finite numbers, got "
                f"{type(center).__name__} of length {len(center) if hasattr(center, '__len__') else '?'}",
            )
            self.profile_center = [float(v) for v in center]
        need(
            isinstance(self.router_profile_subspace, int) and self.router_profile_subspace >= 0,
            f"router_profile_subspace must be an integer >= 0, got {self.router_profile_subspace!r}",
        )
        need(
            self.router_profile_subspace == 0 or self.router_profile_center == "train",
            "router_profile_subspace > 0 needs router_profile_center='train' (the basis is fitted on the centred "
            "training profiles)",
        )
        if self.profile_basis is not None:
            basis = self.profile_basis
            need(
                isinstance(basis, (list, tuple))
                and 0 < len(basis) <= self.router_profile_subspace
                and all(
                    isinstance(row, (list, tuple))
                    and len(row) == self.profile_dim
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in row)
                    for row in basis
                ),
                f"profile_basis must be a list of 1 to router_profile_subspace={self.router_profile_subspace} rows of "
                f"profile_dim={self.profile_dim} finite numbers",
            )
            self.profile_basis = [[float(v) for v in row] for row in basis]
        validate_fast_path(self.fast_path, self.fast_path_compile, "CuMAConfig")
        need(
            self.bias in ("none", "all", "cuma_only"), f"bias must be 'none', 'all' or 'cuma_only', got {self.bias!r}"
        )
