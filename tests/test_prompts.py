"""Prompt rendering and option-letter token ids (docs/data-schema.md), with a tokenizer built in code."""

from pathlib import Path

import pytest

from cuma.data import answer_text, letter_token_ids, render_messages, render_prompt
from cuma.data.prompts import ANSWER_INSTRUCTION, PROFILE_PREFIX, SYSTEM_INSTRUCTION
from cuma.data.records import make_record

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# the generation prompt glues the answer to "assistant": a letter then merges with the preceding word
GLUED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def tiny_tokenizer(template=CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", ".", ":", "?"]
    words += list("ABCDEFGHIJ")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    fast.chat_template = template
    return fast


def record(**over):
    rec = make_record(
        participant_id="90070001", question_id="Q1", split="train",
        profile={"country": "Ardenia", "age_group": "25-34"}, profile_text="Country: Ardenia. Age group: 25-34.",
        profile_index=0, question="How important are gardens in your life?", category="Invented Values",
        options=["Very important", "Rather important", "Not very important", "Not at all important"],
        option_values=[1, 2, 3, 4], gold_value=2, scale_min=1, scale_max=4, ordinal=True,
    )  # fmt: skip
    rec.update(over)
    return rec


def test_render_messages_layout():
    msgs = render_messages(record())
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == f"{SYSTEM_INSTRUCTION}\n{PROFILE_PREFIX}Country: Ardenia. Age group: 25-34."
    assert msgs[1]["content"] == (
        "How important are gardens in your life?\n"
        "A. Very important\nB. Rather important\nC. Not very important\nD. Not at all important\n"
        f"{ANSWER_INSTRUCTION}"
    )
    assert ANSWER_INSTRUCTION == "Answer with the letter only."
    no_profile = render_messages(record(), profile_in_prompt=False)
    assert no_profile[0]["content"] == SYSTEM_INSTRUCTION and "Ardenia" not in no_profile[0]["content"]
    assert no_profile[1] == msgs[1]
    assert answer_text(record()) == "B"


def test_render_messages_with_fewshot():
    shot = record(id="90070002:Q1", participant_id="90070002", gold_letter="D", gold_value=4)
    msgs = render_messages(record(), fewshot=[shot, shot])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "D" and msgs[1]["content"] == msgs[-1]["content"]
    with pytest.raises(ValueError, match=r"fewshot\[0\].*lacks the fields \['options'\]"):
        render_messages(record(), fewshot=[{"question": "x", "letters": ["A"]}])


def test_bad_records_are_clear_errors():
    with pytest.raises(ValueError, match="lacks the fields"):
        render_messages({"question": "x"})
    with pytest.raises(ValueError, match="equal length"):
        render_messages(record(letters=["A", "B"]))
    with pytest.raises(ValueError, match="gold_letter"):
        answer_text({"id": "x"})


def test_render_prompt_applies_the_chat_template():
    tok = tiny_tokenizer()
    text = render_prompt(record(), tok)
    sys_msg, user_msg = (m["content"] for m in render_messages(record()))
    assert text == (
        f"<|im_start|>system\n{sys_msg}<|im_end|>\n<|im_start|>user\n{user_msg}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Ardenia" not in render_prompt(record(), tok, profile_in_prompt=False)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt(record(), tok)


def test_letter_token_ids_single_tokens():
    tok = tiny_tokenizer()
    ids = letter_token_ids(tok, list("ABCDEFGHIJ"))
    assert ids == [tok.convert_tokens_to_ids(c) for c in "ABCDEFGHIJ"]
    # the id is the token the model must produce right after the generation prompt
    prompt_ids = tok(render_prompt(record(), tok), add_special_tokens=False)["input_ids"]
    full_ids = tok(render_prompt(record(), tok) + "B", add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids and full_ids[len(prompt_ids):] == [ids[1]]


def test_letter_token_ids_refuses_multi_token_or_merged_letters():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"option letter 'A\.' does not encode to exactly one token"):
        letter_token_ids(tok, ["A", "A."])
    with pytest.raises(ValueError, match=r"option letters \['Y', 'Z'\] share a token id"):
        letter_token_ids(tok, ["Y", "Z"])  # both unknown -> [UNK]
    with pytest.raises(ValueError, match=r"option letter 'A' does not encode to exactly one token"):
        letter_token_ids(tiny_tokenizer(GLUED), ["A"])  # "assistantA" is one word
    with pytest.raises(ValueError, match="at least one letter"):
        letter_token_ids(tok, [])


def _cached_smollm2_folder():
    try:
        from cuma.models import embedded_cache_dir
    except ImportError:
        return None
    folder = Path(embedded_cache_dir("smollm2-135m"))
    return folder if (folder / "tokenizer_config.json").is_file() else None


def test_smollm2_tokenizer_letters_if_cached():
    """The embedded SmolLM2 tokenizer (only when cuma.models has already cached it; converting takes ~30 s)."""
    folder = _cached_smollm2_folder()
    if folder is None:
        pytest.skip("SmolLM2 tokenizer not cached yet (cuma.models.load_tokenizer('smollm2-135m') creates it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = letter_token_ids(tok, list("ABCDEFGHIJ"))
    assert len(set(ids)) == 10
    assert [tok.decode([i]) for i in ids] == list("ABCDEFGHIJ")
    text = render_prompt(record(), tok)
    assert text.endswith("<|im_start|>assistant\n") and "Country: Ardenia. Age group: 25-34." in text
