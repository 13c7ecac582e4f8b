"""``cuma`` and its ablations ``cuma-semantic``, ``cuma-soft``, ``cuma-minimal`` on the CuMA tuner
(:mod:`cuma.tuners.cuma`). The CuMA options live in :func:`_cuma_options`, the one table the four specs share."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from .common import _peft_from_fields
from .options import PROFILE_IN_PROMPT as _PIP
from .options import Option
from .registry import MethodSpec, register


def _build_cuma(fixed: Mapping[str, Any]):
    def build(base: nn.Module, o: dict) -> nn.Module:
        from ..tuners.cuma import CuMAConfig

        return _peft_from_fields(CuMAConfig, o, fixed, base)

    return build


def _cuma_options(drop: Sequence[str] = (), **defaults) -> dict[str, Option]:
    opts = {
        "r": Option("int", 8, "LoRA rank of each expert"),
        "lora_alpha": Option("int", None, "LoRA alpha (default 2*r: 16 at r=8, 128 at r=64)"),
        "lora_dropout": Option("float", 0.0, "dropout on the expert input"),
        "use_rslora": Option("bool", False, "scale by alpha/sqrt(r)"),
        "num_experts": Option("int", 8, "experts N per adapted projection"),
        "top_k": Option("int", 2, "experts kept per token"),
        "profile_dim": Option("int", 384, "width of profile_embeds (384: all-MiniLM-L6-v2; paper: 1024)"),
        "profile_proj_layers": Option("int", 0, "trainable projection of the profile embedding: 0, 1 or 2 layers"),
        "profile_proj_dim": Option("int", None, "output width of that projection (default profile_dim)"),
        "router_hidden": Option("int", 256, "hidden width of the router MLP"),
        "router_layers": Option("int", 2, "Linear layers in the router (1 = linear router)"),
        "router_dropout": Option("float", 0.0, "dropout inside the router"),
        "router_input_norm": Option("str", "none", "'balanced': RMS-scale the token and profile parts of the "
                                    "router input, each with a learned gain ('none': the paper's raw concat)",
                                    choices=("none", "balanced")),
        "router_profile_gain": Option("float", 1.0, "initial gain of the profile part (router_input_norm='balanced')"),
        "router_token_init_scale": Option("float", 1.0, "scale of the router's token-part weights at init "
                                          "(< 1: the first routing follows the profile)"),
        "router_profile_center": Option("str", "none", "'train': routers read the profile embedding minus the "
                                        "training profiles' mean (fitted by the training recipe, stored in the "
                                        "adapter config); 'none': the paper", choices=("none", "train")),
        "router_profile_subspace": Option("int", 0, "k > 0 (with router_profile_center='train'): routers read the "
                                          "centred profile projected onto the training profiles' k leading principal "
                                          "directions (fitted with the centre); 0: the whole embedding (the paper)"),
        "shared_A": Option("bool", False, "one A shared by all experts (paper: one A per expert)"),
        "share_router_qkv": Option("bool", False, "one router per attention block for q/k/v"),
        "share_router_gate_up": Option("bool", False, "one router per MLP block for gate/up"),
        "balance_loss_coef": Option("float", 0.01, "lambda_aux of the Switch load-balancing term"),
        "fast_path": Option("str", "off", "routed-delta implementation: 'off' (reference), 'fused' (static-shape, "
                            "same results), 'triton' (top-k experts in Triton kernels on CUDA)",
                            choices=("off", "fused", "triton")),
        "fast_path_compile": Option("bool", False, "run the fast path's static-shape functions through torch.compile"),
        "target_modules": Option("modules", ["q_proj", "v_proj"], "modules to adapt (names or regex)"),
        "init_weights": Option("bool", True, "B = 0 at init (False: random B, for tests)"),
        "layers_to_transform": Option("int_list", None, "only these layer indices"),
        "modules_to_save": Option("modules", None, "extra modules trained in full and saved with the adapter"),
        "profile_in_prompt": _PIP,
    }
    for k in drop:
        opts.pop(k)
    for k, v in defaults.items():
        opts[k] = Option(opts[k].kind, v, opts[k].help, opts[k].choices)
    return opts


CUMA_PAPER = "CuMA: Cultural Mixture of Adapters (ACL 2026, arXiv:2601.04885)"

register(
    MethodSpec(
        name="cuma",
        family="cuma",
        summary="N LoRA experts per projection, top-k per token by a router on concat(h_t, e_d)",
        paper=CUMA_PAPER,
        options=_cuma_options(),
        builder=_build_cuma({}),
        save_format="adapter",
        peft_type="CUMA",
        fixed={"soft_routing": False},
        profile_routing=True,
        deviations=(
            "top-k weights renormalised to sum to 1 (the authors' release applies a second softmax to the kept "
            "probabilities)",
            "profile_dim defaults to 384 (the embedded all-MiniLM-L6-v2 encoder); the paper's Qwen3-Embedding-0.6B "
            "is profile_dim=1024",
            "experts computed densely with packed parameters instead of a per-expert loop (same result)",
        ),
    )
)
register(
    MethodSpec(
        name="cuma-semantic",
        family="cuma",
        summary="CuMA ablation: router sees only h_t (profile_dim=0)",
        paper=CUMA_PAPER + ", ablation",
        options=_cuma_options(drop=("profile_dim", "profile_proj_layers", "profile_proj_dim", "router_profile_gain",
                                    "router_profile_center", "router_profile_subspace")),
        builder=_build_cuma({"profile_dim": 0}),
        save_format="adapter",
        peft_type="CUMA",
        fixed={"profile_dim": 0, "profile_proj_layers": 0, "profile_proj_dim": None},
    )
)
register(
    MethodSpec(
        name="cuma-soft",
        family="cuma",
        summary="CuMA ablation: dense soft routing (softmax over all experts, no top-k)",
        paper=CUMA_PAPER + ", ablation",
        options=_cuma_options(drop=("top_k",), balance_loss_coef=0.0),
        builder=_build_cuma({"soft_routing": True}),
        save_format="adapter",
        peft_type="CUMA",
        profile_routing=True,
        fixed={"soft_routing": True, "top_k": "all experts"},
        deviations=(
            "balance_loss_coef defaults to 0: with dense gates the Switch term is the constant 1 (no gradient)",
        ),
    )
)
register(
    MethodSpec(
        name="cuma-minimal",
        family="cuma",
        summary="CuMA ablation: no profile in the router and no balance loss",
        paper=CUMA_PAPER + ", ablation",
        options=_cuma_options(drop=("profile_dim", "profile_proj_layers", "profile_proj_dim", "balance_loss_coef",
                                    "router_profile_gain", "router_profile_center", "router_profile_subspace")),
        builder=_build_cuma({"profile_dim": 0, "balance_loss_coef": 0.0}),
        save_format="adapter",
        peft_type="CUMA",
        fixed={"profile_dim": 0, "profile_proj_layers": 0, "profile_proj_dim": None, "balance_loss_coef": 0.0},
    )
)
