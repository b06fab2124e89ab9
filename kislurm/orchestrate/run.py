"""Submit a run: write its plan, have its shared data prepared, submit the cells not yet done, and (locally) wait.

On Slurm the login node does no heavy work: preparation is one held CPU job the cell arrays wait on (afterok),
behind the general corpus's shard array while that corpus is unpublished; nothing is left held when a submission
fails. Locally the data is prepared here first (its one writer), then cells run with a progress bar, and every
failed cell is reported with its failed ranks (kislurm.errors.CellsFailed).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from kislurm.cluster import scheduler
from kislurm.cluster.status import RESUBMIT, rank_reports_summary
from kislurm.cluster.submit import (cells_to_run, check_cluster, submit_cells, submit_corpus_shards,
                                    submit_preparation, write_plan)
from kislurm.errors import CellsFailed
from kislurm.paths import RunPaths
from kislurm.plan.config import ExperimentConfig
from kislurm.plan.grid import Cell

Echo = Callable[[str], Any]


def load_cell_job(cfg: ExperimentConfig) -> Any:
    """The compute-node entry (kislurm.cluster.cell_job.CellJob): nodes import it from the installed package."""
    from kislurm.cluster.cell_job import CellJob

    return CellJob(allow_tp_across_nodes=cfg.executor.allow_tp_across_nodes)


def job_failure(job: Any) -> Optional[str]:
    """None when every task (rank) of a finished local job succeeded, else one line naming the failed ranks."""
    problems = []
    for rank in range(job.num_tasks):
        try:
            job.task(rank).result() if job.num_tasks > 1 else job.result()
        except Exception as e:  # noqa: BLE001 - report every failed rank, then the cell
            text = str(e).strip()
            problems.append(f"rank {rank}: {text.splitlines()[-1] if text else type(e).__name__}")
    return "; ".join(problems) or None


def check_environment(cfg: ExperimentConfig) -> None:
    """Cells that run in this environment (not on Slurm): refuse a monitor or an lm-eval it lacks before any runs."""
    if cfg.executor.cluster == "slurm":
        return
    from kislurm.train.monitor import check_monitor

    check_monitor(cfg.monitor)
    if cfg.eval.downstream.tasks:  # eval.downstream without kislurm[eval]: one line naming it
        from kislurm.retention.downstream import require_lm_eval

        require_lm_eval()


def submit_run(cfg: ExperimentConfig, cells: list[Cell], force: bool = False, wait: bool = True,
               planned: list[Cell] | None = None, echo: Echo = print) -> RunPaths:
    """Write the plan (`planned`, default `cells`), prepare shared data, submit what of `cells` is not done, and
    (locally) wait with a progress bar. Raises CellsFailed when cells run here failed."""
    check_cluster(cfg.executor)
    check_environment(cfg)
    run = write_plan(cfg, planned if planned is not None else cells, force=force)
    states = cells_to_run(run, cells)
    todo = [c for c, s in states if s in RESUBMIT]
    skipped = {s: sum(1 for _, t in states if t == s) for s in {t for _, t in states} if s not in RESUBMIT}
    echo(f"{run.root}: {len(todo)} of {len(cells)} cells to submit"
         + (f" (skipping {', '.join(f'{n} {s}' for s, n in sorted(skipped.items()))})" if skipped else ""))
    if not todo:
        return run
    if cfg.executor.cluster == "slurm":
        submit_on_slurm(cfg, run, todo, echo)
    else:
        run_here(cfg, run, todo, wait)
    return run


def submit_on_slurm(cfg: ExperimentConfig, run: RunPaths, todo: list[Cell], echo: Echo = print) -> None:
    """The cells as arrays, behind a held preparation job (and the corpus's shard array) while the data is not
    prepared; the held jobs are released once the arrays are queued and recorded, or cancelled on any failure."""
    from kislurm.data.prepare import is_prepared

    corpus = prep = None
    try:
        if not is_prepared(cfg, todo):
            corpus = submit_corpus_shards(cfg, run)
            prep = submit_preparation(cfg, run, todo, after=corpus)
        jobs = submit_cells(cfg, run, todo, load_cell_job(cfg), after=prep)
    except BaseException:
        scheduler.cancel_jobs([j for j in (prep, corpus) if j])  # never leave a held job behind
        raise
    if prep:
        scheduler.release(prep)
        if corpus:
            scheduler.release(corpus)   # last: a failed shard finds the preparation job and the cells to cancel
            echo(f"queued general_corpus shards as array job {corpus}; the preparation job waits on it")
        echo(f"queued preparation job {prep}; the cells wait on it (afterok)")
    echo(f"submitted {len(jobs)} cells: job ids {', '.join(sorted({j.job_id.split('_')[0] for j in jobs}))}")


def run_here(cfg: ExperimentConfig, run: RunPaths, todo: list[Cell], wait: bool = True) -> None:
    """Prepare the data (its one writer, before any job: cells then only read it), run the cells on this machine
    and wait for them; raise CellsFailed naming every failed cell."""
    from tqdm import tqdm

    from kislurm.data.prepare import prepare_run

    prepare_run(cfg, todo)
    job = load_cell_job(cfg)
    if cfg.executor.cluster == "local":
        bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not wait)
        jobs = submit_cells(cfg, run, todo, job, progress=bar.update)
        bar.close()
    else:
        jobs = submit_cells(cfg, run, todo, job)
    failed = [f"{cell.name}: {rank_reports_summary(run.cell(cell.name), cell.model.world_size) or problem}"
              for cell, j in zip(todo, jobs) if (problem := job_failure(j))]
    if failed:
        raise CellsFailed(f"{len(failed)} of {len(todo)} cells failed; see their log.txt under {run.cells}; rerun "
                          "`kislurm submit` to retry only those", failed)
