"""The run record every training stage writes next to its outputs: resolved config, data hashes, versions."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import dump_yaml
from ..runinfo import atomic_write_text, sha256_file


def data_record(data, split: str) -> dict:
    """Where the training data came from, with the hashes of its manifest and of the split that was trained on."""
    manifest = data.path / "manifest.json"
    split_file = data.split_file(split) if hasattr(data, "split_file") else data.path / f"{split}.jsonl"
    return {
        "path": str(data.path),
        "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
        "train_sha256": sha256_file(split_file),
    }


def save_run(trainer, cfg, out: Path, run: dict) -> None:
    """Write ``resolved_config.yaml`` and ``run.json`` into ``out`` (main process only, atomically)."""
    if trainer.is_world_process_zero():
        atomic_write_text(out / "resolved_config.yaml", dump_yaml(cfg))
        atomic_write_text(out / "run.json", json.dumps(run, indent=2, default=str))
