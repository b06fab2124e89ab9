"""Every call kislurm makes to the scheduler (Slurm): what it says about jobs, asked, never guessed, and what kislurm
asks of it after submission (release, cancel, resubmit). Submitting arrays is kislurm.cluster.submit's job; this
module imports no job entry, so a cell (kislurm.cluster.cell_job) can call it without an import cycle.

Why a job ends. A cell that receives SIGTERM cannot tell from the signal alone why it came. On Slurm (measured on
22.05):
- a plain `scancel` sends SIGTERM, and sacct already reads CANCELLED while the job drains (KillWait);
- Slurm requeueing the job itself (`scontrol requeue`, or preemption with PreemptMode=REQUEUE) sends SIGTERM with
  `scontrol show job`'s Restarts already one above the job's SLURM_RESTART_COUNT;
- preemption with PreemptMode=CANCEL sends SIGTERM with sacct PREEMPTED and Restarts unchanged: nobody will requeue
  the job unless the cell does (`scontrol requeue` works on such a completing job);
- `scancel --signal=TERM` sends only the signal: the job still reads RUNNING.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any, Literal, Optional

from kislurm.cluster.executors import make_executor, resources_for, wait_on
from kislurm.cluster.submissions import Submission, record_submissions, submissions_of
from kislurm.errors import SubmitError
from kislurm.paths import RunPaths
from kislurm.plan.grid import Cell

Termination = Literal["cancelled", "requeued", "requeue"]
"""cancelled: a user cancelled the job, do not come back; requeued: Slurm requeues it already, just exit;
requeue: nobody will bring the job back, so the cell requeues itself."""

_TIMEOUT_S = 60


def _run(cmd: list[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (JobState, Restarts, Requeue, ...); {} when scontrol cannot answer."""
    out = _run(["scontrol", "show", "job", "-o", job]) or ""
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


def this_job() -> Optional[str]:
    """The id of the job this process runs in, as sacct names it (ARRAY_TASK for an array task), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def accounting_state(job: str) -> Optional[str]:
    """The job's state word in Slurm's accounting (sacct), e.g. RUNNING, CANCELLED, PREEMPTED, REQUEUED."""
    out = _run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job]) or ""
    words = out.split()
    return words[0] if words else None


def requeue_refused(job: Optional[str] = None) -> bool:
    """Whether Slurm refuses to requeue this job (JobRequeue=0, --no-requeue): `scontrol show job` says Requeue=0."""
    job = job or this_job()
    return bool(job) and job_fields(job).get("Requeue") == "0"


def termination(job: Optional[str] = None, restarts_at_start: Optional[int] = None) -> Termination:
    """Why this job received SIGTERM, from the scheduler's own records (see the module docstring).

    Outside Slurm (no job id) a SIGTERM is someone stopping the cell: cancelled."""
    job = job or this_job()
    if not job:
        return "cancelled"
    if restarts_at_start is None:
        restarts_at_start = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    fields = job_fields(job)
    if int(fields.get("Restarts", restarts_at_start) or 0) > restarts_at_start:
        return "requeued"
    if (accounting_state(job) or fields.get("JobState", "")).startswith("CANCELLED"):
        return "cancelled"
    return "requeue"


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Scheduler states of many jobs with ONE sacct call (arrays queried by their parent id)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    parents = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(parents)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    states: dict[str, str] = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        word = state.split()[0] if state.split() else ""
        if "[" in job:  # a pending array range such as 12_[3-9%2]: every listed task is pending
            base, _, rng = job.partition("_[")
            for part in rng.rstrip("]").split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                for i in range(int(lo), int(hi or lo) + 1):
                    states[f"{base}_{i}"] = word
        else:
            states[job] = word
    return states


def cluster_config() -> dict[str, str]:
    """`scontrol show config` as a dict (MaxArraySize, JobRequeue, ...); {} when scontrol cannot answer."""
    out = _run(["scontrol", "show", "config"]) or ""
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines()) if v}


def partitions() -> list[str]:
    """The cluster's partition names (sinfo), the default's trailing * removed."""
    out = _run(["sinfo", "-h", "-o", "%P"]) or ""
    return sorted({p.strip().rstrip("*") for p in out.split()})


def release(job_id: str) -> None:
    """Let a held job start."""
    out = subprocess.run(["scontrol", "release", job_id], capture_output=True, text=True, timeout=_TIMEOUT_S)
    if out.returncode:
        raise SubmitError(f"could not release the held job {job_id} ({out.stderr.strip() or out.returncode}"
                          f"); fix: scontrol release {job_id}, or scancel it and run `kislurm submit` again")


def cancel_jobs(job_ids: list[str]) -> None:
    """scancel these jobs (array ids cancel the whole array); a job already gone is no error."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=_TIMEOUT_S)


def resubmit_cell(run: RunPaths, cell: Cell, job_fn: Any, after: str, note: str) -> str:
    """Submit `cell` again, as `job_fn` (the cell's own submitit entry), as a new Slurm job that starts once job
    `after` has ended (called by the cell itself when the cluster refuses to requeue it); records the submission
    with `note`; returns the new job id.

    Bounded by executor.max_requeues, counted over the cell's earlier resubmissions in submissions.jsonl."""
    from kislurm.plan.loader import load_config

    cfg = load_config(run.config)
    earlier = sum(1 for s in submissions_of(run, cell.name) if s.note)
    if earlier >= cfg.executor.max_requeues:
        raise SubmitError(f"cell {cell.name} reached its time limit {earlier + 1} times and was resubmitted "
                          f"{earlier} times (executor.max_requeues); fix: raise executor.time or max_requeues, "
                          "then run `kislurm submit` again")
    executor = make_executor(cfg, run, resources_for(cell.model, cfg.executor), [cell])
    wait_on(executor, cfg.executor, f"afterany:{after}")
    job = executor.submit(job_fn, str(run.root), cell)
    record_submissions(run, [Submission(cell.name, job.job_id, "slurm", time.time(), note=note)])
    return job.job_id
