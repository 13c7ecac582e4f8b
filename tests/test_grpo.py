"""`cuma train grpo` on a tiny model: profile rows in generation and every log-prob pass (policy and SFT reference),
the async judge reward (win 1 / tie 0.5 / loss 0 against the reference response), gradient checkpointing on and off."""

import asyncio
import math

import pytest
import torch
from test_dpo import CUMA, LORA, LayerProbe, common_argv, pref_dir, sft_outputs, write_preference_folder  # noqa: F401

from cuma.config import load_config
from cuma.train.config import GRPORunConfig


class FakeJudge:
    """Deterministic stand-in for cuma.evaluate.judges: the longer answer wins, equal lengths tie."""

    def __init__(self):
        self.calls = []

    async def compare(self, prompt, profile_text, answer_a, answer_b):
        self.calls.append((profile_text, answer_a, answer_b))
        await asyncio.sleep(0)
        if len(answer_a) == len(answer_b):
            return "tie"
        return "A" if len(answer_a) > len(answer_b) else "B"


def grpo_config(model_dir, data_dir, sft_dir, out, **train):
    argv = common_argv(model_dir, data_dir, out, 2, **train) + [
        "--init.sft_path", str(sft_dir), "--grpo.num_generations", "2", "--grpo.max_completion_length", "6",
        "--grpo.beta", "0.04"]
    return load_config(GRPORunConfig, None, argv)


def test_reward_fn_scores_win_tie_loss_in_both_orders():
    from cuma.train.grpo import judge_reward_fn

    fn = judge_reward_fn(FakeJudge())
    out = asyncio.run(fn(prompts=[[{"role": "user", "content": "q"}]] * 3,
                         completions=[[{"role": "assistant", "content": c}] for c in ("longer", "ab", "x")],
                         reference=["ab", "ab", "ab"], profile_text=["p"] * 3))
    assert out == [1.0, 0.5, 0.0]
    assert fn.verdict_tally.totals == {"rewards": 3, "fallback_rewards": 0, "unparseable_verdicts": 0}


class MumblingJudge(FakeJudge):
    """A weak judge: its replies never parse (like SmolLM2 served by llama.cpp as judge)."""

    async def compare(self, prompt, profile_text, answer_a, answer_b):
        await super().compare(prompt, profile_text, answer_a, answer_b)
        return None


def test_reward_fn_counts_fallback_rewards_and_unparseable_verdicts():
    from cuma.evaluate.judges import Judge
    from cuma.train.grpo import judge_reward_fn

    fn = judge_reward_fn(MumblingJudge())
    kw = dict(prompts=["q"] * 3, completions=["a", "b", "c"], reference=["r"] * 3, profile_text=["p"] * 3)
    assert asyncio.run(fn(**kw)) == [0.5, 0.5, 0.5]
    assert fn.verdict_tally.pop() == {"rewards": 3, "fallback_rewards": 3, "unparseable_verdicts": 6}
    assert fn.verdict_tally.pop() == {"rewards": 0, "fallback_rewards": 0, "unparseable_verdicts": 0}
    assert isinstance(fn.judge, Judge) and fn.judge.stats["reward_invalid"] == 3  # cuma.evaluate.judges' reward


def test_grpo_with_a_judge_that_never_parses_warns_and_counts_per_step(tiny_model_dir, pref_dir, sft_outputs,  # noqa: F811
                                                                        tmp_path):
    import json

    from cuma.train.grpo import run_grpo

    with pytest.warns(UserWarning, match=r"of \d+ judge rewards are the 0.5 fallback"):
        run = run_grpo(grpo_config(tiny_model_dir, pref_dir, sft_outputs["lora"], tmp_path / "out"),
                       judge=MumblingJudge())
    validity = run["reward_validity"]
    assert validity["rewards"] > 0 and validity["fallback_rewards"] == validity["rewards"]
    assert validity["fallback_fraction"] == 1.0 and validity["unparseable_verdicts"] == 2 * validity["rewards"]
    assert validity["per_generation_batch"] and all(b["fallback_rewards"] == b["rewards"]
                                                    for b in validity["per_generation_batch"])
    steps = [h for h in run["log_history"] if "judge/fallback_fraction" in h]
    assert len(steps) == run["global_step"] and all(h["judge/fallback_fraction"] == 1.0 for h in steps)
    assert all(h["judge/unparseable_verdicts"] > 0 for h in steps)
    on_disk = json.loads((tmp_path / "out" / "run.json").read_text())
    assert on_disk["reward_validity"]["fallback_fraction"] == 1.0


def test_prompt_rows_one_per_turn_with_the_chosen_reference(pref_dir):  # noqa: F811
    from cuma.train.grpo import prompt_rows
    from cuma.train.preference import load_preference_data

    records = load_preference_data(pref_dir, "pairs").split("train")
    rows = prompt_rows(records + records, profile_in_prompt=True)
    assert len(rows) == len(records)
    assert rows[0]["prompt"][0]["role"] == "system" and "About the user" in rows[0]["prompt"][0]["content"]
    assert rows[0]["reference"] == records[0]["chosen"] and rows[0]["profile_index"] == records[0]["profile_index"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grpo_two_steps_cuma_profile_in_generation_and_logprob_passes(tiny_model_dir, pref_dir, sft_outputs, tmp_path,  # noqa: F811
                                                                       checkpointing):
    from cuma.train import grpo

    probes, seen = [], {}
    original_init = grpo.ProfileGRPOTrainer.__init__
    original_gen = grpo.ProfileGRPOTrainer._generate_and_score_completions

    def init(self, *a, **k):
        original_init(self, *a, **k)
        probes.append(LayerProbe(self.model, tiled=False))
        seen["adapters"] = set(self.model.peft_config)

    def gen(self, inputs):
        out = original_gen(self, inputs)
        seen.setdefault("ref", []).append("ref_per_token_logps" in out)
        seen.setdefault("rows", []).append(out["profile_embeds"].shape[0] == len(inputs))
        return out

    judge = FakeJudge()
    cfg = grpo_config(tiny_model_dir, pref_dir, sft_outputs["cuma"], tmp_path / "out",
                      gradient_checkpointing=str(checkpointing).lower())
    grpo.ProfileGRPOTrainer.__init__ = init
    grpo.ProfileGRPOTrainer._generate_and_score_completions = gen
    try:
        run = grpo.run_grpo(cfg, judge=judge)
    finally:
        grpo.ProfileGRPOTrainer.__init__ = original_init
        grpo.ProfileGRPOTrainer._generate_and_score_completions = original_gen
        for p in probes:
            p.remove()
    assert run["global_step"] == 2 and math.isfinite(run["train_loss"])
    probe = probes[0]
    # generation steps + reference pass + policy pass, on 2 layers x (q, v): every call saw rows matching its batch
    assert probe.calls > 16 and not probe.bad, probe.bad[:3]
    assert seen["adapters"] == {"default", "ref"} and all(seen["ref"]) and all(seen["rows"])
    assert judge.calls and {c[0] for c in judge.calls} <= set(__import__("test_dpo").PROFILES)
    assert any("balance_loss" in h for h in run["log_history"])
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert run["reward_validity"]["rewards"] > 0 and run["reward_validity"]["fallback_rewards"] == 0


def test_grpo_two_steps_lora_with_a_plain_reward(tiny_model_dir, pref_dir, sft_outputs, tmp_path):  # noqa: F811
    from cuma.train.grpo import run_grpo

    def length_reward(prompts, completions, reference, profile_text, **kwargs):
        assert len(reference) == len(completions) == len(profile_text)
        return [float(len(c[-1]["content"])) for c in completions]

    run = run_grpo(grpo_config(tiny_model_dir, pref_dir, sft_outputs["lora"], tmp_path / "out"),
                   reward_funcs=[length_reward])
    assert run["global_step"] == 2 and run["method"]["method"] == "lora"


def test_grpo_balance_term_is_scaled_like_the_grpo_loss():
    from cuma.train.grpo import ProfileGRPOTrainer

    t = ProfileGRPOTrainer.__new__(ProfileGRPOTrainer)
    t.current_gradient_accumulation_steps = 4
    assert t._balance_scale(None) == 4  # GRPO's loss is already normalised over the accumulated batch
