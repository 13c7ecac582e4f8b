"""``cuma`` and its ablations ``cuma-semantic``, ``cuma-soft``, ``cuma-minimal`` on the CuMA tuner
(:mod:`cuma.tuners.cuma`). Their options are :class:`~cuma.tuners.cuma.CuMAConfig`'s fields (names, types, defaults,
help); each ablation names only what it fixes (and so drops from its options) or defaults differently."""

from __future__ import annotations

from torch import nn

from ..tuners.cuma import CuMAConfig
from .options import PROFILE_IN_PROMPT as _PIP
from .options import Option, options_from_config
from .registry import MethodSpec, get_spec, peft_from_config, register

def _build(name: str):
    def build(base: nn.Module, o: dict) -> nn.Module:
        return peft_from_config(get_spec(name), o, base)

    return build


def _cuma_options(fixed: dict, drop: tuple = (), **defaults) -> dict[str, Option]:
    """Every CuMAConfig field is an option of a CuMA method, less the ones the method fixes (or that mean nothing in
    it: ``drop``)."""
    exclude = (*fixed, *drop)
    return {**options_from_config(CuMAConfig, exclude=exclude, defaults=defaults), "profile_in_prompt": _PIP}


CUMA_PAPER = "CuMA: Cultural Mixture of Adapters (ACL 2026, arXiv:2601.04885)"

# what each method fixes: these CuMAConfig fields are not its options. Semantic-only routing has no profile input, so
# of conditioning="fast" only the profile-free parts (balanced input, token init) apply to it.
_NO_PROFILE = {"profile_dim": 0, "profile_proj_layers": 0, "profile_proj_dim": None, "router_profile_gain": 1.0,
               "router_profile_center": "none", "router_profile_subspace": 0}
_FIXED: dict[str, dict] = {
    "cuma": {"soft_routing": False},
    "cuma-semantic": {"soft_routing": False, **_NO_PROFILE},
    "cuma-soft": {"soft_routing": True},
    "cuma-minimal": {"soft_routing": False, **_NO_PROFILE, "balance_loss_coef": 0.0},
}

register(
    MethodSpec(
        name="cuma",
        family="cuma",
        summary="N LoRA experts per projection, top-k per token by a router on concat(h_t, e_d)",
        paper=CUMA_PAPER,
        options=_cuma_options(_FIXED["cuma"]),
        builder=_build("cuma"),
        save_format="adapter",
        peft_type="CUMA",
        config_cls=CuMAConfig,
        fixed=_FIXED["cuma"],
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
        options=_cuma_options(_FIXED["cuma-semantic"]),
        builder=_build("cuma-semantic"),
        save_format="adapter",
        peft_type="CUMA",
        config_cls=CuMAConfig,
        fixed=_FIXED["cuma-semantic"],
    )
)
register(
    MethodSpec(
        name="cuma-soft",
        family="cuma",
        summary="CuMA ablation: dense soft routing (softmax over all experts, no top-k)",
        paper=CUMA_PAPER + ", ablation",
        options=_cuma_options(_FIXED["cuma-soft"], drop=("top_k",), balance_loss_coef=0.0),
        builder=_build("cuma-soft"),
        save_format="adapter",
        peft_type="CUMA",
        config_cls=CuMAConfig,
        profile_routing=True,
        fixed=_FIXED["cuma-soft"],
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
        options=_cuma_options(_FIXED["cuma-minimal"]),
        builder=_build("cuma-minimal"),
        save_format="adapter",
        peft_type="CUMA",
        config_cls=CuMAConfig,
        fixed=_FIXED["cuma-minimal"],
    )
)
