"""Saving and reloading built methods: ``save`` / ``load`` / ``read_record``, the trainable prefix state, ``load_weights``
and the trainer callback that makes ``prefix`` checkpoints resumable."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .common import _count, _disable_gradient_checkpointing, _quiet_peft
from .prompting import _build_prompting
from ..runinfo import read_json, staged_directory
from .options import _coerce
from .registry import BuiltMethod, _uses_profile, get_spec, list_methods, resolve_options

METHOD_FILE = "cuma_method.json"
# prefix only: the trainable prompt-encoder state (embedding + MLP) that PEFT's adapter file does not keep
PREFIX_STATE_FILE = "prefix_encoder.safetensors"
# what trainer_callback writes into each trainer checkpoint of a prefix run (Trainer resumes from it)
TRAINER_STATE_FILE = "model.safetensors"
# what PEFT's save_pretrained writes
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


PREFIX_TRAINABLE_RELOAD_ERROR = (
    "a 'prefix' (P-Tuning v2) adapter cannot be reloaded as trainable: PEFT refuses to load a prompt-learning adapter "
    "with is_trainable=True, and its adapter file keeps only the computed prefix, not the reparameterising MLP that "
    "training updates. Resume training from a trainer checkpoint instead: train with "
    "callbacks=[cuma.methods.trainer_callback(built)] and call trainer.train(resume_from_checkpoint=...), or build the "
    "method fresh with cuma.methods.build('prefix', base_model, **options) and copy the trainable state in with "
    "cuma.methods.load_weights(built, path) (path = a cuma.methods.save() folder or such a trainer checkpoint). "
    "Loading for inference (is_trainable=False) works."
)


def save(built: BuiltMethod, out_dir: str | os.PathLike) -> str:
    """Save ``built`` to ``out_dir``: the PEFT adapter (``save_pretrained``), or the full model for ``fft``, or only
    the method record for prompting baselines. ``cuma_method.json`` records the method and its options.

    Atomic: everything is written into a temporary folder next to ``out_dir`` first. A new or empty ``out_dir`` is
    that folder renamed into place; into a folder that already holds other files (a training run's output folder
    with its checkpoints and logs) the saved files are moved one by one, an old ``cuma_method.json`` removed first
    and the new one moved last, so a save that fails part-way never leaves a folder that looks like a complete save
    of mixed or half-written files."""
    out = Path(os.fspath(out_dir)).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot save method {built.spec.name!r} to {str(out)!r}: it exists and is not a folder")
    with staged_directory(out, last=(METHOD_FILE,)) as tmp:
        fmt = built.spec.save_format
        if fmt in ("adapter", "full"):
            built.model.save_pretrained(str(tmp))
        if built.spec.name == "prefix":
            # PEFT's adapter file holds only the computed prefix (the reparameterising MLP is dropped), enough for
            # inference but not to train on; keep the trainable state too so that load_weights can resume from it
            save_trainable_state(built, tmp, PREFIX_STATE_FILE)
        with open(tmp / METHOD_FILE, "w", encoding="utf-8") as fh:
            json.dump(built.record(), fh, indent=2, sort_keys=True)
    return str(out)


def read_record(path: str | os.PathLike) -> Optional[dict]:
    """The method record ``save`` wrote in ``path`` (None when there is none). A record that cannot be read (not
    UTF-8, not JSON, not an object, no method name) is a ValueError naming the file."""
    f = os.path.join(os.fspath(path), METHOD_FILE)
    if not os.path.isfile(f):
        return None
    rec = read_json(f, dict, what="the method record cuma.methods.save writes")
    if not isinstance(rec.get("method"), str):
        raise ValueError(f"{f}: field 'method' must be a method name (a string), got {rec.get('method')!r}")
    if "options" in rec and not isinstance(rec["options"], dict):
        raise ValueError(f"{f}: field 'options' must be a JSON object, got {type(rec['options']).__name__}")
    return rec


def read_adapter_config(path: str | os.PathLike) -> Optional[dict]:
    """``adapter_config.json`` of the adapter folder ``path`` (None when there is none); unreadable: ValueError
    naming the file."""
    f = os.path.join(os.fspath(path), ADAPTER_CONFIG_FILE)
    if not os.path.isfile(f):
        return None
    return read_json(f, dict, what="PEFT adapter config")


def _peft_type_name(cfg: dict) -> Optional[str]:
    value = cfg.get("peft_type")
    return str(getattr(value, "value", value)).upper() if value is not None else None


def _fixed_conflicts(spec, cfg: dict) -> list[str]:
    """The settings ``spec`` pins that the adapter config contradicts, as ``"field=value"`` strings of the config."""
    out = []
    for key, want in spec.fixed.items():
        if key not in cfg or key == "profile_in_prompt":
            continue
        have = cfg[key]
        if isinstance(want, str) and not isinstance(have, str):  # a description ("all experts"), not a value
            continue
        if have != want:
            out.append(f"{key}={have!r} (method {spec.name!r} fixes {key}={want!r})")
    return out


def infer_method(path: str | os.PathLike) -> str:
    """The method of the adapter folder ``path``: from its ``cuma_method.json``, else from ``adapter_config.json``
    (its ``peft_type`` and the settings each method pins; the most specific method that fits). ValueError naming the
    file when neither tells."""
    path = os.fspath(path)
    rec = read_record(path)
    if rec:
        return rec["method"]
    cfg = read_adapter_config(path)
    if cfg is None:
        raise ValueError(
            f"{path} has neither {METHOD_FILE} nor {ADAPTER_CONFIG_FILE}: it is not a saved method or adapter; "
            "pass the method name"
        )
    ptype = _peft_type_name(cfg)
    fits = [get_spec(n) for n in list_methods() if get_spec(n).peft_type and get_spec(n).peft_type == ptype]
    fits = [s for s in fits if not _fixed_conflicts(s, cfg)]
    if not fits:
        raise ValueError(
            f"{os.path.join(path, ADAPTER_CONFIG_FILE)}: peft_type {ptype!r} with these settings is none of "
            f"cuma's adapter methods; pass the method name"
        )
    best = max(len(s.fixed) for s in fits)
    top = [s.name for s in fits if len(s.fixed) == best]
    if len(top) > 1:
        raise ValueError(
            f"{os.path.join(path, ADAPTER_CONFIG_FILE)} fits several methods ({', '.join(top)}); pass the method name"
        )
    return top[0]


def _options_from_adapter_config(spec, cfg: dict, cfg_file: str) -> dict:
    """The method options the adapter's own config fixes (same-named fields), coerced like user options."""
    out = {}
    for key, opt in spec.options.items():
        if key not in cfg or key == "profile_in_prompt":
            continue
        value = cfg[key]
        if value is None:
            continue
        if opt.kind == "modules" and isinstance(value, (list, tuple)):
            value = sorted(value)
        try:
            out[key] = _coerce(spec.name, key, opt, value)
        except ValueError as err:
            raise ValueError(f"{cfg_file}: field {key!r}: {err}") from None
    return out


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return sorted(map(str, a)) == sorted(map(str, b))
    return a == b


def _check_adapter_folder(name: str, spec, path: str, cfg: Optional[dict]) -> None:
    """Before PEFT sees the folder: it has an adapter config of this method and adapter weights."""
    cfg_file = os.path.join(path, ADAPTER_CONFIG_FILE)
    if cfg is None:
        raise FileNotFoundError(
            f"{path} has no {ADAPTER_CONFIG_FILE}: not a saved adapter of method {name!r} (expected the folder "
            "cuma.methods.save or save_pretrained wrote)"
        )
    weights = [f for f in ADAPTER_WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    if not weights:
        raise FileNotFoundError(
            f"{path} has {ADAPTER_CONFIG_FILE} but no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}); the save "
            "did not finish or the weights were not copied"
        )
    ptype = _peft_type_name(cfg)
    if spec.peft_type and ptype != spec.peft_type:
        raise ValueError(
            f"{cfg_file}: peft_type is {ptype!r}, but method {name!r} saves {spec.peft_type!r} adapters; pass the "
            "method the adapter was trained with"
        )
    conflicts = _fixed_conflicts(spec, cfg)
    if conflicts:
        raise ValueError(f"{cfg_file}: {'; '.join(conflicts)}: this adapter is not a {name!r} adapter")


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)
# config fields that add their width to another one (the router input is concat(h_t, e_d))
_ADDITIVE_FIELDS = ("profile_dim", "profile_proj_dim")
# integer config fields that set no parameter's size (scalings, routing choices)
_SHAPELESS_FIELDS = ("top_k", "router_layers", "profile_proj_layers")


def _mismatch_error(err: Exception, path: str, cfg: dict) -> Optional[ValueError]:
    """A size mismatch from loading the adapter weights, explained: the config field that gives the wrong size (a
    field whose value is the size the config gives, or, for the router input, a width added to the hidden size)."""
    found = _SIZE_MISMATCH.findall(str(err))
    if not found:
        return None

    def shape(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    params = [(p.replace(".default.", ".").removesuffix(".default"), shape(c), shape(m)) for p, c, m in found]
    param, ckpt, model = params[0]
    axes = [a for a in range(min(len(ckpt), len(model))) if ckpt[a] != model[a]] or [0]
    ints = {k: v for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0
            and k not in _SHAPELESS_FIELDS and not k.endswith("alpha")}
    guesses: dict[str, tuple[int, int]] = {}  # field -> (value in the config, value the weights imply)
    for a in axes:
        for key, v in ints.items():
            if v == model[a]:
                guesses.setdefault(key, (v, ckpt[a]))
    if not guesses and ("router" in param or "profile" in param):
        for a in axes:
            for key in _ADDITIVE_FIELDS:
                v = ints.get(key)
                if v is not None and model[a] > v and v + ckpt[a] - model[a] >= 0:
                    guesses.setdefault(key, (v, v + ckpt[a] - model[a]))
    if len(guesses) > 1:  # prefer the fields whose name the parameter's name mentions
        hinted = {k: g for k, g in guesses.items() if any(part in param for part in k.split("_") if len(part) > 2)}
        guesses = hinted or guesses
    cfg_file = os.path.join(path, ADAPTER_CONFIG_FILE)
    weights = next((f for f in ADAPTER_WEIGHT_FILES if os.path.isfile(os.path.join(path, f))), ADAPTER_WEIGHT_FILES[0])
    more = f" ({len(params) - 1} more parameters differ)" if len(params) > 1 else ""
    shapes = f"{param} has shape {ckpt} in {os.path.join(path, weights)} but {model} under the config{more}"
    if len(guesses) == 1:
        (key, (v, implied)), = guesses.items()
        return ValueError(
            f"{cfg_file} does not match its weights: field {key!r} is {v} there, the weights were saved with "
            f"{key}={implied}: {shapes}"
        )
    if guesses:
        names = " or ".join(repr(k) for k in sorted(guesses))
        return ValueError(f"{cfg_file} does not match its weights: field {names} is wrong: {shapes}")
    return ValueError(f"{cfg_file} does not match its weights: {shapes}")


def load(
    name: Optional[str],
    base_model: Optional[nn.Module],
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
) -> BuiltMethod:
    """Reload what :func:`save` (or PEFT's ``save_pretrained``) wrote. ``name`` may be None to take it from the saved
    record or the adapter config (:func:`infer_method`); ``base_model`` must be the same base the method was built on
    (ignored for ``fft``, which reloads the full model from ``path``).

    For adapters the options come from the adapter's own ``adapter_config.json`` where it has them (it is what PEFT
    builds), then from ``cuma_method.json``, then the registry defaults; a record that disagrees with the adapter
    config is warned about."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"saved method folder {path} does not exist")
    rec = read_record(path) or {}
    if name is None:
        name = infer_method(path)
    spec = get_spec(name)
    if rec and rec.get("method") != name:
        raise ValueError(f"{os.path.join(path, METHOD_FILE)} holds method {rec.get('method')!r}, not {name!r}")
    options = dict(rec.get("options") or spec.defaults)
    options = {k: v for k, v in options.items() if k in spec.options}
    adapter_cfg = read_adapter_config(path) if spec.save_format == "adapter" else None
    if spec.save_format == "adapter":
        _check_adapter_folder(name, spec, path, adapter_cfg)
        from_cfg = _options_from_adapter_config(spec, adapter_cfg, os.path.join(path, ADAPTER_CONFIG_FILE))
        if rec:
            # the record's None means "the library default", which the adapter config spells out: not a conflict
            recorded = resolve_options(name, options)
            differ = [k for k, v in from_cfg.items() if recorded.get(k) is not None and not _same(recorded[k], v)]
            if differ:
                warnings.warn(
                    f"{os.path.join(path, METHOD_FILE)} and {ADAPTER_CONFIG_FILE} disagree on "
                    + ", ".join(f"{k} ({recorded[k]!r} vs {from_cfg[k]!r})" for k in differ)
                    + f"; using {ADAPTER_CONFIG_FILE}, which is what the adapter is built from",
                    stacklevel=2,
                )
            options.update({k: from_cfg[k] for k in differ})
        else:
            options.update(from_cfg)
    resolved = resolve_options(name, options)

    if spec.save_format == "adapter":
        if name == "prefix" and is_trainable:
            raise ValueError(PREFIX_TRAINABLE_RELOAD_ERROR)
        if base_model is None:
            raise ValueError(f"method {name!r} saves an adapter: pass the base model it was trained on")
        import cuma  # noqa: F401  (registers this project's tuners with PEFT)
        from peft import PeftModel

        from .._registry import ensure_registered

        if adapter_cfg is not None and _peft_type_name(adapter_cfg):
            try:
                ensure_registered(_peft_type_name(adapter_cfg))
            except ValueError as err:
                raise ValueError(f"{os.path.join(path, ADAPTER_CONFIG_FILE)}: {err}") from None
        if name == "prefix":
            _disable_gradient_checkpointing(base_model)
        _, base_params = _count(base_model)
        try:
            with _quiet_peft():
                model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
        except RuntimeError as err:
            better = _mismatch_error(err, path, adapter_cfg)
            if better is None:
                raise
            raise better from None
    elif spec.save_format == "full":
        from transformers import AutoModelForCausalLM

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: not a full model saved by method {name!r}")
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
