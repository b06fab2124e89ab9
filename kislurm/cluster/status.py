"""Where each cell stands: a one-word STATUS file with a heartbeat, the retention store, and the scheduler's view.

The STATUS file is written by the cell's job (RUNNING with a heartbeat while it trains, DONE, FAILED, CANCELLED) and
is only advisory; the store's completion flag is the truth for DONE (whatever sacct says), and the scheduler (sacct,
polled once per call for all cells together) is the truth for PENDING, CANCELLED and requeues. A RUNNING cell
whose heartbeat is older than `STALE_AFTER_S` and that the scheduler no longer knows is reported as failed (a dead
job).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Optional

from kislurm.cluster.scheduler import slurm_states
from kislurm.cluster.submissions import latest_submissions
from kislurm.paths import CellPaths, RunPaths
from kislurm.publish import atomic_write_text

STALE_AFTER_S = 600.0

# States a user sees. Cells in RESUBMIT states are submitted again by `kislurm submit`.
STATES = ("missing", "pending", "running", "requeued", "done", "failed", "cancelled")
RESUBMIT = frozenset({"missing", "failed", "cancelled"})

_SLURM_TO_STATE = {
    "PENDING": "pending", "CONFIGURING": "pending", "RUNNING": "running", "COMPLETING": "running",
    "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued", "REQUEUE_FED": "requeued", "RESIZING": "running",
    "SUSPENDED": "pending", "COMPLETED": "done", "CANCELLED": "cancelled", "FAILED": "failed",
    "TIMEOUT": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "PREEMPTED": "requeued",
    "BOOT_FAIL": "failed", "DEADLINE": "failed",
}


def write_status(cell: CellPaths, word: str, **info: object) -> None:
    """Record the cell's one-word state and a heartbeat (host, pid, time, extra info) atomically."""
    detail = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **info}
    atomic_write_text(cell.status, f"{word}\n{json.dumps(detail, sort_keys=True)}\n")


def read_status(cell: CellPaths) -> tuple[Optional[str], dict]:
    """The word and heartbeat info of a cell's STATUS file, or (None, {}) when absent or unreadable."""
    try:
        word, _, rest = cell.status.read_text().partition("\n")
        return word.strip() or None, json.loads(rest or "{}")
    except (OSError, ValueError):
        return None, {}


def rank_reports_summary(cell: CellPaths, world_size: int | None = None) -> Optional[str]:
    """One line naming every rank of the cell's latest session that reported an error (earliest first: usually the
    cause, the others' errors follow from it) and every rank that ended without a report (killed, out of memory
    in the kernel's eyes, or crashed outside Python). None when no rank failed."""
    reports = []
    for path in sorted(cell.ranks.glob("*.json")) if cell.ranks.is_dir() else []:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a report being replaced: the next look sees it
    failed = sorted((r for r in reports if r.get("state") == "failed"), key=lambda r: r.get("time", 0))
    if not failed:
        return None
    seen = {r.get("rank") for r in reports}
    silent = [r for r in reports if r.get("state") == "running"]
    parts = [f"rank {r['rank']} on {r.get('node', '?')}: {r.get('error', '?')}" for r in failed]
    if silent and len(silent) < len(reports):
        parts.append("no error report from " + ", ".join(f"rank {r['rank']} on {r.get('node', '?')} (pid "
                                                         f"{r.get('pid', '?')})" for r in silent)
                     + ": killed or crashed outside Python, unless still running (its task log is under RUN/submitit)")
    if world_size and len(seen) < world_size:
        parts.append(f"ranks that never started: {sorted(set(range(world_size)) - seen)}")
    return "; ".join(parts)


def silent_failure(run: RunPaths, sub: Any) -> str:
    """What to say of a failed cell that no rank reported on (killed before Python started, or a crash outside it)."""
    logs = f"{run.submitit}/{sub.job_id}_*_log.err" if sub else f"under {run.submitit}"
    return f"the cell ended before any rank reported an error (killed, or a crash outside Python); fix: read its " \
           f"task logs, {logs}"


def _local_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_state(cell: CellPaths, complete: bool, scheduler_word: Optional[str], now: float) -> str:
    """Combine the three views into one state (see the module docstring for the precedence)."""
    if complete:
        return "done"
    word, info = read_status(cell)
    if scheduler_word:
        state = _SLURM_TO_STATE.get(scheduler_word, "failed")
        if state in ("pending", "running", "requeued", "cancelled"):
            return state
        if state == "failed":
            return "failed"
    if word is None:
        return "missing"
    if word == "FAILED":
        return "failed"
    if word == "CANCELLED":  # stopped by SIGTERM with its checkpoint saved (the scheduler no longer knows it)
        return "cancelled"
    if word in ("RUNNING", "PENDING"):
        fresh = now - float(info.get("time", 0)) < STALE_AFTER_S
        same_host = info.get("host") == socket.gethostname()
        if same_host and "pid" in info and not _local_alive(int(info["pid"])):
            return "failed"  # the process that owned the cell is gone: a dead job
        return ("running" if word == "RUNNING" else "pending") if fresh else "failed"
    return "failed"  # DONE without a complete store means the store was lost or damaged: rerun


def cell_records(run: RunPaths) -> dict[str, dict]:
    """Every planned cell's cell.json as written (cell name -> record), unreadable ones left out: the coordinates
    and ids without rebuilding cells (recorded_cell rebuilds one)."""
    records = {}
    for name in run.cell_names():
        try:
            records[name] = json.loads(run.cell(name).spec.read_text())
        except (OSError, ValueError):
            continue  # a record being replaced, or damaged: the cell itself reports it when it runs
    return records


def recorded_cell(run: RunPaths, name: str) -> Any:
    """The cell that a cell folder's cell.json records: a validation or ladder cell too, which no grid holds. A
    record written before cell.json held the whole cell is found among the cells of the run's own config.yaml; a
    missing or unrecognised record is refused in one line."""
    from kislurm.errors import ConfigError
    from kislurm.plan.loader import load_config
    from kislurm.plan.grid import Cell, expand

    spec = run.cell(name).spec
    try:
        record = json.loads(spec.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{spec}: no readable cell record ({type(e).__name__}); fix: pass a run folder and one of "
                          f"the folders under {run.cells}") from None
    if "cell" in record or not run.config.exists():
        return Cell.from_json(record, str(spec))
    found = [c for c in expand(load_config(run.config)) if c.cell_id == record.get("cell_id")]
    if not found:
        raise ConfigError(f"{spec}: written by an older kislurm and not a cell of {run.config}; fix: rerun it "
                          "with the kislurm version that wrote the run")
    return found[0]


def missing_corpus_shards(cfg: Any, run: RunPaths, array_job: str) -> Optional[str]:
    """One line naming the general corpus's shards that its array job left unpublished, with how its tasks ended in
    sacct (OUT_OF_MEMORY, NODE_FAIL, CANCELLED...) and the fix; None when every shard is published. The preparation
    job asks before merging: a task killed outright records nothing itself."""
    from kislurm.data.prepare import general_corpus_plan

    plan = general_corpus_plan(cfg.data, run.data)
    missing = plan.unfinished() if plan is not None else []
    if not missing:
        return None
    shard = missing[0][0]
    where = f"{shard.path}" + (f" bytes {shard.start}-{shard.end}" if shard.end >= 0 else "")
    ended = sorted((job, word) for job, word in slurm_states([array_job]).items() if word != "COMPLETED")
    how = (", ".join(f"task {job.split('_')[-1]} {word}" for job, word in ended)
           or "sacct records no failed task: one cancelled while pending leaves no record")
    return (f"corpus shard {where} was not published ({len(missing)} of {len(plan.shards)} shards missing; array job "
            f"{array_job}: {how}); fix: give the preparation jobs more memory (executor.sbatch_extra: {{mem: ...}}) "
            "or time (executor.prepare_time), or split the corpus into smaller files, then `kislurm submit` again "
            "(published shards are kept)")


def preparation_state(run: RunPaths) -> dict:
    """The preparation job's last recorded state (RUN/prepare.json), or {} when the run never queued one."""
    try:
        return json.loads(run.preparation.read_text())
    except (OSError, ValueError):
        return {}


def run_status(run: RunPaths, names: Optional[list[str]] = None) -> list[dict]:
    """One row per cell of a run (all cells with a cell.json, or `names`): state, step, last retention, job id.

    The scheduler is asked once for every cell together, so the cost of a poll does not grow with the grid.
    """
    from kislurm.retention.store import StoreError, read_cell

    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root}: no such run folder; fix: pass the folder `kislurm submit` created "
                                "(output_root/name of the config)")
    if names is None:
        names = run.cell_names()
    subs = latest_submissions(run)
    sched = slurm_states([s.job_id for s in subs.values() if s.cluster == "slurm"])
    # After sacct, never before: a failing preparation job records why, then cancels the cells. Read the other way
    # round, a poll could see the cells cancelled and the preparation still running, and show no error (CI did).
    prep = preparation_state(run)
    known_arrays = {job.split("_")[0] for job in sched}
    now = time.time()
    rows = []
    for name in names:
        cp = run.cell(name)
        row: dict = {"cell": name, "step": None, "steps": None, "general_acc": None, "infused_acc": None,
                     "job": subs[name].job_id if name in subs else None, "error": None}
        complete = False
        if cp.store.exists():
            try:
                rec = read_cell(cp.store, matrix=False)
                complete = rec.complete
                if len(rec.step):
                    row["step"] = int(rec.step[-1])
                    for key in ("general_acc", "infused_acc"):
                        if key in rec.metrics:
                            row[key] = float(rec.metrics[key][-1])
            except StoreError as e:
                row["error"] = str(e)
        sub = subs.get(name)
        word = sched.get(sub.job_id) if sub and sub.cluster == "slurm" else None
        if sub and sub.cluster == "slurm" and word is None and sub.job_id.split("_")[0] in known_arrays:
            # Slurm keeps no accounting record of an array task cancelled while pending: its array is known to
            # sacct but the task is gone without ever running.
            word = "CANCELLED"
        row["state"] = cell_state(cp, complete, word, now)  # a complete store is done, whatever sacct says
        _, info = read_status(cp)
        row["steps"] = info.get("of")
        if row["step"] is None and info.get("step"):
            row["step"] = info.get("step")
        if row["state"] == "failed":
            row["error"] = rank_reports_summary(cp) or info.get("error") or row["error"] or silent_failure(run, sub)
        row["note"] = sub.note if sub and sub.note else None
        if row["state"] == "running" and info.get("progress"):  # the heartbeat reports progress, not just life
            row["phase"] = info.get("phase")
            row["progress_age_s"] = round(now - float(info["progress"]))
            if row["progress_age_s"] > 300 and not row["note"]:
                row["note"] = f"no progress for {row['progress_age_s'] // 60} min ({info.get('phase')})"
        if sub and sub.after and sub.after == prep.get("job"):
            if prep.get("state") == "failed" and row["state"] != "done":
                row["error"] = f"preparation job {sub.after} failed: {prep.get('error')}"
            elif prep.get("state") in ("queued", "running"):
                row["note"] = f"waits on preparation job {sub.after} ({prep['state']})"
        rows.append(row)
    return rows
