"""Conditional DPO on TRL's DPOTrainer, starting from a `cuma train sft` output.

Recipe (:func:`run_dpo`): pair records -> conversational prompt/chosen/rejected rows (system prompt with the profile
when the method puts it in the prompt) -> the SFT output loaded twice, ``default`` (trainable policy) and ``ref``
(frozen reference: the SFT policy, not the base model) -> :class:`ProfileDPOTrainer` -> adapter + run record.

- ``profile_embeds``: :class:`PreferenceProfileCollator` gives TRL's batch of 2B rows (chosen then rejected) the
  profile of each row (the pair's profile, twice), for the policy and the reference forward alike (TRL passes the
  same model kwargs to both).
- Reference: TRL's DPOTrainer uses the adapter named ``ref`` when the PEFT model has one. Its own copy of
  ``default`` matches parameters on ``.default.`` and misses CuMA's expert tensors, so the trainer replaces it by
  the SFT adapter loaded from disk.
- Balance loss: only the policy forward records it (the reference runs under ``no_grad``); added with the
  Trainer's gradient-accumulation scaling (:class:`cuma.train.preference.BalanceLossMixin`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .. import methods
from ..models import DTYPES
from ..runinfo import check_output_dir, environment_record
from .checkpoints import CheckpointMixin, resolve_resume, resumed_record
from .config import DPORunConfig, attention_kwargs
from .preference import (
    REFERENCE_ADAPTER,
    BalanceLossMixin,
    add_reference_adapter,
    fit_profile_centers,
    load_policy_and_reference,
    load_preference_data,
    profile_lookup,
    profile_source,
    train_args_common,
)
from .run_record import data_record, save_run



def pair_row(record: dict, profile_in_prompt: bool) -> dict:
    """A pair record as TRL's conversational preference row, plus the profile columns the collator reads."""
    from ..data.conversations import prompt_messages

    return {
        "id": str(record.get("id", "")),
        "prompt": prompt_messages(record, profile_in_prompt=profile_in_prompt),
        "chosen": [{"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "assistant", "content": record["rejected"]}],
        "profile_index": int(record.get("profile_index", -1)),
        "profile_text": record.get("profile_text", ""),
    }


@dataclass
class PreferenceProfileCollator:
    """TRL's preference collator (2B rows: chosen, then rejected) plus ``profile_embeds``, one row per sequence: the
    pair's profile for its chosen and for its rejected row."""

    base: DataCollatorForPreference
    profile_table: Optional[torch.Tensor] = None
    encoder: Any = None
    uses_profile: bool = True

    def __call__(self, examples: Sequence[dict]) -> dict:
        batch = self.base(list(examples))
        if self.uses_profile:
            rows = profile_lookup(self.profile_table, self.encoder, examples)
            n = batch["input_ids"].shape[0]
            if n == 2 * rows.shape[0]:  # TRL's layout: the chosen rows, then the rejected rows of the same pairs
                rows = torch.cat([rows, rows], dim=0)
            elif n != rows.shape[0]:
                raise ValueError(f"DPO batch of {n} sequences for {rows.shape[0]} pairs: expected 2 per pair")
            batch["profile_embeds"] = rows
        return batch


class ProfileDPOTrainer(CheckpointMixin, BalanceLossMixin, DPOTrainer):
    """DPOTrainer whose reference is the SFT adapter loaded as ``ref`` (``reference_path``) and whose loss includes
    the routers' balance term of the policy forward."""

    def __init__(self, *args, reference_path: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if reference_path is not None and hasattr(model, "peft_config"):
            add_reference_adapter(model, reference_path, REFERENCE_ADAPTER)
        elif hasattr(model, "peft_config") and REFERENCE_ADAPTER in model.peft_config:
            # a fresh adapter: the reference is the base model (adapter disabled), not TRL's copy
            model.delete_adapter(REFERENCE_ADAPTER)
            model.set_adapter("default")


def _build_policy(cfg, data):
    """(built, ref_model, reference_path) from init.sft_path, or a fresh method when it is None."""
    from ..models import load_base_and_tokenizer

    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype: expected one of {sorted(DTYPES)}, got {cfg.model.dtype!r}")
    base, tokenizer = load_base_and_tokenizer(cfg.model.name_or_path, dtype=DTYPES[cfg.model.dtype],
                                              **attention_kwargs(cfg.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.init.sft_path:
        built, ref_model = load_policy_and_reference(cfg.init.sft_path, base, reference=True)
        is_peft = built.spec.save_format == "adapter"
        return built, ref_model, (cfg.init.sft_path if is_peft else None), tokenizer
    options = dict(cfg.method.options)
    if cfg.method.profile_in_prompt is not None:
        options["profile_in_prompt"] = cfg.method.profile_in_prompt
    spec = methods.get_spec(cfg.method.name)
    if not spec.trainable:
        raise ValueError(f"method.name={cfg.method.name!r} is a prompting baseline: there is nothing to train")
    if spec.profile_routing and "profile_dim" in spec.options and "profile_dim" not in options:
        if cfg.data.encoder or data.profile_embeds is None:
            from ..encoder import ProfileEncoder

            enc = ProfileEncoder(cfg.data.encoder) if cfg.data.encoder else ProfileEncoder.default()
            options["profile_dim"] = enc.dim
        else:
            options["profile_dim"] = int(data.profile_embeds.shape[1])
    built = methods.build(cfg.method.name, base, **options)
    ref_model = None
    if spec.save_format == "full":
        raise ValueError("fft without init.sft_path has no reference: train SFT first and set init.sft_path")
    return built, ref_model, None, tokenizer


def run_dpo(cfg: DPORunConfig) -> dict[str, Any]:
    """Conditional DPO on the pair records of ``cfg.data.path``; saves the policy adapter in ``cfg.train.output_dir``."""
    from datasets import Dataset
    from transformers import set_seed

    from ..models import describe

    out = check_output_dir(cfg.train.output_dir, "train.output_dir")
    resume = resolve_resume(out, cfg.train.resume_from_checkpoint)
    resume.say("cuma train dpo")
    set_seed(cfg.train.seed)
    t0 = time.perf_counter()

    data = load_preference_data(cfg.data.path, kind="pairs")
    records = data.split(cfg.data.train_split)
    if cfg.data.limit is not None:
        records = records[: cfg.data.limit]
    if not records:
        raise ValueError(f"data.path={cfg.data.path}: split {cfg.data.train_split!r} has no pair records")
    eval_records = data.split(cfg.data.eval_split) if cfg.data.eval_split else []

    built, ref_model, reference_path, tokenizer = _build_policy(cfg, data)
    train_ds = Dataset.from_list([pair_row(r, built.profile_in_prompt) for r in records])
    eval_ds = Dataset.from_list([pair_row(r, built.profile_in_prompt) for r in eval_records]) if eval_records else None

    table, encoder = profile_source(data.profile_embeds, cfg.data.encoder, built.uses_profile)
    if built.uses_profile:
        width = table.shape[1] if table is not None else encoder.dim
        if width != built.profile_dim:
            raise ValueError(f"the method's profile_dim={built.profile_dim} does not match the profile embeddings' width {width}")
        fit_profile_centers(built.model, records, table, encoder)  # router_profile_center='train', when not fitted
    d = cfg.dpo
    args = train_args_common(
        cfg.train, built, DPOConfig,
        beta=d.beta, loss_type=[d.loss_type], max_length=d.max_length, truncation_mode=d.truncation_mode,
        label_smoothing=d.label_smoothing, disable_dropout=d.disable_dropout,
        eval_strategy="steps" if eval_ds is not None and cfg.train.eval_steps else "no",
    )
    collator = PreferenceProfileCollator(
        base=DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=d.max_length,
                                       truncation_mode=d.truncation_mode),
        profile_table=table, encoder=encoder, uses_profile=built.uses_profile,
    )
    trainer = ProfileDPOTrainer(
        model=built.model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, data_collator=collator, reference_path=reference_path,
    )
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=None if resume.checkpoint is None else str(resume.checkpoint))
    train_seconds = time.perf_counter() - t_train

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config") and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)  # save only the policy, under the default name
        model.set_adapter("default")
    methods.save(built, out)
    run = {
        "command": "cuma train dpo",
        "method": built.record(),
        "init": {"sft_path": cfg.init.sft_path, "reference": "sft adapter" if cfg.init.sft_path else "base model"},
        **resumed_record(resume, trainer, result.training_loss),
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "train_records": len(records),
        "log_history": [h for h in trainer.state.log_history if "loss" in h or "balance_loss" in h],
        "base_model": describe(cfg.model.name_or_path),
        "data": data_record(data, cfg.data.train_split),
        "environment": environment_record(),
    }
    save_run(trainer, cfg, out, run)
    return run
