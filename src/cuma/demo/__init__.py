"""`cuma demo`: the main job on the embedded offline defaults (SmolLM2-135M, MiniLM, a synthetic population).

LoRA, semantic-only CuMA and CuMA are trained with the same budget on a population of real countries whose
cultural modes conflict, evaluated with the untrained model on the same test pairs (countries seen in training and
countries held out entirely), and compared in ``report/`` against the population's oracle, with the paper's claims
checked and CuMA's routing map drawn. ``docs/demo.md`` describes the run and its result.

- :mod:`.config`: :class:`DemoConfig` and the per-method options;
- :mod:`.recipe`: :func:`run_demo`, top to bottom (data, training, evaluation, report);
- :mod:`.report` and :mod:`.figures`: ``report.md``, ``results.json`` and the PNG figures;
- :mod:`.cli`: the command line.

Library use::

    from cuma.demo import DemoConfig, run_demo
    summary = run_demo(DemoConfig(steps=100, out="report-100"))
"""

from __future__ import annotations

from .cli import add_arguments, config_from_args, run
from .config import (
    DEMO_PROFILE_FIELDS,
    DEMO_ZONES,
    METHOD_LABELS,
    DemoConfig,
    has_routers,
    method_options,
)
from .recipe import (
    curve_steps,
    evaluate_method,
    held_out_countries,
    load_base,
    prepare_data,
    run_demo,
    train_method,
    training_config,
)
from .report import claim_row, command_line

__all__ = [
    "DEMO_PROFILE_FIELDS",
    "DEMO_ZONES",
    "METHOD_LABELS",
    "DemoConfig",
    "add_arguments",
    "claim_row",
    "command_line",
    "config_from_args",
    "curve_steps",
    "evaluate_method",
    "has_routers",
    "held_out_countries",
    "load_base",
    "method_options",
    "prepare_data",
    "run",
    "run_demo",
    "train_method",
    "training_config",
]
