"""Conditional SFT for every method of the registry, on TRL's SFTTrainer.

The recipe reads top to bottom in :func:`run_sft`: prepared data -> tokenised examples -> base model -> method ->
trainer (balance loss added in ``compute_loss``) -> train -> adapter + run record.
"""

from __future__ import annotations

import dataclasses
import math
import re
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import torch
from trl import SFTConfig, SFTTrainer

from .. import methods
from ..distributed import prepare_for_zero3
from ..models import DTYPES
from ..routing import clear_balance_loss, pop_balance_loss, record_gates
from ..runinfo import check_output_dir, environment_record
from .checkpoints import CheckpointMixin, resolve_resume, resumed_record
from .collator import ProfileCollator, split_by_length, tokenize_example
from .config import SFTRunConfig, attention_kwargs
from . import distribution
from .distribution import answer_logits, distribution_loss
from .run_record import data_record, save_run



def expert_load_entropy(record) -> Optional[float]:
    """Mean over routed layers of the normalised entropy of the expert load (non-pad tokens): 1 = every expert used
    equally, 0 = one expert takes everything (routing collapse)."""
    values = []
    for name, gates in record.gates.items():
        for g, m in zip(gates, record.masks[name]):
            g = g.float()
            if m is not None:
                g = g[m.to(g.device)]
            else:
                g = g.reshape(-1, g.shape[-1])
            if g.numel() == 0 or g.shape[-1] < 2:
                continue
            load = g.sum(0) / g.sum().clamp_min(1e-12)
            h = -(load * load.clamp_min(1e-12).log()).sum() / math.log(g.shape[-1])
            values.append(h.item())
    return sum(values) / len(values) if values else None


@contextmanager
def labelled_positions_only(device: torch.device):
    """On the CPU, let TRL's fused LM head score only the positions with a label.

    TRL 1.16 projects only the labelled positions through the LM head on Triton devices and every position elsewhere
    (fixed tile shapes for compiled backends); on the CPU the compact path is the same plain-torch tiles on fewer
    rows. With an answer of a few tokens after a ~140-token prompt this skips nearly all of the LM head, forward and
    backward (for SmolLM2 at batch 8 x 140 on two cores the head is ~0.5 s of a 2.5 s forward). Scoped to one call
    and restored after it; a no-op elsewhere or when TRL no longer has the switch."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover
        trl_utils = None
    original = getattr(trl_utils, "_use_triton", None)
    if device.type != "cpu" or original is None:
        yield
        return
    trl_utils._use_triton = lambda d: True if d.type == "cpu" else original(d)
    try:
        yield
    finally:
        trl_utils._use_triton = original


class ProfileSFTTrainer(CheckpointMixin, SFTTrainer):
    """SFTTrainer that adds the routers' balance loss with the trainer's gradient-accumulation scaling and logs it
    (and the expert-load entropy) separately. Works unchanged for methods without routers.

    ``split_by_length`` > 1 runs every batch as that many micro-batches of similar length (``split_by_length`` of
    the collator module), each backpropagated at once: the task loss is normalised by the whole batch's labelled
    tokens (``num_items_in_batch``), so the micro-batches' gradients add up to the batch's; the balance term is the
    mean of the micro-batches' terms, as under gradient accumulation."""

    def __init__(self, *args, router_learning_rate: Optional[float] = None, split_by_length: int = 1,
                 loraplus_lr_ratio: Optional[float] = None, **kwargs):
        if loraplus_lr_ratio is not None and not (isinstance(loraplus_lr_ratio, (int, float))
                                                  and not isinstance(loraplus_lr_ratio, bool) and loraplus_lr_ratio > 0):
            raise ValueError(f"train.loraplus_lr_ratio must be a number > 0 (or unset), got {loraplus_lr_ratio!r}")
        if not isinstance(split_by_length, int) or isinstance(split_by_length, bool) or split_by_length < 1:
            raise ValueError(f"train.split_by_length must be an integer >= 1, got {split_by_length!r}")
        self.router_learning_rate = router_learning_rate
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.split_by_length = split_by_length
        self._micro_batches = 1  # micro-batches of the batch being trained on (the balance term's share)
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.split_by_length == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("train.split_by_length > 1 cannot run under DeepSpeed (it counts one micro-step per "
                             "backward); use gradient_accumulation_steps there")
        if num_items_in_batch is None or not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            raise ValueError("train.split_by_length > 1 needs a loss normalised by the batch's labelled tokens "
                             "(num_items_in_batch), which this model or trainer does not take; set it to 1")
        pieces = split_by_length(inputs, self.split_by_length)
        self._micro_batches = len(pieces)
        try:
            return sum(super(ProfileSFTTrainer, self).training_step(model, p, num_items_in_batch) for p in pieces)
        finally:
            self._micro_batches = 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        clear_balance_loss(model)  # drop terms a gradient-checkpointing recompute left behind
        compact = labelled_positions_only(self.args.device) if not return_outputs else nullcontext()
        with record_gates(model, to_cpu=False) if mode == "train" else nullcontext() as rec, compact:
            # return_outputs only when asked: TRL's fused LM head then needs a second forward for the logits
            result = self.task_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        balance = pop_balance_loss(model)
        if balance is not None:
            # like TRL's MoE aux loss: a per-micro-batch mean; with num_items_in_batch the Trainer leaves gradient
            # accumulation to the loss, so average it over the accumulation steps here
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + balance.to(loss.device) / (steps * self._micro_batches)
            self._metrics[mode]["balance_loss"].append(float(balance.detach()))
        if rec is not None and rec.gates:
            entropy = expert_load_entropy(rec)
            if entropy is not None:
                self._metrics[mode]["expert_load_entropy"].append(entropy)
        return (loss, outputs) if return_outputs else loss

    def task_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss before the balance term: TRL's token loss here (cuma.train.distribution replaces it)."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        """The Trainer's own optimizer (``optim``, betas, epsilon, its decay / no-decay split), with the routers and
        the profile projection in groups of their own at ``router_learning_rate`` when one is given, and the adapters'
        B matrices at ``loraplus_lr_ratio`` x the learning rate when that is given."""
        if (self.router_learning_rate is None and self.loraplus_lr_ratio is None) or self.optimizer is not None:
            return super().create_optimizer(model)
        from transformers.trainer import is_optimizer_factory

        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        own_groups = any(k in optimizer_kwargs for k in ("params", "model", "optimizer_dict"))
        if is_optimizer_factory(optimizer_cls) or own_groups:
            name = "router_learning_rate" if self.router_learning_rate is not None else "loraplus_lr_ratio"
            raise ValueError(
                f"train.{name} cannot be combined with optim={self.args.optim!r}: that optimizer builds "
                f"its own parameter groups; leave {name} unset or use an AdamW/SGD-style optimizer"
            )
        groups = router_param_groups(opt_model, self.get_decay_parameter_names(opt_model), self.args.weight_decay,
                                     self.router_learning_rate, lora_b_lr=None if self.loraplus_lr_ratio is None
                                     else self.args.learning_rate * self.loraplus_lr_ratio)
        # hand the groups to Trainer.create_optimizer through its own "params" hook (as GaLore's kwargs do), so it
        # keeps doing everything else it does (bitsandbytes overrides, SageMaker wrapping)
        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (optimizer_cls, {**optimizer_kwargs, "params": groups})
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = saved


class DistributionSFTTrainer(ProfileSFTTrainer):
    """:class:`ProfileSFTTrainer` whose task loss is :func:`cuma.train.distribution.distribution_loss` (balance loss, router
    learning rate, LoRA+ and ``split_by_length`` as there). Logs the plain cross-entropy term's batch value too."""

    def __init__(self, *args, cdf_loss_weight: float = 0.0, **kwargs):
        self.cdf_loss_weight = float(cdf_loss_weight)
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if num_items_in_batch is None and self.split_by_length > 1:
            # there are no label tokens to count; the loss is normalised by cell_weight_total instead, which every
            # micro-batch carries, so any count lets the split run (task_loss follows the Trainer's GA scaling)
            num_items_in_batch = int(inputs["input_ids"].shape[0])
        return super().training_step(model, inputs, num_items_in_batch)

    def task_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        cell = {k: inputs.pop(k) for k in ("letter_ids", "letter_mask", "target", "cell_weight", "cell_weight_total",
                                           "ordinal")}
        inputs.pop("labels", None)
        logits = answer_logits(model, inputs.pop("input_ids"), inputs.pop("attention_mask"), **inputs)
        letter_logits = torch.gather(logits, 1, cell["letter_ids"].to(logits.device))
        dev = letter_logits.device
        loss = distribution_loss(letter_logits, cell["letter_mask"].to(dev), cell["target"].to(dev),
                                 cell["cell_weight"].to(dev), cell["cell_weight_total"].to(dev),
                                 cell["ordinal"].to(dev), self.cdf_loss_weight)
        # the Trainer divides the loss by the accumulation steps itself unless it takes it as already normalised by
        # the whole accumulated batch (a model that accepts loss kwargs and a num_items_in_batch): then do it here
        scaled = self.loss_is_scaled_for_ga if getattr(self, "loss_is_scaled_for_ga", None) is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        if scaled and self.model.training:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, {"logits": letter_logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def is_router_parameter(name: str) -> bool:
    """Routers and the profile projection: the parameters ``router_learning_rate`` applies to."""
    return "router" in name or "profile_proj" in name


# the up-projections of every LoRA-style adapter: PEFT's lora_B / lora_embedding_B and the mixtures' per-expert B
_LORA_B = re.compile(r"(^|\.)(lora|lora_embedding|cuma|hydralora|mixlora|mixlora_gate|mixlora_up|mixlora_down)_B(\.|$)")


def is_lora_b_parameter(name: str) -> bool:
    """An adapter's B matrix (the up-projection, zero at init): the parameters ``loraplus_lr_ratio`` applies to."""
    return _LORA_B.search(name) is not None


def router_param_groups(model, decay_names, weight_decay: float, router_lr: Optional[float],
                        lora_b_lr: Optional[float] = None) -> list[dict]:
    """Trainable parameters in optimizer groups of (other | router | B matrix) x (decay | no decay). Router groups
    carry ``lr=router_lr`` and B-matrix groups ``lr=lora_b_lr`` where those are given; everything else takes the
    optimizer's learning rate. Empty groups are left out."""
    decay_names = set(decay_names)
    buckets: dict[tuple[int, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            if router_lr is not None and is_router_parameter(n):
                kind = 1
            elif lora_b_lr is not None and is_lora_b_parameter(n):
                kind = 2
            else:
                kind = 0
            buckets.setdefault((kind, n in decay_names), []).append(p)
    groups = []
    for (kind, decay), params in sorted(buckets.items()):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if kind:
            group["lr"] = router_lr if kind == 1 else lora_b_lr
        groups.append(group)
    return groups


def _sft_args(cfg: SFTRunConfig, built: methods.BuiltMethod, has_eval: bool) -> SFTConfig:
    t = cfg.train
    gradient_checkpointing = t.gradient_checkpointing and built.gradient_checkpointing_allowed
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name still works, warns)
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    checkpointing = {
        ckpt: gradient_checkpointing,
        f"{ckpt}_kwargs": {"use_reentrant": False} if gradient_checkpointing else None,
    }
    return SFTConfig(
        **checkpointing,
        output_dir=t.output_dir,
        seed=t.seed,
        data_seed=t.seed,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        fp16=t.fp16,
        logging_steps=t.logging_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        report_to=t.report_to,
        deepspeed=t.deepspeed,
        dataloader_num_workers=t.dataloader_num_workers,
        disable_tqdm=t.disable_tqdm,
        # the collator builds labels and profile_embeds from our own tokenised columns
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=cfg.data.max_length,
        # every expert parameter is in the graph (dense experts), so DDP needs no unused-parameter search
        ddp_find_unused_parameters=False,
    )


def run_sft(cfg: SFTRunConfig, callbacks: Optional[list] = None) -> dict[str, Any]:
    """Train ``cfg.method.name`` on the prepared data and save the result in ``cfg.train.output_dir``.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. an evaluation at chosen steps)."""
    from datasets import Dataset
    from transformers import set_seed

    from ..data.records import load_prepared
    from ..models import describe, load_base_and_tokenizer

    # before any work: the output folder can be written, and where the run starts (a folder holding checkpoints is
    # resumed only when asked)
    out = check_output_dir(cfg.train.output_dir, "train.output_dir")
    resume = resolve_resume(out, cfg.train.resume_from_checkpoint)
    resume.say("cuma train sft")
    set_seed(cfg.train.seed)
    t0 = time.perf_counter()

    # data -> tokenised examples (WVB choice records, or the conversation records of a preference folder)
    from .preference import (fit_profile_centers, is_preference_folder, load_preference_data, record_format,
                             tokenize_conversation)

    distribution.check_objective(cfg.train)
    if cfg.train.objective == "distribution":  # one example per opinion cell (cuma data opinions)
        data = distribution.load_cells(cfg.data.path)
    elif cfg.data.format == "conversations" or (cfg.data.format == "auto" and is_preference_folder(cfg.data.path)):
        data = load_preference_data(cfg.data.path, kind="sft")
    else:
        data = load_prepared(cfg.data.path)
    records = data.split(cfg.data.train_split)
    if cfg.data.limit is not None:
        records = records[: cfg.data.limit]
    if not records:
        raise ValueError(f"data.path={cfg.data.path}: split {cfg.data.train_split!r} has no records to train on")
    eval_records = data.split(cfg.data.eval_split) if cfg.data.eval_split else []

    # base model -> method
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype: expected one of {sorted(DTYPES)}, got {cfg.model.dtype!r}")
    base, tokenizer = load_base_and_tokenizer(cfg.model.name_or_path, dtype=DTYPES[cfg.model.dtype],
                                              **attention_kwargs(cfg.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    options = dict(cfg.method.options)
    if cfg.method.profile_in_prompt is not None:
        options["profile_in_prompt"] = cfg.method.profile_in_prompt
    spec = methods.get_spec(cfg.method.name)
    if not spec.trainable:
        raise ValueError(f"method.name={cfg.method.name!r} is a prompting baseline: there is nothing to train")
    if spec.profile_routing and "profile_dim" in spec.options and "profile_dim" not in options:
        options["profile_dim"] = _profile_dim(data, cfg)
    built = methods.build(cfg.method.name, base, **options)
    # ZeRO-3: adapter layers become leaf modules and take the base dtype (a no-op for every other launch)
    prepare_for_zero3(built.model, cfg.train.deepspeed)

    if cfg.train.objective == "distribution":
        tokenize_one = distribution.cell_tokenizer(tokenizer)
    else:
        tokenize_one = tokenize_conversation if record_format(records, cfg.data.format) == "conversations" else tokenize_example

    def tokenize(rows):
        return [tokenize_one(r, tokenizer, built.profile_in_prompt, cfg.data.max_length) for r in rows]

    train_ds = Dataset.from_list(tokenize(records))
    eval_ds = Dataset.from_list(tokenize(eval_records)) if eval_records else None

    encoder = None
    table = data.profile_embeds
    if built.uses_profile and (cfg.data.encoder or table is None):
        from ..encoder import ProfileEncoder

        encoder = ProfileEncoder(cfg.data.encoder) if cfg.data.encoder else ProfileEncoder.default()
        table = None
    if built.uses_profile:
        width = table.shape[1] if table is not None else encoder.dim
        if width != built.profile_dim:
            raise ValueError(
                f"method.options.profile_dim={built.profile_dim} does not match the profile embeddings' width {width}"
            )
    if built.uses_profile:  # router_profile_center='train': the routers' profile input is centred on these profiles
        fit_profile_centers(built.model, records, table, encoder)
    collator = ProfileCollator(
        pad_token_id=tokenizer.pad_token_id, profile_table=table, encoder=encoder, uses_profile=built.uses_profile
    )
    trainer_class, objective_kwargs = ProfileSFTTrainer, {}
    if cfg.train.objective == "distribution":
        collator, objective_kwargs = distribution.objective_parts(cfg.train, collator)
        trainer_class = DistributionSFTTrainer

    callbacks = [cb for cb in [methods.trainer_callback(built), *(callbacks or [])] if cb is not None]
    trainer = trainer_class(
        model=built.model,
        args=_sft_args(cfg, built, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
        router_learning_rate=cfg.train.router_learning_rate,
        loraplus_lr_ratio=cfg.train.loraplus_lr_ratio,
        split_by_length=cfg.train.split_by_length,
        **objective_kwargs,
    )
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=None if resume.checkpoint is None else str(resume.checkpoint))
    train_seconds = time.perf_counter() - t_train

    # outputs: the method (adapter / full model), resolved config, versions, data hashes
    methods.save(built, out)
    tokens = sum(len(x) for x in train_ds["input_ids"])
    history = [h for h in trainer.state.log_history if "loss" in h or "balance_loss" in h]
    run = {
        "command": "cuma train sft",
        "method": built.record(),
        **resumed_record(resume, trainer, result.training_loss),
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "train_records": len(records),
        "train_tokens_per_epoch": tokens,
        "log_history": history,
        "base_model": describe(cfg.model.name_or_path),
        "data": data_record(data, cfg.data.train_split),
        "environment": environment_record(),
    }
    save_run(trainer, cfg, out, run)
    return run


def _profile_dim(data, cfg: SFTRunConfig) -> int:
    if cfg.data.encoder:
        from ..encoder import ProfileEncoder

        return ProfileEncoder(cfg.data.encoder).dim
    if data.profile_embeds is not None:
        return int(data.profile_embeds.shape[1])
    from ..encoder import ProfileEncoder

    return ProfileEncoder.default().dim
