"""Worker of tests/test_distributed.py, started by ``python -m torch.distributed.run --nproc_per_node 2`` (gloo, CPU)
or run in one process as the reference.

    _dist_worker.py train OUT      # DDP (find_unused_parameters=False) training of a tiny CuMA model; with one
                                   # process: the same global batch as two accumulated micro-batches
    _dist_worker.py eval OUT DATA N  # each rank scores its slice of the first N test records; rank 0 writes the
                                     # gathered predictions

Rank r trains on rows [2r, 2r+2) of each global batch of 4; the two halves carry opposite, large profile embeddings so
the ranks route to different experts. Each rank writes OUT/rank{r}.pt (adapter state, expert loads, losses).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

STEPS, ROWS, LENGTH, DIM, EXPERTS = 3, 4, 12, 16, 4


def build_model():
    import peft
    from conftest import tiny_llama

    import cuma

    cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=EXPERTS, top_k=1, profile_dim=DIM, router_hidden=8,
                          init_weights=False, balance_loss_coef=0.01)
    base = tiny_llama(seed=0)
    torch.manual_seed(1)
    return peft.get_peft_model(base, cfg)


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, 128, (ROWS, LENGTH), generator=g)
    direction = torch.randn(DIM, generator=g)
    direction = 20 * direction / direction.norm()
    noise = 0.1 * torch.randn(ROWS, DIM, generator=g)
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None]  # rows of rank 0 vs rows of rank 1
    return ids, sign * direction + noise


def shard(step: int, part: int):
    ids, prof = global_batch(step)
    rows = slice(2 * part, 2 * part + 2)
    return ids[rows], prof[rows]


def loss_of(model, ids, prof):
    from cuma.routing import clear_balance_loss, pop_balance_loss, record_gates

    clear_balance_loss(model)
    with record_gates(model) as rec:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, profile_embeds=prof)
    loss = out.loss + pop_balance_loss(model)
    load = torch.zeros(EXPERTS)
    for gates in rec.gates.values():
        for g in gates:
            load += (g > 0).float().reshape(-1, EXPERTS).sum(0)
    return loss, load


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = build_model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # every expert parameter is in the graph (dense experts): no unused-parameter search
        net = DDP(model, find_unused_parameters=False)
    losses, loads = [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if world > 1:
            loss, load = loss_of(net, *shard(step, rank))
            loss.backward()
            loads.append(load)
            losses.append(float(loss.detach()))
        else:  # the same global batch: two micro-batches, gradients averaged (gradient accumulation)
            for part in range(2):
                loss, load = loss_of(net, *shard(step, part))
                (loss / 2).backward()
                loads.append(load)
                losses.append(float(loss.detach()))
        opt.step()
    os.makedirs(out, exist_ok=True)
    torch.save({"state": adapter_state(model), "loads": torch.stack(loads), "losses": losses, "world": world},
               os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def eval_model():
    model = build_model()
    return model.eval()


def evaluate(out: str, data: str, n: int) -> None:
    from conftest import tiny_chat_tokenizer

    from cuma.data.records import load_prepared
    from cuma.distributed import init_from_env, rank_and_world
    from cuma.evaluate.distributed import score_records_distributed

    init_from_env()
    prepared = load_prepared(data)
    table = prepared.profile_embeds
    # a 16-d profile table: the eval model routes on it
    records = prepared.test[:n]
    preds = score_records_distributed(eval_model(), tiny_chat_tokenizer(), records, batch_size=2,
                                      profile_table=table, progress=False)
    rank, world = rank_and_world()
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        with open(os.path.join(out, "predictions.json"), "w") as fh:
            json.dump({"world": world, "predictions": preds}, fh)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        train(sys.argv[2])
    elif mode == "eval":
        evaluate(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
