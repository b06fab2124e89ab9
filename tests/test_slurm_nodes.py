"""Cells across nodes, through `kislurm submit` on the project's real two-node Slurm cluster
(`tools/slurm_cluster.sh start --nodes 2`): placement, rendezvous, requeue and failure with gloo.

- A DP=2 cell with one rank per node, and a TP=2 x DP=2 cell with two ranks per node (TP inside a node, DP across
  nodes), give the same loss and retention series as the same cells on one node.
- A two-node cell that cannot finish within its time limit (every step takes at least KISLURM_MIN_STEP_S, so this
  holds on any machine) saves at the signalled step, is requeued, resumes from that step and completes with every
  evaluation exactly once.
- A rank killed on the second node fails the cell with that rank named; a resubmission resumes it.
- On a cluster that refuses requeue (JobRequeue=0) the timed-out cell resubmits itself as a new job that resumes,
  and `kislurm status` says so.
- SIGTERM with no warning signal: a bare `scancel --signal=TERM` (the cell requeues itself) and a real preemption by
  a job of the `urgent` partition (Slurm requeues the cell) each save at the next step and resume there; a plain
  `scancel` saves, does not requeue, and the cell shows as cancelled; a complete cell whose job was PREEMPTED is done.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kislurm.cli import main, submit_run
from kislurm.plan.config import load_config
from kislurm.paths import RunPaths
from kislurm.plan.grid import expand
from kislurm.cluster.status import latest_submissions, run_status, submissions_of
from kislurm.retention.store import read_cell
from kislurm.train.trainer import MIN_STEP_ENV
from slurm_fixtures import REQUIRE_ENV, job_requeue, wait_for_cells as wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SHAPE = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 32}


@pytest.fixture
def two_nodes(slurm_cluster):
    if len(slurm_cluster.nodes) < 2:
        problem = f"the test cluster has one node ({slurm_cluster.node}); fix: tools/slurm_cluster.sh start --nodes 2"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return slurm_cluster


def plan(root: Path, tp: int, dp: int, per_node: int, **overrides):
    """A one-cell tiny grid at layout TP x DP with `per_node` ranks on each node, on Slurm."""
    cfg = load_config(TINY, {"output_root": str(root), "executor.cluster": "slurm", "executor.time": "10",
                             "executor.tasks_per_node": per_node, "grid.sizes": ["m"], "grid.ratios": [0.5],
                             "train.micro_batch_size": 16 // dp,
                             "models.m": {**SHAPE, "tensor_parallel": tp, "data_parallel": dp}, **overrides})
    return cfg, expand(cfg)


def all_done(rows: list[dict]) -> bool:
    return all(r["state"] == "done" for r in rows)


def sacct(job_id: str, fields: str) -> list[str]:
    return subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", fields], capture_output=True,
                          text=True, check=True, timeout=60).stdout.split()


def job_of(run: RunPaths, cell) -> str:
    return latest_submissions(run)[cell.name].job_id


def extend_time_limit_after_requeue(job_id: str, minutes: int = 10, timeout: float = 600) -> None:
    """Once Slurm has requeued the job (Restarts >= 1), give its next run time to finish. A requeued job waits
    10 s (the cluster's cred_expire) before it may start, and its own signal comes 75 s or more into it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        if re.search(r"\bRestarts=[1-9]", out):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True)
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued within {timeout:.0f} s")


def test_two_node_cells_equal_one_node(two_nodes, tmp_path):
    layouts = {"dp2": (1, 2), "tp2dp2": (2, 2)}
    runs = {}
    for name, (tp, dp) in layouts.items():
        for nodes in (1, 2):
            cfg, cells = plan(tmp_path / f"{name}-{nodes}n", tp, dp, per_node=tp * dp // nodes)
            runs[name, nodes] = (submit_run(cfg, cells), cells[0])
    for run, _ in runs.values():
        wait_for(run, all_done)
    for name in layouts:
        (one, cell), (two, cell2) = runs[name, 1], runs[name, 2]
        assert cell.cell_id == cell2.cell_id, "placement is not part of a cell's identity"
        assert sacct(job_of(two, cell), "NodeList") == ["kn[1-2]"], "the two-node cell spans both nodes"
        assert len(sacct(job_of(one, cell), "NodeList")[0].split(",")) == 1
        a, b = (read_cell(r.cell(cell.name).store) for r in (one, two))
        assert list(a.step) == list(b.step) == cell.eval_steps
        dloss = float(np.max(np.abs(a.train_loss - b.train_loss)))
        dmetric = max(float(np.max(np.abs(a.metrics[k] - b.metrics[k]))) for k in a.metrics)
        print(f"\n{name}: one node vs two nodes: max |dloss| {dloss:.3g}, max |dmetric| {dmetric:.3g}")
        assert dloss <= 1e-6 and dmetric <= 1e-6, (name, dloss, dmetric)
        assert np.array_equal(a.probe_correct, b.probe_correct), name


def test_two_node_time_limit_saves_at_signal_requeues_resumes(two_nodes, tmp_path, monkeypatch):
    # 60 steps of at least 2 s: 120 s of training cannot fit a 2-minute limit on any machine.
    monkeypatch.setenv(MIN_STEP_ENV, "2")
    cfg, cells = plan(tmp_path, 1, 2, per_node=1, **{"executor.time": "2", "grid.token_budgets": [60 * 512],
                                                     "train.eval_interval": 10})
    cell = cells[0]
    run = submit_run(cfg, cells)
    extend_time_limit_after_requeue(job_of(run, cell))
    wait_for(run, all_done)
    rec = read_cell(run.cell(cell.name).store, matrix=False)
    assert rec.complete and list(rec.step) == cell.eval_steps, "every evaluation exactly once"
    log = run.cell(cell.name).log.read_text()
    signalled = [int(s) for s in re.findall(r"SIGUSR2 at step (\d+): checkpoint saved; requeueing", log)]
    resumed = [int(s) for s in re.findall(r"resumed \S+ from \S+ at step (\d+)/", log)]
    assert signalled and 0 < signalled[0] < cell.steps
    assert resumed[:len(signalled)] == signalled, (signalled, resumed)  # each run resumed where the last saved
    assert "REQUEUED" in sacct(job_of(run, cell), "State")
    assert sacct(job_of(run, cell), "NodeList")[-1] == "kn[1-2]"


def test_rank_killed_on_second_node_fails_cell_and_resubmit_resumes(two_nodes, tmp_path, monkeypatch):
    monkeypatch.setenv(MIN_STEP_ENV, "0.5")  # after the first evaluation (step 20 of 40) >= 10 s remain
    cfg, cells = plan(tmp_path, 1, 2, per_node=1)
    cell = cells[0]
    run = submit_run(cfg, cells)
    paths = run.cell(cell.name)
    wait_for(run, lambda rows: rows[0]["step"] is not None or rows[0]["state"] in ("failed", "done"))
    victim = json.loads(paths.rank_report(1).read_text())
    assert victim["node"] == "kn2"
    os.kill(victim["pid"], signal.SIGKILL)
    rows = wait_for(run, lambda rows: rows[0]["state"] in ("failed", "done"))
    assert rows[0]["state"] == "failed" and "no error report from rank 1 on kn2" in rows[0]["error"], rows
    assert "FAILED" in sacct(job_of(run, cell), "State")

    monkeypatch.delenv(MIN_STEP_ENV)
    submit_run(cfg, cells)
    wait_for(run, all_done)
    rec = read_cell(paths.store, matrix=False)
    assert list(rec.step) == cell.eval_steps and len(rec.meta["writers"]) == 2, "resumed in the same store"


def test_requeue_refused_resubmits_a_new_job_that_resumes(two_nodes, tmp_path, monkeypatch):
    monkeypatch.setenv(MIN_STEP_ENV, "1")  # 64 s of training: cannot fit its 1-minute limit
    cfg, cells = plan(tmp_path, 1, 1, per_node=1, **{"executor.time": "1", "grid.token_budgets": [64 * 512],
                                                     "train.eval_interval": 16})
    cell = cells[0]
    with job_requeue(two_nodes, 0):
        run = submit_run(cfg, cells)
        first = job_of(run, cell)
        deadline = time.monotonic() + 600
        while len(submissions_of(run, cell.name)) < 2:
            assert time.monotonic() < deadline, "the cell did not resubmit itself"
            assert run_status(run)[0]["state"] not in ("failed", "done"), run_status(run)
            time.sleep(1)
        second = job_of(run, cell)
        # the new job waits for the old one (afterany): give it time to finish before it starts
        subprocess.run(["scontrol", "update", f"JobId={second}", "TimeLimit=10"], check=True)
        rows = wait_for(run, all_done)
    assert second != first and "refuses requeue" in rows[0]["note"]
    shown = CliRunner().invoke(main, ["status", str(run.root)])
    assert f"{cell.name}: note: job {first} reached its time limit" in shown.output, shown.output
    rec = read_cell(run.cell(cell.name).store, matrix=False)
    assert rec.complete and list(rec.step) == cell.eval_steps and len(rec.meta["writers"]) == 2
    assert "REQUEUED" not in sacct(first, "State")


def test_tp_group_across_nodes_is_refused_with_one_line(two_nodes, tmp_path):
    cfg, cells = plan(tmp_path, 2, 1, per_node=1)  # TP=2 with one rank per node: the TP group spans kn1 and kn2
    run = submit_run(cfg, cells)
    rows = wait_for(run, lambda rows: rows[0]["state"] in ("failed", "done"))
    assert rows[0]["state"] == "failed", rows
    assert "tensor-parallel group of ranks 0-1 spans nodes kn1, kn2; fix: set executor.tasks_per_node" in \
        rows[0]["error"], rows[0]["error"]


def test_preflight_of_a_tp2_dp2_layout_across_two_nodes(two_nodes, tmp_path):
    out = CliRunner().invoke(main, ["preflight", str(TINY), "--steps", "6", "--set", f"output_root={tmp_path}",
                                    "--set", "executor.cluster=slurm", "--set", "executor.time=10",
                                    "--set", "executor.tasks_per_node=2", "--set", "grid.sizes=[m]",
                                    "--set", "train.micro_batch_size=8",
                                    "--set", f"models.m={{{', '.join(f'{k}: {v}' for k, v in SHAPE.items())}, "
                                             "tensor_parallel: 2, data_parallel: 2}"])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "tiny" / "preflight" / "m_tp2_pp1_dp2_cpu" / "report.json").read_text())
    assert report["passed"] and report["nodes"] == 2, report
    assert report["checks"]["tp_groups_on_one_host"]["hosts"] == [["kn1", "kn1"], ["kn2", "kn2"]]
    assert report["checks"]["resume_exact"]["max_abs_diff"] == 0.0
    dp_eval = report["checks"]["dp_eval"]  # rank 0's view: half of the 256 candidates, the same results
    assert dp_eval["ok"] and dp_eval["max_abs_diff"] == 0.0 and dp_eval["scored_on_this_rank"] == 128, dp_eval
    print(f"\npreflight across two nodes: {out.output.strip().splitlines()[-1]}")


def log_lines(run: RunPaths, cell, pattern: str) -> list[int]:
    return [int(x) for x in re.findall(pattern, run.cell(cell.name).log.read_text())]


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
    from conftest import make_store
    from kislurm.cluster.status import Submission, record_submissions

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
