"""Registration of this project's tuners with PEFT.

PEFT has no public plugin API (``register_peft_method`` only accepts names of its closed ``PeftType`` enum), but its
dispatch goes through three dictionaries keyed by the peft type string. Inserting our keys there makes
``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained`` and ``disable_adapter`` work. Tested against the
pinned peft minor version; ``tests/test_peft_registration.py`` fails loudly if an upgrade breaks it.

``profile_embeds`` is a forward/generate keyword that the base model must never see: PeftModel strips the names in
its per-instance ``special_peft_forward_args`` before calling the base model, so models whose adapters route on a
profile get the name added there when they are built.
"""

from __future__ import annotations

import functools

import peft
from peft import mapping as peft_mapping

PROFILE_KWARG = "profile_embeds"

# peft type -> whether its layers take profile_embeds
_PROFILE_AWARE_TYPES: set[str] = set()


def register_tuner(peft_type: str, config_cls, model_cls, prefix: str, takes_profile: bool) -> None:
    """Insert a tuner into PEFT's dispatch tables (idempotent)."""
    for table in (peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING, peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING):
        if not isinstance(table, dict):
            raise RuntimeError(f"peft {peft.__version__}: a dispatch table is no longer a dict; cuma needs updating")
    existing = peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if existing is not None and existing is not model_cls:
        raise RuntimeError(f"PEFT already has a tuner registered as {peft_type!r}: {existing}")
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    if takes_profile:
        _PROFILE_AWARE_TYPES.add(peft_type)
    _install_profile_kwarg()


def _install_profile_kwarg() -> None:
    init = peft.PeftModel.__init__
    if getattr(init, "_cuma_wrapped", False):
        return

    @functools.wraps(init)
    def __init__(self, model, peft_config, *args, **kwargs):
        init(self, model, peft_config, *args, **kwargs)
        if str(getattr(peft_config, "peft_type", "")) in _PROFILE_AWARE_TYPES:
            self.special_peft_forward_args = set(self.special_peft_forward_args) | {PROFILE_KWARG}

    __init__._cuma_wrapped = True
    peft.PeftModel.__init__ = __init__
