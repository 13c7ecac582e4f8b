"""Registration of this project's tuners with PEFT.

PEFT's ``register_peft_method`` only accepts names of its ``PeftType`` enum, so each tuner first gets a real member
of that enum (``PeftType.CUMA``, ``PeftType.HYDRALORA``, ``PeftType.MIXLORA``: added the way ``enum`` adds members,
so ``PeftType("CUMA")``, ``.value``, iteration and pickling behave like PEFT's own); then PEFT's own registration
fills its dispatch tables. ``get_peft_model``, ``save_pretrained`` (model card included), ``PeftModel.from_pretrained``
and ``disable_adapter`` then work as for any PEFT method. Tested against the pinned peft minor version;
``tests/test_peft_registration.py`` fails loudly if an upgrade breaks it.

``profile_embeds`` is a forward/generate keyword that the base model must never see: PeftModel strips the names in
its per-instance ``special_peft_forward_args`` before calling the base model, so models whose adapters route on a
profile get the name added there when they are built. ``PeftModel.generate`` is wrapped to mark generation calls
(whose base-model batches repeat each prompt row for beams and returned sequences; see :mod:`cuma.routing_state`).
"""

from __future__ import annotations

import functools

import peft
from peft import mapping as peft_mapping
from peft.utils.peft_types import PeftType, register_peft_method

from .routing_state import PROFILE_KWARG, generation

# peft types whose layers take profile_embeds, and every type registered here
_PROFILE_AWARE_TYPES: set[str] = set()
_OUR_TYPES: set[str] = set()

LOADING_NOTE = (
    "This adapter uses a tuner of the `cuma` package (pip package `cuma`): run `import cuma` before "
    "`PeftModel.from_pretrained`, which registers the tuner with PEFT."
)


def peft_type_member(name: str) -> PeftType:
    """The ``PeftType`` member ``name``, added to the enum when PEFT does not have it."""
    existing = PeftType._value2member_map_.get(name)
    if existing is not None:
        return existing
    if not name.isupper() or not name.isidentifier():
        raise ValueError(f"a PeftType name must be an upper-case identifier, got {name!r}")
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member


def register_tuner(peft_type: str, config_cls, model_cls, prefix: str, takes_profile: bool) -> PeftType:
    """Make ``peft_type`` a PEFT method (idempotent). Returns its ``PeftType`` member."""
    for table in (peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING, peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING):
        if not isinstance(table, dict):
            raise RuntimeError(f"peft {peft.__version__}: a dispatch table is no longer a dict; cuma needs updating")
    member = peft_type_member(peft_type)
    existing = peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(member)
    if existing is not None and existing is not model_cls:
        raise RuntimeError(f"PEFT already has a tuner registered as {peft_type!r}: {existing}")
    if existing is None:
        register_peft_method(name=peft_type.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    if takes_profile:
        _PROFILE_AWARE_TYPES.add(peft_type)
    _OUR_TYPES.add(peft_type)
    _install_profile_kwarg()
    _install_generation_marker()
    _install_model_card_note()
    return member


def ensure_registered(peft_type: str) -> None:
    """Raise a clear error when ``peft_type`` (from an ``adapter_config.json``) is not a registered PEFT method."""
    if peft_type not in peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"peft_type {peft_type!r} is not a PEFT method known in this process: cuma's tuners (CUMA, HYDRALORA, "
            "MIXLORA) are registered by `import cuma` (do it before PeftModel.from_pretrained); otherwise the adapter "
            "needs a newer peft or cuma"
        )


def _install_profile_kwarg() -> None:
    init = peft.PeftModel.__init__
    if getattr(init, "_cuma_wrapped", False):
        return

    @functools.wraps(init)
    def __init__(self, model, peft_config, *args, **kwargs):
        init(self, model, peft_config, *args, **kwargs)
        if getattr(peft_config, "peft_type", None) in _PROFILE_AWARE_TYPES:
            self.special_peft_forward_args = set(self.special_peft_forward_args) | {PROFILE_KWARG}

    __init__._cuma_wrapped = True
    peft.PeftModel.__init__ = __init__


def _marked_generate(fn):
    @functools.wraps(fn)
    def generate(self, *args, **kwargs):
        with generation():
            return fn(self, *args, **kwargs)

    generate._cuma_generation = True
    return generate


def _install_generation_marker() -> None:
    """Wrap ``generate`` of PeftModel and of every PeftModel class that defines its own."""
    from peft import peft_model

    classes = [peft.PeftModel]
    stack = [peft.PeftModel]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in classes:
                classes.append(sub)
                stack.append(sub)
    for cls in classes:
        fn = cls.__dict__.get("generate")
        if fn is not None and not getattr(fn, "_cuma_generation", False):
            setattr(cls, "generate", _marked_generate(fn))
    del peft_model


def _install_model_card_note() -> None:
    """Say in the model card of a saved cuma adapter that loading it needs ``import cuma``."""
    fn = peft.PeftModel.create_or_update_model_card
    if getattr(fn, "_cuma_note", False):
        return

    @functools.wraps(fn)
    def create_or_update_model_card(self, output_dir: str):
        fn(self, output_dir)
        types = {getattr(c, "peft_type", None) for c in getattr(self, "peft_config", {}).values()}
        if not types & _OUR_TYPES:
            return
        import os

        path = os.path.join(output_dir, "README.md")
        if os.path.isfile(path):
            text = open(path, encoding="utf-8").read()
            if LOADING_NOTE not in text:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(f"\n## Loading this adapter\n\n{LOADING_NOTE}\n")

    create_or_update_model_card._cuma_note = True
    peft.PeftModel.create_or_update_model_card = create_or_update_model_card
