"""Scoring option letters with one forward per batch: padding sides, profile rows, progress bar."""

import numpy as np
import peft
import pytest
import torch
from conftest import tiny_chat_tokenizer, tiny_llama

import cuma
from cuma.evaluate import scoring


def make_record(pid: str, qid: str, n_options: int, gold: int, profile: dict, profile_index: int, question: str):
    letters = list("ABCDEFGHIJ"[:n_options])
    values = list(range(1, n_options + 1))
    text = " ".join(f"{k.replace('_', ' ').capitalize()}: {v}." for k, v in profile.items())
    return {
        "id": f"{pid}:{qid}",
        "participant_id": pid,
        "question_id": qid,
        "split": "test",
        "profile": dict(profile),
        "profile_text": text,
        "profile_index": profile_index,
        "question": question,
        "category": "Test",
        "letters": letters,
        "options": [f"option {v}" for v in values],
        "option_values": values,
        "gold_letter": letters[gold],
        "gold_value": values[gold],
        "scale_min": 1,
        "scale_max": n_options,
        "ordinal": True,
        "held_out": False,
    }


PROFILES = [
    {"country": "Egypt", "age_group": "25-34"},
    {"country": "Sweden", "age_group": "65+", "gender": "Female"},
    {"country": "Chile"},
]
QUESTIONS = [("Q1", 4, "Family?"), ("Q2", 2, "Is work important in your life, compared with leisure?"), ("Q3", 5, "Trust?")]


def sample_records():
    recs = []
    for p, prof in enumerate(PROFILES):
        for q, (qid, n, text) in enumerate(QUESTIONS):
            recs.append(make_record(f"p{p}", qid, n, (p + q) % n, prof, p, text))
    return recs


def test_answer_positions():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert scoring.answer_positions(right).tolist() == [2, 4, 0]
    assert scoring.answer_positions(right).tolist() == (right.sum(-1) - 1).tolist()
    assert scoring.answer_positions(left).tolist() == [4, 4, 4]


def test_left_and_right_padding_agree():
    model = tiny_llama()
    recs = sample_records()
    out = {}
    for side in ("left", "right"):
        tok = tiny_chat_tokenizer(side)
        out[side] = scoring.score_records(model, tok, recs, batch_size=4, progress=False)
    single = scoring.score_records(model, tiny_chat_tokenizer("right"), recs, batch_size=1, progress=False)
    chunked = scoring.score_records(model, tiny_chat_tokenizer("left"), recs, batch_size=2, chunk_size=3, progress=False)
    assert [c["id"] for c in chunked] == [r["id"] for r in recs]
    for a, b in zip(out["left"], chunked):
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    for a, b, c, rec in zip(out["left"], out["right"], single, recs):
        assert len(a["probs"]) == len(rec["letters"])
        assert sum(a["probs"]) == pytest.approx(1.0)
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
        np.testing.assert_allclose(b["probs"], c["probs"], atol=1e-5)  # batched == unbatched
        assert a["pred_letter"] == rec["letters"][int(np.argmax(a["probs"]))]
        assert a["pred_value"] == rec["option_values"][a["pred_index"]]
        assert a["id"] == rec["id"] and a["gold_letter"] == rec["gold_letter"]


def test_distribution_is_softmax_over_letter_logits():
    model = tiny_llama()
    tok = tiny_chat_tokenizer("right")
    rec = sample_records()[0]
    prompt = scoring.render_prompt(rec, tok, profile_in_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    letter_ids = scoring.letter_token_ids(tok, rec["letters"])
    expected = torch.softmax(logits[letter_ids].double(), -1).numpy()
    got = scoring.score_records(model, tok, [rec], progress=False)[0]["probs"]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_cuma_receives_matching_profile_rows():
    dim = 8
    base = tiny_llama()
    cfg = cuma.CuMAConfig(
        profile_dim=dim, init_weights=False, num_experts=4, top_k=2, r=4, lora_alpha=8, router_hidden=16,
        target_modules=["q_proj", "v_proj"],
    )
    model = peft.get_peft_model(base, cfg).eval()
    table = torch.randn(len(PROFILES), dim, generator=torch.Generator().manual_seed(3))
    tok = tiny_chat_tokenizer("left")
    recs = sample_records()
    prompts = scoring.build_prompts(recs, tok, profile_in_prompt=True)
    assert len(set(prompts)) == len(prompts)
    index_of_prompt = {
        tuple(tok(p, add_special_tokens=False)["input_ids"]): r["profile_index"] for p, r in zip(prompts, recs)
    }
    seen = []

    def hook(module, args, kwargs):
        e = kwargs.get("profile_embeds")
        assert e is not None, "profile_embeds was not passed"
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        assert e.shape == (ids.shape[0], dim)
        for row in range(ids.shape[0]):
            pi = index_of_prompt[tuple(ids[row][mask[row].bool()].tolist())]
            torch.testing.assert_close(e[row], table[pi])
            seen.append(pi)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        batched = scoring.score_records(model, tok, recs, batch_size=4, profile_table=table, progress=False)
    finally:
        handle.remove()
    assert sorted(seen) == sorted(r["profile_index"] for r in recs)
    # batched scores equal one-at-a-time scores with each record's own profile row
    single = scoring.score_records(model, tiny_chat_tokenizer("right"), recs, batch_size=1, profile_table=table,
                                   progress=False, chunk_size=4)
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    # the profile matters: other rows give other distributions
    swapped = scoring.score_records(model, tok, recs, batch_size=4, profile_table=table.flip(0), progress=False)
    assert any(not np.allclose(a["probs"], b["probs"], atol=1e-4) for a, b in zip(batched, swapped))
    bad = [dict(recs[0], profile_index=99)]
    with pytest.raises(ValueError, match="profile_index"):
        scoring.score_records(model, tok, bad, profile_table=table, progress=False)


def test_prefix_tuning_left_right():
    from cuma import methods

    built = methods.build("prefix", tiny_llama(), num_virtual_tokens=4)
    model = built.model.eval()
    recs = sample_records()[:4]
    left = scoring.score_records(model, tiny_chat_tokenizer("left"), recs, batch_size=4, progress=False)
    right = scoring.score_records(model, tiny_chat_tokenizer("right"), recs, batch_size=4, progress=False)
    for a, b in zip(left, right):
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)


def test_fewshot_prompts_use_training_records():
    tok = tiny_chat_tokenizer()
    recs = sample_records()
    pool = [dict(r, split="train", participant_id="t" + r["participant_id"], id="t" + r["id"]) for r in recs]
    prompts = scoring.build_prompts(recs[:1], tok, profile_in_prompt=False, fewshot_pool=pool, fewshot_k=2)
    plain = scoring.build_prompts(recs[:1], tok, profile_in_prompt=False)
    assert len(prompts[0]) > len(plain[0])
    assert prompts[0].count("<|im_start|>assistant") == 3  # two shots + the generation prompt
    # the per-group shortcut picks exactly the shots select_fewshot picks from the whole pool
    from cuma.evaluate.fewshot import select_fewshot

    pool = pool + [dict(pool[0], id=f"x{i}", participant_id=f"x{i}") for i in range(4)]
    pool.append(dict(pool[0], id="y", participant_id="y", profile={"age_group": "25-34"}))
    targets = recs + [dict(recs[0], profile={"country": "Atlantis"}), dict(recs[0], profile={})]
    for k in (1, 3, 6):
        got = scoring.build_prompts(targets, tok, profile_in_prompt=False, fewshot_pool=pool, fewshot_k=k, fewshot_seed=7)
        want = [
            scoring.render_prompt(t, tok, profile_in_prompt=False, fewshot=select_fewshot(pool, t, k, seed=7))
            for t in targets
        ]
        assert got == want
    with pytest.raises(ValueError, match="fewshot_pool"):
        scoring.build_prompts(recs[:1], tok, fewshot_k=2)


def test_progress_bar_on_stderr_and_disabled(capsys):
    model = tiny_llama()
    tok = tiny_chat_tokenizer()
    recs = sample_records()[:3]
    scoring.score_records(model, tok, recs, batch_size=2, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    scoring.score_records(model, tok, recs, batch_size=2, progress=True, desc="scoring-test")
    captured = capsys.readouterr()
    assert "scoring-test" in captured.err and captured.out == ""


def test_tokenizer_without_pad_token_uses_eos():
    model = tiny_llama()
    tok = tiny_chat_tokenizer()
    tok.pad_token = None
    out = scoring.score_records(model, tok, sample_records()[:3], batch_size=3, progress=False)
    assert tok.pad_token == tok.eos_token
    assert all(abs(sum(o["probs"]) - 1) < 1e-9 for o in out)
