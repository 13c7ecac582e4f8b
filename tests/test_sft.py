"""`cuma train sft` on a tiny model for every trainable method: loss, saving, reloading, evaluation, resume, and the
balance loss's place in the trainer's loss."""

import json
import shutil

import pytest
import torch
from conftest import batch, profiles, tiny_chat_tokenizer, tiny_llama

import cuma
from cuma import methods
from cuma.config import load_config
from cuma.train.config import SFTRunConfig
from cuma.train.sft import ProfileSFTTrainer, run_sft

TINY = {
    "lora": {"r": 2, "lora_alpha": 4},
    "dora": {"r": 2, "lora_alpha": 4},
    "prefix": {"num_virtual_tokens": 4},
    "fft": {},
    "hydralora": {"r": 2, "lora_alpha": 4, "num_experts": 3},
    "mixlora": {"r": 2, "lora_alpha": 4, "num_experts": 3},
    "cuma": {"r": 2, "lora_alpha": 4, "num_experts": 3, "router_hidden": 8},
    "cuma-semantic": {"r": 2, "lora_alpha": 4, "num_experts": 3, "router_hidden": 8},
    "cuma-soft": {"r": 2, "lora_alpha": 4, "num_experts": 3, "router_hidden": 8},
    "cuma-minimal": {"r": 2, "lora_alpha": 4, "num_experts": 3, "router_hidden": 8},
}


def config(model_dir, data_dir, out, method, steps=2, **train):
    argv = [
        "--model.name_or_path", str(model_dir), "--data.path", str(data_dir), "--data.max_length", "512",
        "--method.name", method, "--train.output_dir", str(out), "--train.max_steps", str(steps),
        "--train.per_device_train_batch_size", "2", "--train.learning_rate", "1e-3", "--train.logging_steps", "1",
        "--train.report_to", "none", "--train.save_strategy", "no", "--train.disable_tqdm", "true",
    ]
    for k, v in train.items():
        argv += [f"--train.{k}", str(v)]
    cfg = load_config(SFTRunConfig, None, argv)
    cfg.method.options = dict(TINY[method])
    return cfg


@pytest.mark.parametrize("method", sorted(TINY))
def test_two_step_sft_saves_reloads_and_evaluates(method, tiny_model_dir, tiny_prepared, tmp_path):
    from cuma.data.records import load_prepared
    from cuma.evaluate.scoring import score_records

    run = run_sft(config(tiny_model_dir, tiny_prepared, tmp_path / "out", method))
    assert run["global_step"] == 2 and torch.isfinite(torch.tensor(run["train_loss"]))
    out = tmp_path / "out"
    assert (out / "resolved_config.yaml").is_file() and (out / methods.METHOD_FILE).is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["train_sha256"] and record["environment"]["packages"]["peft"]
    if methods.get_spec(method).trainable and method != "fft":
        assert (out / "adapter_config.json").is_file()
    if method.startswith("cuma") and method not in ("cuma-minimal",):
        assert any("balance_loss" in h for h in record["log_history"]) or method == "cuma-soft"

    base = None if method == "fft" else cuma.models.load_base(str(tiny_model_dir))
    built = methods.load(None, base, out)
    data = load_prepared(tiny_prepared)
    predictions = score_records(
        built.model, tiny_chat_tokenizer(), data.test[:4], batch_size=4,
        profile_table=data.profile_embeds if built.uses_profile else None,
        profile_in_prompt=built.profile_in_prompt, progress=False,
    )
    assert len(predictions) == 4
    for p in predictions:
        assert abs(sum(p["probs"]) - 1) < 1e-4 and p["pred_letter"] in p["letters"]


def test_resume_reproduces_an_uninterrupted_run(tiny_model_dir, tiny_prepared, tmp_path):
    full = config(tiny_model_dir, tiny_prepared, tmp_path / "full", "cuma", steps=4, save_strategy="steps", save_steps=2)
    run_sft(full)
    # a second run resumes from the first run's step-2 checkpoint and finishes the same 4 steps
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    cfg = config(tiny_model_dir, tiny_prepared, resumed_dir, "cuma", steps=4, save_strategy="steps", save_steps=2,
                 resume_from_checkpoint="latest")
    run = run_sft(cfg)
    assert run["global_step"] == 4
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


class _Args:
    pass


def test_balance_loss_enters_the_loss_with_gradient_accumulation_scaling(tiny_model_dir):
    """compute_loss adds lambda * balance / accumulation_steps when the trainer normalises by num_items_in_batch,
    so the router gradient changes by exactly that term's gradient."""
    import peft
    from datasets import Dataset
    from trl import SFTConfig

    def model():
        torch.manual_seed(0)
        cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=3, profile_dim=16, router_hidden=8, init_weights=False,
                              balance_loss_coef=0.5)
        return peft.get_peft_model(tiny_llama(), cfg).train()

    ids, mask = batch(2, 9)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(), "profile_embeds": profiles(2)}
    m = model()
    trainer = ProfileSFTTrainer(
        model=m, args=SFTConfig(output_dir=str(tiny_model_dir / "unused"), report_to="none", max_steps=1, bf16=False,
                                dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False),
        processing_class=tiny_chat_tokenizer(), train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]), data_collator=lambda x: x,
    )
    trainer.current_gradient_accumulation_steps = 4
    n_items = int((ids[:, 1:] != -100).sum())
    loss = trainer.compute_loss(m, dict(inputs), num_items_in_batch=n_items)
    loss.backward()
    router = [p for n, p in m.named_parameters() if "cuma_router" in n]
    with_balance = [p.grad.clone() for p in router]

    # reference: the task loss alone plus the recorded balance term / 4, by hand
    ref = model()
    cuma.clear_balance_loss(ref)
    out = ref(**inputs)
    task = -out.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).sum() / n_items
    balance = cuma.pop_balance_loss(ref)
    (task + balance / 4).backward()
    ref_router = [p for n, p in ref.named_parameters() if "cuma_router" in n]
    for g, r in zip(with_balance, ref_router):
        torch.testing.assert_close(g, r.grad, rtol=1e-4, atol=1e-7)
    # and the balance part is not zero: without it the router gradients differ
    assert balance.item() > 0


def test_sft_with_gradient_checkpointing(tiny_model_dir, tiny_prepared, tmp_path):
    """The recipe trains CuMA with checkpointing on: the profile survives the recompute (a missing profile would
    raise) and the balance loss is still logged once per step."""
    run = run_sft(config(tiny_model_dir, tiny_prepared, tmp_path / "gc", "cuma", gradient_checkpointing="true"))
    assert run["global_step"] == 2 and torch.isfinite(torch.tensor(run["train_loss"]))
    logged = [h for h in run["log_history"] if "balance_loss" in h]
    assert len(logged) == 2 and all(h["balance_loss"] > 0 for h in logged)


def test_labelled_positions_only_gives_the_same_loss_and_gradients():
    # the CPU speed-up scores only labelled positions through TRL's fused LM head: same loss, same gradients
    from trl.trainer import utils as trl_utils

    from cuma.train.sft import labelled_positions_only

    model = tiny_llama(seed=3)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids, mask = batch(bsz=3, length=9)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    labels[1, -3:] = -100  # a row without labels
    labels[1, 4:6] = ids[1, 4:6]

    def run(compact):
        model.zero_grad()
        ctx = labelled_positions_only(torch.device("cpu")) if compact else torch.enable_grad()
        with ctx:
            assert trl_utils._use_triton(torch.device("cpu")) is compact  # the switch TRL reads
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, g_full = run(False)
    compact, g_compact = run(True)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored after the call
    torch.testing.assert_close(compact.loss, full.loss)
    torch.testing.assert_close(compact.entropy, full.entropy)
    assert g_full.keys() == g_compact.keys() and g_full
    for name in g_full:
        torch.testing.assert_close(g_compact[name], g_full[name], rtol=1e-5, atol=1e-6)


def test_extra_callbacks_reach_the_trainer(tiny_model_dir, tiny_prepared, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            from peft import PeftModel

            seen.append((state.global_step, isinstance(model, PeftModel)))

    run_sft(config(tiny_model_dir, tiny_prepared, tmp_path / "out", "cuma", steps=3), callbacks=[Steps()])
    assert seen == [(1, True), (2, True), (3, True)]


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_router_learning_rate_keeps_the_trainer_optimizer(optim, tmp_path):
    """router_learning_rate only adds groups: the optimizer class, betas and epsilon are the Trainer's (``optim``),
    biases and norms are not decayed, and the routers / profile projection get their own learning rate."""
    import peft
    from datasets import Dataset
    from trl import SFTConfig

    torch.manual_seed(0)
    cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=3, profile_dim=16, router_hidden=8, profile_proj_layers=1)
    model = peft.get_peft_model(tiny_llama(), cfg)
    for n, p in model.named_parameters():  # a trainable norm, to see it is not decayed
        if n.endswith("model.norm.weight"):
            p.requires_grad_(True)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, bf16=False, optim=optim,
                     learning_rate=1e-4, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6, weight_decay=0.1,
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    trainer = ProfileSFTTrainer(model=model, args=args, processing_class=tiny_chat_tokenizer(),
                                train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]), data_collator=lambda x: x,
                                router_learning_rate=1e-2)
    opt = trainer.create_optimizer()
    expected_cls, expected_kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    assert type(opt) is expected_cls and type(opt) is (torch.optim.AdamW if optim == "adamw_torch" else torch.optim.SGD)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in opt.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        seen += group_names
        routed = {("router" in n or "profile_proj" in n) for n in group_names}
        assert len(routed) == 1  # a group is all router parameters or none
        assert group["lr"] == (1e-2 if routed == {True} else 1e-4)
        no_decay = {n.endswith("bias") or "norm" in n for n in group_names}
        assert len(no_decay) == 1 and group["weight_decay"] == (0.0 if no_decay == {True} else 0.1)
        if optim == "adamw_torch":
            assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)  # every trainable parameter exactly once
    assert any("cuma_profile_proj" in n for n in seen) and any(n.endswith("model.norm.weight") for n in seen)
    # the scheduler keeps each group's learning rate
    trainer.create_scheduler(num_training_steps=1, optimizer=opt)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-4, 1e-2]


@pytest.mark.parametrize("method", ["lora", "cuma"])
@pytest.mark.parametrize("router_lr", [None, 1e-2])
def test_loraplus_ratio_puts_every_b_matrix_and_nothing_else_at_its_learning_rate(method, router_lr, tmp_path):
    """LoRA+: the adapters' B matrices learn at ratio x lr, A matrices at lr, routers at their own lr when given (or
    at lr); the scheduler keeps the ratio; a ratio that is not a positive number is refused by name."""
    import peft
    from datasets import Dataset
    from trl import SFTConfig

    torch.manual_seed(0)
    if method == "lora":
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    else:
        cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=3, profile_dim=16, router_hidden=8)
    model = peft.get_peft_model(tiny_llama(), cfg)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=4, bf16=False, learning_rate=1e-4,
                     lr_scheduler_type="linear", dataset_kwargs={"skip_prepare_dataset": True},
                     remove_unused_columns=False)
    make = lambda ratio: ProfileSFTTrainer(  # noqa: E731
        model=model, args=args, processing_class=tiny_chat_tokenizer(), data_collator=lambda x: x,
        train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]), router_learning_rate=router_lr,
        loraplus_lr_ratio=ratio)
    trainer = make(16.0)
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(lr_of) == sorted(trainable)  # every trainable parameter exactly once
    b_name = "lora_B" if method == "lora" else "cuma_B"
    a_name = "lora_A" if method == "lora" else "cuma_A"
    b = [n for n in trainable if b_name in n]
    assert b and all(lr_of[n] == pytest.approx(1.6e-3) for n in b)
    assert all(lr_of[n] == 1e-4 for n in trainable if a_name in n)
    routed = [n for n in trainable if "router" in n or "profile_proj" in n]
    assert (method == "cuma") == bool(routed)
    assert all(lr_of[n] == (router_lr or 1e-4) for n in routed)
    # the scheduler scales every group alike: B stays at 16x A through the decay
    sched = trainer.create_scheduler(num_training_steps=4, optimizer=opt)
    opt.step(); sched.step()  # noqa: E702
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[-1 if router_lr is None or method == "lora" else 1] == pytest.approx(16 * lrs[0])
    for bad in (0, -1.0, True, "4"):
        with pytest.raises(ValueError, match="loraplus_lr_ratio"):
            make(bad)


def test_sft_fits_the_profile_center_and_the_reloaded_adapter_scores_with_it(tiny_model_dir, tiny_prepared, tmp_path):
    from cuma.data.records import load_prepared
    from cuma.evaluate.scoring import score_records

    cfg = config(tiny_model_dir, tiny_prepared, tmp_path / "out", "cuma")
    cfg.method.options["router_profile_center"] = "train"
    run_sft(cfg)
    data = load_prepared(tiny_prepared)
    from safetensors.torch import load_file

    # the fitted centre is a buffer saved with the adapter weights (not a float list in adapter_config.json)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")["base_model.cuma_profile_stats.center"]
    rows = sorted({r["profile_index"] for r in data.train})
    assert torch.allclose(saved, data.profile_embeds[rows].mean(0), atol=1e-6)
    built = methods.load(None, cuma.models.load_base(str(tiny_model_dir)), tmp_path / "out")
    preds = score_records(built.model, tiny_chat_tokenizer(), data.test[:4], batch_size=4,
                          profile_table=data.profile_embeds, profile_in_prompt=built.profile_in_prompt, progress=False)
    assert len(preds) == 4 and all(abs(sum(p["probs"]) - 1) < 1e-4 for p in preds)
