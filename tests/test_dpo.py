"""`cuma train dpo` on a tiny model: SFT on conversation records, then DPO from that adapter with the SFT policy as
the frozen reference, profile rows reaching every CuMA layer call (tiled over chosen + rejected), the balance loss
from the policy pass only, gradient checkpointing on and off."""

import json
import math

import pytest
import torch
from conftest import tiny_chat_tokenizer

from cuma import methods
from cuma.config import load_config
from cuma.train.config import DPORunConfig, SFTRunConfig
from cuma.train.sft import run_sft

PROFILES = ["Country: Egypt. Age: 25-34.", "Country: Sweden. Age: 65+.", "Country: Chile. Age: 18-24."]
CUMA = {"r": 2, "lora_alpha": 4, "num_experts": 3, "router_hidden": 8, "init_weights": False}
LORA = {"r": 2, "lora_alpha": 4}


def write_preference_folder(root):
    """A tiny prepared preference folder (docs/preference-schema.md): 3 profiles with a random 16-d table, SFT
    conversations, pairs."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    base = lambda i, cid: {"conversation_id": cid, "user_id": f"u{i}", "split": "train", "profile": {},  # noqa: E731
                           "profile_text": PROFILES[i % 3], "profile_index": i % 3}
    sft, pairs = [], []
    for i in range(6):
        cid = f"c{i}"
        msgs = [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "why?"}, {"role": "assistant", "content": f"because {i}"}]
        sft.append({"id": cid, **base(i, cid), "messages": msgs, "supervise": "all" if i % 2 else "last"})
        pairs.append({"id": f"{cid}:t0:r1", **base(i, cid), "turn": 0, "prompt": [{"role": "user", "content": f"hi {i}"}],
                      "chosen": "yes" if i % 2 else "sure", "rejected": "no"})
    for kind, rows in (("sft", sft), ("pairs", pairs)):
        for split in ("train", "valid", "test"):
            (root / f"{kind}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "profiles.jsonl").write_text(
        "".join(json.dumps({"profile_index": i, "profile_text": t, "profile": {}}) + "\n" for i, t in enumerate(PROFILES))
    )
    g = torch.Generator().manual_seed(0)
    save_file({"profile_embeds": torch.randn(3, 16, generator=g)}, str(root / "profile_embeds.safetensors"))
    (root / "manifest.json").write_text(json.dumps({"format": "cuma-prepared-preference"}))
    return root


@pytest.fixture(scope="session")
def pref_dir(tmp_path_factory):
    return write_preference_folder(tmp_path_factory.mktemp("pref") / "prepared")


def common_argv(model_dir, data_dir, out, steps=2, **train):
    argv = ["--model.name_or_path", str(model_dir), "--data.path", str(data_dir), "--train.output_dir", str(out),
            "--train.max_steps", str(steps), "--train.per_device_train_batch_size", "2",
            "--train.learning_rate", "1e-3", "--train.logging_steps", "1", "--train.report_to", "none",
            "--train.save_strategy", "no", "--train.disable_tqdm", "true"]
    for k, v in train.items():
        argv += [f"--train.{k}", str(v)]
    return argv


@pytest.fixture(scope="session")
def sft_outputs(tiny_model_dir, pref_dir, tmp_path_factory):
    """SFT on the conversation records (auto-detected format) for cuma and lora; shared by the DPO/GRPO tests."""
    outs = {}
    for method, options in (("cuma", CUMA), ("lora", LORA)):
        out = tmp_path_factory.mktemp(f"sft-{method}")
        cfg = load_config(SFTRunConfig, None, common_argv(tiny_model_dir, pref_dir, out) + ["--method.name", method,
                                                                                            "--data.max_length", "256"])
        cfg.method.options = dict(options)
        run = run_sft(cfg)
        assert run["global_step"] == 2 and math.isfinite(run["train_loss"])
        outs[method] = out
    return outs


class LayerProbe:
    """Forward hooks on every CuMA layer: each call must see profile rows matching its batch; for DPO's batches the
    rows must be the pair rows tiled (first half == second half)."""

    def __init__(self, model, tiled: bool):
        from cuma.tuners.cuma.layer import CuMALayer

        self.calls, self.bad, self.tiled = 0, [], tiled
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules() if isinstance(m, CuMALayer)]
        assert self.handles

    def hook(self, module, args, output):
        x = args[0]
        call = module._routing_scope.current()
        rows = call.profile_rows if call is not None else None
        self.calls += 1
        if rows is None or rows.shape[0] != x.shape[0]:
            self.bad.append(("rows", None if rows is None else tuple(rows.shape), tuple(x.shape)))
        elif self.tiled:
            half = rows.shape[0] // 2
            if rows.shape[0] % 2 or not torch.equal(rows[:half], rows[half:]):
                self.bad.append(("not tiled", tuple(rows.shape)))

    def remove(self):
        for h in self.handles:
            h.remove()


def dpo_config(model_dir, data_dir, sft_dir, out, steps=2, **train):
    return load_config(DPORunConfig, None, common_argv(model_dir, data_dir, out, steps, **train) + [
        "--init.sft_path", str(sft_dir), "--dpo.max_length", "256"])


def test_sft_on_conversations_masks_assistant_turns():
    from cuma.train.preference import tokenize_conversation

    tok = tiny_chat_tokenizer()
    rec = {"id": "c", "profile_text": "P", "profile_index": 0, "supervise": "all",
           "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "xy"},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "zw"}]}
    ex = tokenize_conversation(rec, tok, True, 512)
    def text(ids):
        return "".join(tok.convert_ids_to_tokens(ids))

    supervised = text([i for i, m in zip(ex["input_ids"], ex["completion_mask"]) if m])
    assert supervised == "xy<|im_end|>\nzw<|im_end|>\n"
    last = tokenize_conversation({**rec, "supervise": "last"}, tok, True, 512)
    assert text([i for i, m in zip(last["input_ids"], last["completion_mask"]) if m]) == "zw<|im_end|>\n"
    assert "About the user: P" in text(ex["input_ids"])
    short = tokenize_conversation(rec, tok, True, 12)  # left truncation keeps the last turn
    assert len(short["input_ids"]) == 12 and any(short["completion_mask"])


def _trainer_for(cfg):
    """The pieces run_dpo builds, up to the trainer (to inspect it before training)."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from cuma.train import dpo
    from cuma.train.preference import load_preference_data, profile_source, train_args_common
    from trl import DPOConfig

    data = load_preference_data(cfg.data.path, kind="pairs")
    built, ref_model, ref_path, tok = dpo._build_policy(cfg, data)
    ds = Dataset.from_list([dpo.pair_row(r, built.profile_in_prompt) for r in data.split("train")])
    table, enc = profile_source(data.profile_embeds, None, built.uses_profile)
    args = train_args_common(cfg.train, built, DPOConfig, beta=cfg.dpo.beta, max_length=256)
    collator = dpo.PreferenceProfileCollator(DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=256),
                                             table, enc, built.uses_profile)
    trainer = dpo.ProfileDPOTrainer(model=built.model, ref_model=ref_model, args=args, train_dataset=ds,
                                    processing_class=tok, data_collator=collator, reference_path=ref_path)
    return trainer, built, collator, ds


def test_reference_is_the_sft_adapter_and_balance_comes_from_the_policy_only(tiny_model_dir, pref_dir, sft_outputs, tmp_path):
    from safetensors.torch import load_file

    import cuma

    cfg = dpo_config(tiny_model_dir, pref_dir, sft_outputs["cuma"], tmp_path / "out")
    trainer, built, collator, ds = _trainer_for(cfg)
    model = built.model
    assert set(model.peft_config) == {"default", "ref"} and model.active_adapter == "default"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default" in n for n in trainable)
    # the reference adapter holds exactly the SFT weights (routers and experts included)
    saved = load_file(str(sft_outputs["cuma"] / "adapter_model.safetensors"))
    ref_state = {n: p for n, p in model.named_parameters() if ".ref" in n}
    assert len(ref_state) == len(saved)
    for key, value in saved.items():
        name = key.replace("base_model.model.", "base_model.model.", 1)
        match = [p for n, p in ref_state.items() if n.replace(".ref", "") == name]
        assert len(match) == 1, key
        torch.testing.assert_close(match[0].detach(), value)

    prepared = trainer.train_dataset  # tokenised by TRL
    batch = collator([prepared[i] for i in range(2)])
    model.train()
    # policy == reference at the start: every log-ratio is 0, the DPO loss is log 2; the balance term comes on top,
    # recorded once (the policy pass), not by the reference pass under no_grad
    cuma.clear_balance_loss(model)
    loss = trainer.compute_loss(model, dict(batch))
    balance = trainer._metrics["train"]["balance_loss"]
    assert len(balance) == 1 and balance[0] > 0
    torch.testing.assert_close(loss.detach(), torch.tensor(math.log(2) + balance[0]), rtol=1e-5, atol=1e-5)
    margins = trainer._metrics["train"].get("rewards/margins")
    assert margins is not None and abs(margins[-1]) < 1e-5
    # and the base model would be a different reference
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**kwargs).logits
        sft = model(**kwargs).logits
    assert not torch.allclose(base, sft)
    assert trainer._balance_scale(None) == 1  # DPO: the Trainer scales the whole loss for gradient accumulation


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dpo_two_steps_cuma_profile_reaches_every_layer_call(tiny_model_dir, pref_dir, sft_outputs, tmp_path, checkpointing):
    from cuma.train import dpo

    probes = []
    original = dpo.ProfileDPOTrainer.__init__

    def init(self, *a, **k):
        original(self, *a, **k)
        probes.append(LayerProbe(self.model, tiled=True))

    cfg = dpo_config(tiny_model_dir, pref_dir, sft_outputs["cuma"], tmp_path / "out",
                     gradient_checkpointing=str(checkpointing).lower())
    dpo.ProfileDPOTrainer.__init__ = init
    try:
        run = dpo.run_dpo(cfg)
    finally:
        dpo.ProfileDPOTrainer.__init__ = original
        for p in probes:
            p.remove()
    probe = probes[0]
    assert run["global_step"] == 2 and math.isfinite(run["train_loss"])
    # 2 steps x (policy + reference) x 2 layers x (q, v), plus recomputes under checkpointing
    assert probe.calls >= 16 and not probe.bad, probe.bad[:3]
    assert any("balance_loss" in h for h in run["log_history"])
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "run.json").is_file()
    reloaded = methods.load(None, __import__("cuma").models.load_base(str(tiny_model_dir)), out)
    assert reloaded.uses_profile and list(reloaded.model.peft_config) == ["default"]


def test_dpo_two_steps_lora(tiny_model_dir, pref_dir, sft_outputs, tmp_path):
    from cuma.train.dpo import run_dpo

    run = run_dpo(dpo_config(tiny_model_dir, pref_dir, sft_outputs["lora"], tmp_path / "out"))
    assert run["global_step"] == 2 and math.isfinite(run["train_loss"])
    assert run["method"]["method"] == "lora" and (tmp_path / "out" / "adapter_config.json").is_file()


def test_dpo_cli_prints_config(tmp_path, capsys):
    from cuma.cli import main

    assert main(["train", "dpo", "--print-config", "--dpo.beta", "0.2"]) == 0
    assert "beta: 0.2" in capsys.readouterr().out


@pytest.mark.parametrize("option, value", [("router_learning_rate", 1e-3), ("loraplus_lr_ratio", 16.0),
                                           ("split_by_length", 2), ("objective", "distribution"),
                                           ("cell_weighting", "weight"), ("cdf_loss_weight", 0.5)])
def test_preference_stages_refuse_the_sft_only_options(option, value):
    """The SFT trainer's optimizer groups and length-split batches do not exist in DPO / GRPO: refused, not dropped."""
    from trl import DPOConfig

    from cuma.train.config import PreferenceTrainSection
    from cuma.train.preference import train_args_common

    class Built:
        gradient_checkpointing_allowed = True

    t = PreferenceTrainSection(**{option: value})
    with pytest.raises(ValueError, match=f"train.{option}=.*SFT .*only"):
        train_args_common(t, Built(), DPOConfig)
    assert isinstance(train_args_common(PreferenceTrainSection(output_dir="x", report_to="none"), Built(), DPOConfig),
                      DPOConfig)
