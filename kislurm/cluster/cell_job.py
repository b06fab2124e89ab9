"""The compute-node entry: run one grid cell = train, evaluate retention, store it.

This is the only code with node-side effects. submitit runs `CellJob()(run_root, cell)` in every task of the cell
(TP x PP x DP ranks, on one node or several); all ranks train and evaluate together, rank 0 alone writes the store
and the STATUS file, and each rank K writes only its own `ranks/K.json` (where it runs, and its error if it fails).

Resume contract (so a killed, timed-out or requeued cell continues exactly):
  - after each evaluation the record is appended to the store first, then a checkpoint is saved;
  - on start the trainer loads the latest checkpoint (step c) and the store drops records after c, so the
    evaluations are re-done deterministically from c: no duplicated or missing evaluation steps;
  - a cell whose store is complete is never trained again.

Time limit and preemption (Slurm's USR2, `--signal` from kislurm.cluster.executors): the signal only sets a flag;
every step the ranks all-reduce it (Megatron-LM's exit-signal handler does the same), so all of them stop after the same step,
save a checkpoint there, and rank 0 hands over to submitit, which requeues the job. Where the cluster refuses
requeue (JobRequeue=0, or a job submitted with --no-requeue), rank 0 submits the cell again as a new job that
starts after this one ends (`afterany`), records it in submissions.jsonl with the reason, and exits.
SIGTERM (preemption with no warning signal, `scancel`, `scontrol requeue`) is the same flag: the cell saves after the
next step and must be gone within Slurm's KillWait; rank 0 then asks the scheduler why the job ends
(kislurm.cluster.scheduler): a cancelled job stays cancelled (STATUS CANCELLED), a job Slurm requeues itself just
exits, and any other requeues itself as after USR2.

Failures: a rank that raises writes its error to ranks/K.json; rank 0 writes STATUS FAILED naming every rank that
reported an error and every rank that ended without one (killed, or crashed outside Python). On Slurm, srun's
--kill-on-bad-exit ends the other ranks, so a dead rank never leaves the rest waiting in a collective.

Structure: run_cell is a cell session (kislurm.cluster.cell_session.CellSession: set-up, guards, STATUS, tear-down)
around a loop (CellLoop: training to each stop, the retention record, the saves); whether a save is due is the
checkpoint cadence's decision (kislurm.train.checkpoint.SaveCadence).

Run one cell by hand: python -m kislurm.cluster.cell_job RUN_DIR CELL_NAME   (or jobs/run_cell.py, the same)
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from kislurm.errors import DataError
from kislurm.paths import CellPaths, RunPaths
from kislurm.publish import atomic_write_json
from kislurm.plan.grid import Cell
from kislurm.cluster import scheduler
from kislurm.cluster.cell_session import CellSession, StepFlags, error_line, node_name, write_rank_report
from kislurm.cluster.status import missing_corpus_shards, preparation_state, recorded_cell

if TYPE_CHECKING:
    from kislurm.train.checkpoint import SaveCadence
    from kislurm.train.trainer import Trainer

# megatron-core warns at import that Apex / Transformer Engine are absent: expected on CPU, noise in every cell log.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")


class RequeueRefused(SystemExit):
    """Raised on rank 0 after the cell was resubmitted as a new job because the cluster refuses requeue."""


def run_cell(run: RunPaths, cell: Cell, allow_tp_across_nodes: bool = False) -> dict[str, Any]:
    """Train and evaluate one cell to completion (or resume it); returns its final metrics (rank 0)."""
    from kislurm.train.checkpoint import SaveCadence

    with CellSession(run, cell) as session:
        if not session.already_complete():
            cadence = SaveCadence(cell.train.checkpoint_interval, cell.train.checkpoint_minutes)
            flags = session.start(allow_tp_across_nodes, cadence)
            loop = _open_loop(session, cadence, flags)
            loop.run()
            session.finish(loop.trainer, loop.recorder.writer)
    return session.summary()


def _open_loop(session: CellSession, cadence: SaveCadence, flags: StepFlags) -> "CellLoop":
    """What the loop works on, built in the order the resume contract needs: the cell's dataset, its trainer
    (resumed from the latest checkpoint), its monitor and probes, and on rank 0 its store, cut back to the resumed
    step (the evaluations after it are done again)."""
    from kislurm.data import prepare as data
    from kislurm.retention.store import RetentionWriter
    from kislurm.train.monitor import CellMonitor
    from kislurm.train.trainer import Trainer

    cell, dist, paths = session.cell, session.dist, session.paths
    prepared = data.load_prepared(cell.data, session.run.data, cell.model.seq_length)  # built by kislurm prepare
    dataset, data_stats = data.cell_dataset(prepared, cell)
    trainer = Trainer(cell, dataset, paths.checkpoints, prepared.tokenizer.vocab_size, dist, log=session.log)
    monitor = CellMonitor.open(session.run, cell, dist.rank, trainer.step, trainer.tokens_per_step)  # rank 0 writes
    session.close_at_end(monitor.close)
    trainer.on_log = monitor.train
    probes = data.cell_probes(prepared, cell)  # under fixed_exposures: the facts this cell infuses
    heldout = data.heldout_documents(prepared)  # general documents no cell trains on (data.heldout_general)
    writer = None
    if dist.is_main:
        counts = trainer.params  # counted on the real model (padded vocabulary), from any TP rank
        meta = {"cell_id": cell.cell_id, "name": cell.name, "size": cell.size, "ratio": cell.ratio,
                "tokens": cell.tokens, "seed": cell.seed, "config": cell.to_json(),
                "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
                "n_choices": probes.n_choices, "data_stats": data_stats}
        frequency, unit = data.fact_frequency(prepared, cell, dataset, probes)  # issue 25: bands in aggregate
        if frequency is not None:
            meta["fact_frequency_unit"] = unit
        writer = RetentionWriter.open(paths.store, meta, probes.fact_ids, probes.fact_group, probes.fact_index,
                                      probes.heldout, fact_frequency=frequency)
        session.close_at_end(writer.close)
        writer.truncate_after(trainer.step if trainer.step else -1)  # a fresh start redoes a step-0 evaluation
    session.beat(trainer)
    downstream = _in_loop_downstream(cell, paths, prepared, probes, dist.rank, writer)
    recorder = _Recorder(session, trainer, writer, monitor, probes, heldout, downstream)
    return CellLoop(session, trainer, recorder, cadence, flags)


class CellLoop:
    """The cell's training loop: train to each stop (every evaluation, every step the checkpoint cadence
    schedules), evaluate and record retention there, and checkpoint where the cadence says (SaveCadence decides,
    the StepFlags make every rank agree); a stop signal saves after the step where every rank stopped and hands
    the job over. Apart from the session (set-up and tear-down) so that the order the resume contract depends on,
    the store's record first and then the checkpoint, reads in one place."""

    def __init__(self, session: CellSession, trainer: Trainer, recorder: "_Recorder", cadence: SaveCadence,
                 flags: StepFlags):
        from kislurm.train import distributed

        self.session, self.trainer, self.recorder, self.cadence, self.flags = session, trainer, recorder, cadence, flags
        self.cell, self.evals = session.cell, sorted(session.cell.eval_steps)
        # A stop signal that lands on an evaluation step saves there before evaluating: the store, not the
        # checkpoint, says whether the evaluation at the resumed step is done (rank 0 reads it for every rank).
        writer = recorder.writer
        self.stored_here = distributed.rank0_decides(lambda: writer is not None and trainer.step in writer.steps(),
                                                     "whether the resumed step's evaluation is stored")

    def run(self) -> None:
        """Every stop from the resumed step to the last step."""
        for stop in sorted(set(self.evals) | set(self.cadence.scheduled(self.cell.steps))):
            if self._done_before(stop):
                continue
            self._train_to(stop)
            evaluated = stop in self.evals
            if evaluated:
                self.recorder.record(stop, self.evals)
            self._save_if(evaluated=evaluated, timed=self.flags.save_due)  # after the record: the resume contract

    def _done_before(self, stop: int) -> bool:
        """Whether `stop` was passed before an interruption (its evaluation, if any, is stored)."""
        step = self.trainer.step
        return stop < step or stop == step > 0 and (self.stored_here or stop not in self.evals)

    def _train_to(self, stop: int) -> None:
        """Train up to `stop`, pausing after any step where the flags say every rank must: a stop signal (save and
        hand over) or a timed checkpoint (saved here; one due at `stop` itself waits for its evaluation)."""
        trainer = self.trainer
        while trainer.step < stop:
            self.session.watchdog.enter("training", trainer.step)
            ran = trainer.train_steps(stop - trainer.step, stop=lambda: self.flags.poll(trainer.step))
            self.recorder.trained(ran)
            trainer.poll_saves()  # publish an asynchronous save whose writes have finished
            if self.flags.signalled:  # every rank stopped after the same step: save there, then hand over
                self._save_if(stopping=True)
                trainer.close()
                self.session.hand_over(trainer.step)
            if trainer.step < stop:
                self._save_if(timed=self.flags.save_due)

    def _save_if(self, **why: bool) -> None:
        """Checkpoint the current step if the cadence says so (a collective: every rank asks with the same why)."""
        step = self.trainer.step
        if not self.cadence.should_save(step, last=step == self.cell.steps, **why):
            return
        self.session.watchdog.enter("checkpoint save", step)
        started = time.perf_counter()
        self.trainer.save_checkpoint()
        self.flags.saved()
        self.session.log(f"checkpoint step {step} {'scheduled' if self.trainer.saver else 'saved'} in "
                         f"{time.perf_counter() - started:.2f} s")


class _Recorder:
    """The retention record at each evaluation step: every rank evaluates its share (and reports it), rank 0
    appends the record to the store with the training speed since the previous evaluation, the monitor and the
    log."""

    def __init__(self, session: CellSession, trainer: Trainer, writer: Any, monitor: Any, probes: Any, heldout: Any,
                 downstream: Any):
        self.session, self.trainer, self.writer, self.monitor = session, trainer, writer, monitor
        self.probes, self.heldout, self.downstream = probes, heldout, downstream
        self.history = [e for e in (writer.meta().get("throughput", []) if writer else [])
                        if e["step"] <= trainer.step]
        self.segment = [0.0, 0.0]  # steps and seconds trained since the last evaluation (this process)

    def trained(self, ran: dict[str, float]) -> None:
        """Count a run of steps (train_steps' result) into the speed of the current segment."""
        self.segment = [self.segment[0] + ran["steps"], self.segment[1] + ran["seconds"]]

    def record(self, stop: int, evals: list[int]) -> None:
        """Evaluate the model at `stop` (a collective) and record it."""
        from kislurm.retention.evaluate import evaluate_retention, heldout_loss

        trainer, cell, session = self.trainer, self.session.cell, self.session
        self.history.append(_throughput(trainer, stop, *self.segment))
        self.segment = [0.0, 0.0]
        session.watchdog.enter("evaluation", trainer.step)
        with trainer.params_in_sync():
            result = evaluate_retention(trainer.model, self.probes, cell.eval.batch_size, cell.eval.exact_match)
            if self.heldout is not None:  # recorded beside the probe metrics
                result.metrics.update(heldout_loss(trainer.model, self.heldout, cell.eval.batch_size))
            scores = self.downstream.scores(trainer.model, stop) if self.downstream else {}
        write_rank_report(session.paths, session.dist.rank, state="running", step=trainer.step,
                          eval_candidates=result.scored_here)
        if self.writer is None:
            return
        previous = max([e for e in evals if e < stop], default=0)
        # restored on resume too; step 0 (a base model before training) has no training loss
        mean_loss = sum(trainer.losses[previous:stop]) / (stop - previous) if stop else float("nan")
        tokens = trainer.step * cell.train.global_batch_size * cell.model.seq_length
        self.writer.append(trainer.step, tokens, mean_loss, {**result.metrics, **scores}, result.probe_correct,
                           result.probe_exact, meta={"throughput": self.history, **(
                               {"downstream": self.downstream.record} if self.downstream else {})})
        self.monitor.retention(trainer.step, tokens, {**result.metrics, **{k: v for k, v in scores.items()
                                                                           if v == v}})  # NaN: not scored
        total = len(self.probes.prompt) * self.probes.n_choices
        session.log(f"step {trainer.step}/{cell.steps} eval " + " ".join(
            f"{k}={v:.3f}" for k, v in sorted(result.metrics.items()) if k.endswith("_acc"))
            + f" (rank 0 scored {result.scored_here} of {total} candidates, DP={session.dist.dp})")


def _throughput(trainer: Any, step: int, steps: float, seconds: float) -> dict[str, float]:
    """Training speed over the steps since the previous evaluation, as stored in the cell's HDF5 metadata."""
    tps = steps * trainer.tokens_per_step / seconds if seconds > 0 else float("nan")
    mfu = trainer.mfu(tps) if steps else None
    return {"step": step, "tokens_per_s": round(tps, 1), **({"mfu": float(f"{mfu:.4g}")} if mfu is not None else {})}


def _in_loop_downstream(cell: Cell, paths: CellPaths, prepared: Any, probes: Any, rank: int,
                        writer: Any) -> Any:
    """eval.downstream's scorer for this cell (kislurm.retention.downstream.InLoop), or None when off. Each rank
    writes its own copy of the probe task (no rank waits on another's file on a shared filesystem); rank 0 picks
    up the downstream record a resumed store holds (the metric names of the evaluations that do not score)."""
    if not cell.eval.downstream.tasks:
        return None
    from kislurm.retention.downstream import InLoop

    stored = writer.meta().get("downstream") if writer is not None else None
    return InLoop(cell.eval.downstream, cell.eval_steps, prepared, probes,
                  paths.downstream_tasks(f"rank{rank}"), cell.eval.batch_size, stored)


class CellJob(submitit.helpers.Checkpointable):
    """submitit entry: run a cell; on the timeout/preemption signal, requeue it (state is saved at that step).
    The submitting side fixes the placement policy (executor.allow_tp_across_nodes) here, so no rank reads it."""

    def __init__(self, allow_tp_across_nodes: bool = False):
        self.allow_tp_across_nodes = allow_tp_across_nodes

    def __call__(self, run_root: str, cell: Cell) -> dict[str, Any]:
        return run_cell(RunPaths(Path(run_root)), cell, self.allow_tp_across_nodes)

    def checkpoint(self, run_root: str, cell: Cell) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before it requeues the job. Where the cluster refuses requeue, submit the
        cell as a new job that starts after this one ends, record why, and exit instead."""
        if scheduler.requeue_refused():
            old = os.environ["SLURM_JOB_ID"]
            new = scheduler.resubmit_cell(RunPaths(Path(run_root)), cell, self, after=old,
                                note=f"job {old} reached its time limit and the cluster refuses requeue: "
                                     "resubmitted as a new job")
            print(f"requeue refused: cell {cell.name} resubmitted as job {new} (starts after job {old})", flush=True)
            raise RequeueRefused(0)
        return super().checkpoint(run_root, cell)


class PrepareJob:
    """submitit entry of the preparation job, the run's one writer of shared data (kislurm.data.prepare.prepare_run). It
    records its state in RUN/prepare.json; when it fails it records the one-line error that `kislurm status`
    shows and cancels the cell arrays waiting on it (afterok could never be satisfied)."""

    def __call__(self, run_root: str, cfg: Any, cells: list[Cell]) -> dict[str, Any]:
        from kislurm.data import prepare as data

        run = RunPaths(Path(run_root))
        job = os.environ.get("SLURM_JOB_ID", "")
        queued = {k: v for k, v in preparation_state(run).items() if k == "corpus_job"}  # the shards it waited on
        atomic_write_json(run.preparation, {"job": job, "state": "running", "node": node_name(), "time": time.time(),
                                            **queued})
        try:
            missing = missing_corpus_shards(cfg, run, queued["corpus_job"]) if queued else None
            if missing:
                raise DataError(missing)
            summary = data.prepare_run(cfg, cells)
        except Exception as e:
            atomic_write_json(run.preparation, {"job": job, "state": "failed", "error": error_line(e),
                                                "time": time.time(), **queued})
            _cancel_waiting_cells(run, job)
            raise
        atomic_write_json(run.preparation, {"job": job, "state": "done", "summary": summary, "time": time.time(),
                                            **queued})
        return summary


class CorpusShardJob:
    """submitit entry of one array task of data.general_corpus (kislurm.data.sources.run_shard), queued ahead of the
    preparation job, which waits on the array (afterany) and then only merges. A shard that fails in Python records
    its one-line error as the preparation's failure (what `kislurm status` shows) and cancels the preparation job and
    the cell arrays waiting on it, as a failed preparation does; one killed outright is named by the preparation job
    (kislurm.cluster.status.missing_corpus_shards)."""

    def __call__(self, run_root: str, work: Any, shard: Any, final: str) -> str:
        from kislurm.data.sources import run_shard

        try:
            return str(run_shard(work, shard, Path(final)))
        except Exception as e:
            run = RunPaths(Path(run_root))
            prep = preparation_state(run)
            job = str(prep.get("job", ""))
            where = f"{shard.path}" + (f" bytes {shard.start}-{shard.end}" if shard.end >= 0 else "")
            atomic_write_json(run.preparation, {**prep, "state": "failed", "time": time.time(),
                                                "error": f"corpus shard {where}: {error_line(e)}"})
            scheduler.cancel_jobs([job] if job else [])
            _cancel_waiting_cells(run, job)
            raise


def _cancel_waiting_cells(run: RunPaths, job: str) -> None:
    from kislurm.cluster.submissions import latest_submissions

    scheduler.cancel_jobs(sorted({s.job_id.split("_")[0] for s in latest_submissions(run).values()
                                  if job and s.after == job}))


def main(argv: list[str]) -> int:
    """Run one cell by hand from its own cell.json: any cell of the run folder, a validation or ladder cell too."""
    from kislurm.errors import KislurmError
    from kislurm.plan.loader import load_config

    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    run = RunPaths(Path(argv[1]))
    try:
        cell = recorded_cell(run, argv[2])
        allow = load_config(run.config).executor.allow_tp_across_nodes if run.config.exists() else False
    except (KislurmError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(run_cell(run, cell, allow), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
