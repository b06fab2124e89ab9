"""`kislurm downstream RUN --tasks TASKS`: lm-eval scores of every finished cell's final weights.

Each cell's `checkpoints/final` weights are loaded into the cell's own model (kislurm.train.checkpoint.load_weights,
any layout) and scored through kislurm's scorer (kislurm.retention.downstream), at TP=1. Locally the cells run one
after another in this process; when the run's executor is Slurm, each cell that still lacks a task is one task of a
submitit array (the cells' partition and one GPU when they trained on GPUs, the preparation job's CPU resources
otherwise), and the command waits for them. The scores go to CELL/downstream.json, written atomically and merged
per task: a rerun skips every task already scored there with the same lm-eval version and limit, so adding a task
scores only that one.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any, Callable

from kislurm.errors import EvalError
from kislurm.paths import CellPaths, RunPaths
from kislurm.plan.grid import Cell
from kislurm.publish import atomic_write_json
from kislurm.cluster.status import recorded_cell

def read_results(paths: CellPaths) -> dict[str, Any]:
    """CELL/downstream.json, or an empty record; a damaged one is one line naming it."""
    path = paths.downstream_results
    if not path.is_file():
        return {"tasks": {}}
    try:
        record = json.loads(path.read_text())
        assert isinstance(record.get("tasks"), dict)
        return record
    except (ValueError, AssertionError, OSError) as exc:
        raise EvalError(f"{path}: unreadable downstream results ({str(exc)[:80]}); fix: delete it and rerun "
                        "kislurm downstream") from None


def missing_tasks(record: dict[str, Any], tasks: list[str], version: str, limit: int | None) -> list[str]:
    """The tasks not yet scored in `record` with this lm-eval version and limit."""
    done = record.get("tasks", {})
    return [t for t in tasks if not (t in done and done[t].get("lm_eval_version") == version
                                     and done[t].get("limit") == limit)]


def skipped_line(cell: Cell, tasks: list[str], version: str) -> str:
    return f"{cell.name}: {', '.join(tasks)} already scored (lm-eval {version}); skipped"


def score_cell(run: RunPaths, cell: Cell, tasks: list[str], limit: int | None, batch_size: int | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score one cell's final weights on the tasks it lacks; returns its (merged) record."""
    from kislurm.data import prepare as data
    from kislurm.plan.presets import resolve_precision
    from kislurm.retention.downstream import require_lm_eval, run_tasks, write_local_tasks
    from kislurm.train import checkpoint
    from kislurm.train.distributed import init_model_parallel, seed_all, teardown
    from kislurm.train.model import build_model

    paths = run.cell(cell.name)
    version = require_lm_eval()
    record = read_results(paths)
    todo = missing_tasks(record, tasks, version, limit)
    if not todo:
        log(skipped_line(cell, tasks, version))
        return record
    weights = paths.checkpoints / checkpoint.FINAL_DIR
    if not weights.is_dir():
        raise EvalError(f"{cell.name}: no final weights at {weights}; fix: let the cell finish with "
                        "train.keep_final weights (the default) or full")
    prepared = data.load_prepared(cell.data, run.data, cell.model.seq_length)
    folder = paths.downstream_tasks("final")
    write_local_tasks(todo, prepared, data.cell_probes(prepared, cell), folder)
    preset = replace(cell.model, tensor_parallel=1, pipeline_parallel=1, data_parallel=1)
    ctx = init_model_parallel(1, device=preset.device)
    try:
        seed_all(cell.seed)
        model = build_model(preset, prepared.tokenizer.vocab_size, cell.train.init_std,
                            resolve_precision(preset, cell.train.precision))
        meta = checkpoint.load_weights(weights, model)
        started = time.perf_counter()
        result = run_tasks(model, prepared.tokenizer, todo, [folder], limit, batch_size or cell.eval.batch_size)
    finally:
        teardown(ctx)
    for task in todo:
        prefix = f"downstream/{task}/"
        record["tasks"][task] = {"metrics": {k[len(prefix):]: v for k, v in result.metrics.items()
                                             if k.startswith(prefix)},
                                 "task_hash": result.task_hashes.get(task), "lm_eval_version": version,
                                 "limit": limit, "step": meta.get("step"), "seconds": round(time.perf_counter()
                                                                                              - started, 2)}
    record.update(cell=cell.name, cell_id=cell.cell_id, size=cell.size, ratio=cell.ratio, tokens=cell.tokens,
                  seed=cell.seed)
    atomic_write_json(paths.downstream_results, record)
    log(f"{cell.name}: scored {', '.join(todo)}")
    return record


def run_cells(run: RunPaths) -> list[Cell]:
    """Every cell of the run folder, from its own cell.json (validation and ladder cells too, as export reads them)."""
    return [recorded_cell(run, name) for name in run.cell_names()]


def score_run(run: RunPaths, tasks: list[str], limit: int | None, log: Callable[[str], None] = print,
              in_process: bool = False) -> tuple[list[str], list[str]]:
    """Every cell with final weights; returns (scored or skipped cells, cells not finished). A run whose executor
    is Slurm scores as one array task per cell that lacks a task (waited for), unless `in_process`; other runs
    one cell after another in this process. Failed Slurm tasks: one line each, then EvalError."""
    from kislurm.plan.loader import load_config
    from kislurm.retention.downstream import require_lm_eval  # without the extra: one line, before any cell

    version = require_lm_eval()
    finished, waiting = finished_cells(run)
    cfg = load_config(run.config)
    if cfg.executor.cluster == "slurm" and not in_process:
        todo = []
        for cell in finished:
            if missing_tasks(read_results(run.cell(cell.name)), tasks, version, limit):
                todo.append(cell)
            else:
                log(skipped_line(cell, tasks, version))
        failures = score_on_slurm(cfg, run, todo, tasks, limit, log) if todo else []
        for failure in failures:
            log(failure.line("downstream"))
        if failures:
            raise EvalError(f"{len(failures)} of {len(todo)} cells' downstream tasks failed (lines above); fix: see "
                            "their stderr, then run `kislurm downstream` again (scored cells are skipped)")
    else:
        for cell in finished:
            score_cell(run, cell, tasks, limit, log=log)
    return [c.name for c in finished], waiting


def finished_cells(run: RunPaths) -> tuple[list[Cell], list[str]]:
    """The run's cells whose store is complete, and the names of the others."""
    from kislurm.retention.store import read_cell

    finished, waiting = [], []
    for cell in run_cells(run):
        store = run.cell(cell.name).store
        if store.exists() and read_cell(store, matrix=False).complete:
            finished.append(cell)
        else:
            waiting.append(cell.name)
    return finished, waiting


def slurm_parameters(cfg: Any, cells: list[Cell], gpu: bool) -> dict[str, Any]:
    """sbatch options of one cell's scoring task: one process at TP=1, for the cells' time limit; on GPU cells the
    cells' partition and one GPU, otherwise the preparation job's CPU resources (as `kislurm export`)."""
    from kislurm.cluster.arrays import cpu_task_parameters
    from kislurm.cluster.executors import resources_for

    ex = cfg.executor
    params = cpu_task_parameters(cfg, "downstream")
    params["time"] = max(resources_for(c.model, ex).timeout_min for c in cells)
    if gpu:
        params.pop("partition", None)
        params.update(gpus_per_node=1, cpus_per_task=ex.cpus_per_task, **({"partition": ex.partition}
                                                                          if ex.partition else {}))
        if ex.mem_gb:
            params["mem"] = f"{ex.mem_gb}GB"
    return params


def score_on_slurm(cfg: Any, run: RunPaths, cells: list[Cell], tasks: list[str], limit: int | None,
                   log: Callable[[str], None] = print) -> list[Any]:
    """One array task per cell (a CPU array and a GPU array when the run has both kinds), all submitted before
    any is waited for; returns the failed tasks (kislurm.cluster.arrays.TaskFailure)."""
    from kislurm.cluster.arrays import slurm_executor, submit_array, wait_array

    submitted = []
    for gpu in sorted({c.model.device == "gpu" for c in cells}):
        group = [c for c in cells if (c.model.device == "gpu") == gpu]
        executor = slurm_executor(run.submitit / "downstream", slurm_parameters(cfg, group, gpu),
                                  cfg.executor.array_parallelism)
        submitted += submit_array(executor, score_cell, [(c.name, (run, c, tasks, limit)) for c in group],
                                  "downstream", log)
    return wait_array(submitted)[1]
