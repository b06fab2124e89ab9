"""Validation, the pilot and the demo on a run: plan from the run's own law or results, submit, and report back.

`kislurm validate`, `kislurm pilot` and `kislurm demo` only parse their options and print what these return; the
placement rules are kislurm.analysis.validate's and the verdicts kislurm.analysis.pilot's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from kislurm.analysis.pilot import PilotResult, chance_of, pilot_cells
from kislurm.analysis.validate import ValidationError, ValidationPlan, full_sweep, validation_cells
from kislurm.orchestrate.run import Echo, submit_run
from kislurm.paths import RunPaths
from kislurm.plan.config import ExperimentConfig
from kislurm.plan.loader import load_config
from kislurm.plan.estimate import plan_vocab_size, total_gpu_hours
from kislurm.plan.grid import Cell, expand


def run_law(run: RunPaths) -> Any:
    """The law fitted on `run` so far (aggregated again, quietly, from its stores)."""
    from kislurm.analysis.aggregate import aggregate_runs

    return aggregate_runs([run.root], echo=lambda *_: None).law


def plan_validation(run: RunPaths, size: str, points: int) -> tuple[ExperimentConfig, ValidationPlan]:
    """The run's config and the cells that validate `size` against the run's law; refused in one line when the
    folder is no run or has no law yet."""
    if not run.config.exists():
        raise FileNotFoundError(f"{run.config}: not a run folder; fix: pass a folder made by `kislurm submit`")
    if not run.law.exists():
        raise ValidationError(f"{run.root} has no law yet (no reports/law.json); fix: run `kislurm aggregate "
                              f"{run.root}` once the fitted sizes are done")
    cfg = load_config(run.config)
    return cfg, validation_cells(cfg, run_law(run), size, points)


@dataclass(frozen=True)
class ValidationCost:
    """GPU-hours (the plan's one model; None for CPU cells) of a validation against the full sweep it replaces."""

    cells: list[tuple[Cell, Optional[float]]]   # each validation cell with its GPU-hours
    hours: Optional[float]
    sweep_cells: int
    sweep_hours: Optional[float]


def validation_cost(cfg: ExperimentConfig, vp: ValidationPlan) -> ValidationCost:
    """What `kislurm validate --dry-run` shows: each cell's GPU-hours, their sum, and the fixed grid's full sweep
    of the same size."""
    ex, vocab = cfg.executor, plan_vocab_size(cfg.data)
    sweep = full_sweep(cfg, vp.size)
    each = [(c, total_gpu_hours([c], ex, vocab)) for c in vp.cells]
    return ValidationCost(each, total_gpu_hours(vp.cells, ex, vocab), len(sweep), total_gpu_hours(sweep, ex, vocab))


def submit_validation(cfg: ExperimentConfig, vp: ValidationPlan, echo: Echo = print) -> RunPaths:
    """Submit the validation cells as `kislurm submit` does, joining the run's plan."""
    return submit_run(cfg, vp.cells, planned=expand(cfg) + vp.cells, echo=echo)


def run_pilot(cfg: ExperimentConfig, echo: Echo = print) -> tuple[list[Cell], Optional[PilotResult]]:
    """Submit the pilot's two cells (kislurm.analysis.pilot) and, once both are done, their result; (cells, None)
    while they are not finished (on a cluster: run the pilot again later)."""
    from kislurm.analysis.aggregate import CellDigest, summarise

    cells = pilot_cells(cfg)
    run = submit_run(cfg, cells, echo=echo)
    got = [summarise(str(run.cell(c.name).store), cfg.analysis.metric) for c in cells]
    if not all(isinstance(d, CellDigest) and d.complete and d.value is not None for d in got):
        return cells, None
    low, high = got
    return cells, PilotResult(cells[0].ratio, cells[1].ratio, float(low.value), float(high.value),
                              chance_of(cfg.analysis.metric, low.n_choices))


def run_demo(cfg: ExperimentConfig, cells: list[Cell], validate_size: Optional[str] = None, echo: Echo = print
             ) -> Any:
    """Train every cell, aggregate, and with `validate_size` then train that held-out size at 5 ratios placed
    from the law and aggregate again; returns the last aggregation (kislurm.analysis.aggregate's result)."""
    from kislurm.analysis.aggregate import aggregate_runs

    started = time.time()
    run = submit_run(cfg, cells, echo=echo)
    echo(f"trained {len(cells)} cells in {time.time() - started:.0f} s")
    result = aggregate_runs([run.root], echo=echo)
    if validate_size:
        vp = validation_cells(cfg, result.law, validate_size, points=5)
        echo(f"validation: {validate_size} predicted r* {vp.prediction.r_star:.3g} [{vp.prediction.r_lo:.3g}, "
             f"{vp.prediction.r_hi:.3g}]; training it at {', '.join(f'{r:g}' for r in vp.ratios)}")
        submit_run(cfg, vp.cells, planned=cells + vp.cells, echo=echo)
        result = aggregate_runs([run.root], echo=echo)
    return result
