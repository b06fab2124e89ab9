"""The whole pipeline on the embedded default: real submitit local executor, real megatron-core training on CPU,
real HDF5 stores, then aggregation and the CLI on what was written."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kislurm.analysis.aggregate import aggregate_runs
from kislurm.cli import main
from kislurm.orchestrate.run import submit_run
from kislurm.plan.loader import load_config
from kislurm.plan.grid import expand
from kislurm.cluster.status import run_status
from kislurm.retention.store import read_cell

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"output_root": str(root)})
    cells = expand(cfg)
    run = submit_run(cfg, cells)
    return cfg, cells, run


def test_every_cell_trained_evaluated_and_stored(tiny_run):
    cfg, cells, run = tiny_run
    assert len(cells) == 4
    for cell in cells:
        rec = read_cell(run.cell(cell.name).store)
        assert rec.complete
        assert list(rec.step) == cell.eval_steps
        assert rec.meta["cell_id"] == cell.cell_id
        assert rec.probe_correct.shape == (len(cell.eval_steps), len(rec.probe_fact_index))
        assert 0.0 <= rec.metrics["general_acc"][-1] <= 1.0
        stats = rec.meta["data_stats"]
        assert stats, "realised data statistics are recorded"
        speed = rec.meta["throughput"]  # one entry per evaluation interval; MFU only on GPU
        assert [e["step"] for e in speed] == cell.eval_steps
        assert all(e["tokens_per_s"] > 0 and "mfu" not in e for e in speed)
    assert {r["state"] for r in run_status(run)} == {"done"}


def test_aggregate_reads_the_stores(tiny_run):
    _, cells, run = tiny_run
    result = aggregate_runs([run.root])
    assert result.n_read == len(cells) and not result.unreadable and not result.excluded
    assert (result.out / "collapse_points.csv").exists()
    again = aggregate_runs([run.root])  # warm: nothing changed, nothing re-read
    assert again.n_read == 0


def test_resubmit_skips_done_cells_and_cli_reports(tiny_run):
    cfg, cells, run = tiny_run
    runner = CliRunner()
    out = runner.invoke(main, ["submit", str(REPO / "configs" / "tiny.yaml"), "--set",
                               f"output_root={run.root.parent}"])
    assert out.exit_code == 0, out.output
    assert "0 of 4 cells to submit (skipping 4 done)" in out.output
    status = runner.invoke(main, ["status", str(run.root), "--json"])
    assert status.exit_code == 0
    assert [r["state"] for r in json.loads(status.output)] == ["done"] * 4


def _group_alive(pgid: int, grace_s: float = 10.0) -> bool:
    """Whether a process of group `pgid` is still there after `grace_s`: a checkpoint writer that megatron forked
    dies with its trainer (PR_SET_PDEATHSIG), which the kernel delivers a moment after the trainer has gone."""
    import os
    import time

    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def test_ctrl_c_stops_cells_and_rerun_resumes(tmp_path):
    """SIGINT (Ctrl-C) stops running cells; the same command again skips finished cells and completes the rest."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "kislurm.cli", "submit", str(REPO / "configs" / "tiny.yaml"), "--set",
           f"output_root={tmp_path}"]
    # SIGINT back to its default in the child: a shell's background jobs inherit it ignored, unlike a terminal's
    # Each step takes at least 0.1 s (a cell >= 4 s), two cells at a time: when the first cell is seen complete
    # (polled every 0.1 s) the other two cannot have run yet, on a machine of any speed.
    from kislurm.train.trainer import MIN_STEP_ENV

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, MIN_STEP_ENV: "0.1"})
    run = tmp_path / "tiny"
    deadline = time.monotonic() + 300
    while not any(read_cell(p, matrix=False).complete for p in run.glob("cells/*/retention.h5")):
        assert time.monotonic() < deadline and proc.poll() is None, "no cell completed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert not _group_alive(proc.pid), "cells of the interrupted command are still running after it returned:\n" \
        + subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    assert "interrupted; running cells were stopped, finished cells are kept" in out
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    skipped = re.search(r"of 4 cells to submit \(skipping (\d+) done", again.stdout)
    assert skipped and int(skipped.group(1)) >= 1 and "running" not in again.stdout, again.stdout
    assert all(read_cell(p, matrix=False).complete for p in run.glob("cells/*/retention.h5"))
