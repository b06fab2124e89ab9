"""SIGTERM with no warning signal, on the project's real two-node Slurm cluster (`tools/slurm_cluster.sh start --nodes
2`, whose `urgent` partition preempts the `main` one with PreemptMode=REQUEUE):

- a bare `scancel --signal=TERM` (the job still RUNNING: the cell requeues itself) and a real preemption by a job of
  the `urgent` partition (Slurm requeues the cell) each save at the next step and resume there, every evaluation
  stored exactly once;
- a plain `scancel` saves, does not requeue, and the cell shows as cancelled until a resubmission resumes it;
- a complete cell whose job was PREEMPTED shows as done.
"""

import re
import subprocess
import time

import pytest
from click.testing import CliRunner

from conftest import make_store
from kislurm.cli import main
from kislurm.orchestrate.run import submit_run
from kislurm.cluster.status import run_status
from kislurm.cluster.submissions import Submission, record_submissions
from kislurm.paths import RunPaths
from kislurm.retention.store import read_cell
from kislurm.train.trainer import MIN_STEP_ENV
from slurm_fixtures import all_done, job_of, plan, sacct
from slurm_fixtures import wait_for_cells as wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def log_lines(run: RunPaths, cell, pattern: str) -> list[int]:
    """The integers `pattern` captures in the cell's log; none while the log does not exist yet (the store gets the
    first evaluation a moment before the log gets its line, and `status` reads the store)."""
    log = run.cell(cell.name).log
    return [int(x) for x in re.findall(pattern, log.read_text())] if log.exists() else []


def wait_until(what: str, ready, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)
    return value


def wait_job_gone(job: str) -> None:
    """Until the job has left the queue (its store can be complete while it still cleans up)."""
    wait_until(f"job {job} left the queue", lambda: subprocess.run(
        ["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=60).stdout.strip() == "")


def preempt(nodes: str = "kn[1-2]") -> str:
    """A short job of the `urgent` partition on whole nodes: Slurm preempts what runs there (SIGTERM, requeue)."""
    count = len(nodes.split(",")) if "[" not in nodes else 2
    return subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-w", nodes, "-N", str(count), "--exclusive",
                           "-o", "/dev/null", "--wrap", "sleep 1"], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_sigterm_saves_at_next_step_and_resumes(two_nodes, tmp_path, monkeypatch):
    """A bare SIGTERM (the job still RUNNING: the cell requeues itself), then a real preemption (Slurm requeues it):
    each time every rank stops after the same step, saves there, and the next run resumes at that step."""
    monkeypatch.setenv(MIN_STEP_ENV, "0.5")  # 60 steps of >= 0.5 s: >= 20 s of training remain after each resume
    cfg, cells = plan(tmp_path, 1, 2, per_node=1, **{"grid.token_budgets": [60 * 512], "train.eval_interval": 10})
    cell = cells[0]
    run = submit_run(cfg, cells)
    wait_for(run, lambda rows: rows[0]["step"] is not None or rows[0]["state"] in ("failed", "done"))
    job = job_of(run, cell)
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=60)
    first = wait_until("the signalled cell saved", lambda: log_lines(
        run, cell, r"SIGTERM at step (\d+): checkpoint saved; requeueing"))[0]
    wait_until("the requeued cell resumed", lambda: first in log_lines(run, cell, r"resumed \S+ from \S+ at step (\d+)/"))
    preempt()
    second = wait_until("the preempted cell saved", lambda: log_lines(
        run, cell, r"SIGTERM at step (\d+): checkpoint saved; Slurm requeues the job"))[0]
    wait_for(run, all_done)
    wait_job_gone(job)
    assert 0 < first < second < cell.steps
    assert log_lines(run, cell, r"resumed \S+ from \S+ at step (\d+)/") == [first, second]
    rec = read_cell(run.cell(cell.name).store, matrix=False)
    assert rec.complete and list(rec.step) == cell.eval_steps, "every evaluation exactly once"
    states = sacct(job, "State")
    assert "REQUEUED" in states and "PREEMPTED" in states and states[-1] == "COMPLETED", states


def test_plain_scancel_saves_and_stays_cancelled(two_nodes, tmp_path, monkeypatch):
    monkeypatch.setenv(MIN_STEP_ENV, "0.5")
    cfg, cells = plan(tmp_path, 1, 2, per_node=1, **{"grid.token_budgets": [40 * 512], "train.eval_interval": 10})
    cell = cells[0]
    run = submit_run(cfg, cells)
    wait_for(run, lambda rows: rows[0]["step"] is not None or rows[0]["state"] in ("failed", "done"))
    job = job_of(run, cell)
    subprocess.run(["scancel", job], check=True, timeout=60)
    saved = wait_until("the cancelled cell saved", lambda: log_lines(
        run, cell, r"SIGTERM at step (\d+): checkpoint saved; the job is cancelled, not requeueing"))[0]
    wait_job_gone(job)
    assert sacct(job, "State")[0] == "CANCELLED" and "REQUEUED" not in sacct(job, "State"), "never requeued"
    row = run_status(run)[0]
    assert row["state"] == "cancelled" and row["step"] == max(e for e in cell.eval_steps if e <= saved), row
    monkeypatch.delenv(MIN_STEP_ENV)
    submit_run(cfg, cells)  # cancelled cells are resubmitted: they resume from the saved step
    wait_for(run, all_done)
    assert log_lines(run, cell, r"resumed \S+ from \S+ at step (\d+)/") == [saved]
    assert list(read_cell(run.cell(cell.name).store, matrix=False).step) == cell.eval_steps


def test_complete_cell_whose_job_was_preempted_is_done(two_nodes, tmp_path):
    """The store is the truth for done: a complete cell shows done while sacct says PREEMPTED (a non-requeueable job
    preempted by an urgent one stays PREEMPTED)."""
    run = RunPaths(tmp_path)
    cp = run.cell("c_r0.5_xxxxxxxxxx")
    cp.root.mkdir(parents=True)
    cp.spec.write_text("{}")
    make_store(cp.store, cp.root.name, complete=True)
    job = subprocess.run(["sbatch", "--parsable", "--no-requeue", "-w", "kn1", "--exclusive", "-o", "/dev/null",
                          "--wrap", "sleep 600"], capture_output=True, text=True, check=True).stdout.strip()
    record_submissions(run, [Submission(cp.root.name, job, "slurm", time.time())])
    wait_until("the job runs", lambda: sacct(job, "State") == ["RUNNING"])
    preempt("kn1")
    wait_until("the job was preempted", lambda: sacct(job, "State") == ["PREEMPTED"])
    assert run_status(run)[0]["state"] == "done"
    shown = CliRunner().invoke(main, ["status", str(run.root)])
    assert shown.exit_code == 0 and "done" in shown.output and "requeued" not in shown.output, shown.output
