"""Submit: the plan's cells become submitit jobs, one job array per resource shape.

Cells with the same nodes / tasks / GPUs / time share an array, throttled by `array_parallelism` and split into
chunks of at most the cluster's MaxArraySize. Resubmitting a run submits only cells that are missing, failed or
cancelled (identity is the cell id); a cell whose coordinates (size, ratio, tokens, seed) already exist under a
different config is refused unless forced. Nothing is submitted before every check has passed.

Resources and executors are built by kislurm.cluster.executors; releasing, cancelling and resubmitting jobs is
kislurm.cluster.scheduler's; what to submit when (the run, the ladder, validation) is kislurm.orchestrate's.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable, Optional

import submitit
import yaml

from kislurm.cluster import scheduler
from kislurm.cluster.executors import (Resources, make_executor, preparation_parameters, resources_for,
                                       sbatch_parameters, wait_on)
from kislurm.cluster.status import cell_records, run_status
from kislurm.cluster.submissions import Submission, record_submissions
from kislurm.errors import SubmitError  # noqa: F401 (re-exported)
from kislurm.paths import RunPaths
from kislurm.plan.config import ExecutorConfig, ExperimentConfig
from kislurm.plan.loader import config_to_dict
from kislurm.plan.grid import Cell, run_dir
from kislurm.publish import atomic_write_json, atomic_write_text
from kislurm.train.workarounds import render_sbatch


# ----------------------------------------------------------------------------------------------------------------------
# Checks against the cluster (before anything is submitted)
# ----------------------------------------------------------------------------------------------------------------------


def max_array_size(ex: ExecutorConfig) -> int:
    """The largest array we may submit: the config's value, else the cluster's MaxArraySize, else 1000."""
    if ex.max_array_size:
        return ex.max_array_size
    if ex.cluster == "slurm" and shutil.which("scontrol"):
        try:
            return int(scheduler.cluster_config().get("MaxArraySize", "1001"))
        except ValueError:
            pass
    return 1000


def check_cluster(ex: ExecutorConfig) -> None:
    """Fail early with one line when the config asks for Slurm and the machine cannot serve it."""
    if ex.cluster != "slurm":
        return
    if shutil.which("sbatch") is None:
        raise SubmitError("executor.cluster is slurm but sbatch was not found on this machine; fix: submit from a "
                          "Slurm login node, or set executor.cluster: local")
    if ex.partition:
        partitions = scheduler.partitions()
        if ex.partition not in partitions:
            raise SubmitError(f"unknown partition '{ex.partition}'; fix: set executor.partition to one of "
                              f"{partitions}")


# ----------------------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------------------


def write_plan(cfg: ExperimentConfig, cells: list[Cell], force: bool = False) -> RunPaths:
    """Create or update the run folder; refuse a changed config for existing coordinates unless forced."""
    run = RunPaths(run_dir(cfg))
    existing = _existing_cells(run)
    for cell in cells:
        key = _coords(cell)
        old = existing.get(key, set())
        if old and cell.cell_id not in old and not force:
            raise SubmitError(f"cell {key} already exists in {run.root} with a different config (id "
                              f"{', '.join(sorted(old))}, now "
                              f"{cell.cell_id}); fix: use a new experiment name, or --force to add the new cell")
    run.cells.mkdir(parents=True, exist_ok=True)
    # The effective config, every default and path resolved: the run folder alone can re-create each cell.
    atomic_write_text(run.config, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    for cell in cells:
        cp = run.cell(cell.name)
        if not cp.spec.exists():
            atomic_write_json(cp.spec, cell.to_json())
    atomic_write_json(run.plan, {"name": cfg.name, "cells": [c.name for c in cells], "written": time.time()})
    return run


def _coords(cell: Cell) -> str:
    return f"{cell.size} r={cell.ratio:g} tokens={cell.tokens} seed={cell.seed}"


def _existing_cells(run: RunPaths) -> dict[str, set[str]]:
    """Coordinates -> ids of the cells already planned in this run folder."""
    found: dict[str, set[str]] = {}
    for d in cell_records(run).values():
        try:
            key = f"{d['size']} r={d['ratio']:g} tokens={d['tokens']} seed={d['seed']}"
            found.setdefault(key, set()).add(d["cell_id"])
        except (KeyError, TypeError, ValueError):
            continue
    return found


def cells_to_run(run: RunPaths, cells: list[Cell]) -> list[tuple[Cell, str]]:
    """Each cell with its current state (the scheduler is queried once for all)."""
    rows = {r["cell"]: r["state"] for r in run_status(run, [c.name for c in cells])}
    return [(c, rows[c.name]) for c in cells]


# ----------------------------------------------------------------------------------------------------------------------
# Submission
# ----------------------------------------------------------------------------------------------------------------------


def group_by_resources(cells: Iterable[Cell], ex: ExecutorConfig) -> dict[Resources, list[Cell]]:
    groups: dict[Resources, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(resources_for(cell.model, ex), []).append(cell)
    return groups


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _preparation_executor(cfg: ExperimentConfig, run: RunPaths, job_name: Optional[str] = None,
                          dependency: Optional[str] = None) -> submitit.AutoExecutor:
    """A Slurm executor with the preparation job's sbatch options (held), for the preparation job and the general
    corpus's shard array ahead of it."""
    executor = submitit.AutoExecutor(folder=run.submitit / "%j", cluster="slurm")
    params = preparation_parameters(cfg.executor, f"kislurm-{cfg.name}")
    if job_name:
        params["job_name"] = job_name
    if dependency:
        params["additional_parameters"]["dependency"] = dependency
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    return executor


def submit_preparation(cfg: ExperimentConfig, run: RunPaths, cells: list[Cell], after: Optional[str] = None) -> str:
    """Queue the run's data preparation as one held CPU job (kislurm.cluster.cell_job.PrepareJob); returns its id.
    `after`: the general corpus's shard array it waits on, recorded in prepare.json as corpus_job. It waits with
    afterany, not afterok: a shard task killed outright (out of memory, a lost node) records nothing, and under
    afterok the preparation job would stay pending for ever; it runs instead, finds the shard unpublished and fails
    in one line naming it (a shard that fails in Python has already recorded why and cancelled it)."""
    from kislurm.cluster.cell_job import PrepareJob

    executor = _preparation_executor(cfg, run, dependency=f"afterany:{after}" if after else None)
    job = executor.submit(PrepareJob(), str(run.root), cfg, cells)
    atomic_write_json(run.preparation, {"job": job.job_id, "state": "queued", "time": time.time(),
                                        **({"corpus_job": after} if after else {})})
    return job.job_id


def submit_corpus_shards(cfg: ExperimentConfig, run: RunPaths) -> Optional[str]:
    """Queue data.general_corpus's unfinished shards as one held array (one task per shard, the preparation job's
    partition and CPUs; kislurm.cluster.cell_job.CorpusShardJob); returns the array's job id, or None when the
    corpus is published (a second experiment on the same files and tokenizer) or has nothing left to tokenize."""
    from kislurm.cluster.cell_job import CorpusShardJob
    from kislurm.data.prepare import general_corpus_plan

    plan = general_corpus_plan(cfg.data, run.data)
    todo = plan.unfinished() if plan is not None else []
    if not todo:
        return None
    executor = _preparation_executor(cfg, run, job_name=f"kislurm-{cfg.name}-corpus")
    with executor.batch():
        jobs = [executor.submit(CorpusShardJob(), str(run.root), plan.work, shard, str(final))
                for shard, final in todo]
    return jobs[0].job_id.split("_")[0]


def dry_run(cfg: ExperimentConfig, cells: list[Cell]) -> str:
    """The sbatch scripts that `submit` would send, one per array (rendered by submitit itself), after the
    preparation job's (sent only while the run's data is not yet published; the arrays then wait on it)."""
    run = RunPaths(run_dir(cfg))
    size = max_array_size(cfg.executor)
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(run.submitit / "%j")])
    texts = []
    if cfg.executor.cluster == "slurm":
        prep = render_sbatch(command=command, folder=run.submitit / "%j",
                                   **preparation_parameters(cfg.executor, f"kislurm-{cfg.name}"))
        texts.append("# preparation job (only while the data is not published; the arrays get "
                     f"--dependency=afterok on it)\n{prep}")
    for res, group in group_by_resources(cells, cfg.executor).items():
        for chunk in chunks(group, size):
            params = sbatch_parameters(res, cfg.executor, f"kislurm-{cfg.name}")
            script = render_sbatch(command=command, folder=run.submitit / "%j", map_count=len(chunk),
                                         **params)
            names = ", ".join(c.name for c in chunk[:4]) + (" ..." if len(chunk) > 4 else "")
            texts.append(f"# array of {len(chunk)} cells ({names})\n{script}")
    return "\n".join(texts)


def submit_cells(cfg: ExperimentConfig, run: RunPaths, cells: list[Cell], job_fn: Callable[..., Any],
                 progress: Optional[Callable[[int], Any]] = None, after: Optional[str] = None) -> list:
    """Submit cells as job arrays; returns submitit jobs. On Slurm, `after` is a job the arrays wait on (afterok:
    the preparation job). Local jobs are throttled to array_parallelism (and this call returns when they have all
    finished, calling `progress(1)` as each one does)."""
    ex = cfg.executor
    jobs: list = []
    subs: list[Submission] = []
    limit = max_array_size(ex)
    for res, group in group_by_resources(cells, ex).items():
        executor = make_executor(cfg, run, res, group)
        if ex.cluster == "slurm":
            if after:
                wait_on(executor, ex, f"afterok:{after}")
            for chunk in chunks(group, limit):
                with executor.batch():
                    batch = [executor.submit(job_fn, str(run.root), cell) for cell in chunk]
                jobs += batch
                subs += [Submission(c.name, j.job_id, ex.cluster, time.time(), after=after or "")
                         for c, j in zip(chunk, batch)]
        else:
            jobs += _submit_throttled(executor, run, group, job_fn, ex, subs, progress)
    record_submissions(run, subs)
    return jobs


def _submit_throttled(executor, run: RunPaths, cells: list[Cell], job_fn, ex: ExecutorConfig,
                      subs: list[Submission], progress: Optional[Callable[[int], Any]]) -> list:
    """submitit's local executor starts every job at once; keep at most array_parallelism cells running."""
    if ex.cluster == "debug":
        jobs = [executor.submit(job_fn, str(run.root), cell) for cell in cells]
        subs += [Submission(c.name, j.job_id, ex.cluster, time.time()) for c, j in zip(cells, jobs)]
        return jobs
    from collections import deque

    pending, running, jobs = deque(cells), [], []
    try:
        _throttle_loop(executor, run, pending, running, jobs, job_fn, ex, progress)
    except KeyboardInterrupt:
        for job in running:  # stop the cells we started; their checkpoints let the next submit resume them
            job.cancel(check=False)
        deadline = time.time() + 60
        while time.time() < deadline and not all(job.done() for job in running):
            time.sleep(0.2)  # return only once they are gone, so a rerun never finds them still "running"
        raise
    return jobs


def _throttle_loop(executor, run: RunPaths, pending, running: list, jobs: list, job_fn, ex: ExecutorConfig,
                   progress: Optional[Callable[[int], Any]]) -> None:
    while pending or running:
        finished = [j for j in running if j.done()]
        running[:] = [j for j in running if j not in finished]
        if progress and finished:
            progress(len(finished))
        while pending and len(running) < ex.array_parallelism:
            cell = pending.popleft()
            job = executor.submit(job_fn, str(run.root), cell)
            record_submissions(run, [Submission(cell.name, job.job_id, ex.cluster, time.time())])
            running.append(job)
            jobs.append(job)
        time.sleep(0.5)


def describe(cells: list[Cell], ex: ExecutorConfig) -> list[dict[str, Any]]:
    """Rows of the plan table: one per cell with its resources."""
    rows = []
    for cell in cells:
        res = resources_for(cell.model, ex)
        rows.append({"cell": cell.name, "size": cell.size, "ratio": cell.ratio, "tokens": cell.tokens,
                     "seed": cell.seed, "steps": cell.steps, **asdict(res)})
    return rows
