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
  from training records of the same country when there are enough, else random; see
  :func:`cuma.evaluate.fewshot.select_fewshot`).

Layout (one module per role, one per method family, like PEFT's one folder per tuner):

- ``options``: :class:`Option`, ``options_from_config`` (a tuner's options are its config dataclass's fields: name,
  type, default, help) and the coercion of user values to each option kind;
- ``registry``: :class:`MethodSpec`, :class:`BuiltMethod`, ``register`` / ``get_spec`` / ``list_methods`` /
  ``resolve_options`` and ``build``;
- ``common``: target-module checks, gradient-checkpointing switches, parameter counts;
- ``describe``: the option tables of docs/methods.md and ``cuma train sft --method-options``;
- builders, each registering its specs: ``cuma`` (CuMA and its ablations, options from ``CuMAConfig``), ``lora``
  (lora, dora), ``prefix``, ``fft``, ``hydralora``, ``mixlora``, ``prompting`` (vanilla, persona, fewshot);
- ``io``: ``save`` / ``load`` / ``read_record`` / ``load_weights`` / ``trainer_callback``.
"""

from __future__ import annotations

# the builder modules register their specs at import, in this order (the order of list_methods())
from . import cuma as _cuma  # noqa: F401
from . import lora as _lora  # noqa: F401
from . import prefix as _prefix  # noqa: F401
from . import fft as _fft  # noqa: F401
from . import hydralora as _hydralora  # noqa: F401
from . import mixlora as _mixlora  # noqa: F401
from . import prompting as _prompting  # noqa: F401
from .common import (
    _count,
    _disable_gradient_checkpointing,
    _quiet_peft,
    check_target_modules,
    gradient_checkpointing_on,
    linear_module_names,
)
from .io import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHT_FILES,
    METHOD_FILE,
    PREFIX_STATE_FILE,
    PREFIX_TRAINABLE_RELOAD_ERROR,
    TRAINER_STATE_FILE,
    infer_method,
    load,
    load_weights,
    read_adapter_config,
    read_record,
    save,
    save_trainable_state,
    trainer_callback,
)
from .options import Option
from .registry import BuiltMethod, MethodSpec, _jsonable, build, get_spec, list_methods, register, resolve_options

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHT_FILES",
    "BuiltMethod",
    "METHOD_FILE",
    "MethodSpec",
    "Option",
    "PREFIX_STATE_FILE",
    "PREFIX_TRAINABLE_RELOAD_ERROR",
    "TRAINER_STATE_FILE",
    "build",
    "check_target_modules",
    "get_spec",
    "gradient_checkpointing_on",
    "infer_method",
    "linear_module_names",
    "list_methods",
    "load",
    "load_weights",
    "read_adapter_config",
    "read_record",
    "register",
    "resolve_options",
    "save",
    "save_trainable_state",
    "trainer_callback",
]
