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
(SIGTERM and preemption: tests/test_slurm_signals.py.)
"""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner

from kislurm.cli import main
from kislurm.orchestrate.run import submit_run
from kislurm.cluster.status import run_status
from kislurm.cluster.submissions import submissions_of
from kislurm.retention.store import read_cell
from kislurm.train.trainer import MIN_STEP_ENV
from slurm_fixtures import SHAPE, TINY, all_done, job_of, job_requeue, plan, sacct
from slurm_fixtures import wait_for_cells as wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


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

