"""Executors: what a cell asks of the scheduler, as sbatch options and as a configured submitit executor.

One job: turn a preset and the executor config into resources (`Resources`), submitit's sbatch keyword arguments
(`sbatch_parameters`, `preparation_parameters`) and an executor (`make_executor`). It submits nothing and imports
no job entry (kislurm.cluster.cell_job), so both the submitting side (kislurm.cluster.submit) and a cell
resubmitting itself (kislurm.cluster.scheduler.resubmit_cell) build executors here without an import cycle.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import submitit

from kislurm.errors import SubmitError
from kislurm.paths import RunPaths
from kislurm.plan.config import ExecutorConfig, ExperimentConfig
from kislurm.plan.presets import ModelPreset
from kislurm.plan.grid import Cell


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
    timeout = slurm_minutes(ex.time) if ex.time else preset.timeout_min
    gpu = preset.device == "gpu"
    per_node = min(world, ex.tasks_per_node or (ex.gpus_per_node if gpu and ex.gpus_per_node else world))
    if world % per_node:
        raise SubmitError(f"a world size of {world} ranks (TP x PP x DP) does not fill nodes of {per_node} ranks; "
                          "fix: make executor.tasks_per_node (GPU cells: gpus_per_node) divide TP x PP x DP")
    if gpu and ex.gpus_per_node and per_node > ex.gpus_per_node:
        raise SubmitError(f"executor.tasks_per_node {per_node} is more than the {ex.gpus_per_node} GPUs of a node; "
                          "fix: at most one rank per GPU")
    return Resources(world // per_node, per_node, per_node if gpu else 0, ex.cpus_per_task, timeout)


def slurm_minutes(text: str) -> int:
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


SRUN_ARGS = ("--kill-on-bad-exit=1",)
"""Added to every cell's srun: when one rank exits with an error or is killed, Slurm ends the others (they would
otherwise wait in a collective until its timeout)."""


def sbatch_extra(ex: ExecutorConfig) -> dict[str, str]:
    """executor.sbatch_extra as submitit's additional_parameters (dashes become underscores)."""
    return {k.replace("-", "_"): v for k, v in ex.sbatch_extra.items()}


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
        params["additional_parameters"] = sbatch_extra(ex)
    return params


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


def preparation_parameters(ex: ExecutorConfig, name: str) -> dict[str, Any]:
    """sbatch options of the preparation job: one CPU task, no GPU, the cells' partition unless told otherwise.
    It is submitted held and released once the cell arrays that wait on it are queued (and recorded), so a
    preparation that fails early can always find and cancel them."""
    params: dict[str, Any] = {"job_name": f"{name}-prepare", "time": slurm_minutes(ex.prepare_time), "nodes": 1,
                              "ntasks_per_node": 1, "cpus_per_task": ex.prepare_cpus,
                              "additional_parameters": {**sbatch_extra(ex), "hold": True},
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


def local_threads(res: Resources, ex: ExecutorConfig) -> int:
    """Threads per rank when `array_parallelism` cells share this machine: oversubscribed cores make small models
    several times slower (OpenMP threads spin on each other)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (ex.array_parallelism * res.nodes * res.tasks_per_node))


def make_executor(cfg: ExperimentConfig, run: RunPaths, res: Resources, cells: Iterable[Cell] = ()
                  ) -> submitit.AutoExecutor:
    """The submitit executor of one resource shape: sbatch options on Slurm, every rank on this machine otherwise."""
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


def wait_on(executor: submitit.AutoExecutor, ex: ExecutorConfig, dependency: str) -> None:
    """Make the executor's next jobs wait on `dependency` (e.g. afterok:123), keeping the configured extras."""
    executor.update_parameters(slurm_additional_parameters={**sbatch_extra(ex), "dependency": dependency})
