import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot (oversubscribed
    spinning made these tests 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama built in code (no hub access)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.eval()


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


def batch(bsz: int = 3, length: int = 7, seed: int = 1, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (bsz, length), generator=g)
    mask = torch.ones_like(ids)
    return ids, mask


def profiles(bsz: int = 3, dim: int = 16, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, dim, generator=g)


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_tokenizer(padding_side: str = "right"):
    """Character-level tokenizer (102 tokens: fits tiny_llama's vocab of 128) with a ChatML template, built in code."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r\t"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its chat tokenizer saved as a local model folder (what `--model PATH` loads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    tiny_chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """A prepared-data folder from the synthetic generator (few participants, short questions) with a random
    16-d profile table standing in for encoder embeddings."""
    from safetensors.torch import save_file

    from cuma.data.records import load_prepared
    from cuma.data.splits import prepare_wvb
    from cuma.data.synthetic import SynthConfig, write_synthetic
    from cuma.data.wvb import load_wvb

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root / "raw", SynthConfig(participants=80, questions=6, modes=2, seed=0))
    prepare_wvb(load_wvb(root / "raw"), root / "prepared", train_pairs=24, test_pairs=12, seed=0, encoder=None)
    data = load_prepared(root / "prepared", embeddings=False)
    g = torch.Generator().manual_seed(0)
    save_file({"profile_embeds": torch.randn(len(data.profiles), 16, generator=g)}, str(root / "prepared" / "profile_embeds.safetensors"))
    return root / "prepared"
