"""Shared pieces of the preference stages (``cuma train dpo|grpo``) and of SFT on conversation records.

- :func:`load_preference_data`: a prepared preference folder (``docs/preference-schema.md``) behind the small
  interface ``run_sft`` reads (``split()``, ``profile_embeds``, ``path``, ``split_file()``).
- :func:`tokenize_conversation`: an SFT conversation record (``messages`` + ``supervise``) -> ``input_ids`` and the
  ``completion_mask`` of the supervised assistant turns (same output as :func:`cuma.train.collator.tokenize_example`).
- :func:`load_policy_and_reference`: the SFT output loaded twice on one base model: adapter ``default`` (trainable,
  the policy) and adapter ``ref`` (frozen, the reference). ``ref`` is the name TRL's DPO/GRPO trainers look for.
- :class:`BalanceLossMixin`: adds the routers' balance loss of the policy forward to a TRL trainer's loss with that
  trainer's gradient-accumulation scaling (DESIGN decision 5).
- :class:`ProfileInjector`: supplies ``profile_embeds`` to forward/generate calls a trainer makes without them (GRPO).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..routing import clear_balance_loss, pop_balance_loss

REFERENCE_ADAPTER = "ref"  # the adapter name TRL's DPOTrainer / GRPOTrainer use as the reference


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class PreferenceData:
    """A prepared preference folder: records are read lazily per (kind, split)."""

    path: Path
    kind: str  # "sft" | "pairs" | "choice": which record files split() reads
    profiles: list[dict] = field(default_factory=list)
    profile_embeds: Optional[torch.Tensor] = None
    manifest: dict = field(default_factory=dict)

    def split(self, name: str) -> list[dict]:
        f = self.split_file(name)
        if not f.is_file():
            raise FileNotFoundError(f"{self.path} has no {f.name} (a prepared preference folder from `cuma data prism|ca`)")
        from ..data.records import read_jsonl

        return read_jsonl(f)

    def split_file(self, name: str) -> Path:
        return self.path / f"{self.kind}_{name}.jsonl"


def is_preference_folder(path) -> bool:
    root = Path(path).expanduser()
    return any(root.glob("sft_*.jsonl")) or any(root.glob("pairs_*.jsonl"))


def load_preference_data(path, kind: str, embeddings: bool = True) -> PreferenceData:
    """Read ``profiles.jsonl``, ``profile_embeds.safetensors`` (when present) and ``manifest.json`` of a prepared
    preference folder; the records of ``{kind}_{split}.jsonl`` are read by ``split()``."""
    from ..data.records import EMBEDS_FILE, read_jsonl

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"prepared preference folder {str(root)!r} does not exist")
    profiles = read_jsonl(root / "profiles.jsonl") if (root / "profiles.jsonl").is_file() else []
    embeds = None
    if embeddings and (root / EMBEDS_FILE).is_file():
        from ..data.records import read_profile_embeds

        embeds = read_profile_embeds(root / EMBEDS_FILE)  # unreadable: ValueError naming the file
        if profiles and embeds.shape[0] != len(profiles):
            raise ValueError(
                f"{root / EMBEDS_FILE}: {embeds.shape[0]} rows for {len(profiles)} profiles in profiles.jsonl"
            )
    from ..runinfo import read_json

    manifest = read_json(root / "manifest.json", dict) if (root / "manifest.json").is_file() else {}
    return PreferenceData(path=root, kind=kind, profiles=profiles, profile_embeds=embeds, manifest=manifest)


def record_format(records: Sequence[dict], declared: str = "auto") -> str:
    """``wvb`` (choice records: question/options/gold_letter) or ``conversations`` (messages + supervise)."""
    if declared not in ("auto", "wvb", "conversations"):
        raise ValueError(f"data.format: expected auto, wvb or conversations, got {declared!r}")
    if declared != "auto":
        return declared
    first = records[0] if records else {}
    if "messages" in first:
        return "conversations"
    if "question" in first or "gold_letter" in first:
        return "wvb"
    raise ValueError(f"cannot tell the record format from the keys {sorted(first)}; set data.format")


def conversation_messages(record: dict, profile_in_prompt: bool) -> list[dict]:
    """System message (with the profile sentence when ``profile_in_prompt``) + the record's messages; the same
    system prompt as the DPO/GRPO prompts (``cuma.data.conversations.prompt_messages``)."""
    from ..data.conversations import prompt_messages

    return prompt_messages({"prompt": record["messages"], "profile_text": record.get("profile_text", "")},
                           profile_in_prompt=profile_in_prompt)


def tokenize_conversation(record: dict, tokenizer, profile_in_prompt: bool, max_length: int) -> dict:
    """A conversation record tokenised with the chat template; ``completion_mask`` marks the assistant turns that
    carry the loss (``supervise``: ``all`` assistant turns, or only the ``last``).

    Every assistant turn is located as the suffix of the conversation up to and including that turn after the
    conversation up to it rendered with the generation prompt. Too long conversations lose tokens from the left, so
    the last turn always survives."""
    supervise = record.get("supervise", "all")
    if supervise not in ("all", "last"):
        raise ValueError(f"record {record.get('id')!r}: supervise must be 'all' or 'last', got {supervise!r}")
    messages = conversation_messages(record, profile_in_prompt)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ValueError(f"record {record.get('id')!r} has no assistant turn to train on")
    supervised = set(assistant if supervise == "all" else assistant[-1:])

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full_ids = ids(tokenizer.apply_chat_template(messages[: assistant[-1] + 1], tokenize=False))
    mask = [0] * len(full_ids)
    for i in assistant:
        prefix = ids(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        upto = ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if upto[: len(prefix)] != prefix or full_ids[: len(upto)] != upto:
            raise ValueError(
                f"record {record.get('id')!r}: the chat template does not render each turn as a prefix of the "
                "conversation, so the assistant tokens cannot be located"
            )
        if i in supervised:
            for j in range(len(prefix), len(upto)):
                mask[j] = 1
    if not any(mask):
        raise ValueError(f"record {record.get('id')!r}: the supervised turns rendered to no tokens")
    if len(full_ids) > max_length:
        full_ids, mask = full_ids[-max_length:], mask[-max_length:]
        if not any(mask):
            raise ValueError(f"data.max_length={max_length} leaves no supervised token of record {record.get('id')!r}")
    return {
        "input_ids": full_ids,
        "completion_mask": mask,
        "profile_index": int(record.get("profile_index", -1)),
        "profile_text": record.get("profile_text", ""),
    }


def profile_source(data_table: Optional[torch.Tensor], encoder_name: Optional[str], uses_profile: bool):
    """(table, encoder): the precomputed table, or a ProfileEncoder when asked for / when there is no table."""
    if not uses_profile:
        return None, None
    if encoder_name or data_table is None:
        from ..encoder import ProfileEncoder

        return None, (ProfileEncoder(encoder_name) if encoder_name else ProfileEncoder.default())
    return data_table, None


# ---------------------------------------------------------------------------------------------------------- model


def load_policy_and_reference(sft_path, base_model: nn.Module, reference: bool = True):
    """The SFT output as the policy (adapter ``default``, trainable). Returns ``(built, ref_model)``: ``ref_model`` is
    a second frozen full model for ``fft`` (None otherwise); PEFT adapters get their frozen reference (the same SFT
    adapter under the name ``ref``) from :func:`add_reference_adapter`, called by the trainer."""
    from .. import methods

    rec = methods.read_record(sft_path)
    if rec is None:
        raise ValueError(f"init.sft_path={sft_path}: no {methods.METHOD_FILE}; point it at a `cuma train sft` output")
    spec = methods.get_spec(rec["method"])
    if spec.name == "prefix":
        raise ValueError(
            "preference training from a 'prefix' (P-Tuning v2) SFT output is not supported: PEFT cannot reload a "
            "prompt-learning adapter as trainable nor hold it twice as policy and reference"
        )
    if spec.save_format == "full":
        built = methods.load(None, None, sft_path, is_trainable=True)
        ref = methods.load(None, None, sft_path).model if reference else None
        return built, ref
    # the PEFT reference is added by the trainer after TRL's __init__ (which adds its own ``ref`` copy first and
    # refuses a model that already has one): see add_reference_adapter
    built = methods.load(None, base_model, sft_path, is_trainable=True)
    return built, None


def add_reference_adapter(model, sft_path, name: str = REFERENCE_ADAPTER) -> None:
    """Load the SFT adapter a second time as the frozen adapter ``name`` (replacing one of that name, e.g. the copy
    TRL's trainers make: their copy matches parameter names on ``.default.`` and misses CuMA's expert tensors, whose
    names end in ``.default``), and keep ``default`` active and trainable."""
    import cuma  # noqa: F401  (registers this project's tuners with PEFT)

    from ..methods import _quiet_peft

    active = model.active_adapter
    if name in model.peft_config:
        model.delete_adapter(name)
    with _quiet_peft():
        model.load_adapter(str(sft_path), adapter_name=name, is_trainable=False)
    model.set_adapter(active)
    for n, p in model.named_parameters():
        if f".{name}." in n or n.endswith(f".{name}"):
            p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------- trainer


class BalanceLossMixin:
    """Adds the balance loss recorded during ``compute_loss`` (the policy forward: routed layers record only in train
    mode with gradients enabled, so the reference pass under ``no_grad`` adds nothing) and logs it. The term gets
    the same gradient-accumulation scaling as the trainer's own loss: divided by the accumulation steps here when
    the trainer's loss is already scaled for it (GRPO), left to the Trainer otherwise (DPO)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        clear_balance_loss(model)  # drop terms a gradient-checkpointing recompute or a generation left behind
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        balance = pop_balance_loss(model)
        if balance is not None:
            loss = loss + balance.to(loss.device) / self._balance_scale(num_items_in_batch)
            self._metrics[mode]["balance_loss"].append(float(balance.detach()))
        return (loss, outputs) if return_outputs else loss

    def _balance_scale(self, num_items_in_batch) -> int:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = bool(getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        return self.current_gradient_accumulation_steps if scaled else 1


class ProfileInjector:
    """Gives ``profile_embeds`` to the calls of ``model`` (forward and generate) that come without them, from the
    rows set with :meth:`use`. Used where a trainer builds the model inputs itself (TRL's GRPO generation and
    log-prob passes). Calls that pass ``profile_embeds`` explicitly are left alone; with no rows set, nothing is
    added (a profile-routed adapter then raises its own error)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows: Optional[torch.Tensor] = None
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._generate = model.generate
        injector = self

        def generate(*args, **kwargs):
            if injector.rows is not None and kwargs.get("profile_embeds") is None:
                kwargs["profile_embeds"] = injector._on_device(injector.rows)
            return injector._generate(*args, **kwargs)

        model.generate = generate  # instance attribute: shadows the class method for this model only

    @contextmanager
    def use(self, rows: Optional[torch.Tensor]) -> Iterator[None]:
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous

    def _on_device(self, rows: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        return rows.to(param.device)

    def _pre_forward(self, module, args, kwargs):
        if self.rows is None or kwargs.get("profile_embeds") is not None:
            return None
        kwargs = dict(kwargs)
        kwargs["profile_embeds"] = self._on_device(self.rows)
        return args, kwargs

    def remove(self) -> None:
        self._hook.remove()
        if self.model.__dict__.get("generate") is not None:
            del self.model.__dict__["generate"]


def profile_lookup(table, encoder, examples: Sequence[dict]) -> torch.Tensor:
    """Profile rows of ``examples`` (by ``profile_index`` in ``table``, or encoding ``profile_text``)."""
    from .collator import ProfileCollator

    return ProfileCollator(pad_token_id=0, profile_table=table, encoder=encoder).profile_rows(examples)


def train_args_common(t, built, cls, **extra) -> Any:
    """A TRL config of class ``cls`` from a TrainSection (the same mapping as the SFT stage). The SFT trainer's own
    options (optimizer groups, length-split batches) are refused here rather than dropped."""
    import dataclasses

    sft_only = {"router_learning_rate": None, "loraplus_lr_ratio": None, "split_by_length": 1, "objective": "sft",
                "cell_weighting": "none", "cdf_loss_weight": 0.0}
    set_here = [f"train.{k}={getattr(t, k)!r}" for k, off in sft_only.items() if getattr(t, k, off) != off]
    if set_here:
        raise ValueError(f"{', '.join(set_here)}: these options apply to SFT (cuma train sft) only; the "
                         f"{cls.__name__.removesuffix('Config')} stage would ignore them. Leave them unset here.")

    names = {f.name for f in dataclasses.fields(cls)}
    ckpt_on = t.gradient_checkpointing and built.gradient_checkpointing_allowed
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs = dict(
        output_dir=t.output_dir, seed=t.seed, data_seed=t.seed, learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, bf16=t.bf16,
        fp16=t.fp16, logging_steps=t.logging_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_steps=t.eval_steps, report_to=t.report_to, deepspeed=t.deepspeed,
        dataloader_num_workers=t.dataloader_num_workers, disable_tqdm=t.disable_tqdm,
        remove_unused_columns=False,  # profile_index / profile_text / reference must reach collator and rewards
        ddp_find_unused_parameters=False,
    )
    kwargs[ckpt] = ckpt_on
    kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False} if ckpt_on else None
    kwargs.update(extra)
    return cls(**kwargs)


def fit_profile_centers(model, records: Sequence[dict], table, encoder) -> list[str]:
    """Fit ``profile_center`` (the mean training profile embedding; ``profile_basis`` too where
    ``router_profile_subspace`` > 0) of every CuMA adapter of ``model`` that centres its router's profile input
    (``router_profile_center='train'``) and has none yet (an adapter loaded from an SFT run
    keeps the SFT run's). Each distinct training profile counts once. Returns the adapters it set."""
    from ..tuners.cuma.model import fit_profile_center, needs_profile_fit

    wanted = needs_profile_fit(model)
    if not wanted or not records:
        return []
    if table is not None:
        index = sorted({int(r.get("profile_index", -1)) for r in records})
        if index and (index[0] < 0 or index[-1] >= table.shape[0]):
            raise ValueError(f"profile_index out of range for the profile table of {table.shape[0]} rows")
        rows = table[torch.as_tensor(index)]
    else:
        rows = encoder.encode(sorted({r.get("profile_text", "") for r in records}))
    done = []
    for name in wanted:
        done += fit_profile_center(model, rows.cpu(), adapter_name=name)
    return done
