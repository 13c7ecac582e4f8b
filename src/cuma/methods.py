"""Every method the paper compares, buildable by name: ``build(name, base_model, **options) -> BuiltMethod``.

The registry holds one :class:`MethodSpec` per name. A spec declares the options it accepts (with types and defaults),
the paper it follows, how its result is saved (PEFT adapter, full model, or nothing for prompting baselines), whether
it routes on ``profile_embeds`` and whether gradient checkpointing may be used with it. ``build`` validates the options
(unknown or inapplicable options are errors, never silently ignored), checks that the target modules exist in the
base model, and returns the ready model plus everything a run needs to record.

``build`` takes ownership of ``base_model``: PEFT injects its layers in place and full fine-tuning unfreezes it.

Methods (``list_methods()``; ``docs/methods.md`` has the table with defaults, papers and deviations):

- ``lora``, ``dora``: PEFT LoRA / DoRA (paper baseline: r=64, alpha=128, q_proj+v_proj).
- ``prefix``: P-Tuning v2 = PEFT ``PrefixTuningConfig(prefix_projection=True)``, 32 virtual tokens.
- ``fft``: full fine-tuning, every base weight trainable, saved as a full model.
- ``hydralora``, ``mixlora``: this project's PEFT tuners (``cuma.tuners.hydralora`` / ``cuma.tuners.mixlora``).
- ``cuma`` and its ablations ``cuma-semantic`` (no profile in the router), ``cuma-soft`` (dense soft routing),
  ``cuma-minimal`` (no profile in the router, no balance loss).
- prompting baselines without training: ``vanilla``, ``persona`` (profile in the system prompt), ``fewshot`` (k shots
  from training records of the same country when there are enough, else random; see :func:`select_fewshot`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

METHOD_FILE = "cuma_method.json"
# prefix only: the trainable prompt-encoder state (embedding + MLP) that PEFT's adapter file does not keep
PREFIX_STATE_FILE = "prefix_encoder.safetensors"
# what trainer_callback writes into each trainer checkpoint of a prefix run (Trainer resumes from it)
TRAINER_STATE_FILE = "model.safetensors"

# --------------------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class Option:
    """One option a method accepts. ``kind`` is one of int, float, bool, str, modules (list of module names or a
    regex), int_list; ``default`` is used when the option is not given (``None`` = the library's own default)."""

    kind: str
    default: Any = None
    help: str = ""
    choices: Optional[tuple] = None


_KINDS = ("int", "float", "bool", "str", "modules", "int_list")
_REGEX_CHARS = set("*+?[](){}|^$\\")


def _coerce(method: str, name: str, opt: Option, value: Any) -> Any:
    def bad(expected: str):
        return ValueError(
            f"option {name!r} of method {method!r} must be {expected}, got {type(value).__name__} {value!r}"
        )

    if value is None:
        return None
    kind = opt.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
                value = int(value)
            else:
                raise bad("an integer")
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        elif not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == "modules":
        value = _as_modules(value)
        if value is None:
            raise bad("a list of module names, a comma-separated string of names, or a regex string")
    elif kind == "int_list":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        elif isinstance(value, str):
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise bad("a list of integers") from None
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = list(value)
        else:
            raise bad("a list of integers")
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"option {name!r} of method {method!r} must be one of {list(opt.choices)}, got {value!r}")
    return value


def _as_modules(value: Any):
    """list of names | 'a,b' | 'all-linear' | a regex string -> list[str] or str (regex / 'all-linear')."""
    if isinstance(value, str):
        text = value.strip()
        if text == "all-linear" or any(c in _REGEX_CHARS for c in text):
            return text
        names = [v.strip() for v in text.split(",") if v.strip()]
        return names or None
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return None


# --------------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method."""

    name: str
    family: str  # "peft" | "prompt-learning" | "full" | "mixture" | "cuma" | "prompting"
    summary: str
    paper: str  # citation of the paper the method follows
    options: Mapping[str, Option]
    builder: Optional[Callable[[nn.Module, dict], nn.Module]]
    save_format: str  # "adapter" | "full" | "none"
    profile_routing: bool = False  # routes on profile_embeds (when its profile_dim option > 0)
    gradient_checkpointing_allowed: bool = True
    prompting_only: bool = False
    prompt_mode: Optional[str] = None  # prompting baselines: "vanilla" | "persona" | "fewshot"
    fixed: Mapping[str, Any] = field(default_factory=dict)  # settings an ablation pins (not options)
    deviations: tuple[str, ...] = ()

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    @property
    def trainable(self) -> bool:
        return not self.prompting_only

    @property
    def supports_disable(self) -> bool:
        """Whether ``disable_adapter`` can give the base model back (PEFT adapters only)."""
        return self.save_format == "adapter"


@dataclass
class BuiltMethod:
    """A method built on a base model, plus what a run records about it."""

    model: nn.Module
    spec: MethodSpec
    options: dict[str, Any]  # resolved: defaults filled in
    uses_profile: bool  # forward/generate need profile_embeds (B, profile_dim)
    profile_in_prompt: bool  # the data pipeline puts the profile sentence in the (system) prompt
    gradient_checkpointing_allowed: bool
    trainable_parameters: int
    total_parameters: int
    base_parameters: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def prompt_mode(self) -> Optional[str]:
        return self.spec.prompt_mode

    @property
    def profile_dim(self) -> int:
        return int(self.options.get("profile_dim") or 0) if self.uses_profile else 0

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of the base model's parameters."""
        return self.trainable_parameters / self.base_parameters if self.base_parameters else 0.0

    def record(self) -> dict[str, Any]:
        """JSON-serialisable summary that runs store with their outputs (and :func:`save` writes)."""
        return {
            "method": self.spec.name,
            "family": self.spec.family,
            "paper": self.spec.paper,
            "options": _jsonable(self.options),
            "uses_profile": self.uses_profile,
            "profile_dim": self.profile_dim,
            "profile_in_prompt": self.profile_in_prompt,
            "prompt_mode": self.spec.prompt_mode,
            "save_format": self.spec.save_format,
            "gradient_checkpointing_allowed": self.gradient_checkpointing_allowed,
            "trainable_parameters": self.trainable_parameters,
            "base_parameters": self.base_parameters,
            "total_parameters": self.total_parameters,
        }

    def training_overrides(self) -> dict[str, Any]:
        """``TrainingArguments`` values this method forces; merge them last (``prefix``: checkpointing off, under
        both of transformers' names, ``activation_checkpointing`` and its deprecated alias
        ``gradient_checkpointing``, so neither wins over the other)."""
        if self.gradient_checkpointing_allowed:
            return {}
        return {name: False for name in _checkpointing_arg_names()}

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        """Context in which the model computes the base model's outputs. PEFT adapters only; prompting baselines
        already are the base model (a no-op); full fine-tuning has no adapter to disable (ValueError)."""
        if self.spec.prompting_only:
            return contextlib.nullcontext()
        if not self.spec.supports_disable:
            raise ValueError(
                f"method {self.spec.name!r} has no adapter to disable: it trains the base weights themselves"
            )
        return self.model.disable_adapter()


def _checkpointing_arg_names() -> tuple[str, ...]:
    import dataclasses

    try:
        from transformers import TrainingArguments
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ("gradient_checkpointing",)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    names = tuple(n for n in ("activation_checkpointing", "gradient_checkpointing") if n in fields)
    return names or ("gradient_checkpointing",)


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    for name, opt in spec.options.items():
        if opt.kind not in _KINDS:
            raise ValueError(f"method {spec.name!r}: option {name!r} has unknown kind {opt.kind!r}")
    _REGISTRY[spec.name] = spec
    return spec


def list_methods() -> list[str]:
    """Names of every registered method, in registry order."""
    return list(_REGISTRY)


def get_spec(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}") from None


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``options`` against the method's declared options and fill in the defaults."""
    spec = get_spec(name)
    unknown = [k for k in options if k not in spec.options]
    if unknown:
        valid = ", ".join(spec.options) or "(none)"
        pinned = [k for k in unknown if k in spec.fixed]
        why = ""
        if pinned:
            why = " (" + "; ".join(f"{k} is fixed to {spec.fixed[k]!r} by this method" for k in pinned) + ")"
        raise ValueError(
            f"option {', '.join(repr(k) for k in unknown)} does not apply to method {name!r}{why}; "
            f"valid options for {name!r}: {valid}"
        )
    resolved = {}
    for key, opt in spec.options.items():
        value = options.get(key, opt.default)
        resolved[key] = _coerce(name, key, opt, value)
    # LoRA-style alpha follows the paper's alpha = 2r unless given
    if "lora_alpha" in resolved and resolved["lora_alpha"] is None and "r" in resolved:
        resolved["lora_alpha"] = 2 * resolved["r"]
    return resolved


# --------------------------------------------------------------------------------------------------------------
# target modules


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of the ``nn.Linear`` modules of ``model`` (``q_proj``, ``v_proj``, ``lm_head``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def check_target_modules(model: nn.Module, targets, method: str = "") -> None:
    """Raise ValueError naming each target module that matches nothing in ``model`` and listing the Linear module
    names that exist. ``targets``: list of names (PEFT semantics: a full name or a ``.``-suffix), a regex string
    (full match on module names) or ``"all-linear"``."""
    if targets is None or targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    where = f" (method {method!r})" if method else ""
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise ValueError(
                f"target_modules regex {targets!r}{where} matches no module of {type(model).__name__}; "
                f"Linear modules that exist: {', '.join(linear_module_names(model))}"
            )
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"target module {', '.join(repr(t) for t in missing)}{where} not found in {type(model).__name__}; "
            f"Linear modules that exist: {', '.join(linear_module_names(model))}"
        )


# --------------------------------------------------------------------------------------------------------------
# builders


def gradient_checkpointing_on(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` has gradient (activation) checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _disable_gradient_checkpointing(model: nn.Module) -> None:
    if not gradient_checkpointing_on(model):
        return
    for attr in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        fn = getattr(model, attr, None)
        if callable(fn):
            fn()
            break
    for m in model.modules():  # anything the model-level switch did not reach
        if getattr(m, "gradient_checkpointing", False) is True:
            m.gradient_checkpointing = False


def _lora_builder(use_dora: bool):
    def build_lora(base: nn.Module, o: dict) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=o["r"],
            lora_alpha=o["lora_alpha"],
            lora_dropout=o["lora_dropout"],
            target_modules=o["target_modules"],
            use_rslora=o["use_rslora"],
            use_dora=use_dora,
            init_lora_weights=o["init_weights"],
            layers_to_transform=o["layers_to_transform"],
            modules_to_save=o["modules_to_save"],
            bias="none",
        )
        return get_peft_model(base, config)

    return build_lora


def _build_prefix(base: nn.Module, o: dict) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    # PEFT refuses prefix tuning on a model with gradient checkpointing on (and it would break: the prefix is a
    # past_key_values cache that checkpointed recomputation does not see), so it is forced off here
    _disable_gradient_checkpointing(base)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=o["num_virtual_tokens"],
        prefix_projection=True,
        encoder_hidden_size=o["encoder_hidden_size"],
    )
    return get_peft_model(base, config)


def _build_fft(base: nn.Module, o: dict) -> nn.Module:
    for p in base.parameters():
        p.requires_grad_(True)
    return base


def _build_prompting(base: nn.Module, o: dict) -> nn.Module:
    for p in base.parameters():
        p.requires_grad_(False)
    return base.eval()


def _config_fields(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _peft_from_fields(config_cls, o: dict, fixed: Mapping[str, Any], base: nn.Module) -> nn.Module:
    """Build a PEFT model from a config class whose fields are named like the options."""
    from peft import get_peft_model

    known = _config_fields(config_cls)
    kwargs = {k: v for k, v in o.items() if k in known and v is not None}
    kwargs.update({k: v for k, v in fixed.items() if k in known})
    if "task_type" in known and "task_type" not in kwargs:
        kwargs["task_type"] = "CAUSAL_LM"
    return get_peft_model(base, config_cls(**kwargs))


def _build_cuma(fixed: Mapping[str, Any]):
    def build(base: nn.Module, o: dict) -> nn.Module:
        from .tuners.cuma import CuMAConfig

        return _peft_from_fields(CuMAConfig, o, fixed, base)

    return build


def _build_hydralora(base: nn.Module, o: dict) -> nn.Module:
    try:
        from .tuners.hydralora import HydraLoRAConfig
    except ImportError as err:  # pragma: no cover - only while the tuner is missing
        raise ImportError(f"the hydralora tuner is not available: {err}") from err
    import cuma  # noqa: F401  (registers the tuners with PEFT)

    return _peft_from_fields(HydraLoRAConfig, o, {}, base)


def _build_mixlora(base: nn.Module, o: dict) -> nn.Module:
    try:
        from .tuners.mixlora import MixLoRAConfig
    except ImportError as err:  # pragma: no cover - only while the tuner is missing
        raise ImportError(f"the mixlora tuner is not available: {err}") from err
    import cuma  # noqa: F401

    return _peft_from_fields(MixLoRAConfig, o, {}, base)


# --------------------------------------------------------------------------------------------------------------
# the methods

_PIP = Option("bool", True, "put the profile sentence in the (system) prompt; a data option recorded with the run")

_LORA_OPTIONS = {
    "r": Option("int", 64, "LoRA rank"),
    "lora_alpha": Option("int", None, "LoRA alpha (default 2*r: 128 at r=64)"),
    "lora_dropout": Option("float", 0.05, "dropout on the LoRA input"),
    "target_modules": Option("modules", ["q_proj", "v_proj"], "modules to adapt (names, regex or 'all-linear')"),
    "use_rslora": Option("bool", False, "scale by alpha/sqrt(r)"),
    "init_weights": Option("bool", True, "B = 0 at init (False: random B, for tests)"),
    "layers_to_transform": Option("int_list", None, "only these layer indices"),
    "modules_to_save": Option("modules", None, "extra modules trained in full and saved with the adapter"),
    "profile_in_prompt": _PIP,
}


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
        "shared_A": Option("bool", False, "one A shared by all experts (paper: one A per expert)"),
        "share_router_qkv": Option("bool", False, "one router per attention block for q/k/v"),
        "share_router_gate_up": Option("bool", False, "one router per MLP block for gate/up"),
        "balance_loss_coef": Option("float", 0.01, "lambda_aux of the Switch load-balancing term"),
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
        options=_cuma_options(drop=("profile_dim", "profile_proj_layers", "profile_proj_dim")),
        builder=_build_cuma({"profile_dim": 0}),
        save_format="adapter",
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
        options=_cuma_options(drop=("profile_dim", "profile_proj_layers", "profile_proj_dim", "balance_loss_coef")),
        builder=_build_cuma({"profile_dim": 0, "balance_loss_coef": 0.0}),
        save_format="adapter",
        fixed={"profile_dim": 0, "profile_proj_layers": 0, "profile_proj_dim": None, "balance_loss_coef": 0.0},
    )
)
register(
    MethodSpec(
        name="lora",
        family="peft",
        summary="PEFT LoRA",
        paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022, arXiv:2106.09685)",
        options=_LORA_OPTIONS,
        builder=_lora_builder(use_dora=False),
        save_format="adapter",
    )
)
register(
    MethodSpec(
        name="dora",
        family="peft",
        summary="PEFT DoRA (LoRA with a trained magnitude vector)",
        paper="Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation (ICML 2024, arXiv:2402.09353)",
        options=_LORA_OPTIONS,
        builder=_lora_builder(use_dora=True),
        save_format="adapter",
    )
)
register(
    MethodSpec(
        name="prefix",
        family="prompt-learning",
        summary="P-Tuning v2: trained per-layer key/value prefixes through a reparameterising MLP",
        paper="Liu et al., P-Tuning v2 (ACL 2022, arXiv:2110.07602)",
        options={
            "num_virtual_tokens": Option("int", 32, "prefix length"),
            "encoder_hidden_size": Option("int", None, "hidden width of the prefix MLP (default: model hidden size)"),
            "profile_in_prompt": _PIP,
        },
        builder=_build_prefix,
        save_format="adapter",
        gradient_checkpointing_allowed=False,
        deviations=(
            "implemented as PEFT prefix tuning with prefix_projection=True (the reparameterised variant); the MLP "
            "hidden width is PEFT's default (the model hidden size) where the P-Tuning v2 code used 512",
            "gradient checkpointing forced off (PEFT refuses it for prefix tuning)",
            "no trainable reload: PEFT cannot load a prompt-learning adapter as trainable; resume with "
            "build() + load_weights()",
        ),
    )
)
register(
    MethodSpec(
        name="fft",
        family="full",
        summary="full fine-tuning: every base weight trainable, saved as a full model",
        paper="full fine-tuning baseline of the CuMA paper",
        options={"profile_in_prompt": _PIP},
        builder=_build_fft,
        save_format="full",
    )
)
register(
    MethodSpec(
        name="hydralora",
        family="mixture",
        summary="shared A, N B heads, router on the layer input, dense softmax gates, no aux loss",
        paper="Tian et al., HydraLoRA: An Asymmetric LoRA Architecture (NeurIPS 2024, arXiv:2404.19245)",
        options={
            "r": Option("int", 64, "rank of the shared A / each B head"),
            "lora_alpha": Option("int", None, "LoRA alpha (default 2*r)"),
            "lora_dropout": Option("float", 0.05, "dropout on the LoRA input"),
            "num_experts": Option("int", 8, "number of B heads"),
            "target_modules": Option(
                "modules", ["q_proj", "v_proj"], "modules to adapt (the CuMA paper's comparison: q_proj, v_proj)"
            ),
            "use_rslora": Option("bool", False, "scale by alpha/sqrt(r)"),
            "router_hidden": Option(
                "int", 0, "router hidden width: 0 = linear bias-free router (HydraLoRA); 256 = the CuMA paper's count"
            ),
            "router_bias": Option("bool", None, "router biases (default: none for the linear router, yes for the MLP)"),
            "init_weights": Option("bool", True, "B = 0 at init (False: random B, for tests)"),
            "layers_to_transform": Option("int_list", None, "only these layer indices"),
            "modules_to_save": Option("modules", None, "extra modules trained in full and saved with the adapter"),
            "profile_in_prompt": _PIP,
        },
        builder=_build_hydralora,
        save_format="adapter",
        deviations=(
            "the CuMA paper's 2.31% for HydraLoRA r=64 counts a 256-wide MLP router per projection; the faithful "
            "default is HydraLoRA's linear bias-free router (router_hidden=0); pass router_hidden=256 to match "
            "the table",
            "adapts q_proj and v_proj by default, like every adapter in the CuMA paper's comparison (HydraLoRA's own "
            "experiments and the tuner's config default adapt the FFN gate/up/down projections)",
            "r=64 (alpha 128) by default, the CuMA paper's HydraLoRA row (the tuner's own default is r=8)",
        ),
    )
)
register(
    MethodSpec(
        name="mixlora",
        family="mixture",
        summary="per-FFN-block router (top-2 of 8), experts = frozen FFN + own LoRA, plain LoRA on attention",
        paper="Li et al., MixLoRA: Enhancing LLMs Fine-Tuning with LoRA-based Mixture of Experts (arXiv:2404.15159)",
        options={
            "r": Option("int", 8, "LoRA rank of the attention LoRA (and of the experts unless expert_r)"),
            "lora_alpha": Option("int", None, "LoRA alpha (default 2*r)"),
            "lora_dropout": Option("float", 0.05, "dropout on the LoRA inputs"),
            "use_rslora": Option("bool", False, "scale by alpha/sqrt(r)"),
            "expert_r": Option("int", None, "rank of the expert LoRAs (default r)"),
            "expert_alpha": Option("int", None, "alpha of the expert LoRAs (default lora_alpha)"),
            "expert_dropout": Option("float", None, "dropout of the expert LoRAs (default lora_dropout)"),
            "num_experts": Option("int", 8, "FFN experts per block"),
            "top_k": Option("int", 2, "experts kept per token"),
            "router_aux_loss_coef": Option("float", 0.001, "weight of the Mixtral load-balancing loss"),
            "router_init_range": Option("float", 0.02, "std of the router initialisation"),
            "target_modules": Option(
                "modules", ["q_proj", "k_proj", "v_proj", "o_proj"], "attention projections given a plain LoRA"
            ),
            "ffn_modules": Option("modules", ["mlp"], "FFN blocks turned into mixtures of experts"),
            "init_weights": Option("bool", True, "LoRA B = 0 at init (False: random B, for tests)"),
            "layers_to_transform": Option("int_list", None, "only these layer indices"),
            "modules_to_save": Option("modules", None, "extra modules trained in full and saved with the adapter"),
            "profile_in_prompt": _PIP,
        },
        builder=_build_mixlora,
        save_format="adapter",
    )
)
register(
    MethodSpec(
        name="vanilla",
        family="prompting",
        summary="the untouched base model, question only",
        paper="prompting baseline",
        options={},
        builder=_build_prompting,
        save_format="none",
        prompting_only=True,
        prompt_mode="vanilla",
        fixed={"profile_in_prompt": False},
    )
)
register(
    MethodSpec(
        name="persona",
        family="prompting",
        summary="the untouched base model with the profile sentence in the system prompt",
        paper="persona-prompting baseline",
        options={"profile_in_prompt": Option("bool", True, "always on for persona", choices=(True,))},
        builder=_build_prompting,
        save_format="none",
        prompting_only=True,
        prompt_mode="persona",
    )
)
register(
    MethodSpec(
        name="fewshot",
        family="prompting",
        summary="the untouched base model with k answered examples from training records of the same country",
        paper="few-shot in-context baseline",
        options={
            "k": Option("int", 5, "number of shots"),
            "seed": Option("int", 0, "seed of the shot selection"),
            "key": Option("str", "country", "record field that must match for same-group shots"),
            "profile_in_prompt": Option("bool", False, "also put the profile sentence in the system prompt"),
        },
        builder=_build_prompting,
        save_format="none",
        prompting_only=True,
        prompt_mode="fewshot",
        deviations=(
            "shots fall back to random training records (seeded) when the target's country has fewer than k",
        ),
    )
)


# --------------------------------------------------------------------------------------------------------------
# build / save / load


def _count(model: nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` property on every model it wraps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _uses_profile(spec: MethodSpec, options: dict) -> bool:
    return spec.profile_routing and int(options.get("profile_dim") or 0) > 0


def build(name: str, base_model: nn.Module, **options) -> BuiltMethod:
    """Build method ``name`` on ``base_model`` (which it takes ownership of) with ``options``.

    Raises ValueError for an unknown method (listing the valid ones), an option the method does not accept (listing
    the valid ones), an option of the wrong type, or a target module that is not in the model (listing the Linear
    modules that exist).
    """
    spec = get_spec(name)
    resolved = resolve_options(name, options)
    if not isinstance(base_model, nn.Module):
        raise ValueError(f"base_model must be a torch.nn.Module (a transformers model), got {type(base_model).__name__}")
    for key in ("target_modules", "modules_to_save", "ffn_modules"):
        if resolved.get(key):
            check_target_modules(base_model, resolved[key], name)
    _, base_params = _count(base_model)
    with _quiet_peft():
        model = spec.builder(base_model, resolved)
    if not spec.gradient_checkpointing_allowed:
        _disable_gradient_checkpointing(model)
    trainable, total = _count(model)
    pip = bool(resolved.get("profile_in_prompt", spec.fixed.get("profile_in_prompt", False)))
    return BuiltMethod(
        model=model,
        spec=spec,
        options=resolved,
        uses_profile=_uses_profile(spec, resolved),
        profile_in_prompt=pip,
        gradient_checkpointing_allowed=spec.gradient_checkpointing_allowed,
        trainable_parameters=trainable,
        total_parameters=total,
        base_parameters=base_params,
    )


def save(built: BuiltMethod, out_dir: str | os.PathLike) -> str:
    """Save ``built`` to ``out_dir``: the PEFT adapter (``save_pretrained``), or the full model for ``fft``, or only
    the method record for prompting baselines. ``cuma_method.json`` records the method and its options."""
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    fmt = built.spec.save_format
    if fmt in ("adapter", "full"):
        built.model.save_pretrained(out)
    if built.spec.name == "prefix":
        # PEFT's adapter file holds only the computed prefix (the reparameterising MLP is dropped), enough for
        # inference but not to train on; keep the trainable state too so that load_weights can resume from it
        save_trainable_state(built, out, PREFIX_STATE_FILE)
    with open(os.path.join(out, METHOD_FILE), "w") as fh:
        json.dump(built.record(), fh, indent=2, sort_keys=True)
    return out


def read_record(path: str | os.PathLike) -> Optional[dict]:
    """The method record ``save`` wrote in ``path`` (None when there is none)."""
    f = os.path.join(os.fspath(path), METHOD_FILE)
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        return json.load(fh)


PREFIX_TRAINABLE_RELOAD_ERROR = (
    "a 'prefix' (P-Tuning v2) adapter cannot be reloaded as trainable: PEFT refuses to load a prompt-learning adapter "
    "with is_trainable=True, and its adapter file keeps only the computed prefix, not the reparameterising MLP that "
    "training updates. Resume training from a trainer checkpoint instead: train with "
    "callbacks=[cuma.methods.trainer_callback(built)] and call trainer.train(resume_from_checkpoint=...), or build the "
    "method fresh with cuma.methods.build('prefix', base_model, **options) and copy the trainable state in with "
    "cuma.methods.load_weights(built, path) (path = a cuma.methods.save() folder or such a trainer checkpoint). "
    "Loading for inference (is_trainable=False) works."
)


def load(
    name: Optional[str],
    base_model: Optional[nn.Module],
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
) -> BuiltMethod:
    """Reload what :func:`save` wrote. ``name`` may be None to take it from the saved record; ``base_model`` must be
    the same base the method was built on (ignored for ``fft``, which reloads the full model from ``path``)."""
    path = os.fspath(path)
    rec = read_record(path) or {}
    if name is None:
        if not rec:
            raise ValueError(f"{path} has no {METHOD_FILE}; pass the method name")
        name = rec["method"]
    spec = get_spec(name)
    if rec and rec.get("method") != name:
        raise ValueError(f"{path} holds method {rec.get('method')!r}, not {name!r}")
    options = dict(rec.get("options") or spec.defaults)
    options = {k: v for k, v in options.items() if k in spec.options}
    resolved = resolve_options(name, options)

    if spec.save_format == "adapter":
        if name == "prefix" and is_trainable:
            raise ValueError(PREFIX_TRAINABLE_RELOAD_ERROR)
        if base_model is None:
            raise ValueError(f"method {name!r} saves an adapter: pass the base model it was trained on")
        import cuma  # noqa: F401  (registers this project's tuners with PEFT)
        from peft import PeftModel

        if name == "prefix":
            _disable_gradient_checkpointing(base_model)
        _, base_params = _count(base_model)
        with _quiet_peft():
            model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
    elif spec.save_format == "full":
        from transformers import AutoModelForCausalLM

        kwargs = {}
        if base_model is not None and hasattr(base_model, "dtype"):
            kwargs["dtype"] = base_model.dtype
        cls = type(base_model) if base_model is not None and hasattr(type(base_model), "from_pretrained") else AutoModelForCausalLM
        model = cls.from_pretrained(path, **kwargs)
        for p in model.parameters():
            p.requires_grad_(is_trainable)
        base_params = _count(model)[1]
    else:
        if base_model is None:
            raise ValueError(f"method {name!r} is a prompting baseline: pass the base model")
        _, base_params = _count(base_model)
        model = _build_prompting(base_model, resolved)
    if not is_trainable:
        model.eval()
        for p in model.parameters():  # PEFT leaves a reloaded prompt encoder trainable
            p.requires_grad_(False)
    trainable, total = _count(model)
    return BuiltMethod(
        model=model,
        spec=spec,
        options=resolved,
        uses_profile=_uses_profile(spec, resolved),
        profile_in_prompt=bool(resolved.get("profile_in_prompt", spec.fixed.get("profile_in_prompt", False))),
        gradient_checkpointing_allowed=spec.gradient_checkpointing_allowed,
        trainable_parameters=trainable,
        total_parameters=total,
        base_parameters=base_params,
    )


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable_state(built: BuiltMethod, out_dir: str | os.PathLike, filename: str = PREFIX_STATE_FILE) -> str:
    """Write the trainable parameters of ``built.model`` (keys as in ``model.named_parameters()``) to
    ``out_dir/filename`` as safetensors."""
    from safetensors.torch import save_file

    path = os.path.join(os.fspath(out_dir), filename)
    save_file(_trainable_state(built.model), path, metadata={"format": "pt", "cuma_method": built.spec.name})
    return path


def load_weights(built: BuiltMethod, path: str | os.PathLike) -> BuiltMethod:
    """Copy saved weights into an already built, trainable model, e.g. to resume ``prefix`` training.

    ``path``: a :func:`save` folder, or a trainer checkpoint (for ``prefix`` one written with
    :func:`trainer_callback`; for other adapters any PEFT checkpoint)."""
    path = os.fspath(path)
    if built.spec.save_format != "adapter":
        raise ValueError(f"load_weights is for adapter methods; {built.spec.name!r} saves as {built.spec.save_format!r}")
    if built.spec.name == "prefix":
        from safetensors.torch import load_file

        for fname in (PREFIX_STATE_FILE, TRAINER_STATE_FILE):
            f = os.path.join(path, fname)
            if os.path.isfile(f):
                break
        else:
            raise FileNotFoundError(
                f"{path} holds no trainable prefix state ({PREFIX_STATE_FILE} from cuma.methods.save, or "
                f"{TRAINER_STATE_FILE} from cuma.methods.trainer_callback): PEFT's adapter file alone cannot be "
                "trained on"
            )
        state = load_file(f)
        expected = {n: tuple(p.shape) for n, p in built.model.named_parameters() if p.requires_grad}
        wrong = sorted(n for n in set(state) & set(expected) if tuple(state[n].shape) != expected[n])
        if set(state) != set(expected) or wrong:
            raise ValueError(
                f"{f} does not fit this prefix model: missing {sorted(set(expected) - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - set(expected))[:5]}, other shape {wrong[:5]} "
                "(built with different options?)"
            )
        built.model.load_state_dict(state, strict=False)
        return built
    import cuma  # noqa: F401  (registers this project's tuners with PEFT)
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(path, device=str(next(built.model.parameters()).device))
    result = set_peft_model_state_dict(built.model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{path}: weights do not fit method {built.spec.name!r}: unexpected keys {unexpected[:5]}")
    return built


def trainer_callback(built: BuiltMethod):
    """A ``transformers.TrainerCallback`` that makes trainer checkpoints of ``prefix`` runs resumable, or None for
    every other method (PEFT's own checkpoints already resume).

    It writes the trainable prompt-encoder state as ``model.safetensors`` into each ``checkpoint-N`` folder. On
    ``train(resume_from_checkpoint=...)`` Trainer loads a checkpoint's ``model.safetensors`` with
    ``load_state_dict(..., strict=False)`` before it would try PEFT's ``load_adapter`` (which cannot load a
    prompt-learning adapter as trainable). Trainer then logs the base-model keys as missing: they are the frozen
    weights already in place."""
    if built.spec.name != "prefix":
        return None
    from transformers import TrainerCallback

    class PrefixCheckpointCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if os.path.isdir(ckpt):
                    save_trainable_state(built, ckpt, TRAINER_STATE_FILE)
            return control

    return PrefixCheckpointCallback()


# --------------------------------------------------------------------------------------------------------------
# few-shot selection


def _field(record: Mapping[str, Any], key: str) -> Any:
    cur: Any = record
    for part in key.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            cur = None
            break
    if cur is None and "." not in key:
        prof = record.get("profile") if isinstance(record, Mapping) else None
        if isinstance(prof, Mapping):
            cur = prof.get(key)
    return cur


def _stable_seed(seed: int, target: Mapping[str, Any]) -> int:
    text = json.dumps(target, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def select_fewshot(
    records: Sequence[Mapping[str, Any]],
    target_record: Mapping[str, Any],
    k: int,
    seed: int = 0,
    key: str = "country",
) -> list[Mapping[str, Any]]:
    """Pick ``k`` shots for ``target_record`` from training ``records``.

    Same-group shots (records whose ``key`` equals the target's; ``key`` may be dotted, and a plain key is also looked
    up under ``record["profile"]``) when at least ``k`` of them exist, else ``k`` records drawn at random from all of
    them. The target itself (or an identical copy) is never a shot. Deterministic for a given (seed, target): the
    random generator is seeded from ``seed`` and the target's content, so different targets get different shots.
    Returns fewer than ``k`` only when fewer records are available.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return []
    pool = [r for r in records if r is not target_record and r != target_record]
    rng = random.Random(_stable_seed(seed, target_record))
    group = _field(target_record, key)
    if group is not None:
        same = [r for r in pool if _field(r, key) == group]
        if len(same) >= k:
            return rng.sample(same, k)
    return rng.sample(pool, min(k, len(pool)))


__all__ = [
    "BuiltMethod",
    "METHOD_FILE",
    "MethodSpec",
    "Option",
    "PREFIX_TRAINABLE_RELOAD_ERROR",
    "build",
    "check_target_modules",
    "get_spec",
    "gradient_checkpointing_on",
    "linear_module_names",
    "list_methods",
    "load",
    "load_weights",
    "PREFIX_STATE_FILE",
    "TRAINER_STATE_FILE",
    "save_trainable_state",
    "trainer_callback",
    "read_record",
    "resolve_options",
    "save",
    "select_fewshot",
]
