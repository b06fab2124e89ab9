"""What the scheduler says about the job a cell runs in: asked, never guessed.

A cell that receives SIGTERM cannot tell from the signal alone why it came. On Slurm (measured on 22.05):
- a plain `scancel` sends SIGTERM, and sacct already reads CANCELLED while the job drains (KillWait);
- Slurm requeueing the job itself (`scontrol requeue`, or preemption with PreemptMode=REQUEUE) sends SIGTERM with
  `scontrol show job`'s Restarts already one above the job's SLURM_RESTART_COUNT;
- preemption with PreemptMode=CANCEL sends SIGTERM with sacct PREEMPTED and Restarts unchanged: nobody will requeue
  the job unless the cell does (`scontrol requeue` works on such a completing job);
- `scancel --signal=TERM` sends only the signal: the job still reads RUNNING.
"""

from __future__ import annotations

import os
import subprocess
from typing import Literal, Optional

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
