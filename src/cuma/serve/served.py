"""What ``cuma serve`` serves: the base model with its method (adapter, persona or base), the tokenizer, the profile
encoder the adapter was trained with, and the prompts built the way training built them.

* **Method.** ``--adapter DIR`` reloads a trained method with :func:`cuma.methods.load` (its ``cuma_method.json``
  names it). Without an adapter, ``--method persona`` (the profile sentence in the system prompt) or ``--method base``
  (the untouched model; the profile is ignored). Prompt-learning adapters (``prefix``) and ``fewshot`` cannot be
  served: PEFT feeds a prefix through the KV cache that the engine owns, and few-shot needs training records.
* **Encoder.** A method that routes on the profile needs ``profile_embeds`` from the encoder it was trained with. It
  is found from what the training run wrote next to the adapter: ``resolved_config.yaml`` (``data.encoder``, when the
  run encoded profiles on the fly), else ``run.json`` -> the prepared data's ``manifest.json`` -> ``encoder`` (source,
  pooling, normalisation, max length), else the default all-MiniLM-L6-v2. ``--encoder`` overrides all of them. Its
  width must equal the adapter's ``profile_dim``.
* **Prompts.** A chat request's conversation gets a system message (the client's own, or the default of the prompt
  style); methods trained with the profile in the prompt get ``"\\n" + prefix + profile sentence`` appended to it,
  exactly as in training. The style follows the training data: WorldValuesBench choice records
  (:mod:`cuma.data.prompts`: ``SYSTEM_INSTRUCTION`` / ``"About you: "``) or preference conversations
  (:mod:`cuma.data.conversations`: ``"You are a helpful assistant."`` / ``"About the user: "``); without a training
  record (``persona``, ``base``) the preference style. Choice prompts are always the WVB prompts of ``cuma eval wvb``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger("cuma.serve")

__all__ = ["PROMPT_STYLES", "ServedModel", "find_encoder", "prompt_style_of"]

PROMPT_STYLES = ("auto", "wvb", "preference")
_UNSERVABLE = {
    "prefix": "PEFT feeds a prefix-tuning adapter's virtual tokens through the KV cache, which the serving engine "
    "owns; evaluate it with cuma eval instead",
    "fewshot": "few-shot prompting needs the training records to draw shots from; use persona or base",
}


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Optional[dict]:
    try:
        import yaml

        with open(path, encoding="utf-8") as fh:
            value = yaml.safe_load(fh)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError, ImportError):
        return None
    except Exception:  # noqa: BLE001 - a malformed YAML file is the same as none
        return None


def _training_manifest(adapter: Path) -> Optional[dict]:
    """The manifest of the prepared data the adapter was trained on (via ``run.json``), if it can still be read."""
    run = _read_json(adapter / "run.json")
    data = (run or {}).get("data") or {}
    path = data.get("path") if isinstance(data, dict) else None
    if not path:
        cfg = _read_yaml(adapter / "resolved_config.yaml") or {}
        path = (cfg.get("data") or {}).get("path") if isinstance(cfg.get("data"), dict) else None
    if not path:
        return None
    return _read_json(Path(path) / "manifest.json")


def prompt_style_of(adapter: Optional[str]) -> tuple[str, str]:
    """(``"wvb"`` or ``"preference"``, where that was read) for an adapter folder; preference without a record."""
    if adapter:
        folder = Path(adapter)
        cfg = _read_yaml(folder / "resolved_config.yaml") or {}
        data_cfg = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        if data_cfg.get("format") == "conversations":
            return "preference", "resolved_config.yaml data.format"
        manifest = _training_manifest(folder)
        fmt = str((manifest or {}).get("format") or "")
        if fmt.endswith("-wvb"):
            return "wvb", "training data manifest"
        if "preference" in fmt:
            return "preference", "training data manifest"
        if data_cfg.get("format") == "choice":
            return "wvb", "resolved_config.yaml data.format"
    return "preference", "default"


def find_encoder(adapter: Optional[str]) -> tuple[Optional[dict], str]:
    """``(encoder spec, where it was found)`` from an adapter's training record, or ``(None, reason)``.

    The spec is ``{"source", "pooling", "normalize", "max_length"}`` (only ``source`` is certain to be there)."""
    if not adapter:
        return None, "no adapter"
    folder = Path(adapter)
    cfg = _read_yaml(folder / "resolved_config.yaml") or {}
    data_cfg = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    if data_cfg.get("encoder"):
        return {"source": str(data_cfg["encoder"])}, "resolved_config.yaml data.encoder"
    manifest = _training_manifest(folder)
    if manifest:
        described = manifest.get("encoder") if isinstance(manifest.get("encoder"), dict) else None
        named = (manifest.get("options") or {}).get("encoder") if isinstance(manifest.get("options"), dict) else None
        if described and described.get("source"):
            spec = {k: described[k] for k in ("source", "pooling", "normalize", "max_length") if k in described}
            if not os.path.exists(str(spec["source"])) and named:
                spec = {"source": str(named)}  # the folder moved: fall back to the name the run was given
            return spec, "training data manifest"
        if named:
            return {"source": str(named)}, "training data manifest"
    return None, "no training record next to the adapter"


class _ProfileCache:
    """Profile sentence -> embedding row, least recently used first out (bounded: clients send arbitrary text)."""

    def __init__(self, encoder, capacity: int = 4096) -> None:
        from collections import OrderedDict

        self.encoder = encoder
        self.capacity = int(capacity)
        self._rows: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def rows(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            vectors = self.encoder.encode(missing).detach().to("cpu", torch.float32)
            for text, vec in zip(missing, vectors):
                self._rows[text] = vec.clone()
        out = []
        for t in texts:
            self._rows.move_to_end(t)
            out.append(self._rows[t])
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return torch.stack(out)

    def __len__(self) -> int:
        return len(self._rows)


@dataclass
class ServedModel:
    """A loaded method, ready for the engine (model, worker tokenizer, encoder) and the HTTP layer (prompting)."""

    name: str  # the served name (OpenAI model id)
    model: Any
    built: Any  # cuma.methods.BuiltMethod
    tokenizer: Any  # the HTTP layer's copy (rendering, counting)
    worker_tokenizer: Any  # the engine's own copy (decoding, choice scoring): fast tokenizers are not shared across threads
    device: torch.device
    context_length: int
    eos_ids: tuple[int, ...]
    pad_id: int
    prompt_style: str
    encoder: Any = None
    encoder_info: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    _profiles: Optional[_ProfileCache] = None

    # ------------------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model: str = "smollm2-135m",
        adapter: Optional[str] = None,
        method: Optional[str] = None,
        *,
        served_name: Optional[str] = None,
        device: str = "auto",
        dtype: Optional[str] = None,
        encoder: Optional[str] = None,
        max_model_len: Optional[int] = None,
        prompt_style: str = "auto",
    ) -> "ServedModel":
        from .. import methods, models

        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"--prompt-style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        dev = _resolve_device(device)
        base, tokenizer = models.load_base_and_tokenizer(model, dtype=dtype)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"the tokenizer of {model!r} has no chat template; cuma serve needs an instruct/chat model "
                "(chat requests and choice prompts are rendered with it)"
            )
        if adapter is not None:
            if not os.path.isdir(adapter):
                raise FileNotFoundError(f"--adapter {adapter}: folder does not exist")
            rec = methods.read_record(adapter)
            if not rec:
                raise ValueError(f"--adapter {adapter} has no {getattr(methods, 'METHOD_FILE', 'cuma_method.json')}; "
                                 "serve a folder written by cuma train / cuma.methods.save")
            if method is not None and method != rec.get("method"):
                raise ValueError(f"--method {method!r} does not match the adapter's method {rec.get('method')!r}; "
                                 "leave --method out with --adapter")
            name = rec["method"]
            if name in _UNSERVABLE:
                raise ValueError(f"method {name!r} cannot be served: {_UNSERVABLE[name]}")
            built = methods.load(None, base, adapter)
        else:
            name = {"base": "vanilla", None: "vanilla"}.get(method, method)
            if name not in ("vanilla", "persona"):
                raise ValueError(f"--method {method!r}: without --adapter, serve 'persona' or 'base'; trained methods "
                                 "need --adapter DIR")
            built = methods.build(name, base)
        net = built.model.to(dev).eval()
        for p in net.parameters():
            p.requires_grad_(False)

        enc, enc_info = None, {}
        if built.uses_profile:
            enc, enc_info = _load_encoder(encoder, adapter, dev)
            if enc.dim != built.profile_dim:
                raise ValueError(
                    f"the profile encoder {enc_info.get('source')!r} gives {enc.dim}-d embeddings but the adapter was "
                    f"trained with profile_dim={built.profile_dim}; pass --encoder with the encoder it was trained with"
                )
        elif encoder is not None:
            logger.warning("--encoder ignored: method %r does not route on the profile", built.spec.name)

        style, style_from = (prompt_style, "--prompt-style") if prompt_style != "auto" else prompt_style_of(adapter)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {model!r} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        worker_tok = copy.deepcopy(tokenizer)
        ctx = _context_length(net, tokenizer, max_model_len)
        served = cls(
            name=served_name or (os.path.basename(os.path.normpath(adapter)) if adapter else str(model)),
            model=net,
            built=built,
            tokenizer=tokenizer,
            worker_tokenizer=worker_tok,
            device=dev,
            context_length=ctx,
            eos_ids=_eos_ids(net, tokenizer),
            pad_id=int(tokenizer.pad_token_id),
            prompt_style=style,
            encoder=enc,
            encoder_info=enc_info,
        )
        served.info = {
            "base_model": str(model),
            "adapter": os.path.abspath(adapter) if adapter else None,
            "method": built.spec.name,
            "uses_profile": bool(built.uses_profile),
            "profile_in_prompt": bool(built.profile_in_prompt),
            "profile_dim": int(built.profile_dim),
            "encoder": enc_info or None,
            "prompt_style": style,
            "prompt_style_from": style_from,
            "context_length": ctx,
            "device": str(dev),
            "dtype": str(next(net.parameters()).dtype).replace("torch.", ""),
        }
        if enc is not None:
            served._profiles = _ProfileCache(enc)
        return served

    # --------------------------------------------------------------------------------------------------- properties

    @property
    def uses_profile(self) -> bool:
        return bool(self.built.uses_profile)

    @property
    def profile_in_prompt(self) -> bool:
        return bool(self.built.profile_in_prompt)

    @property
    def method(self) -> str:
        return self.built.spec.name

    # ------------------------------------------------------------------------------------------------------ prompts

    def chat_messages(self, messages: list[dict[str, str]], profile_text: Optional[str]) -> list[dict[str, str]]:
        """The conversation the model sees, built by the training pipeline's own functions: a system message first
        (the client's, or the style's default) with the profile sentence appended when the method was trained with
        it in the prompt (``cuma.data.prompts.system_message`` / ``cuma.data.conversations.prompt_messages``)."""
        msgs = [dict(m) for m in messages]
        own = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
        pip = self.profile_in_prompt
        if self.prompt_style == "wvb":
            from ..data.prompts import PROFILE_PREFIX, system_message

            if own is None:
                system = system_message({"profile_text": profile_text}, pip)
            else:
                text = (profile_text or "").strip() if pip else ""
                system = f"{own}\n{PROFILE_PREFIX}{text}" if text else own
            return [{"role": "system", "content": system}] + msgs
        from ..data.conversations import PREFERENCE_SYSTEM_PROMPT, prompt_messages

        system_prompt = own if own is not None else PREFERENCE_SYSTEM_PROMPT
        return prompt_messages({"profile_text": profile_text, "prompt": msgs}, pip, system_prompt=system_prompt)

    def chat_prompt_ids(self, messages: list[dict[str, str]], profile_text: Optional[str]) -> list[int]:
        msgs = self.chat_messages(messages, profile_text)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def choice_prompts(self, question: str, options: list[str], profile_texts: list[str]) -> tuple[list[str], list[int], list[str]]:
        """(prompts, option-letter token ids, letters) of a choice question, one prompt per profile: the prompts of
        ``cuma eval wvb`` (:func:`cuma.evaluate.scoring.render_prompt`)."""
        import string

        from ..evaluate.scoring import letter_token_ids, render_prompt

        letters = list(string.ascii_uppercase[: len(options)])
        prompts = []
        for text in profile_texts:
            record = {"question": question, "letters": letters, "options": list(options), "profile_text": text}
            prompts.append(render_prompt(record, self.tokenizer, profile_in_prompt=self.profile_in_prompt))
        return prompts, letter_token_ids(self.tokenizer, letters), letters

    # ------------------------------------------------------------------------------------------- engine-side helpers

    def profile_rows(self, texts: list[str]) -> torch.Tensor:
        """``(len(texts), profile_dim)`` embeddings (encoder thread only: the engine worker)."""
        if self._profiles is None:
            raise RuntimeError("this method does not route on the profile")
        return self._profiles.rows(texts).to(self.device)


def _resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: {err}") from None


def _load_encoder(explicit: Optional[str], adapter: Optional[str], device: torch.device):
    from ..encoder import ProfileEncoder

    if explicit:
        spec, where = {"source": explicit}, "--encoder"
    else:
        spec, where = find_encoder(adapter)
    if spec is None:
        logger.warning("no recorded profile encoder for %s (%s): using the default all-MiniLM-L6-v2", adapter, where)
        enc = ProfileEncoder.default(device=device, cache=False)
        return enc, {**enc.describe(), "found": f"default ({where})"}
    kwargs = {k: spec[k] for k in ("pooling", "normalize", "max_length") if spec.get(k) is not None}
    enc = ProfileEncoder(spec["source"], device=device, cache=False, **kwargs)
    return enc, {**enc.describe(), "found": where}


def _context_length(model, tokenizer, cap: Optional[int]) -> int:
    cfg = getattr(model, "config", None)
    n = None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            n = value
            break
    if n is None:
        tok_max = getattr(tokenizer, "model_max_length", None)
        n = tok_max if isinstance(tok_max, int) and 0 < tok_max < 10**7 else 2048
    if cap is not None:
        if cap < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {cap}")
        n = min(n, int(cap))
    return int(n)


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    """Tokens that end the assistant's turn: the generation config's and tokenizer's eos, and the chat template's
    end-of-turn token when the vocabulary has one."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None)
    if isinstance(value, int):
        ids.append(value)
    elif isinstance(value, (list, tuple)):
        ids.extend(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if token in vocab:
            ids.append(int(vocab[token]))
    return tuple(dict.fromkeys(ids))
