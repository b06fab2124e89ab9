"""The compute-node entry: run one grid cell = train, evaluate retention, store it.

This is the only code with node-side effects. submitit runs `CellJob()(run_root, cell)` in every task of the cell
(TP x PP x DP ranks, on one node or several); all ranks train and evaluate together, rank 0 alone writes the store
and the STATUS file, and each rank K writes only its own `ranks/K.json` (where it runs, and its error if it fails).

Resume contract (so a killed, timed-out or requeued cell continues exactly):
  - after each evaluation the record is appended to the store first, then a checkpoint is saved;
  - on start the trainer loads the latest checkpoint (step c) and the store drops records after c, so the
    evaluations are re-done deterministically from c: no duplicated or missing evaluation steps;
  - a cell whose store is complete is never trained again.

Time limit and preemption (Slurm's USR2, `--signal` from kislurm.cluster.submit): the signal only sets a flag; every step
the ranks all-reduce it (Megatron-LM's exit-signal handler does the same), so all of them stop after the same step,
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

Run one cell by hand: python -m kislurm.cluster.cell_job RUN_DIR CELL_NAME   (or jobs/run_cell.py, the same)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from kislurm.errors import DataError, KislurmError
from kislurm.paths import CellPaths, RunPaths
from kislurm.publish import atomic_write_json
from kislurm.plan.grid import Cell
from kislurm.cluster import scheduler
from kislurm.cluster.status import (missing_corpus_shards, preparation_state, rank_reports_summary, recorded_cell,
                                    write_status)

HEARTBEAT_S = 60.0

# megatron-core warns at import that Apex / Transformer Engine are absent: expected on CPU, noise in every cell log.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")


class RequeueRefused(SystemExit):
    """Raised on rank 0 after the cell was resubmitted as a new job because the cluster refuses requeue."""


def node_name() -> str:
    """The scheduler's name for this node (several Slurm nodes may share one host), else the host name."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


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
    from kislurm.retention.store import read_cell

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
    """Steps where training pauses: every evaluation, and every checkpoint_interval."""
    every = cell.train.checkpoint_interval
    extra = set(range(every, cell.steps, every)) if every else set()
    return sorted(set(cell.eval_steps) | extra)


def _throughput(trainer: Any, step: int, steps: float, seconds: float) -> dict[str, float]:
    """Training speed over the steps since the previous evaluation, as stored in the cell's HDF5 metadata."""
    tps = steps * trainer.tokens_per_step / seconds if seconds > 0 else float("nan")
    mfu = trainer.mfu(tps) if steps else None
    return {"step": step, "tokens_per_s": round(tps, 1), **({"mfu": float(f"{mfu:.4g}")} if mfu is not None else {})}


class _Heartbeat:
    """Rewrites STATUS every HEARTBEAT_S while the cell runs, so `kislurm status` can tell a live cell from a dead
    one even when evaluations are hours apart. It reports progress, not merely a live thread: the phase, the step
    and when the last step finished (`progress`), so a rank stuck in a collective shows as making none."""

    def __init__(self, paths: CellPaths, trainer: Any, cell: Cell, watchdog: "_Watchdog"):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(paths, trainer, cell, watchdog), daemon=True)
        self._thread.start()

    def _beat(self, paths: CellPaths, trainer: Any, cell: Cell, watchdog: "_Watchdog") -> None:
        while not self._done.is_set():
            write_status(paths, "RUNNING", step=trainer.step, of=cell.steps, phase=watchdog.phase,
                         progress=round(max(trainer.last_progress, watchdog.phase_started), 1))
            self._done.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


class _Watchdog:
    """A bound on every phase of a rank's work, so a dead or hung peer fails the cell in bounded time.

    The process group's own timeout (30 minutes) would let a training-step collective wait half an hour, and on
    NCCL a hang may never raise at all. Each phase has its budget (train.timeout_*_min: start-up, index loading
    and checkpoint loads may take minutes, a step should not); a step restarts the step budget. When a budget
    runs out the rank records why (its ranks/K.json; STATUS FAILED on rank 0) and exits at once: its peers then
    see it gone (srun's --kill-on-bad-exit ends them on Slurm), and the error names the phase, not a timeout.
    """

    POLL_S = 2.0

    def __init__(self, paths: CellPaths, rank: int, train: Any, world_size: int, log: Callable[[str], None]):
        self._paths, self._rank, self._world, self._log = paths, rank, world_size, log
        self._budget = {"start-up": train.timeout_startup_min, "training": train.timeout_step_min,
                        "evaluation": train.timeout_eval_min, "checkpoint save": train.timeout_save_min}
        self.phase, self.phase_started, self.step = "start-up", time.time(), 0
        self._deadline = time.monotonic() + 60 * self._budget["start-up"]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def enter(self, phase: str, step: int) -> None:
        """Start `phase` (at `step`) with its full budget; entering "training" again restarts the step budget."""
        if phase != self.phase:
            self.phase_started = time.time()
        self.phase, self.step = phase, step
        self._deadline = time.monotonic() + 60 * self._budget[phase]

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_S):
            if time.monotonic() > self._deadline:
                self._expire()

    def _expire(self) -> None:
        minutes = self._budget[self.phase]
        error = (f"TrainError: rank {self._rank} made no progress in {self.phase} for {minutes:g} min (step "
                 f"{self.step}): a peer rank probably died or hung; fix: see the other ranks' errors, or raise "
                 f"train.timeout_{_PHASE_KEY[self.phase]}_min if this phase is legitimately that slow")
        try:
            _write_rank_report(self._paths, self._rank, state="failed", error=error)
            self._log("FAILED: " + error)
            if self._rank == 0:
                write_status(self._paths, "FAILED",
                             error=rank_reports_summary(self._paths, self._world) or error)
        finally:
            print(error, file=sys.stderr, flush=True)
            os._exit(1)  # the main thread is blocked in a collective: nothing else can end it

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


_PHASE_KEY = {"start-up": "startup", "training": "step", "evaluation": "eval", "checkpoint save": "save"}


# ----------------------------------------------------------------------------------------------------------------------
# Placement and rank reports
# ----------------------------------------------------------------------------------------------------------------------


def _gather_nodes(dist_ctx: Any) -> list[str]:
    """Every rank's node name, in rank order (one all-gather at start-up)."""
    import torch.distributed as tdist

    nodes: list[Any] = [None] * dist_ctx.world_size
    if dist_ctx.world_size > 1:
        tdist.all_gather_object(nodes, node_name())
    else:
        nodes = [node_name()]
    return [str(n) for n in nodes]


def check_tp_placement(nodes: list[str], tp: int, allow_split: bool = False) -> None:
    """Refuse a layout whose tensor-parallel group spans nodes (TP all-reduces every layer: over the network it
    is several times slower), unless the config explicitly allows it. megatron's rank order puts TP fastest, so
    TP group g is ranks g*tp .. g*tp+tp-1."""
    from kislurm.train.distributed import TrainError

    for first in range(0, len(nodes), tp):
        group = nodes[first:first + tp]
        if len(set(group)) > 1 and not allow_split:
            raise TrainError(f"tensor-parallel group of ranks {first}-{first + tp - 1} spans nodes "
                             f"{', '.join(sorted(set(group)))}; fix: set executor.tasks_per_node to a multiple of "
                             f"tensor_parallel ({tp}), or executor.allow_tp_across_nodes: true to run it anyway")


def _write_rank_report(paths: CellPaths, rank: int, **info: Any) -> None:
    """This rank's own report file (no other process writes it: no lock needed on any filesystem)."""
    atomic_write_json(paths.rank_report(rank), {"rank": rank, "node": node_name(), "pid": os.getpid(),
                                                "time": time.time(), **info})


def _error_line(e: BaseException) -> str:
    """The one line a person reads: kislurm's own errors are already that line (problem and fix); anything else
    keeps its type, which is often the whole clue."""
    if isinstance(e, KislurmError) and str(e).strip():
        return str(e).strip().splitlines()[0]
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return text[-1] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------------------------
# The time-limit / preemption signal
# ----------------------------------------------------------------------------------------------------------------------


class _StopSignal:
    """USR2 (Slurm's time-limit or preemption warning, `--signal`) and SIGTERM (preemption without a warning,
    `scancel`, `scontrol requeue`) as a flag, set by the handler and read at step boundaries by _StepFlags.
    submitit installs its USR2 handler (checkpoint and requeue) and ignores SIGTERM; both are restored on the way
    out."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}  # installed by submitit before the job ran
        for s in self.SIGNALS:
            signal.signal(s, self._receive)

    def _receive(self, signum: int, frame: Any) -> None:
        if self.received is None:  # the first signal decides (a TERM after USR2 is the same stop)
            self.received = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _StepFlags:
    """What every rank must agree on after each step, in one all-reduce (MAX) of two numbers: whether any rank
    received the time-limit signal (Megatron-LM's exit-signal handler does the same), and whether a timed
    checkpoint is due (rank 0's clock alone decides: clocks of different nodes need not agree)."""

    def __init__(self, dist_ctx: Any, sig: _StopSignal, checkpoint_minutes: float, watchdog: _Watchdog):
        self._dist, self._sig, self._watchdog = dist_ctx, sig, watchdog
        self._every_s = 60.0 * checkpoint_minutes
        self._last_save = time.monotonic()
        self.signalled = self.save_due = False

    def saved(self) -> None:
        self._last_save = time.monotonic()
        self.save_due = False

    def poll(self, step: int = 0) -> bool:
        """After a step (a collective: every rank calls it): True when training must pause here."""
        self._watchdog.enter("training", step)  # the step finished: a new step budget
        due = bool(self._every_s) and self._dist.is_main and time.monotonic() - self._last_save >= self._every_s
        flags = [1.0 if self._sig.received is not None else 0.0, 1.0 if due else 0.0]
        if self._dist.world_size > 1:
            import torch
            import torch.distributed as tdist

            agreed = torch.tensor(flags, device=self._dist.device)
            tdist.all_reduce(agreed, op=tdist.ReduceOp.MAX)
            flags = agreed.tolist()
        self.signalled, self.save_due = flags[0] > 0, flags[1] > 0
        return self.signalled or self.save_due


def _hand_over(sig: _StopSignal, step: int, log: Callable[[str], None], paths: CellPaths) -> None:
    """Rank 0, after every rank saved at `step`: leave the job the way the scheduler says it is ending.

    USR2 (the time limit or a preemption warning) and a SIGTERM that nobody will follow with a requeue go to
    submitit's handler, which calls CellJob.checkpoint and requeues the job. A SIGTERM of a job that Slurm requeues
    itself, or that a user cancelled, just exits: asking the scheduler decides which (kislurm.cluster.scheduler)."""
    name = signal.Signals(sig.received).name if sig.received else "signal"
    why = "requeue" if sig.received == signal.SIGUSR2 else scheduler.termination()
    if why == "cancelled":
        log(f"{name} at step {step}: checkpoint saved; the job is cancelled, not requeueing")
        write_status(paths, "CANCELLED", step=step, error=f"cancelled ({name}) at step {step}, checkpoint saved")
        raise SystemExit(f"cancelled by {name} at step {step} (checkpoint saved); submit the run again to resume")
    if why == "requeued":
        log(f"{name} at step {step}: checkpoint saved; Slurm requeues the job")
        raise SystemExit(0)
    log(f"{name} at step {step}: checkpoint saved; requeueing")
    handler = sig.previous[signal.SIGUSR2]
    if callable(handler):
        handler(signal.SIGUSR2, None)  # submitit: CellJob.checkpoint() -> scontrol requeue -> exit
    raise SystemExit(f"stopped by {name} at step {step} (checkpoint saved); run the cell again to resume")


# ----------------------------------------------------------------------------------------------------------------------
# The cell
# ----------------------------------------------------------------------------------------------------------------------


def _saves_after_evaluations(cell: Cell) -> bool:
    """With no cadence configured, a checkpoint follows every evaluation (the default)."""
    return not cell.train.checkpoint_interval and not cell.train.checkpoint_minutes


def run_cell(run: RunPaths, cell: Cell, allow_tp_across_nodes: bool = False) -> dict[str, Any]:
    """Train and evaluate one cell to completion (or resume it); returns its final metrics (rank 0)."""
    from kislurm.train import checkpoint, distributed
    from kislurm.data import prepare as data
    from kislurm.train.cpu_shims import apply_cpu_shims
    from kislurm.retention.evaluate import evaluate_retention, heldout_loss
    from kislurm.train.monitor import CellMonitor
    from kislurm.retention.store import RetentionWriter, read_cell
    from kislurm.train.trainer import Trainer

    paths: CellPaths = run.cell(cell.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    _hide_gpus_from_cpu_cell(cell)
    apply_cpu_shims()
    dist = distributed.setup(cell.model)
    log = _log_to(paths.log, dist.rank)
    writer, heartbeat, watchdog, monitor = None, None, None, None
    try:
        # One decision per cell: rank 0 reads the store; every rank follows (NFS or Lustre may show them
        # different things). A finished cell is never trained again.
        if distributed.rank0_decides(lambda: paths.store.exists() and read_cell(paths.store, matrix=False).complete,
                                     "whether the cell is complete"):
            if dist.is_main:
                checkpoint.keep_after_done(paths.checkpoints, cell.train.keep_final)  # a cut-short clean-up
            return _summary(paths.store) if dist.is_main else {}
        watchdog = _Watchdog(paths, dist.rank, cell.train, dist.world_size, log)
        _write_rank_report(paths, dist.rank, state="running")  # replaces this rank's report of an earlier session
        check_tp_placement(_gather_nodes(dist), dist.tp, allow_tp_across_nodes)
        sig = _StopSignal()
        flags = _StepFlags(dist, sig, cell.train.checkpoint_minutes, watchdog)
        if dist.is_main:
            write_status(paths, "RUNNING", step=0, phase="start-up")
        prepared = data.load_prepared(cell.data, run.data, cell.model.seq_length)  # built by kislurm prepare
        dataset, data_stats = data.cell_dataset(prepared, cell)
        trainer = Trainer(cell, dataset, paths.checkpoints, prepared.tokenizer.vocab_size, dist, log=log)
        monitor = CellMonitor.open(run, cell, dist.rank, trainer.step, trainer.tokens_per_step)  # rank 0 writes
        trainer.on_log = monitor.train
        probes = data.cell_probes(prepared, cell)  # under fixed_exposures: the facts this cell infuses
        heldout = data.heldout_documents(prepared)  # general documents no cell trains on (data.heldout_general)
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
            writer.truncate_after(trainer.step if trainer.step else -1)  # a fresh start redoes a step-0 evaluation
        heartbeat = _Heartbeat(paths, trainer, cell, watchdog) if dist.is_main else None
        downstream = _in_loop_downstream(cell, paths, prepared, probes, dist.rank, writer)
        evals = sorted(cell.eval_steps)
        # A stop signal that lands on an evaluation step saves there before evaluating: the store, not the
        # checkpoint, says whether the evaluation at the resumed step is done (rank 0 reads it for every rank).
        stored_here = distributed.rank0_decides(lambda: writer is not None and trainer.step in writer.steps(),
                                                "whether the resumed step's evaluation is stored")
        history = [e for e in (writer.meta().get("throughput", []) if writer else []) if e["step"] <= trainer.step]
        segment = [0.0, 0.0]  # steps and seconds trained since the last evaluation (this process)

        def save() -> None:
            watchdog.enter("checkpoint save", trainer.step)
            started = time.perf_counter()
            trainer.save_checkpoint()
            flags.saved()
            log(f"checkpoint step {trainer.step} {'scheduled' if trainer.saver else 'saved'} in "
                f"{time.perf_counter() - started:.2f} s")

        for stop in _stops(cell):
            if stop < trainer.step or stop == trainer.step > 0 and (stored_here or stop not in evals):
                continue  # done before an interruption
            while trainer.step < stop:
                watchdog.enter("training", trainer.step)
                ran = trainer.train_steps(stop - trainer.step, stop=lambda: flags.poll(trainer.step))
                segment = [segment[0] + ran["steps"], segment[1] + ran["seconds"]]
                trainer.poll_saves()  # publish an asynchronous save whose writes have finished
                if flags.signalled:  # every rank stopped after the same step: save there, then hand over
                    save()
                    trainer.close()
                    heartbeat = heartbeat.stop() if heartbeat else None
                    sig.restore()
                    if dist.is_main:
                        _hand_over(sig, trainer.step, log, paths)
                    raise SystemExit(0)  # the other ranks: rank 0 requeues the job, or leaves it cancelled
                if flags.save_due:  # checkpoint_minutes since the last save (rank 0's clock, agreed)
                    save()
            if stop in evals:
                history.append(_throughput(trainer, stop, *segment))
                segment = [0.0, 0.0]
                watchdog.enter("evaluation", trainer.step)
                with trainer.params_in_sync():
                    result = evaluate_retention(trainer.model, probes, cell.eval.batch_size, cell.eval.exact_match)
                    if heldout is not None:   # recorded beside the probe metrics
                        result.metrics.update(heldout_loss(trainer.model, heldout, cell.eval.batch_size))
                    scores = downstream.scores(trainer.model, stop) if downstream else {}
                _write_rank_report(paths, dist.rank, state="running", step=trainer.step,
                                   eval_candidates=result.scored_here)
                previous = max([e for e in evals if e < stop], default=0)
                # restored on resume too; step 0 (a base model before training) has no training loss
                mean_loss = sum(trainer.losses[previous:stop]) / (stop - previous) if stop else float("nan")
                if writer is not None:
                    tokens = trainer.step * cell.train.global_batch_size * cell.model.seq_length
                    writer.append(trainer.step, tokens, mean_loss, {**result.metrics, **scores}, result.probe_correct,
                                  result.probe_exact, meta={"throughput": history,
                                                            **({"downstream": downstream.record} if downstream else {})})
                    monitor.retention(trainer.step, tokens, {**result.metrics, **{k: v for k, v in scores.items()
                                                                                  if v == v}})  # NaN: not scored
                    total = len(probes.prompt) * probes.n_choices
                    log(f"step {trainer.step}/{cell.steps} eval " + " ".join(
                        f"{k}={v:.3f}" for k, v in sorted(result.metrics.items()) if k.endswith("_acc"))
                        + f" (rank 0 scored {result.scored_here} of {total} candidates, DP={dist.dp})")
            if stop == cell.steps:
                break  # the last step's checkpoint is what keep_final keeps (trainer.finish), nothing routine
            if stop and (stop in evals and _saves_after_evaluations(cell) or
                         cell.train.checkpoint_interval and stop % cell.train.checkpoint_interval == 0):
                save()  # (never at step 0: nothing trained yet)
        watchdog.enter("checkpoint save", trainer.step)
        trainer.finish()  # what keep_final keeps, written before the store says complete
        heartbeat = heartbeat.stop() if heartbeat else None
        if writer is not None:
            writer.mark_complete()
            write_status(paths, "DONE", step=trainer.step, of=cell.steps)
            checkpoint.keep_after_done(paths.checkpoints, cell.train.keep_final)
    except BaseException as e:
        if heartbeat:
            heartbeat.stop()  # before FAILED is written, so no beat overwrites it
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            _write_rank_report(paths, dist.rank, state="failed", error=_error_line(e))
            log("FAILED: " + _error_line(e))
            if dist.is_main:
                write_status(paths, "FAILED", error=rank_reports_summary(paths, dist.world_size) or _error_line(e))
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        if writer is not None:
            writer.close()
        if monitor is not None:
            monitor.close()
        distributed.teardown()
    return _summary(paths.store) if dist.is_main else {}


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
                  paths.root / "downstream" / "tasks" / f"rank{rank}", cell.eval.batch_size, stored)


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
            from kislurm.cluster.submit import resubmit_cell

            old = os.environ["SLURM_JOB_ID"]
            new = resubmit_cell(RunPaths(Path(run_root)), cell, after=old,
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
            atomic_write_json(run.preparation, {"job": job, "state": "failed", "error": _error_line(e),
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
        from kislurm.cluster.submit import cancel_jobs
        from kislurm.data.sources import run_shard

        try:
            return str(run_shard(work, shard, Path(final)))
        except Exception as e:
            run = RunPaths(Path(run_root))
            prep = preparation_state(run)
            job = str(prep.get("job", ""))
            where = f"{shard.path}" + (f" bytes {shard.start}-{shard.end}" if shard.end >= 0 else "")
            atomic_write_json(run.preparation, {**prep, "state": "failed", "time": time.time(),
                                                "error": f"corpus shard {where}: {_error_line(e)}"})
            cancel_jobs([job] if job else [])
            _cancel_waiting_cells(run, job)
            raise


def _cancel_waiting_cells(run: RunPaths, job: str) -> None:
    from kislurm.cluster.status import latest_submissions

    from kislurm.cluster.submit import cancel_jobs

    cancel_jobs(sorted({s.job_id.split("_")[0] for s in latest_submissions(run).values() if job and s.after == job}))


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
