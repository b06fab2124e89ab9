"""One cell's session on one rank: everything around its training loop (kislurm.cluster.cell_job.CellLoop).

Set-up: the process group, the cell's folder and log, the resume decision (a complete cell is never trained
again), the placement check, the watchdog that bounds every phase, the stop signals, the heartbeat; tear-down:
the final checkpoint, STATUS DONE, CANCELLED or FAILED (naming every rank that failed), this rank's report, and the
hand-over to the scheduler after a stop signal. Kept apart from the loop so that the loop reads as training,
evaluation and saves only, and so that every way out of a cell (done, signalled, failed, killed by the watchdog)
is written in one module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from kislurm.cluster import scheduler
from kislurm.errors import KislurmError
from kislurm.cluster.status import rank_reports_summary, write_status
from kislurm.paths import CellPaths, RunPaths
from kislurm.plan.grid import Cell
from kislurm.publish import atomic_write_json

if TYPE_CHECKING:
    from kislurm.train.checkpoint import SaveCadence

HEARTBEAT_S = 60.0


def node_name() -> str:
    """The scheduler's name for this node (several Slurm nodes may share one host), else the host name."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def log_to(path: Path, rank: int):
    """A log callable appending to the cell's log file (rank 0) and stdout (all ranks)."""

    def log(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [rank {rank}] {message}"
        print(line, flush=True)
        if rank == 0:
            with open(path, "a") as f:
                f.write(line + "\n")

    return log


def _summary(store_path: Path) -> dict[str, Any]:
    """What run_cell returns on rank 0: the store's last record, and whether it is complete."""
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


# ----------------------------------------------------------------------------------------------------------------------
# The guards: heartbeat, watchdog, placement, rank reports
# ----------------------------------------------------------------------------------------------------------------------


class Heartbeat:
    """Rewrites STATUS every HEARTBEAT_S while the cell runs, so `kislurm status` can tell a live cell from a dead
    one even when evaluations are hours apart. It reports progress, not merely a live thread: the phase, the step
    and when the last step finished (`progress`), so a rank stuck in a collective shows as making none."""

    def __init__(self, paths: CellPaths, trainer: Any, cell: Cell, watchdog: "Watchdog"):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(paths, trainer, cell, watchdog), daemon=True)
        self._thread.start()

    def _beat(self, paths: CellPaths, trainer: Any, cell: Cell, watchdog: "Watchdog") -> None:
        while not self._done.is_set():
            write_status(paths, "RUNNING", step=trainer.step, of=cell.steps, phase=watchdog.phase,
                         progress=round(max(trainer.last_progress, watchdog.phase_started), 1))
            self._done.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


class Watchdog:
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
            write_rank_report(self._paths, self._rank, state="failed", error=error)
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


def gather_nodes(dist_ctx: Any) -> list[str]:
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


def write_rank_report(paths: CellPaths, rank: int, **info: Any) -> None:
    """This rank's own report file (no other process writes it: no lock needed on any filesystem)."""
    atomic_write_json(paths.rank_report(rank), {"rank": rank, "node": node_name(), "pid": os.getpid(),
                                                "time": time.time(), **info})


def error_line(e: BaseException) -> str:
    """The one line a failure is reported by (rank reports, STATUS, the log, prepare.json): kislurm's own errors
    are already that line (problem and fix); anything else keeps its type, which is often the whole clue."""
    if isinstance(e, KislurmError) and str(e).strip():
        return str(e).strip().splitlines()[0]
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return text[-1] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------------------------
# The time-limit / preemption signal
# ----------------------------------------------------------------------------------------------------------------------


class StopSignal:
    """USR2 (Slurm's time-limit or preemption warning, `--signal`) and SIGTERM (preemption without a warning,
    `scancel`, `scontrol requeue`) as a flag, set by the handler and read at step boundaries by StepFlags.
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


class StepFlags:
    """What every rank must agree on after each step, in one all-reduce (MAX) of two numbers: whether any rank
    received the time-limit signal (Megatron-LM's exit-signal handler does the same), and whether the checkpoint
    cadence's clock says a save is due (kislurm.train.checkpoint.SaveCadence.clock_due; rank 0's clock alone
    decides: clocks of different nodes need not agree)."""

    def __init__(self, dist_ctx: Any, sig: StopSignal, cadence: SaveCadence, watchdog: Watchdog):
        self._dist, self._sig, self._cadence, self._watchdog = dist_ctx, sig, cadence, watchdog
        self.signalled = self.save_due = False

    def saved(self) -> None:
        """A checkpoint was written: the cadence's clock restarts, and no timed save is due."""
        self._cadence.saved()
        self.save_due = False

    def poll(self, step: int = 0) -> bool:
        """After a step (a collective: every rank calls it): True when training must pause here."""
        self._watchdog.enter("training", step)  # the step finished: a new step budget
        due = self._dist.is_main and self._cadence.clock_due()
        flags = [1.0 if self._sig.received is not None else 0.0, 1.0 if due else 0.0]
        if self._dist.world_size > 1:
            import torch
            import torch.distributed as tdist

            agreed = torch.tensor(flags, device=self._dist.device)
            tdist.all_reduce(agreed, op=tdist.ReduceOp.MAX)
            flags = agreed.tolist()
        self.signalled, self.save_due = flags[0] > 0, flags[1] > 0
        return self.signalled or self.save_due


def hand_over(sig: StopSignal, step: int, log: Callable[[str], None], paths: CellPaths) -> None:
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
# The session
# ----------------------------------------------------------------------------------------------------------------------


class CellSession:
    """This rank's run of one cell as a context manager, around the loop: `with CellSession(run, cell) as s:`.

    On entry it sets the process up (CPU cells hide the GPUs, CPU shims, the process group, the cell's log); on
    exit, whatever ended the body, it stops the watchdog, closes what the body registered (close_at_end) and tears
    the process group down, after recording a failure (this rank's report, the log, and on rank 0 STATUS FAILED
    naming every rank that failed). A stop signal's exit (SystemExit) and Ctrl-C are not failures."""

    def __init__(self, run: RunPaths, cell: Cell):
        self.run, self.cell, self.paths = run, cell, run.cell(cell.name)
        self.dist: Any = None
        self.log: Callable[[str], None] = print
        self.watchdog: Optional[Watchdog] = None
        self.signal: Optional[StopSignal] = None
        self._heartbeat: Optional[Heartbeat] = None
        self._closers: list[Callable[[], None]] = []

    def __enter__(self) -> "CellSession":
        from kislurm.train import distributed
        from kislurm.train.cpu_shims import apply_cpu_shims

        self.paths.root.mkdir(parents=True, exist_ok=True)
        _hide_gpus_from_cpu_cell(self.cell)
        apply_cpu_shims()
        try:
            self.dist = distributed.setup(self.cell.model)
        except Exception as e:  # the rendezvous: no rank of the cell has a report yet, so `kislurm status` needs one
            rank = distributed.job_rank()
            why = error_line(e) if isinstance(e, KislurmError) else f"process group start-up failed: {error_line(e)}"
            write_rank_report(self.paths, rank, state="failed", error=why)
            if rank == 0:   # its own line: the other ranks' reports, if any, are an earlier session's
                write_status(self.paths, "FAILED", error=f"rank 0 on {node_name()}: {why}")
            raise
        self.log = log_to(self.paths.log, self.dist.rank)
        return self

    def already_complete(self) -> bool:
        """Whether the cell's store is complete: rank 0 reads it, every rank follows (NFS or Lustre may show them
        different things). A complete cell is never trained again; rank 0 finishes a cut-short clean-up."""
        from kislurm.retention.store import read_cell
        from kislurm.train import checkpoint, distributed

        complete = distributed.rank0_decides(
            lambda: self.paths.store.exists() and read_cell(self.paths.store, matrix=False).complete,
            "whether the cell is complete")
        if complete and self.dist.is_main:
            checkpoint.keep_after_done(self.paths.checkpoints, self.cell.train.keep_final)
        return complete

    def start(self, allow_tp_across_nodes: bool, cadence: SaveCadence) -> StepFlags:
        """Start training's guards: the watchdog, this rank's report, the placement check, the stop signals and
        STATUS RUNNING; returns the per-step flags the loop polls (with the checkpoint cadence's clock)."""
        self.watchdog = Watchdog(self.paths, self.dist.rank, self.cell.train, self.dist.world_size, self.log)
        write_rank_report(self.paths, self.dist.rank, state="running")  # replaces a report of an earlier session
        check_tp_placement(gather_nodes(self.dist), self.dist.tp, allow_tp_across_nodes)
        self.signal = StopSignal()
        flags = StepFlags(self.dist, self.signal, cadence, self.watchdog)
        if self.dist.is_main:
            write_status(self.paths, "RUNNING", step=0, phase="start-up")
        return flags

    def close_at_end(self, close: Callable[[], None]) -> None:
        """Call `close` when the session ends, however it ends (the store writer, the monitor)."""
        self._closers.append(close)

    def beat(self, trainer: Any) -> None:
        """Rank 0: start rewriting STATUS with the trainer's progress every HEARTBEAT_S."""
        if self.dist.is_main:
            self._heartbeat = Heartbeat(self.paths, trainer, self.cell, self.watchdog)

    def _stop_beating(self) -> None:
        """Before a final STATUS is written, so that no beat overwrites it."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def hand_over(self, step: int) -> None:
        """After every rank saved at `step` on a stop signal: rank 0 leaves the job as the scheduler says it ends
        (hand_over); every rank exits."""
        self._stop_beating()
        self.signal.restore()
        if self.dist.is_main:
            hand_over(self.signal, step, self.log, self.paths)
        raise SystemExit(0)  # the other ranks: rank 0 requeues the job, or leaves it cancelled

    def finish(self, trainer: Any, writer: Any) -> None:
        """After the last step: the checkpoint train.keep_final keeps, written before the store says complete;
        then (rank 0) the store's completion, STATUS DONE and the clean-up of what keep_final does not keep."""
        from kislurm.train import checkpoint

        self.watchdog.enter("checkpoint save", trainer.step)
        trainer.finish()
        self._stop_beating()
        if writer is not None:
            writer.mark_complete()
            write_status(self.paths, "DONE", step=trainer.step, of=self.cell.steps)
            checkpoint.keep_after_done(self.paths.checkpoints, self.cell.train.keep_final)

    def summary(self) -> dict[str, Any]:
        """The cell's final metrics from its store (rank 0; the other ranks return {})."""
        return _summary(self.paths.store) if self.dist.is_main else {}

    def __exit__(self, kind: Any, error: Optional[BaseException], trace: Any) -> bool:
        from kislurm.train import distributed

        try:
            if error is not None:
                self._fail(error)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            for close in reversed(self._closers):
                close()
            distributed.teardown()
        return False

    def _fail(self, error: BaseException) -> None:
        self._stop_beating()  # before FAILED is written, so no beat overwrites it
        if not isinstance(error, (KeyboardInterrupt, SystemExit)):
            write_rank_report(self.paths, self.dist.rank, state="failed", error=error_line(error))
            self.log("FAILED: " + error_line(error))
            if self.dist.is_main:
                write_status(self.paths, "FAILED",
                             error=rank_reports_summary(self.paths, self.dist.world_size) or error_line(error))
