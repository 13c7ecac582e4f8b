"""Training faults: a kill during a checkpoint save, resuming (`latest`, `true`, a cut checkpoint), the loss a resumed
run reports, a rerun into a folder that holds checkpoints, and output folders that cannot be written.

The kill is deterministic: ``CUMA_TEST_KILL_IN_SAVE=N`` makes the save of checkpoint-N die by SIGKILL half-way
through writing ``optimizer.pt`` (left empty, as a kill inside ``torch.save`` leaves it)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cuma import cli
from cuma.train.checkpoints import KILL_IN_SAVE_ENV, resolve_resume, why_incomplete

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY_CUMA = ["--method.options.r", "2", "--method.options.lora_alpha", "4", "--method.options.num_experts", "3",
             "--method.options.router_hidden", "8"]


def argv(model_dir, data_dir, out, steps=4, *extra):
    return ["train", "sft", "--model.name_or_path", str(model_dir), "--data.path", str(data_dir),
            "--data.max_length", "512", "--method.name", "cuma", *TINY_CUMA, "--train.output_dir", str(out),
            "--train.max_steps", str(steps), "--train.per_device_train_batch_size", "2",
            "--train.learning_rate", "1e-3", "--train.logging_steps", "1", "--train.report_to", "none",
            "--train.save_strategy", "steps", "--train.save_steps", "2", "--train.save_total_limit", "3",
            "--train.disable_tqdm", "true", *extra]


def run_cli(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cuma.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tiny_prepared, tmp_path_factory):
    """An uninterrupted 4-step run saving checkpoints at steps 2 and 4 (the reference)."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert cli.main(argv(tiny_model_dir, tiny_prepared, out)) == 0
    return out


def test_kill_during_a_checkpoint_save_then_latest_resumes_from_the_last_complete_one(
        tiny_model_dir, tiny_prepared, full_run, tmp_path):
    out = tmp_path / "run"
    killed = run_cli(argv(tiny_model_dir, tiny_prepared, out), {KILL_IN_SAVE_ENV: "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # the cut save is recognisably incomplete: an empty optimizer.pt, no trainer_state.json, our record says so
    cut = out / "checkpoint-4"
    assert (cut / "optimizer.pt").stat().st_size == 0 and not (cut / "trainer_state.json").exists()
    assert json.loads((cut / "cuma_checkpoint.json").read_text())["complete"] is False
    assert "trainer_state.json" in why_incomplete(cut) and why_incomplete(out / "checkpoint-2") is None

    resumed = run_cli(argv(tiny_model_dir, tiny_prepared, out, 4, "--train.resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint-4: incomplete (no trainer_state.json: the save was cut" in resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-2 (step 2)" in resumed.stderr
    # the resumed run ends where the uninterrupted one does, and the cut checkpoint was written again, complete
    a, b = load_file(str(full_run / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    assert why_incomplete(out / "checkpoint-4") is None
    # the reported loss covers the whole run and equals the uninterrupted run's
    full = json.loads((full_run / "run.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"]["step"] == 2 and run["resumed_from"]["skipped"][0]["checkpoint"].endswith("checkpoint-4")
    assert run["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    assert run["train_loss_covers"].startswith("steps 1-4")
    assert f"train loss {full['train_loss']:.4f} over steps 1-4" in resumed.stdout


def test_true_resumes_like_latest_and_the_loss_covers_the_whole_run(tiny_model_dir, tiny_prepared, full_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    assert cli.main(argv(tiny_model_dir, tiny_prepared, out, 4, "--train.resume_from_checkpoint", "true")) == 0
    run = json.loads((out / "run.json").read_text())
    full = json.loads((full_run / "run.json").read_text())
    assert run["global_step"] == 4 and run["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    # Transformers' own figure (the mean of steps 3-4 only) is kept under its own name, and differs
    assert run["train_loss_resumed_steps"] != pytest.approx(full["train_loss"], rel=1e-3)


def test_a_rerun_into_a_folder_with_checkpoints_says_how_to_resume(tiny_model_dir, tiny_prepared, full_run, capsys):
    before = sorted(p.name for p in full_run.iterdir())
    assert cli.main(argv(tiny_model_dir, tiny_prepared, full_run)) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "checkpoint-4" in err
    assert "--train.resume_from_checkpoint latest" in err
    assert sorted(p.name for p in full_run.iterdir()) == before


def test_resume_choices_without_training(tmp_path):
    # nothing there yet: latest starts from step 0 and says so
    fresh = resolve_resume(tmp_path / "new", "latest")
    assert fresh.checkpoint is None and "starting from step 0" in fresh.notes[0]
    # every checkpoint cut: an error naming each and why
    cut = tmp_path / "run" / "checkpoint-2"
    cut.mkdir(parents=True)
    (cut / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="no complete checkpoint.*checkpoint-2: no trainer_state.json"):
        resolve_resume(tmp_path / "run", "latest")
    # an explicit cut checkpoint: refused, pointing at latest
    with pytest.raises(ValueError, match="incomplete checkpoint.*'latest'"):
        resolve_resume(tmp_path / "run", str(cut))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_resume(tmp_path / "run", str(tmp_path / "nowhere"))
    # a file that changed size since the save finished
    (cut / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (cut / "cuma_checkpoint.json").write_text(json.dumps({"complete": True, "files": {"adapter_model.safetensors": 9}}))
    assert why_incomplete(cut) == "adapter_model.safetensors has 1 bytes, 9 when saved"
    (cut / "cuma_checkpoint.json").write_text(json.dumps({"complete": True, "files": {"adapter_model.safetensors": 1}}))
    assert resolve_resume(tmp_path / "run", "latest").checkpoint == cut


@pytest.mark.parametrize("save_strategy", ["no", "steps"])
def test_an_output_folder_under_a_file_fails_before_any_work(tiny_model_dir, tiny_prepared, tmp_path, capsys,
                                                             save_strategy):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = argv(tiny_model_dir, tiny_prepared, blocker / "run") + ["--train.save_strategy", save_strategy,
                                                                   "--model.name_or_path", str(tmp_path / "absent")]
    # the model path does not exist either: the output check comes first, so that is not what is reported
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.output_dir=" in err and f"{blocker} is a file" in err
    assert "Traceback" not in err and blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_folder_under_a_read_only_folder_fails_before_any_work(tiny_model_dir, tiny_prepared, tmp_path,
                                                                         capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(argv(tiny_model_dir, tiny_prepared, ro / "run")) == 2
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err
    assert "train.output_dir=" in err and "Permission denied" in err and not any(ro.iterdir())


def test_an_os_error_escaping_a_command_is_one_line(monkeypatch, capsys):
    from cuma.train import sft

    def broken(cfg, callbacks=None):
        raise PermissionError(13, "Permission denied", "/somewhere/adapter_model.safetensors")

    monkeypatch.setattr(sft, "run_sft", broken)
    assert cli.main(["train", "sft", "--train.report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert err == "cuma train: error: /somewhere/adapter_model.safetensors: Permission denied\n"


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_preference_stages_share_the_resume_and_output_checks(stage, tmp_path, capsys):
    """DPO and GRPO run the same checks before loading anything: a folder with checkpoints is not retrained
    silently, a cut checkpoint is named, an output folder under a file fails at once."""
    out = tmp_path / "run"
    cut = out / "checkpoint-3"
    cut.mkdir(parents=True)
    (cut / "adapter_model.safetensors").write_bytes(b"weights")
    base = ["train", stage, "--data.path", str(tmp_path / "no-data"), "--train.report_to", "none"]
    assert cli.main(base + ["--train.output_dir", str(out)]) == 2
    assert "already holds checkpoints of an earlier run (checkpoint-3)" in capsys.readouterr().err
    assert cli.main(base + ["--train.output_dir", str(out), "--train.resume_from_checkpoint", "latest"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert cli.main(base + ["--train.output_dir", str(tmp_path / "f" / "run")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_trainer_train_true_takes_the_newest_complete_checkpoint(full_run, tmp_path, capsys):
    """``trainer.train(resume_from_checkpoint=True)`` (Transformers' spelling, from Python) skips a cut checkpoint
    too, and the whole-run loss uses the loss sum recorded in the checkpoint it resumed from."""
    import shutil
    from types import SimpleNamespace

    from transformers.trainer_utils import TrainOutput

    from cuma.train.checkpoints import CheckpointMixin

    out = tmp_path / "run"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"")
    seen = {}

    class Base:
        def train(self, resume_from_checkpoint=None, **kwargs):
            seen["resume"] = resume_from_checkpoint
            self._initial_global_step, self.state.global_step = 2, 4
            return TrainOutput(4, 1.0, {})  # this call's steps 3-4 had a mean loss of 1.0

    class Trainer(CheckpointMixin, Base):
        args = SimpleNamespace(output_dir=str(out))
        state = SimpleNamespace(global_step=0)

    trainer = Trainer()
    trainer.train(resume_from_checkpoint=True)
    assert seen["resume"] == str(out / "checkpoint-2")
    assert "skipping checkpoint-4: incomplete" in capsys.readouterr().err
    before = json.loads((out / "checkpoint-2" / "cuma_checkpoint.json").read_text())["train_loss_sum"]
    assert trainer.whole_run_loss == pytest.approx((before + 2 * 1.0) / 4)
