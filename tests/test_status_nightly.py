"""Cell states from STATUS files, stores and the scheduler; the nightly entry's lock, dated reports and exit codes."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kislurm.paths import RunPaths
from kislurm.cluster.status import STALE_AFTER_S, cell_state, read_status, run_status, write_status
from conftest import make_store

REPO = Path(__file__).resolve().parents[1]


def test_states_from_status_file_store_and_scheduler(tmp_path):
    run = RunPaths(tmp_path)
    cp = run.cell("a")
    cp.root.mkdir(parents=True)
    now = time.time()
    assert cell_state(cp, False, None, now) == "missing"
    write_status(cp, "RUNNING", step=3)
    assert read_status(cp)[0] == "RUNNING"
    assert cell_state(cp, False, None, now) == "running"
    assert cell_state(cp, False, None, now + STALE_AFTER_S + 1) == "failed"  # heartbeat went stale: a dead job
    assert cell_state(cp, False, "CANCELLED", now) == "cancelled"
    assert cell_state(cp, False, "PENDING", now) == "pending"
    assert cell_state(cp, True, "CANCELLED", now) == "done"  # a complete store wins
    write_status(cp, "RUNNING", step=3, pid=2**22 + 12345)  # a pid that does not exist on this host
    assert cell_state(cp, False, None, now) == "failed"


def test_run_status_rows(tmp_path):
    run = RunPaths(tmp_path)
    for name, complete in (("done_cell", True), ("half_cell", False)):
        run.cell(name).root.mkdir(parents=True)
        (run.cell(name).spec).write_text("{}")
        make_store(run.cell(name).store, name, complete)
    write_status(run.cell("half_cell"), "RUNNING", step=10)
    rows = {r["cell"]: r for r in run_status(run)}
    assert rows["done_cell"]["state"] == "done" and rows["done_cell"]["general_acc"] == pytest.approx(0.9)
    assert rows["half_cell"]["state"] == "running" and rows["half_cell"]["step"] == 10
    assert rows["half_cell"]["note"] is None  # no progress recorded: nothing to say
    # A live heartbeat whose last finished step is 10 minutes old: running, but the row says it makes no progress.
    write_status(run.cell("half_cell"), "RUNNING", step=10, phase="training", progress=time.time() - 600)
    row = {r["cell"]: r for r in run_status(run)}["half_cell"]
    assert row["state"] == "running" and row["phase"] == "training" and row["progress_age_s"] >= 600
    assert row["note"] == "no progress for 10 min (training)"
    # Its process is gone and no rank wrote a word of why (killed before Python, or a crash outside it): the row
    # still says where the cause is.
    write_status(run.cell("half_cell"), "RUNNING", step=10, pid=2**22 + 12345)
    row = {r["cell"]: r for r in run_status(run)}["half_cell"]
    assert row["state"] == "failed" and "ended before any rank reported an error" in row["error"], row
    assert f"task logs, under {run.submitit}" in row["error"], row
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        run_status(RunPaths(tmp_path / "absent"))


def nightly(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "nightly.py"), *args], capture_output=True,
                          text=True, timeout=300)


def test_nightly_dated_reports_lock_and_exit_codes(tmp_path):
    run = RunPaths(tmp_path / "run")
    ratios = [0.1, 0.3, 0.5, 0.7, 0.9]
    for size, params, mid in (("s", 1e5, 0.4), ("m", 4e5, 0.6), ("l", 1.6e6, 0.8)):
        for r in ratios:
            name = f"{size}_r{r}_xxxxxxxxxx"
            run.cell(name).root.mkdir(parents=True)
            make_store(run.cell(name).store, name, True, ratio=r, acc=float(0.9 if r < mid else 0.3), size=size,
                       params=params)
    run.config.write_text("analysis: {bootstrap: 20}\n")  # the run's own analysis settings are used
    (run.cells / "garbage_cell").mkdir()
    (run.cells / "garbage_cell" / "retention.h5").write_bytes(b"not hdf5 at all" * 10)
    reports = tmp_path / "reports"
    out = nightly(str(run.root), "--reports", str(reports))
    assert out.returncode == 0, out.stderr
    assert "1 unreadable" in out.stdout
    latest = reports / "latest"
    assert latest.is_symlink() and (latest / "collapse_points.csv").exists()
    again = nightly(str(run.root), "--reports", str(reports))  # warm: nothing new to read
    assert again.returncode == 0 and "read 0 new or changed stores" in again.stdout
    # a second instance while one holds the lock does nothing and succeeds
    import fcntl

    with open(reports / ".nightly.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = nightly(str(run.root), "--reports", str(reports))
    assert busy.returncode == 0 and "another aggregation holds" in busy.stdout
    missing = nightly(str(tmp_path / "nope"), "--reports", str(reports))
    assert missing.returncode == 1 and "no such run folder" in missing.stderr


def test_a_preparation_that_fails_between_two_reads_is_named_on_its_cancelled_cells(tmp_path, monkeypatch):
    """A failing preparation job records why, then cancels the cells waiting on it. `kislurm status` reads the
    scheduler first and prepare.json after: read the other way round, a poll that straddled the failure saw the
    cells cancelled and the preparation running, and showed no error (CI, test_slurm_submit). Here the failure is
    made to happen inside the scheduler query."""
    import json

    from kislurm.cluster import status
    from kislurm.cluster.submissions import Submission, record_submissions

    run = RunPaths(tmp_path)
    run.cell("c").root.mkdir(parents=True)
    run.cell("c").spec.write_text("{}")
    record_submissions(run, [Submission(cell="c", job_id="116_0", cluster="slurm", time=0.0, after="115")])
    run.preparation.write_text(json.dumps({"job": "115", "state": "running"}))

    def sacct_while_it_fails(jobs):
        run.preparation.write_text(json.dumps({"job": "115", "state": "failed", "error": "k.tsv:21: bad line"}))
        return {"116_0": "CANCELLED"}

    monkeypatch.setattr(status, "slurm_states", sacct_while_it_fails)
    row = run_status(run)[0]
    assert row["state"] == "cancelled" and row["error"] == "preparation job 115 failed: k.tsv:21: bad line", row
