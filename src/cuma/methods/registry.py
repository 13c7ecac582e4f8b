"""The method registry: :class:`MethodSpec` (what a method is), :class:`BuiltMethod` (a method built on a base model),
``register`` / ``get_spec`` / ``list_methods``, option validation (``resolve_options``) and ``build``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import nn

from .common import _count, _disable_gradient_checkpointing, _quiet_peft, check_target_modules
from .options import _KINDS, Option, _coerce


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
    peft_type: Optional[str] = None  # adapter methods: the peft_type their adapter_config.json holds
    deviations: tuple[str, ...] = ()
    # this project's tuners: the config dataclass the options come from (options_from_config) and that fills in the
    # options left unset (None), so that a run records the values the adapter was built with
    config_cls: Optional[type] = None

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
    # one alpha rule for every LoRA-style method, the tuner configs' own: lora_alpha = 2 * r unless given
    if "lora_alpha" in resolved and resolved["lora_alpha"] is None and "r" in resolved:
        resolved["lora_alpha"] = 2 * resolved["r"]
    if spec.config_cls is not None:
        config = config_from_options(spec, resolved)
        for key, value in resolved.items():
            if value is None and hasattr(config, key):
                resolved[key] = _jsonable(getattr(config, key))
    return resolved


def config_kwargs(spec: MethodSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``spec.config_cls`` from resolved options plus what the method fixes (None = the config's
    own default)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(spec.config_cls)}
    kwargs = {k: v for k, v in options.items() if k in known and v is not None}
    kwargs.update({k: v for k, v in spec.fixed.items() if k in known})
    if "task_type" in known and "task_type" not in kwargs:
        kwargs["task_type"] = "CAUSAL_LM"
    return kwargs


def config_from_options(spec: MethodSpec, options: Mapping[str, Any]):
    """The tuner config a method builds from ``options``; a value the config rejects is a ValueError naming the
    method."""
    try:
        return spec.config_cls(**config_kwargs(spec, options))
    except (TypeError, ValueError) as err:
        raise ValueError(f"method {spec.name!r}: {err}") from None


def peft_from_config(spec: MethodSpec, options: Mapping[str, Any], base: nn.Module) -> nn.Module:
    """A PEFT model of ``spec.config_cls`` (one of this project's tuners) built on ``base`` from resolved options."""
    from peft import get_peft_model

    return get_peft_model(base, config_from_options(spec, options))


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
