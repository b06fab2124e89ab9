"""The adaptive ladder on a real run folder: which cells can be planned now, submitting them, and what it costs.

The placement rules are pure and live in kislurm.analysis.validate (next_rung_ratios, more_ratios); this module
reads the run folder (the rungs already planned, which cells are done, the law so far) and submits. A rung once
planned is read back from its cells' cell.json files, never re-placed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kislurm.analysis.collapse import CollapseResult
from kislurm.analysis.law import LawFit
from kislurm.analysis.validate import full_sweep, more_ratios, next_rung_ratios
from kislurm.cluster.status import cell_records
from kislurm.cluster.submit import cells_to_run
from kislurm.orchestrate.run import Echo, submit_run
from kislurm.paths import RunPaths
from kislurm.plan.config import ExperimentConfig
from kislurm.plan.estimate import plan_vocab_size, total_gpu_hours
from kislurm.plan.grid import Cell, expand, ladder_order, run_dir, size_cells

Analyse = Callable[[RunPaths], tuple[list[CollapseResult], LawFit]]
"""The collapses and the law of a run folder so far (kislurm.analysis.aggregate, or a test's stand-in)."""


def existing_ratios(run: RunPaths, size: str) -> list[float]:
    """Ratios of the cells of `size` already planned in the run folder (their cell.json files)."""
    return sorted({float(d["ratio"]) for d in cell_records(run).values() if d.get("size") == size})


def ladder_plan(cfg: ExperimentConfig, run: RunPaths, analyse: Analyse, max_rounds: int = 3) -> tuple[list[Cell], str]:
    """The cells an adaptive run can have now, and why it stops there: the two smallest sizes (expand), every
    further rung already planned (its ratios read back from the run folder, so a resubmission never re-plans it),
    and the next rung when every cell before it is done (its ratios from the law of the sizes so far:
    `analyse(run)` gives the collapses and the law). A finished rung whose collapse was missed, or whose r* interval
    is wider than analysis.target_width, first gets more ratios (more_ratios; at most max_rounds x rung_points in
    all). One step per call: what it adds has to be trained before the next step can be placed."""
    cells = expand(cfg)
    points = cfg.grid.rung_points
    for size in ladder_order(cfg)[2:]:
        ratios = existing_ratios(run, size)
        if ratios:
            cells += size_cells(cfg, size, ratios)
            if len(ratios) < (1 + max_rounds) * points and not [c for c, s in cells_to_run(run, cells)
                                                                 if s != "done"]:
                rung = [c for c in analyse(run)[0] if c.size == size]
                extra = more_ratios(rung[-1], ratios, points, cfg.analysis.target_width) if rung else []
                if extra:
                    return cells + size_cells(cfg, size, extra), (
                        f"adaptive ladder: {size} gets ratios {', '.join(f'{r:g}' for r in extra)} ({rung[-1].flag}, "
                        f"r* interval [{rung[-1].lo:.3g}, {rung[-1].hi:.3g}])")
            continue
        waiting = [c for c, s in cells_to_run(run, cells) if s != "done"] if run.cells.is_dir() else cells
        if waiting:
            return cells, (f"adaptive ladder: {size} is placed once the {len(waiting)} unfinished cells of the smaller "
                           "sizes are done; run `kislurm submit` again then")
        n = float(cfg.presets[size].param_counts(cfg.data.vocab_size)["non_embedding"])
        ratios = next_rung_ratios(analyse(run)[1], n, points)
        return cells + size_cells(cfg, size, ratios), (f"adaptive ladder: {size} placed at ratios "
                                                       f"{', '.join(f'{r:g}' for r in ratios)} from the law so far")
    return cells, "adaptive ladder: every size is planned"


def aggregate_law(run: RunPaths) -> tuple[list[CollapseResult], LawFit]:
    """The run's collapses and law so far, aggregated quietly (the ladder's `analyse`)."""
    from kislurm.analysis.aggregate import aggregate_runs

    result = aggregate_runs([run.root], echo=lambda *_: None)
    return result.collapses, result.law


def submit_ladder(cfg: ExperimentConfig, force: bool = False, echo: Echo = print) -> None:
    """An adaptive grid (grid.ratios: adaptive): submit what can be planned now; locally, wait for it, place the next
    rung from the law so far (ladder_plan) and go on; on Slurm stop until the next `kislurm submit` (or a cron job
    running it) finds the rung before done."""
    paths = RunPaths(run_dir(cfg))
    planned, why = ladder_plan(cfg, paths, aggregate_law)
    while True:
        submit_run(cfg, planned, force=force, echo=echo)
        if cfg.executor.cluster == "slurm":
            break
        more, why = ladder_plan(cfg, paths, aggregate_law)
        if len(more) == len(planned):
            break
        echo(why)
        planned = more
    echo(why)


@dataclass(frozen=True)
class LadderEstimate:
    """What an adaptive ladder is expected to cost (no added ratios) against the fixed grid of its start ratios on
    every size, priced by the plan's one GPU-hour model (kislurm.plan.estimate.cell_gpu_hours)."""

    now: int                # cells planned now: the two smallest sizes on the start ratios
    more: int               # cells expected later: rung_points per further size
    hours: float | None     # GPU-hours of the whole ladder (None: CPU cells only)
    fixed_cells: int        # the start ratios on every size
    fixed_hours: float | None


def ladder_estimate(cfg: ExperimentConfig, first: list[Cell]) -> LadderEstimate:
    """The expected cells and GPU-hours of cfg's ladder, `first` being the cells it plans now (expand(cfg))."""
    g, ex, vocab = cfg.grid, cfg.executor, plan_vocab_size(cfg.data)
    one_ratio = [c for s in ladder_order(cfg)[2:] for c in size_cells(cfg, s, [0.5])]  # cost does not depend on r
    fixed = [c for s in g.sizes for c in full_sweep(cfg, s)]
    hours = total_gpu_hours(first + one_ratio * g.rung_points, ex, vocab)
    return LadderEstimate(len(first), g.rung_points * len(one_ratio), hours, len(fixed),
                          total_gpu_hours(fixed, ex, vocab))
