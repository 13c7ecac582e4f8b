"""Conditional GRPO on TRL's GRPOTrainer (transformers generation, no vLLM), starting from a `cuma train sft` output.

Recipe (:func:`run_grpo`): pair records -> one prompt per (conversation, turn) with its chosen response as the
``reference`` -> the SFT output as policy (``default``) and, when ``grpo.beta > 0``, again as the frozen reference
(``ref``) -> :class:`ProfileGRPOTrainer` -> adapter + run record.

Reward: the profile-aware pairwise judge (``cuma.evaluate.judges``) compares each completion with the reference
response in both orders (win 1, tie 0.5, loss 0) as an async reward function (TRL runs it on its event loop); the
dataset columns ``reference`` and ``profile_text`` reach it as keyword lists. ``reward.model`` gives a reward-model
path instead (TRL loads it as a sequence classifier). An unparseable verdict makes the reward the neutral 0.5; how
many rewards of each generation batch were that fallback is logged (``judge/fallback_fraction``), kept in
``run.json`` (``reward_validity``) and warned about when it is most of them (:class:`VerdictTally`).

How the profile reaches the model: TRL builds the generation and log-prob inputs itself, so the trainer
(1) looks up one profile row per example of the generation batch (TRL's sampler already repeats each prompt
``num_generations`` times, so row i belongs to completion i) and returns them in the batch as ``profile_embeds``
(shuffled and split with the other tensors); (2) a :class:`cuma.train.preference.ProfileInjector` adds those rows
to every ``forward``/``generate`` call made without ``profile_embeds`` while a batch is active; (3) the log-prob
helper is run chunk by chunk so each forward gets the rows of its chunk. No TRL method body is copied.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any, Optional

import torch
from trl import GRPOConfig, GRPOTrainer

from .. import methods
from ..evaluate.judges import VERDICTS, Judge, make_reward_fn
from ..runinfo import check_output_dir, environment_record
from .checkpoints import CheckpointMixin, resolve_resume, resumed_record
from .config import GRPORunConfig
from .dpo import _build_policy
from .preference import (
    REFERENCE_ADAPTER,
    BalanceLossMixin,
    ProfileInjector,
    add_reference_adapter,
    fit_profile_centers,
    load_preference_data,
    profile_lookup,
    profile_source,
)
from .run_record import data_record, save_run

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def prompt_rows(records: list[dict], profile_in_prompt: bool) -> list[dict]:
    """One GRPO prompt per (conversation, user, turn): the history ending with the user's turn (system prompt with
    the profile when asked), its chosen response as ``reference``, and the profile columns."""
    from ..data.conversations import prompt_messages

    rows, seen = [], set()
    for r in records:
        key = (r.get("conversation_id"), r.get("user_id"), r.get("turn"), json.dumps(r["prompt"], sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        rows.append({
            "id": str(r.get("id", "")),
            "prompt": prompt_messages(r, profile_in_prompt=profile_in_prompt),
            "reference": r["chosen"],
            "profile_text": r.get("profile_text", ""),
            "profile_index": int(r.get("profile_index", -1)),
        })
    return rows


class VerdictTally:
    """What the judge reward said, per reward call (one per generation batch): how many rewards it gave, how many of
    them were the neutral fallback of an invalid outcome (an unparseable verdict in either order) and how many
    verdicts could not be parsed. ``pop()`` returns the counts since the last pop; ``totals`` the whole run."""

    def __init__(self) -> None:
        self._pending = {"rewards": 0, "fallback_rewards": 0, "unparseable_verdicts": 0}
        self.totals = dict(self._pending)
        self.batches: list[dict[str, int]] = []

    def add(self, rewards: int, fallback: int, unparseable: int) -> None:
        for key, n in (("rewards", rewards), ("fallback_rewards", fallback), ("unparseable_verdicts", unparseable)):
            self._pending[key] += n
            self.totals[key] += n

    def pop(self) -> dict[str, int]:
        out, self._pending = self._pending, {k: 0 for k in self._pending}
        return out

    def summary(self) -> dict[str, Any]:
        n = self.totals["rewards"]
        return {**self.totals, "fallback_fraction": self.totals["fallback_rewards"] / n if n else None,
                "per_generation_batch": list(self.batches)}


class CountingJudge(Judge):
    """A bare judge (any object with the ``compare`` coroutine) with the counters of :class:`cuma.evaluate.judges.Judge`
    that the reward function keeps; a reply that is not A / B / tie counts as unparseable and becomes None."""

    name = "wrapped"

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    async def compare(self, prompt, profile_text, answer_a, answer_b):
        verdict = await self.inner.compare(prompt, profile_text, answer_a, answer_b)
        self.count("judged")
        if verdict not in VERDICTS:
            self.count("unparseable")
            return None
        self.count(f"verdict_{verdict}")
        return verdict


def judge_reward_fn(judge):
    """The GRPO reward of ``judge``: ``cuma.evaluate.judges.make_reward_fn`` (win 1, tie 0.5, loss 0 against the
    reference response; an invalid outcome gets the neutral 0.5), counting per call how many rewards were that
    fallback (``.verdict_tally``, read by :class:`ProfileGRPOTrainer` into the log and ``run.json``)."""
    if not isinstance(judge, Judge):
        judge = CountingJudge(judge)
    inner = make_reward_fn(judge)
    tally = VerdictTally()

    async def judge_reward(prompts, completions, **kwargs):
        before = (judge.stats.get("reward_invalid", 0), judge.stats.get("unparseable", 0))
        rewards = await inner(prompts, completions, **kwargs)
        tally.add(len(rewards), judge.stats.get("reward_invalid", 0) - before[0],
                  judge.stats.get("unparseable", 0) - before[1])
        return rewards

    judge_reward.verdict_tally = tally
    judge_reward.judge = judge
    return judge_reward


# more than this share of fallback rewards in a generation batch: the judge is not judging, GRPO learns nothing
FALLBACK_WARN_FRACTION = 0.5


def make_judge(cfg):
    from ..evaluate import judges

    classes = {"http": "HTTPJudge", "transformers": "TransformersJudge"}
    if cfg.reward.judge not in classes:
        raise ValueError(f"reward.judge: expected one of {sorted(classes)}, got {cfg.reward.judge!r}")
    return getattr(judges, classes[cfg.reward.judge])(**dict(cfg.reward.judge_options))


class ProfileGRPOTrainer(CheckpointMixin, BalanceLossMixin, GRPOTrainer):
    """GRPOTrainer that routes on the profile in generation and in every log-prob pass, uses the SFT adapter as the
    reference (``reference_path``) and adds the balance loss of the policy pass."""

    def __init__(self, *args, profile_table=None, encoder=None, uses_profile: bool = True,
                 reference_path: Optional[str] = None, **kwargs):
        self.profile_table, self.profile_encoder, self.uses_profile = profile_table, encoder, uses_profile
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            if reference_path is not None and self.beta != 0.0:
                add_reference_adapter(model, reference_path, REFERENCE_ADAPTER)
            elif REFERENCE_ADAPTER in model.peft_config:
                model.delete_adapter(REFERENCE_ADAPTER)  # beta 0 (no reference pass) or a fresh adapter (base model)
                model.set_adapter("default")
        self.profile_injector = ProfileInjector(model) if uses_profile else None

    def _profile_scope(self, rows):
        from contextlib import nullcontext

        if self.profile_injector is None or rows is None:
            return nullcontext()
        return self.profile_injector.use(rows)

    def _generate_and_score_completions(self, inputs):
        if not self.uses_profile:
            output = super()._generate_and_score_completions(inputs)
        else:
            rows = profile_lookup(self.profile_table, self.profile_encoder, inputs).to(self.accelerator.device)
            with self._profile_scope(rows):
                output = super()._generate_and_score_completions(inputs)
            output["profile_embeds"] = rows  # travels with the batch through TRL's shuffle and split
        self._log_verdicts()
        return output

    def verdict_tallies(self) -> list[VerdictTally]:
        return [f.verdict_tally for f in self.reward_funcs if isinstance(getattr(f, "verdict_tally", None), VerdictTally)]

    def _log_verdicts(self) -> None:
        """Per generation batch: fallback rewards and unparseable verdicts of the judge reward, into the trainer's
        metrics (averaged into each logged step), the tally's batch list (``run.json``) and a warning when most of
        the batch's rewards are the fallback."""
        mode = "train" if self.model.training else "eval"
        for tally in self.verdict_tallies():
            batch = tally.pop()
            if not batch["rewards"]:
                continue
            fraction = batch["fallback_rewards"] / batch["rewards"]
            self._metrics[mode]["judge/fallback_rewards"].append(float(batch["fallback_rewards"]))
            self._metrics[mode]["judge/fallback_fraction"].append(fraction)
            self._metrics[mode]["judge/unparseable_verdicts"].append(float(batch["unparseable_verdicts"]))
            tally.batches.append({"step": int(self.state.global_step), "mode": mode, **batch})
            if fraction > FALLBACK_WARN_FRACTION and not getattr(self, "_warned_fallback", False):
                self._warned_fallback = True
                warnings.warn(
                    f"GRPO step {self.state.global_step}: {batch['fallback_rewards']} of {batch['rewards']} judge "
                    f"rewards are the 0.5 fallback ({batch['unparseable_verdicts']} unparseable verdicts): the judge's "
                    "replies cannot be read as A / B / tie, so these rewards carry no signal. Check the judge "
                    "(reward.judge_options) before training further; counts per step are in the log "
                    "(judge/fallback_fraction) and run.json (reward_validity).",
                    stacklevel=2,
                )

    def _compute_loss(self, model, inputs):
        with self._profile_scope(inputs.get("profile_embeds")):
            return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        rows = self.profile_injector.rows if self.profile_injector is not None else None
        if rows is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        if any(kwargs.get(k) is not None for k in _MULTIMODAL):
            raise NotImplementedError("profile-routed GRPO supports text-only models")
        n = input_ids.size(0)
        if rows.shape[0] != n:
            raise ValueError(f"{rows.shape[0]} profile rows for a log-prob batch of {n} sequences")
        size = batch_size or n
        logps, entropies, aux = [], [], []
        for start in range(0, n, size):  # the parent's chunking, with each chunk's own profile rows
            end = min(start + size, n)
            with self.profile_injector.use(rows[start:end]):
                lp, ent, ax = super()._get_per_token_logps_and_entropies(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep, batch_size=None,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss)
            logps.append(lp)
            entropies.append(ent)
            aux.append(ax)
        return (
            torch.cat(logps, dim=0),
            torch.cat(entropies, dim=0) if compute_entropy else None,
            torch.stack(aux).mean() if compute_aux_loss else None,
        )


def run_grpo(cfg: GRPORunConfig, judge=None, reward_funcs=None) -> dict[str, Any]:
    """Conditional GRPO on the prompts of ``cfg.data.path``'s pair records. ``judge`` (an object with the judge's
    ``compare`` coroutine) or ``reward_funcs`` replace the judge built from ``cfg.reward``."""
    from datasets import Dataset
    from transformers import set_seed

    from ..models import describe

    out = check_output_dir(cfg.train.output_dir, "train.output_dir")
    resume = resolve_resume(out, cfg.train.resume_from_checkpoint)
    resume.say("cuma train grpo")
    set_seed(cfg.train.seed)
    t0 = time.perf_counter()

    data = load_preference_data(cfg.data.path, kind="pairs")
    records = data.split(cfg.data.train_split)
    built, ref_model, reference_path, tokenizer = _build_policy(cfg, data)
    rows = prompt_rows(records, built.profile_in_prompt)
    if cfg.data.limit is not None:
        rows = rows[: cfg.data.limit]
    if not rows:
        raise ValueError(f"data.path={cfg.data.path}: split {cfg.data.train_split!r} has no prompts")
    train_ds = Dataset.from_list(rows)
    eval_ds = None
    if cfg.data.eval_split:
        eval_ds = Dataset.from_list(prompt_rows(data.split(cfg.data.eval_split), built.profile_in_prompt))

    if reward_funcs is None:
        if cfg.reward.model:
            reward_funcs = [cfg.reward.model]
            reward_kind = {"reward_model": cfg.reward.model}
        else:
            reward_funcs = [judge_reward_fn(judge if judge is not None else make_judge(cfg))]
            reward_kind = {"judge": cfg.reward.judge if judge is None else type(judge).__name__}
    else:
        reward_kind = {"custom": [getattr(f, "__name__", str(f)) for f in reward_funcs]}

    table, encoder = profile_source(data.profile_embeds, cfg.data.encoder, built.uses_profile)
    if built.uses_profile:
        width = table.shape[1] if table is not None else encoder.dim
        if width != built.profile_dim:
            raise ValueError(f"the method's profile_dim={built.profile_dim} does not match the profile embeddings' width {width}")
        fit_profile_centers(built.model, records, table, encoder)  # router_profile_center='train', when not fitted
    g = cfg.grpo
    extra = dict(beta=g.beta, num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                 temperature=g.temperature, top_p=g.top_p, num_iterations=g.num_iterations,
                 disable_dropout=g.disable_dropout, use_vllm=False,
                 eval_strategy="steps" if eval_ds is not None and cfg.train.eval_steps else "no")
    for name in ("loss_type", "steps_per_generation", "scale_rewards"):
        if getattr(g, name) is not None:
            extra[name] = getattr(g, name)
    from .preference import train_args_common

    args = train_args_common(cfg.train, built, GRPOConfig, **extra)
    if ref_model is not None:
        raise ValueError("GRPO from an fft SFT output is not supported here (PEFT adapters only)")
    trainer = ProfileGRPOTrainer(
        model=built.model, reward_funcs=reward_funcs, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, profile_table=table, encoder=encoder, uses_profile=built.uses_profile,
        reference_path=reference_path,
    )
    t_train = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=None if resume.checkpoint is None else str(resume.checkpoint))
    finally:
        if trainer.profile_injector is not None:
            trainer.profile_injector.remove()
    train_seconds = time.perf_counter() - t_train

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config") and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")
    methods.save(built, out)
    validity = _reward_validity(trainer)
    run = {
        "command": "cuma train grpo",
        "method": built.record(),
        "init": {"sft_path": cfg.init.sft_path,
                 "reference": None if g.beta == 0 else ("sft adapter" if cfg.init.sft_path else "base model")},
        "reward": reward_kind,
        "reward_validity": validity,
        **resumed_record(resume, trainer, result.training_loss),
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "train_prompts": len(rows),
        "log_history": list(trainer.state.log_history),
        "base_model": describe(cfg.model.name_or_path),
        "data": data_record(data, cfg.data.train_split),
        "environment": environment_record(),
    }
    save_run(trainer, cfg, out, run)
    return run


def _reward_validity(trainer: ProfileGRPOTrainer) -> Optional[dict[str, Any]]:
    """Fallback rewards and unparseable verdicts of the judge reward over the run (None without a judge reward);
    warns when most of the run's rewards were the fallback."""
    tallies = trainer.verdict_tallies()
    if not tallies:
        return None
    summary = tallies[0].summary()
    fn = next(f for f in trainer.reward_funcs if getattr(f, "verdict_tally", None) is tallies[0])
    summary["judge_stats"] = dict(getattr(fn.judge, "stats", {}))
    frac = summary["fallback_fraction"]
    if frac is not None and frac > FALLBACK_WARN_FRACTION:
        warnings.warn(
            f"GRPO: {summary['fallback_rewards']} of {summary['rewards']} judge rewards over the run were the 0.5 "
            f"fallback ({summary['unparseable_verdicts']} unparseable verdicts); the policy was trained on little or "
            "no reward signal",
            stacklevel=2,
        )
    return summary
