"""RUN/submissions.jsonl: the append-only log of every job kislurm submitted for a cell, and its readers.

`kislurm submit` appends one line per cell; a cell whose cluster refuses requeue appends its own resubmission
(kislurm.cluster.scheduler.resubmit_cell) with a note saying why. `kislurm status` reads the latest per cell.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable

from kislurm.paths import RunPaths
from kislurm.publish import append_lines


@dataclass(frozen=True)
class Submission:
    """One cell's latest submission, appended to RUN/submissions.jsonl by `kislurm submit` (or by the cell itself
    when the cluster refuses to requeue it; `note` then says why)."""

    cell: str
    job_id: str
    cluster: str
    time: float
    note: str = ""
    after: str = ""
    """The job this one waits on (afterok): the run's preparation job, when one was queued."""


def record_submissions(run: RunPaths, subs: Iterable[Submission]) -> None:
    """Append-only log: a crash mid-way loses at most the line being written, never earlier ones."""
    append_lines(run.submissions, [json.dumps(asdict(s), sort_keys=True) for s in subs])


def _submissions(run: RunPaths) -> Iterable[Submission]:
    path = run.submissions
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                yield Submission(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn last line from a crash


def latest_submissions(run: RunPaths) -> dict[str, Submission]:
    return {s.cell: s for s in _submissions(run)}


def submissions_of(run: RunPaths, cell: str) -> list[Submission]:
    """Every submission of one cell, oldest first."""
    return [s for s in _submissions(run) if s.cell == cell]

