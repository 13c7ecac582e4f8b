"""`cuma demo`: the main job on the embedded offline defaults.

Loads SmolLM2-135M-Instruct and the MiniLM profile encoder (both shipped by PyPI wheels), attaches a CuMA adapter,
and answers one question for two different profiles: it shows that the same text is routed to different experts
depending on the profile, and what the model answers with the profile in the system prompt. Writes a run record.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .runinfo import atomic_write_text, environment_record

DEFAULT_PROFILES = (
    "Country: Egypt. Age group: 25-34 years old. Gender: Female. Religion: Muslim.",
    "Country: Sweden. Age group: 55-64 years old. Gender: Male. Religion: None.",
)
DEFAULT_QUESTION = "In one sentence: how important is religion in your daily life?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--out", default="runs/demo", help="output directory for the run record")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--profile", action="append", help="profile sentence (give twice); default: two contrasting profiles")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)


def _expert_load(record, mask_rows: int) -> torch.Tensor:
    """(rows, N) share of each expert over every adapted projection and non-pad token."""
    total = None
    for name, gates in record.gates.items():
        g, m = gates[0], record.masks[name][0]
        m = m.float() if m is not None else torch.ones(g.shape[:2])
        load = (g * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        total = load if total is None else total + load
    return total / len(record.gates)


def run(args: argparse.Namespace) -> int:
    import peft

    import cuma
    from cuma.encoder import ProfileEncoder
    from cuma.models import describe, load_base_and_tokenizer

    profiles = args.profile or list(DEFAULT_PROFILES)
    if len(profiles) < 2:
        raise ValueError("--profile: give at least two profiles to compare")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print(f"[1/4] loading base model {args.model!r} and the profile encoder ...", flush=True)
    base, tok = load_base_and_tokenizer(args.model)
    encoder = ProfileEncoder.default()
    e = encoder.encode(profiles)

    print("[2/4] attaching CuMA (N=8 experts, top-2, r=8, q_proj+v_proj) ...", flush=True)
    config = cuma.CuMAConfig(r=8, lora_alpha=16, num_experts=8, top_k=2, profile_dim=encoder.dim)
    model = peft.get_peft_model(base, config).eval()
    trainable, total = model.get_nb_trainable_parameters()

    print("[3/4] routing the same question under each profile ...", flush=True)
    user = [{"role": "user", "content": args.question}]
    plain = tok.apply_chat_template(user, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = plain["input_ids"].repeat(len(profiles), 1)
    with torch.no_grad(), cuma.record_gates(model) as rec:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), profile_embeds=e)
    load = _expert_load(rec, len(profiles))
    p, q = load[0].clamp_min(1e-12), load[1].clamp_min(1e-12)
    mid = (p + q) / 2
    js = 0.5 * (p * (p / mid).log()).sum() + 0.5 * (q * (q / mid).log()).sum()

    print("[4/4] generating with the profile in the system prompt ...", flush=True)
    answers = []
    for i, text in enumerate(profiles):
        messages = [{"role": "system", "content": f"Answer as a person with this profile. {text}"}, *user]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(
                **enc, profile_embeds=e[i : i + 1], max_new_tokens=args.max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        answers.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())

    print()
    print(f"CuMA adapter: {trainable:,} trainable parameters ({100 * trainable / (total - trainable):.2f}% of the base)")
    for i, text in enumerate(profiles):
        top = load[i].topk(2).indices.tolist()
        print(f"\nprofile {i + 1}: {text}")
        print(f"  expert load (share of tokens x projections): {[round(x, 3) for x in load[i].tolist()]}; top experts {top}")
        print(f"  answer: {answers[i]}")
    print(f"\nrouting distance between the two profiles (Jensen-Shannon, nats): {js.item():.4f}")
    print("(the adapter is untrained, B = 0: outputs equal the base model's; routing already depends on the profile)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "cuma demo",
        "options": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "profiles": profiles,
        "answers": answers,
        "expert_load": load.tolist(),
        "routing_js_nats": js.item(),
        "trainable_parameters": trainable,
        "adapter_config": config.to_dict(),
        "base_model": describe(args.model),
        "encoder": encoder.describe(),
        "environment": environment_record(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out_dir / "demo.json", json.dumps(record, indent=2, default=str))
    print(f"\nrun record: {out_dir / 'demo.json'}")
    return 0
