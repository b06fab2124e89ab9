"""Submit: the plan's cells become submitit jobs, one job array per resource shape.

Cells with the same nodes / tasks / GPUs / time share an array, throttled by `array_parallelism` and split into
chunks of at most the cluster's MaxArraySize. Resubmitting a run submits only cells that are missing, failed or
cancelled (identity is the cell id); a cell whose coordinates (size, ratio, tokens, seed) already exist under a
different config is refused unless forced. Nothing is submitted before every check has passed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import submitit
import yaml
from submitit.slurm.slurm import _make_sbatch_string

from kislurm.plan.config import ExecutorConfig, ExperimentConfig
from kislurm.plan.loader import config_to_dict
from kislurm.plan.presets import ModelPreset
from kislurm.paths import RunPaths
from kislurm.publish import atomic_write_json, atomic_write_text
from kislurm.plan.grid import Cell, expand, run_dir
from kislurm.cluster.status import RESUBMIT, Submission, record_submissions, run_status
from kislurm.errors import SubmitError  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Resources:
    """What one cell asks of the scheduler; cells with equal Resources share a job array."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    timeout_min: int


def resources_for(preset: ModelPreset, ex: ExecutorConfig) -> Resources:
    """TP x PP x DP ranks, one task per rank, `tasks_per_node` of them on each node (GPU cells: one per GPU)."""
    world = preset.world_size
    timeout = _slurm_minutes(ex.time) if ex.time else preset.timeout_min
    gpu = preset.device == "gpu"
    per_node = min(world, ex.tasks_per_node or (ex.gpus_per_node if gpu and ex.gpus_per_node else world))
    if world % per_node:
        raise SubmitError(f"a world size of {world} ranks (TP x PP x DP) does not fill nodes of {per_node} ranks; "
                          "fix: make executor.tasks_per_node (GPU cells: gpus_per_node) divide TP x PP x DP")
    if gpu and ex.gpus_per_node and per_node > ex.gpus_per_node:
        raise SubmitError(f"executor.tasks_per_node {per_node} is more than the {ex.gpus_per_node} GPUs of a node; "
                          "fix: at most one rank per GPU")
    return Resources(world // per_node, per_node, per_node if gpu else 0, ex.cpus_per_task, timeout)


def _slurm_minutes(text: str) -> int:
    """Minutes in a Slurm time string (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]])."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + math.ceil(s / 60)
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + math.ceil(parts[1] / 60)
    return parts[0] * 60 + parts[1] + math.ceil(parts[2] / 60)


def sbatch_parameters(res: Resources, ex: ExecutorConfig, name: str, save_s: Optional[float] = None
                      ) -> dict[str, Any]:
    """Keyword arguments of submitit's own sbatch renderer (the single source of truth for valid options);
    `save_s`: the slowest checkpoint save measured among the cells (sets the signal's lead time)."""
    params: dict[str, Any] = {
        "job_name": name, "time": res.timeout_min, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "array_parallelism": ex.array_parallelism,
        "signal_delay_s": ex.signal_lead_s or signal_delay_s(res.timeout_min, save_s),
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(ex, key):
            params[key] = getattr(ex, key)
    if ex.mem_gb:
        params["mem"] = f"{ex.mem_gb}GB"
    if ex.setup:
        params["setup"] = list(ex.setup)
    params["srun_args"] = [*SRUN_ARGS, *ex.srun_args]
    if ex.sbatch_extra:
        params["additional_parameters"] = _sbatch_extra(ex)
    return params


SRUN_ARGS = ("--kill-on-bad-exit=1",)
"""Added to every cell's srun: when one rank exits with an error or is killed, Slurm ends the others (they would
otherwise wait in a collective until its timeout)."""


def _sbatch_extra(ex: ExecutorConfig) -> dict[str, str]:
    return {k.replace("-", "_"): v for k, v in ex.sbatch_extra.items()}


def signal_delay_s(timeout_min: int, save_s: Optional[float] = None) -> int:
    """Seconds before the time limit that Slurm sends USR2 (the cell then finishes its step, saves and requeues).

    slurmctld checks limits every 30 s, so the signal comes up to 30 s earlier than asked; submitit's 90 s default
    would hit a 1-2 minute job before its Python process has installed the handler, killing it instead. Where a
    save time has been measured, the lead covers twice that save plus a minute for the step in flight and the
    scheduler's granularity (a 3B cell saving for 4 minutes on NFS gets 9 minutes, not 90 s), up to half the
    time limit."""
    base = 90 if timeout_min >= 5 else 15
    if not save_s:
        return base
    return int(min(max(base, math.ceil(60 + 2 * save_s)), max(base, timeout_min * 30)))


def measured_save_s(run: RunPaths, cells: Iterable[Cell]) -> Optional[float]:
    """The slowest save recorded in the latest checkpoint of any of `cells` (None before any was saved): one small
    JSON read per cell, on the submitting machine."""
    from kislurm.train.checkpoint import find_latest

    times = []
    for cell in cells:
        try:
            info = find_latest(run.cell(cell.name).checkpoints)
        except Exception:  # an unreadable record is the cell's problem, reported when it runs
            continue
        if info is not None and info.meta.get("save_seconds"):
            times.append(float(info.meta["save_seconds"]))
    return max(times) if times else None


# ----------------------------------------------------------------------------------------------------------------------
# Checks against the cluster (before anything is submitted)
# ----------------------------------------------------------------------------------------------------------------------


def _scontrol_config() -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines()) if v}


def max_array_size(ex: ExecutorConfig) -> int:
    """The largest array we may submit: the config's value, else the cluster's MaxArraySize, else 1000."""
    if ex.max_array_size:
        return ex.max_array_size
    if ex.cluster == "slurm" and shutil.which("scontrol"):
        try:
            return int(_scontrol_config().get("MaxArraySize", "1001"))
        except (ValueError, subprocess.SubprocessError, OSError):
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
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
        partitions = sorted({p.strip().rstrip("*") for p in out.split()})
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
    if run.cells.is_dir():
        for spec in run.cells.glob("*/cell.json"):
            try:
                d = json.loads(spec.read_text())
                key = f"{d['size']} r={d['ratio']:g} tokens={d['tokens']} seed={d['seed']}"
                found.setdefault(key, set()).add(d["cell_id"])
            except (OSError, ValueError, KeyError):
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


def preparation_parameters(ex: ExecutorConfig, name: str) -> dict[str, Any]:
    """sbatch options of the preparation job: one CPU task, no GPU, the cells' partition unless told otherwise.
    It is submitted held and released once the cell arrays that wait on it are queued (and recorded), so a
    preparation that fails early can always find and cancel them."""
    params: dict[str, Any] = {"job_name": f"{name}-prepare", "time": _slurm_minutes(ex.prepare_time), "nodes": 1,
                              "ntasks_per_node": 1, "cpus_per_task": ex.prepare_cpus,
                              "additional_parameters": {**_sbatch_extra(ex), "hold": True},
                              "srun_args": [*SRUN_ARGS, *ex.srun_args]}  # the same container as the cells
    partition = ex.prepare_partition or ex.partition
    if partition:
        params["partition"] = partition
    for key in ("account", "qos"):
        if getattr(ex, key):
            params[key] = getattr(ex, key)
    if ex.setup:
        params["setup"] = list(ex.setup)
    return params


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


def release(job_id: str) -> None:
    """Let a held job start."""
    out = subprocess.run(["scontrol", "release", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise SubmitError(f"could not release the held job {job_id} ({out.stderr.strip() or out.returncode}"
                          f"); fix: scontrol release {job_id}, or scancel it and run `kislurm submit` again")


def _wait_on(executor: submitit.AutoExecutor, ex: ExecutorConfig, dependency: str) -> None:
    """Make the executor's next jobs wait on `dependency` (e.g. afterok:123), keeping the configured extras."""
    executor.update_parameters(slurm_additional_parameters={**_sbatch_extra(ex), "dependency": dependency})


def cancel_jobs(job_ids: list[str]) -> None:
    """scancel these jobs (array ids cancel the whole array); a job already gone is no error."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


def dry_run(cfg: ExperimentConfig, cells: list[Cell]) -> str:
    """The sbatch scripts that `submit` would send, one per array (rendered by submitit itself), after the
    preparation job's (sent only while the run's data is not yet published; the arrays then wait on it)."""
    run = RunPaths(run_dir(cfg))
    size = max_array_size(cfg.executor)
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(run.submitit / "%j")])
    texts = []
    if cfg.executor.cluster == "slurm":
        prep = _make_sbatch_string(command=command, folder=run.submitit / "%j",
                                   **preparation_parameters(cfg.executor, f"kislurm-{cfg.name}"))
        texts.append("# preparation job (only while the data is not published; the arrays get "
                     f"--dependency=afterok on it)\n{prep}")
    for res, group in group_by_resources(cells, cfg.executor).items():
        for chunk in chunks(group, size):
            params = sbatch_parameters(res, cfg.executor, f"kislurm-{cfg.name}")
            script = _make_sbatch_string(command=command, folder=run.submitit / "%j", map_count=len(chunk),
                                         **params)
            names = ", ".join(c.name for c in chunk[:4]) + (" ..." if len(chunk) > 4 else "")
            texts.append(f"# array of {len(chunk)} cells ({names})\n{script}")
    return "\n".join(texts)


def make_executor(cfg: ExperimentConfig, run: RunPaths, res: Resources, cells: Iterable[Cell] = ()
                  ) -> submitit.AutoExecutor:
    ex = cfg.executor
    executor = submitit.AutoExecutor(folder=run.submitit / "%j", cluster=ex.cluster,
                                     slurm_max_num_timeout=ex.max_requeues)
    if ex.cluster == "slurm":
        params = sbatch_parameters(res, ex, f"kislurm-{cfg.name}", measured_save_s(run, cells))
        executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    else:
        # One machine: every rank on it (tasks_per_node places ranks on Slurm nodes only). gpus_per_node 0 makes
        # the local executor hide every GPU (CUDA_VISIBLE_DEVICES=""): CPU cells stay on CPU.
        executor.update_parameters(timeout_min=res.timeout_min, tasks_per_node=res.nodes * res.tasks_per_node,
                                   nodes=1, gpus_per_node=res.nodes * res.gpus_per_node, name=f"kislurm-{cfg.name}")
        if ex.cluster == "local":
            executor.update_parameters(local_setup=[*ex.setup, f"export OMP_NUM_THREADS={local_threads(res, ex)}"])
    return executor


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
                _wait_on(executor, ex, f"afterok:{after}")
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


def local_threads(res: Resources, ex: ExecutorConfig) -> int:
    """Threads per rank when `array_parallelism` cells share this machine: oversubscribed cores make small models
    several times slower (OpenMP threads spin on each other)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (ex.array_parallelism * res.nodes * res.tasks_per_node))


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


def resubmit_cell(run: RunPaths, cell: Cell, after: str, note: str) -> str:
    """Submit `cell` again as a new Slurm job that starts once job `after` has ended (called by the cell itself when
    the cluster refuses to requeue it); records the submission with `note`; returns the new job id.

    Bounded by executor.max_requeues, counted over the cell's earlier resubmissions in submissions.jsonl."""
    from kislurm.cluster.cell_job import CellJob
    from kislurm.plan.loader import load_config
    from kislurm.cluster.status import submissions_of

    cfg = load_config(run.config)
    earlier = sum(1 for s in submissions_of(run, cell.name) if s.note)
    if earlier >= cfg.executor.max_requeues:
        raise SubmitError(f"cell {cell.name} reached its time limit {earlier + 1} times and was resubmitted "
                          f"{earlier} times (executor.max_requeues); fix: raise executor.time or max_requeues, "
                          "then run `kislurm submit` again")
    res = resources_for(cell.model, cfg.executor)
    executor = make_executor(cfg, run, res, [cell])
    _wait_on(executor, cfg.executor, f"afterany:{after}")
    job = executor.submit(CellJob(cfg.executor.allow_tp_across_nodes), str(run.root), cell)
    record_submissions(run, [Submission(cell.name, job.job_id, "slurm", time.time(), note=note)])
    return job.job_id
