"""Evaluate a model on WorldValuesBench-format choice questions: one function, :func:`evaluate_wvb`, that ``cuma eval
wvb``, ``cuma demo`` and the benchmarks call.

    from cuma import methods
    from cuma.evaluate.wvb import WVBEvalConfig, evaluate_wvb

    built = methods.load(None, base, "runs/sft/cuma")        # or methods.build("persona", base)
    result = evaluate_wvb(built, tokenizer, "runs/data/synth", WVBEvalConfig(split="test", batch_size=16))
    result.metrics["accuracy"], result.predictions[0]["probs"]

Every (participant, question) pair of the split is scored by the option-letter logits at the answer position
(:func:`cuma.evaluate.scoring.score_records`; under ``torchrun`` each rank scores a slice,
:mod:`cuma.evaluate.distributed`); records that cannot be scored are dropped and counted by reason, never silently.
The server's ``/v1/choice`` scores with the same :func:`~cuma.evaluate.scoring.score_prompts` and prompts.
``docs/evaluation.md`` describes the protocol and every metric.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "REQUIRED_FIELDS",
    "WVBEvalConfig",
    "WVBEvalResult",
    "build_method",
    "check_profile_index",
    "check_profile_rows",
    "check_record_values",
    "evaluate_wvb",
    "read_records",
    "validate_records",
]


@dataclass
class WVBEvalConfig:
    """How :func:`evaluate_wvb` scores a split."""

    split: str = "test"  # which split of the prepared data (train, valid, test)
    batch_size: int = 32  # prompts per forward
    limit: Optional[int] = None  # score only the first N scorable records (the rest are counted as dropped)
    # the profile sentence in the system prompt; None: what the method was trained with
    profile_in_prompt: Optional[bool] = None
    per_question: bool = True  # per-question blocks (accuracy, F1, EMD per question) in the metrics
    progress: bool = True  # progress bar on stderr
    desc: Optional[str] = None  # the progress bar's label (default: "eval METHOD")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class WVBEvalResult:
    """What :func:`evaluate_wvb` returns: one prediction per scored record (input order) and their metrics."""

    predictions: list[dict[str, Any]]  # :func:`cuma.evaluate.scoring.prediction` dicts
    metrics: dict[str, Any]  # :func:`cuma.evaluate.choice.compute_metrics` over every prediction
    counts: dict[str, Any]  # records in the split, pairs scored, questions, participants, dropped by reason
    method: str
    profile_in_prompt: bool  # as scored
    profile_in_prompt_trained: bool  # the method's own setting
    uses_profile_embeds: bool
    fewshot_k: int = 0
    fewshot_key: Optional[str] = None
    data_files: list[str] = field(default_factory=list)  # the files read (hashed into run records)
    score_seconds: float = 0.0

    @property
    def seen(self) -> list[dict[str, Any]]:
        """Predictions of participants from countries seen in training."""
        return [p for p in self.predictions if not p["held_out"]]

    @property
    def held_out(self) -> list[dict[str, Any]]:
        """Predictions of participants from countries held out of training (zero-shot)."""
        return [p for p in self.predictions if p["held_out"]]


PathLike = Union[str, os.PathLike]


def evaluate_wvb(model, tokenizer, data, config: Optional[WVBEvalConfig] = None, *, routing=None) -> WVBEvalResult:
    """Score ``config.split`` of ``data`` with ``model`` and compute the metrics.

    ``model``: a :class:`~cuma.methods.BuiltMethod` (what ``methods.build`` / ``methods.load`` return: it says
    whether the model routes on ``profile_embeds``, puts the profile in the prompt, or prompts with few-shot
    examples), or a bare causal LM (scored with the profile sentence in the prompt, no profile embeddings). The
    model is used where it is (move it to its device first) and in eval mode.
    ``data``: a prepared-data folder (``cuma data wvb`` / ``cuma data synth --prepare``) or a
    :class:`~cuma.data.records.PreparedData` already loaded.
    ``routing``: a :class:`~cuma.evaluate.topology.RoutingAccumulator` over the split's records that pools the
    routers' gates of this pass (the routing map without a forward of its own).
    """
    from ..data.records import PreparedData
    from .choice import compute_metrics
    from .distributed import score_records_distributed

    config = config or WVBEvalConfig()
    built = model if hasattr(model, "spec") and hasattr(model, "uses_profile") else None
    net = built.model if built is not None else model
    method = built.name if built is not None else type(model).__name__
    uses_profile = bool(built and built.uses_profile)
    trained_pip = built.profile_in_prompt if built is not None else True
    pip = trained_pip if config.profile_in_prompt is None else bool(config.profile_in_prompt)

    if isinstance(data, PreparedData):
        source = _Loaded(data, config.split)
    else:
        source = _Folder(Path(data), config.split)
    raw = source.records()
    records, dropped = validate_records(raw, need_profile_index=uses_profile)
    if config.limit is not None and len(records) > config.limit:
        dropped[f"beyond --limit {config.limit}"] = len(records) - config.limit
        records = records[: config.limit]
    if not records:
        raise ValueError(f"{source.where}: no records to score (dropped: {dropped or 'none'})")

    profile_table = None
    if uses_profile:
        profile_table = source.profile_table(method)
        if profile_table.shape[1] != built.profile_dim:
            raise ValueError(
                f"{source.embeds_where} holds {profile_table.shape[1]}-d profile embeddings but the adapter was built "
                f"with profile_dim={built.profile_dim}; prepare the data with the encoder the adapter was trained with"
            )
        source.check_rows(profile_table.shape[0], records)

    fewshot_pool, fewshot_k, fewshot_key, fewshot_seed = None, 0, "country", 0
    if built is not None and built.prompt_mode == "fewshot":
        fewshot_k = int(built.options["k"])
        fewshot_key = built.options.get("key") or "country"
        fewshot_seed = int(built.options.get("seed") or 0)
        fewshot_pool, _ = validate_records(source.train_records())

    t0 = time.perf_counter()
    score = dict(batch_size=config.batch_size, profile_table=profile_table, profile_in_prompt=pip,
                 fewshot_pool=fewshot_pool, fewshot_k=fewshot_k, fewshot_seed=fewshot_seed, fewshot_key=fewshot_key,
                 progress=config.progress, desc=config.desc or f"eval {method}")
    net.eval()
    if routing is None:
        preds = score_records_distributed(net, tokenizer, records, **score)
    else:  # the gates of every forward, pooled by the records' groups
        from ..distributed import rank_and_world
        from ..routing import record_gates

        if rank_and_world()[1] > 1:
            raise ValueError("routing: pooling the gates of an evaluation runs in one process (each rank would see only "
                             "its own slice); run the routing map without torchrun, or use cuma analyze routing")

        with record_gates(net) as rec:
            preds = score_records_distributed(
                net, tokenizer, records, **score,
                on_rows=lambda idx: routing.add_forward(rec, [records[i] for i in idx]),
            )  # fmt: skip
    seconds = time.perf_counter() - t0
    metrics = compute_metrics(preds, per_question=config.per_question)
    counts = {
        "records_in_split": len(raw),
        "pairs": len(preds),
        "questions": len({p["question_id"] for p in preds}),
        "participants": len({p["participant_id"] for p in preds}),
        "profiles": len({r.get("profile_index") for r in records if r.get("profile_index") is not None}),
        "held_out_pairs": sum(1 for p in preds if p["held_out"]),
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "questions_without_emd": metrics["questions"] - metrics["emd"]["questions"],
    }
    return WVBEvalResult(
        predictions=preds, metrics=metrics, counts=counts, method=method, profile_in_prompt=pip,
        profile_in_prompt_trained=trained_pip, uses_profile_embeds=uses_profile, fewshot_k=fewshot_k,
        fewshot_key=fewshot_key if fewshot_k else None, data_files=source.files, score_seconds=seconds,
    )  # fmt: skip


class _Folder:
    """A prepared-data folder read as ``cuma eval wvb`` reads it: the split's lines checked, errors naming file:line."""

    def __init__(self, root: Path, split: str) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist; prepare it with cuma data wvb")
        self.root, self.split = root, split
        self.where = str(root / f"{split}.jsonl")
        self.embeds_where = str(root / "profile_embeds.safetensors")
        self.files = [self.where]
        self._numbered: list = []

    def records(self) -> list[dict]:
        from ..data.records import read_jsonl_numbered

        self._numbered = read_jsonl_numbered(self.where)
        check_record_values(self._numbered, self.where)
        if (self.root / "manifest.json").is_file():
            self.files.append(str(self.root / "manifest.json"))
        if (self.root / "profiles.jsonl").is_file():
            self.files.append(str(self.root / "profiles.jsonl"))
        return [r for _, r in self._numbered]

    def profile_table(self, method: str):
        from .scoring import load_profile_table

        if not os.path.isfile(self.embeds_where):
            raise FileNotFoundError(f"method {method!r} routes on the profile but {self.embeds_where} does not exist")
        self.files.append(self.embeds_where)
        return load_profile_table(self.embeds_where)

    def check_rows(self, rows: int, keep: list[dict]) -> None:
        check_profile_rows(self._numbered, self.where, rows, self.embeds_where, keep=keep)

    def train_records(self) -> list[dict]:
        path = str(self.root / "train.jsonl")
        self.files.append(path)
        return read_records(path)


class _Loaded:
    """A :class:`~cuma.data.records.PreparedData` (``load_prepared`` has already checked its records)."""

    def __init__(self, data, split: str) -> None:
        self.data, self.split = data, split
        self.where = str(Path(data.path) / f"{split}.jsonl")
        self.embeds_where = str(Path(data.path) / "profile_embeds.safetensors")
        self.files = [self.where]

    def records(self) -> list[dict]:
        return self.data.split(self.split)

    def profile_table(self, method: str):
        if self.data.profile_embeds is None:
            raise FileNotFoundError(f"method {method!r} routes on the profile but {self.embeds_where} was not loaded")
        self.files.append(self.embeds_where)
        return self.data.profile_embeds

    def check_rows(self, rows: int, keep: list[dict]) -> None:
        for rec in keep:
            check_profile_index(rec, f"{self.where}: record {rec.get('id')!r}", rows, self.embeds_where)

    def train_records(self) -> list[dict]:
        return self.data.train


REQUIRED_FIELDS = (
    "question_id",
    "letters",
    "options",
    "option_values",
    "gold_letter",
    "gold_value",
    "scale_min",
    "scale_max",
    "question",
)


# --------------------------------------------------------------------------------------- reading and checking


def build_method(name: Optional[str], adapter: Optional[str], base, *, profile_in_prompt: Optional[bool] = None,
                 fewshot_k: Optional[int] = None, seed: int = 0, fewshot: bool = True):
    """(BuiltMethod, method name) to evaluate: a prompting baseline built fresh on ``base``, or a trained method
    reloaded from ``adapter`` (``name`` None: read from the adapter's cuma_method.json / adapter_config.json).
    ``fewshot`` False: the data has no answers to show, so the few-shot baseline is refused."""
    from .. import methods

    if name is None:
        if not adapter:
            raise ValueError("pass --method (or --adapter with a cuma_method.json); methods: "
                             + ", ".join(methods.list_methods()))
        if not os.path.isdir(adapter):
            raise FileNotFoundError(f"--adapter {adapter}: folder does not exist")
        try:
            name = methods.infer_method(adapter)
        except ValueError as err:
            raise ValueError(f"{err} (--method)") from None
    spec = methods.get_spec(name)
    if fewshot_k is not None and spec.prompt_mode != "fewshot":
        raise ValueError(f"--fewshot-k applies to --method fewshot only, not {name!r}")
    baselines = "vanilla, persona and fewshot" if fewshot else "vanilla and persona"
    if not spec.prompting_only:
        if not adapter:
            raise ValueError(f"method {name!r} is trained: pass --adapter DIR (the folder its training run saved); "
                             f"the prompting baselines {baselines} need none")
        if not os.path.isdir(adapter):
            raise FileNotFoundError(f"--adapter {adapter}: folder does not exist")
        return methods.load(name, base, adapter), name
    if adapter:
        raise ValueError(f"method {name!r} is a prompting baseline and takes no --adapter")
    if spec.prompt_mode == "vanilla" and profile_in_prompt:
        raise ValueError("vanilla prompts without the profile; use --method persona to put it in the prompt")
    if spec.prompt_mode == "persona" and profile_in_prompt is False:
        raise ValueError("persona always puts the profile in the prompt; use --method vanilla for no profile")
    options: dict[str, Any] = {}
    if spec.prompt_mode == "fewshot":
        if not fewshot:
            raise ValueError("--method fewshot has no answers to show for opinion cells (one distribution per "
                             "cell); use persona or vanilla")
        options["seed"] = seed
        if fewshot_k is not None:
            options["k"] = fewshot_k
        if profile_in_prompt is not None:
            options["profile_in_prompt"] = profile_in_prompt
    return methods.build(name, base, **options), name


def read_records(path: str) -> list[dict]:
    """Records of one JSONL file (docs/data-schema.md); a missing file is a FileNotFoundError, a bad line a
    ValueError naming ``file:line``."""
    from ..data.records import read_jsonl

    return read_jsonl(path)


def validate_records(records: list[dict], need_profile_index: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Keep the records that can be scored; returns ``(kept, {reason: count})``."""
    kept, dropped = [], {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for rec in records:
        missing = [k for k in REQUIRED_FIELDS if rec.get(k) is None]
        if missing:
            drop(f"missing field {missing[0]}")
            continue
        letters = rec["letters"]
        if not (len(letters) == len(rec["options"]) == len(rec["option_values"])):
            drop("letters, options and option_values differ in length")
            continue
        if len(letters) < 2:
            drop("fewer than two options")
            continue
        if rec["gold_letter"] not in letters:
            drop("gold_letter not among the letters")
            continue
        if rec["option_values"][letters.index(rec["gold_letter"])] != rec["gold_value"]:
            drop("gold_value is not the value of gold_letter")
            continue
        if need_profile_index and rec.get("profile_index") is None:
            drop("no profile_index (the method routes on profile_embeds)")
            continue
        kept.append(rec)
    return kept, dropped


def check_record_values(numbered: list[tuple[int, dict]], path: str) -> None:
    """Values that would silently corrupt the metrics are errors naming ``file:line``, the record and the field: option
    values off the question's scale (they would give EMDs above 1) and a ``profile_index`` that is not an integer."""
    for lineno, rec in numbered:
        at = f"{path}:{lineno}: record {rec.get('id')!r}"
        lo, hi, values = rec.get("scale_min"), rec.get("scale_max"), rec.get("option_values")
        if lo is not None or hi is not None:
            for name, v in (("scale_min", lo), ("scale_max", hi)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{at}: field {name!r} must be an integer, got {v!r}")
            if lo > hi:
                raise ValueError(f"{at}: scale_min {lo} is above scale_max {hi}")
            if isinstance(values, list):
                numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                off = [v for v in numbers if not lo <= v <= hi]
                if off:
                    raise ValueError(
                        f"{at}: option_values {values} fall outside [scale_min, scale_max] = [{lo}, {hi}] ({off}); "
                        "expected every option value on the question's scale"
                    )
        check_profile_index(rec, at)


def check_profile_index(rec: dict, at: str, rows: Optional[int] = None, table: str = "") -> None:
    idx = rec.get("profile_index")
    if idx is None:
        return
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise ValueError(f"{at}: field 'profile_index' must be a non-negative integer (a row of the profile table), "
                         f"got {idx!r}")
    if rows is not None and idx >= rows:
        raise ValueError(f"{at}: profile_index {idx} is not a row of {table} ({rows} rows, 0..{rows - 1})")


def check_profile_rows(numbered: list[tuple[int, dict]], path: str, rows: int, table: str, keep=None) -> None:
    """Every (kept) record's ``profile_index`` is a row of the profile table ``table`` of ``rows`` rows."""
    keep_ids = None if keep is None else {id(r) for r in keep}
    for lineno, rec in numbered:
        if keep_ids is None or id(rec) in keep_ids:
            check_profile_index(rec, f"{path}:{lineno}: record {rec.get('id')!r}", rows, table)
