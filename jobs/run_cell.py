"""The compute-node entry: run one grid cell = prepare data, train, evaluate retention, store it.

This is the only code with node-side effects. submitit runs `CellJob()(run_root, cell)` in every task of the cell
(TP x PP x DP ranks); all ranks train and evaluate together, rank 0 alone writes the store and the STATUS file.

Resume contract (so a killed, timed-out or requeued cell continues exactly):
  - after each evaluation the record is appended to the store first, then a checkpoint is saved;
  - on start the trainer loads the latest checkpoint (step c) and the store drops records after c, so the
    evaluations are re-done deterministically from c: no duplicated or missing evaluation steps;
  - a cell whose store is complete is never trained again.
On Slurm, the time-limit or preemption signal makes submitit call `checkpoint()`, which requeues the same cell
(training state is already on disk from the last evaluation).

Run one cell by hand: python jobs/run_cell.py RUN_DIR CELL_NAME
"""

from __future__ import annotations

import json
import os
import sys
import time
import threading
import traceback
from pathlib import Path
from typing import Any

import warnings

import submitit

from kislurm.paths import CellPaths, RunPaths
from kislurm.plan import Cell
from kislurm.status import write_status

HEARTBEAT_S = 60.0

# megatron-core warns at import that Apex / Transformer Engine are absent: expected on CPU, noise in every cell log.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")


def _log_to(path: Path, rank: int):
    """A log callable appending to the cell's log file (rank 0) and stdout (all ranks)."""

    def log(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [rank {rank}] {message}"
        print(line, flush=True)
        if rank == 0:
            with open(path, "a") as f:
                f.write(line + "\n")

    return log


def _summary(store_path: Path) -> dict[str, Any]:
    from kislurm.store import read_cell

    rec = read_cell(store_path, matrix=False)
    last = {k: float(v[-1]) for k, v in rec.metrics.items() if len(v)}
    return {"cell": rec.meta.get("name"), "complete": rec.complete, "steps": int(rec.step[-1]) if len(rec.step)
            else 0, **last}


def _hide_gpus_from_cpu_cell(cell: Cell) -> None:
    """A CPU cell on a GPU node trains exactly as on a laptop (CPU shims, gloo): hide the GPUs before anything in
    this process initialises CUDA. submitit's local executor already does this for jobs given no GPU."""
    if cell.model.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _stops(cell: Cell) -> list[int]:
    """Steps where training pauses: every evaluation, plus every checkpoint_interval (0 = evaluations only)."""
    every = cell.train.checkpoint_interval
    extra = set(range(every, cell.steps, every)) if every else set()
    return sorted(set(cell.eval_steps) | extra)


def _throughput(trainer: Any, step: int, steps: float, seconds: float) -> dict[str, float]:
    """Training speed over the steps since the previous evaluation, as stored in the cell's HDF5 metadata."""
    tps = steps * trainer.tokens_per_step / seconds if seconds > 0 else float("nan")
    mfu = trainer.mfu(tps) if steps else None
    return {"step": step, "tokens_per_s": round(tps, 1), **({"mfu": float(f"{mfu:.4g}")} if mfu is not None else {})}


class _Heartbeat:
    """Rewrites STATUS every HEARTBEAT_S while the cell trains, so `kislurm status` can tell a live cell from a
    dead one even when evaluations are hours apart."""

    def __init__(self, paths: CellPaths, trainer: Any, cell: Cell):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(paths, trainer, cell), daemon=True)
        self._thread.start()

    def _beat(self, paths: CellPaths, trainer: Any, cell: Cell) -> None:
        while not self._done.is_set():
            write_status(paths, "RUNNING", step=trainer.step, of=cell.steps)
            self._done.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_cell(run: RunPaths, cell: Cell) -> dict[str, Any]:
    """Train and evaluate one cell to completion (or resume it); returns its final metrics."""
    from kislurm import data, distributed
    from kislurm.cpu_shims import apply_cpu_shims
    from kislurm.evaluate import evaluate_retention
    from kislurm.store import RetentionWriter, read_cell
    from kislurm.train import Trainer

    paths: CellPaths = run.cell(cell.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    if paths.store.exists() and read_cell(paths.store, matrix=False).complete:
        return _summary(paths.store)  # a finished cell is never trained again

    _hide_gpus_from_cpu_cell(cell)
    apply_cpu_shims()
    dist = distributed.setup(cell.model)
    log = _log_to(paths.log, dist.rank)
    writer, heartbeat = None, None
    try:
        if dist.is_main:
            write_status(paths, "RUNNING", step=0)
        prepared = data.prepare(cell.data, run.data, cell.model.seq_length)
        dataset, data_stats = data.cell_dataset(prepared, cell)
        trainer = Trainer(cell, dataset, paths.checkpoints, prepared.tokenizer.vocab_size, dist, log=log)
        probes = data.cell_probes(prepared, cell)  # under fixed_exposures: the facts this cell infuses
        if dist.is_main:
            counts = trainer.params  # counted on the real model (padded vocabulary), from any TP rank
            meta = {"cell_id": cell.cell_id, "name": cell.name, "size": cell.size, "ratio": cell.ratio,
                    "tokens": cell.tokens, "seed": cell.seed, "config": cell.to_json(),
                    "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
                    "n_choices": probes.n_choices, "data_stats": data_stats}
            writer = RetentionWriter.open(paths.store, meta, probes.fact_ids, probes.fact_group, probes.fact_index,
                                          probes.heldout)
            writer.truncate_after(trainer.step)
        heartbeat = _Heartbeat(paths, trainer, cell) if dist.is_main else None
        evals = sorted(cell.eval_steps)
        history = [e for e in (writer.meta().get("throughput", []) if writer else []) if e["step"] <= trainer.step]
        segment = [0.0, 0.0]  # steps and seconds trained since the last evaluation (this process)
        for stop in _stops(cell):
            if stop <= trainer.step:
                continue  # done before an interruption (an evaluation is always stored before its checkpoint)
            ran = trainer.train_steps(stop - trainer.step)
            segment = [segment[0] + ran["steps"], segment[1] + ran["seconds"]]
            if stop in evals:
                history.append(_throughput(trainer, stop, *segment))
                segment = [0.0, 0.0]
                result = evaluate_retention(trainer.model, probes, cell.eval.batch_size, cell.eval.exact_match)
                previous = max([e for e in evals if e < stop], default=0)
                mean_loss = sum(trainer.losses[previous:stop]) / (stop - previous)  # restored on resume too
                if writer is not None:
                    tokens = trainer.step * cell.train.global_batch_size * cell.model.seq_length
                    writer.append(trainer.step, tokens, mean_loss, result.metrics, result.probe_correct,
                                  result.probe_exact, meta={"throughput": history})
                    log(f"step {trainer.step}/{cell.steps} eval " + " ".join(
                        f"{k}={v:.3f}" for k, v in sorted(result.metrics.items()) if k.endswith("_acc")))
            trainer.save_checkpoint()
        heartbeat = heartbeat.stop() if heartbeat else None
        if writer is not None:
            writer.mark_complete()
            write_status(paths, "DONE", step=trainer.step, of=cell.steps)
    except BaseException as e:
        if heartbeat:
            heartbeat.stop()  # before FAILED is written, so no beat overwrites it
        if dist.is_main and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            write_status(paths, "FAILED", error=f"{type(e).__name__}: {e}")
            log("FAILED: " + "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    finally:
        if writer is not None:
            writer.close()
        distributed.teardown()
    return _summary(paths.store) if dist.is_main else {}


class CellJob(submitit.helpers.Checkpointable):
    """submitit entry: run a cell; on the timeout/preemption signal, requeue it (state is already on disk)."""

    def __call__(self, run_root: str, cell: Cell) -> dict[str, Any]:
        return run_cell(RunPaths(Path(run_root)), cell)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    run = RunPaths(Path(argv[1]))
    spec = json.loads(run.cell(argv[2]).spec.read_text())
    from kislurm.config import load_config
    from kislurm.plan import expand

    cells = {c.name: c for c in expand(load_config(run.config))}
    if spec["name"] not in cells:
        print(f"{argv[2]}: not a cell of {run.config}; fix: pick a folder under {run.cells}", file=sys.stderr)
        return 2
    print(json.dumps(run_cell(run, cells[spec["name"]]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
