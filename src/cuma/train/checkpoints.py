"""Checkpoints that survive a kill: which one to resume from, how to tell a cut one, and a run loss that covers the
whole run after a resume. Shared by the SFT, DPO and GRPO trainers (:class:`CheckpointMixin`).

A checkpoint folder ``checkpoint-N`` is *complete* when Transformers' last write, ``trainer_state.json``, parses and
names step N, a weights file is there, no file is empty, and every file our record ``cuma_checkpoint.json`` lists
has the size it had when the save finished. The record is written twice: ``{"complete": false}`` before the save
starts (so a folder cut by a kill says so in its own words) and the full list once the save is done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..runinfo import atomic_write_json

RECORD = "cuma_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# test hook: "STEP" makes the save of checkpoint-STEP die by SIGKILL half-way through writing optimizer.pt (the file
# is left empty, as a kill inside torch.save leaves it), so a test can cut a save deterministically
KILL_IN_SAVE_ENV = "CUMA_TEST_KILL_IN_SAVE"
_NAME = re.compile(r"^checkpoint-(\d+)$")

RESUME_LATEST = ("latest", "true", "yes", "1")
RESUME_NONE = ("false", "no", "0", "none", "")


def checkpoint_folders(output_dir: os.PathLike | str) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``output_dir``, newest (highest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def why_incomplete(path: os.PathLike | str) -> Optional[str]:
    """None when ``path`` is a complete checkpoint; else what is wrong with it, in a few words."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    m = _NAME.match(path.name)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return f"no {TRAINER_STATE}: the save was cut before its last file"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is cut or unreadable"
    if m and step != int(m.group(1)):
        return f"{TRAINER_STATE} says step {step}, not {m.group(1)}"
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        return "no model weights file"
    for f in sorted(path.iterdir()):
        if f.is_file() and f.stat().st_size == 0:
            return f"{f.name} is empty (0 bytes)"
    record_file = path / RECORD
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{RECORD} is unreadable"
        for name, size in (record.get("files") or {}).items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} when saved"
    return None


@dataclass
class Resume:
    """What a run resumes from: ``checkpoint`` (None: a fresh start) and the lines that say why."""

    checkpoint: Optional[Path] = None
    step: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"checkpoint", "reason"} of incomplete newer checkpoints
    notes: list[str] = field(default_factory=list)

    def record(self) -> Optional[dict]:
        if self.checkpoint is None:
            return None
        return {"checkpoint": str(self.checkpoint), "step": self.step, "skipped": self.skipped}

    def say(self, prefix: str) -> None:
        for line in self.notes:
            print(f"{prefix}: {line}", file=sys.stderr, flush=True)


def resolve_resume(output_dir: os.PathLike | str, value, option: str = "train.resume_from_checkpoint") -> Resume:
    """Where a run into ``output_dir`` starts, from the option's ``value``:

    - None / "false": a fresh start; a folder that already holds checkpoints is an error that says how to resume
      (retraining over them would mix two runs' checkpoints);
    - "latest" / "true": the newest *complete* checkpoint, naming each newer one skipped and why; a fresh start (said
      so) when there is none yet, an error when every checkpoint there is incomplete;
    - a folder: that checkpoint, which must be complete.
    """
    out = Path(output_dir)
    text = None if value is None else str(value).strip()
    if isinstance(value, bool):
        text = "true" if value else "false"
    found = checkpoint_folders(out)
    if text is None or text.lower() in RESUME_NONE:
        if found:
            names = ", ".join(p.name for _, p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise ValueError(
                f"train.output_dir={str(out)!r} already holds checkpoints of an earlier run ({names}): resume it with "
                f"--{option} latest, or train from scratch into another train.output_dir (or delete the "
                "checkpoint-* folders first)"
            )
        return Resume()
    if text.lower() in RESUME_LATEST:
        resume = Resume()
        for step, path in found:
            reason = why_incomplete(path)
            if reason is None:
                resume.checkpoint, resume.step = path, step
                break
            resume.skipped.append({"checkpoint": str(path), "reason": reason})
            resume.notes.append(f"skipping {path.name}: incomplete ({reason})")
        if resume.checkpoint is None:
            if found:
                raise ValueError(f"{option}={text}: no complete checkpoint in {out} (" + "; ".join(
                    f"{Path(s['checkpoint']).name}: {s['reason']}" for s in resume.skipped) + ")")
            resume.notes.append(f"{option}={text}: no checkpoint in {out} yet, starting from step 0")
            return resume
        resume.notes.append(f"resuming from {resume.checkpoint} (step {resume.step})")
        return resume
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{option}={text!r}: no such checkpoint folder (or use 'latest' for the newest "
                                f"complete one in train.output_dir)")
    reason = why_incomplete(path)
    if reason is not None:
        raise ValueError(f"{option}={text!r}: incomplete checkpoint ({reason}); use 'latest' to resume from the "
                         "newest complete one")
    m = _NAME.match(path.name)
    step = int(m.group(1)) if m else 0
    return Resume(checkpoint=path, step=step, notes=[f"resuming from {path} (step {step})"])


def loss_sum_at(checkpoint: Optional[Path]) -> Optional[float]:
    """The sum of the per-step training losses up to ``checkpoint`` (our record), or None when it is not known."""
    if checkpoint is None:
        return 0.0
    try:
        record = json.loads((Path(checkpoint) / RECORD).read_text(encoding="utf-8"))
        return float(record["train_loss_sum"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class CheckpointMixin:
    """Trainer mixin: marks a checkpoint incomplete while it is written and records its files (and the run's loss
    sum so far) when done, so :func:`why_incomplete` can tell a cut one; reports the mean loss of the whole run after
    a resume (:attr:`whole_run_loss`)."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # Transformers' "the last checkpoint": the newest *complete* one here
            resume = resolve_resume(self.args.output_dir, "latest")
            resume.say("cuma")
            resume_from_checkpoint = None if resume.checkpoint is None else str(resume.checkpoint)
        ckpt = Path(resume_from_checkpoint) if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
        self._loss_sum_before = loss_sum_at(ckpt)
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        steps_now = self.state.global_step - getattr(self, "_initial_global_step", 0)
        self.whole_run_loss = None  # None: only the resumed part's loss is known (a checkpoint without our record)
        if self._loss_sum_before is not None and self.state.global_step > 0:
            self.whole_run_loss = (self._loss_sum_before + result.training_loss * steps_now) / self.state.global_step
        return result

    def _loss_sum_so_far(self) -> Optional[float]:
        if self._loss_sum_before is None or not hasattr(self, "_total_loss_scalar"):
            return None
        pending = getattr(self, "_tr_loss", 0.0)
        pending = float(pending.item()) if hasattr(pending, "item") else float(pending)
        return self._loss_sum_before + self._total_loss_scalar + pending

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{step}"
        main = self.args.should_save
        if main:
            if folder.exists():  # a cut save of the same step from an earlier, killed run
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / RECORD, {"complete": False, "global_step": step})
        super()._save_checkpoint(model, trial)
        if main and folder.is_dir():
            files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != RECORD}
            atomic_write_json(folder / RECORD, {"complete": True, "global_step": step, "files": files,
                                                "train_loss_sum": self._loss_sum_so_far()})

    def _save_optimizer_and_scheduler(self, output_dir):
        hook = os.environ.get(KILL_IN_SAVE_ENV)
        if hook and hook.strip() == str(self.state.global_step):
            with open(Path(output_dir) / "optimizer.pt", "wb") as f:  # what a kill inside torch.save leaves
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._save_optimizer_and_scheduler(output_dir)


def resumed_record(resume: Resume, trainer, transformers_loss: float) -> dict:
    """The run.json fields of the loss and the resume: ``train_loss`` over the whole run where it is known (else the
    resumed steps' mean, said so in ``train_loss_covers``)."""
    whole = getattr(trainer, "whole_run_loss", None)
    step = trainer.state.global_step
    if resume.checkpoint is None:
        return {"train_loss": transformers_loss if whole is None else whole, "train_loss_covers": f"steps 1-{step}"}
    fields = {"resumed_from": resume.record()}
    if whole is not None:
        fields.update(train_loss=whole, train_loss_covers=f"steps 1-{step} (resumed at {resume.step})",
                      train_loss_resumed_steps=transformers_loss)
    else:
        fields.update(train_loss=transformers_loss,
                      train_loss_covers=f"steps {resume.step + 1}-{step} only (the checkpoint has no loss record)")
    return fields
