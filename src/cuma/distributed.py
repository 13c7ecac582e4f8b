"""Multi-process training and evaluation helpers: ZeRO-3 preparation of routed adapters, sharding without padding,
and gathering of per-rank results in the original order.

Everything here is a no-op in a single process and never imports DeepSpeed unless ZeRO-3 is actually in use, so the
package and its tests run on a CPU without DeepSpeed. ``docs/scaling.md`` describes the launch configurations.

- :func:`zero_stage` tells which ZeRO stage a run uses (from ``--train.deepspeed``, the environment ``accelerate
  launch`` sets, or transformers' own DeepSpeed config).
- :func:`prepare_for_zero3` registers the routed adapter layers as ZeRO-3 *leaf* modules (their parameters are
  gathered once per layer call, not per sub-module: the router, the packed experts and the base weight are used
  together in one forward) and gives the adapter parameters the base dtype (ZeRO-3 flattens a module's parameters
  into one buffer of one dtype).
- :func:`shard_bounds` and :func:`gather_in_order`: each rank works on a contiguous slice of the items (sizes differ
  by at most one, no padding), and the slices are gathered back in rank order, each item exactly once
  (:func:`cuma.evaluate.distributed.score_records_distributed` scores with them).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "adapter_layer_classes",
    "gather_in_order",
    "init_from_env",
    "is_distributed",
    "match_adapter_dtype",
    "prepare_for_zero3",
    "rank_and_world",
    "shard_bounds",
    "zero_stage",
]


# ------------------------------------------------------------------------------------------------ process group


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice ``[start, stop)`` of ``n`` items for ``rank`` of ``world``: the first ``n % world`` ranks get
    one item more, nothing is padded or repeated, and the slices in rank order cover ``range(n)`` exactly once."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_in_order(local: Sequence[Any], group=None) -> list[Any]:
    """Concatenation of every rank's ``local`` list, in rank order (``all_gather_object``: the lists may differ in
    length, so uneven shards need no padding and no tail sample is duplicated). In one process: ``list(local)``."""
    if not is_distributed():
        return list(local)
    world = torch.distributed.get_world_size(group)
    parts: list[Optional[list]] = [None] * world
    torch.distributed.all_gather_object(parts, list(local), group=group)
    out: list[Any] = []
    for part in parts:
        out.extend(part or [])
    return out


# ------------------------------------------------------------------------------------------------ ZeRO stage


def _stage_of(config: Any) -> Optional[int]:
    """ZeRO stage of a DeepSpeed config given as a dict or a JSON path; None when it has none."""
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    if not isinstance(config, dict):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage")
    try:
        return int(stage) if stage is not None else None
    except (TypeError, ValueError):
        return None


def zero_stage(deepspeed_config: Any = None, environ: Optional[dict] = None) -> int:
    """ZeRO stage of this run: 0 when DeepSpeed is not used.

    Looked up in order: the DeepSpeed config of the run (``--train.deepspeed``: dict or JSON path), the variables
    ``accelerate launch`` exports for a DeepSpeed config (``ACCELERATE_DEEPSPEED_ZERO_STAGE``,
    ``ACCELERATE_DEEPSPEED_CONFIG_FILE``) when ``ACCELERATE_USE_DEEPSPEED`` is set, and transformers' global
    DeepSpeed config (set once ``TrainingArguments`` with a DeepSpeed config exist)."""
    env = os.environ if environ is None else environ
    stage = _stage_of(deepspeed_config)
    if stage is not None:
        return stage
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() in ("1", "true", "yes"):
        value = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if value not in (None, ""):
            return int(value)
        stage = _stage_of(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        if stage is not None:
            return stage
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return 3
    except ImportError:  # pragma: no cover
        pass
    return 0


# ------------------------------------------------------------------------------------------------ ZeRO-3


def adapter_layer_classes() -> list[type]:
    """The adapter layer classes this project injects, which ZeRO-3 must treat as leaves: the CuMA, HydraLoRA and
    MixLoRA ``Linear`` layers and the MixLoRA FFN block (its router and experts run inside one forward)."""
    from .tuners.cuma.layer import Linear as CuMALinear

    classes: list[type] = [CuMALinear]
    try:
        from .tuners.hydralora.layer import Linear as HydraLinear

        classes.append(HydraLinear)
    except ImportError:  # pragma: no cover
        pass
    try:
        from .tuners.mixlora.layer import Linear as MixLinear, MixLoRAFFN

        classes += [MixLinear, MixLoRAFFN]
    except ImportError:  # pragma: no cover
        pass
    return classes


def present_adapter_classes(model: nn.Module) -> list[type]:
    """The classes of :func:`adapter_layer_classes` that occur in ``model``."""
    wanted = tuple(adapter_layer_classes())
    seen: list[type] = []
    for module in model.modules():
        cls = type(module)
        if isinstance(module, wanted) and cls not in seen:
            seen.append(cls)
    return seen


def _base_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The most common floating dtype among the frozen parameters (the base model's dtype)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def match_adapter_dtype(model: nn.Module, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Cast every trainable floating parameter to ``dtype`` (default: the frozen base's dtype) in place; returns the
    names of the parameters it cast. ZeRO-3 keeps one flat 16-bit copy of all parameters, so fp32 adapters next to
    a bf16 base would otherwise be an error or a silent cast inside DeepSpeed; the fp32 master copy lives in
    DeepSpeed's optimizer either way."""
    dtype = dtype or _base_dtype(model)
    if dtype is None:
        return []
    cast = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast.append(name)
    return cast


def prepare_for_zero3(
    model: nn.Module,
    deepspeed_config: Any = None,
    *,
    stage: Optional[int] = None,
    import_deepspeed: Optional[Callable[[], Any]] = None,
) -> dict[str, Any]:
    """Under ZeRO-3: register the adapter layer classes present in ``model`` as ZeRO-3 leaf modules
    (``deepspeed.utils.set_z3_leaf_modules``) and cast the adapter parameters to the base dtype. Otherwise (other
    stages, or DeepSpeed not importable) nothing is changed.

    Returns ``{"stage", "leaf_classes", "cast", "reason"}`` describing what was done. ``import_deepspeed`` replaces
    ``import deepspeed`` (tests pass a fake)."""
    stage = zero_stage(deepspeed_config) if stage is None else int(stage)
    done: dict[str, Any] = {"stage": stage, "leaf_classes": [], "cast": [], "reason": ""}
    if stage != 3:
        done["reason"] = f"ZeRO stage {stage}: no leaf registration needed"
        return done
    if import_deepspeed is None:

        def import_deepspeed():
            import deepspeed

            return deepspeed

    try:
        deepspeed = import_deepspeed()
    except ImportError:
        done["reason"] = "ZeRO-3 requested but deepspeed is not importable: nothing registered"
        return done
    classes = present_adapter_classes(model)
    if classes:
        deepspeed.utils.set_z3_leaf_modules(model, classes)
    done["leaf_classes"] = [c.__module__ + "." + c.__qualname__ for c in classes]
    done["cast"] = match_adapter_dtype(model)
    done["reason"] = "ZeRO-3: adapter layers registered as leaf modules"
    return done


def iter_base_shape_reads(paths: Iterable[str]) -> list[str]:
    """Lines of the given source files that read a weight's shape directly (``.weight.shape`` / ``.weight.size(``);
    under ZeRO-3 a partitioned weight has shape ``(0,)``, so adapters must use ``in_features``/``out_features``."""
    hits = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for no, line in enumerate(fh, 1):
                code = line.split("#", 1)[0]
                if ".weight.shape" in code or ".weight.size(" in code:
                    hits.append(f"{path}:{no}: {line.strip()}")
    return hits


def init_from_env(device: Optional[torch.device] = None) -> bool:
    """Join the process group a launcher (torchrun, ``accelerate launch``) describes in the environment, when
    ``WORLD_SIZE > 1`` and no group exists yet: NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
    Returns whether this process is part of a multi-process group."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    on_cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if on_cuda else "gloo")
    return True
