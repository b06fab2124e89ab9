"""`kislurm downstream RUN --tasks TASKS`: lm-eval scores of every finished cell's final weights.

Each cell's `checkpoints/final` weights are loaded into the cell's own model (kislurm.train.checkpoint.load_weights,
any layout) and scored through kislurm's scorer (kislurm.retention.downstream); locally the cells run one after
another in this process, at TP=1. The scores go to CELL/downstream.json, written atomically and merged per task:
a rerun skips every task already scored there with the same lm-eval version and limit, so adding a task scores
only that one.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from kislurm.errors import EvalError
from kislurm.paths import CellPaths, RunPaths
from kislurm.plan.grid import Cell
from kislurm.publish import atomic_write_json

RESULTS = "downstream.json"
"""The cell folder's file of downstream scores of its final weights."""


def results_path(paths: CellPaths) -> Path:
    return paths.root / RESULTS


def read_results(paths: CellPaths) -> dict[str, Any]:
    """CELL/downstream.json, or an empty record; a damaged one is one line naming it."""
    path = results_path(paths)
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


def score_cell(run: RunPaths, cell: Cell, tasks: list[str], limit: int | None, batch_size: int | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score one cell's final weights on the tasks it lacks; returns its (merged) record."""
    from kislurm.data import prepare as data
    from kislurm.plan.config import resolve_precision
    from kislurm.retention.downstream import require_lm_eval, run_tasks, write_local_tasks
    from kislurm.train import checkpoint
    from kislurm.train.distributed import init_model_parallel, seed_all, teardown
    from kislurm.train.model import build_model

    paths = run.cell(cell.name)
    version = require_lm_eval()
    record = read_results(paths)
    todo = missing_tasks(record, tasks, version, limit)
    if not todo:
        log(f"{cell.name}: {', '.join(tasks)} already scored (lm-eval {version}); skipped")
        return record
    weights = paths.checkpoints / checkpoint.FINAL_DIR
    if not weights.is_dir():
        raise EvalError(f"{cell.name}: no final weights at {weights}; fix: let the cell finish with "
                        "train.keep_final weights (the default) or full")
    prepared = data.load_prepared(cell.data, run.data, cell.model.seq_length)
    folder = paths.root / "downstream" / "tasks" / "final"
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
    atomic_write_json(results_path(paths), record)
    log(f"{cell.name}: scored {', '.join(todo)}")
    return record


def run_cells(run: RunPaths) -> list[Cell]:
    """Every cell of the run folder, from its own cell.json (validation and ladder cells too, as export reads them)."""
    cells = []
    for folder in sorted(p for p in run.cells.iterdir() if p.is_dir()) if run.cells.is_dir() else []:
        spec = CellPaths(folder).spec
        if spec.is_file():
            cells.append(Cell.from_json(json.loads(spec.read_text()), str(spec)))
    return cells


def score_run(run: RunPaths, tasks: list[str], limit: int | None,
              log: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
    """Every cell with final weights, one after another; returns (scored or skipped cells, cells not finished)."""
    from kislurm.retention.downstream import require_lm_eval  # without the extra: one line, before any cell
    from kislurm.retention.store import read_cell

    require_lm_eval()
    done, waiting = [], []
    for cell in run_cells(run):
        store = run.cell(cell.name).store
        if not store.exists() or not read_cell(store, matrix=False).complete:
            waiting.append(cell.name)
            continue
        score_cell(run, cell, tasks, limit, log=log)
        done.append(cell.name)
    return done, waiting
