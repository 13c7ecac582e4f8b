"""`cuma demo --quick` end to end on the embedded defaults (SmolLM2, MiniLM, synthetic population)."""

import json

import pytest

from cuma.cli import main


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    assert main(["demo", "--quick", "--out", str(out), "--work", str(work)]) == 0
    report = (out / "report.md").read_text()
    for label in ("untrained + persona prompt", "| LoRA |", "semantic-only CuMA", "| CuMA |", "oracle"):
        assert label in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"persona", "lora", "cuma-semantic", "cuma"}
    for method, row in results["results"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["entropy"] <= 1.0
        assert (row["trainable_parameters"] > 0) == (method != "persona")
    for name in ("metrics.png", "distributions.png", "expert_load.png"):
        assert (out / name).stat().st_size > 1000
    assert (work / "adapters" / "cuma" / "adapter_model.safetensors").is_file()
