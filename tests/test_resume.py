"""A cell SIGKILLed at random moments and restarted each time ends with exactly the uninterrupted run's record:
the same final loss and retention series, no evaluation step lost or repeated (jobs/run_cell.py's contract), with
a checkpoint every two evaluations (so a restart redoes the evaluations after its checkpoint)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kislurm.plan.loader import load_config
from kislurm.data.prepare import prepare_run
from kislurm.plan.grid import expand
from kislurm.retention.store import read_cell
from kislurm.cluster.submit import write_plan
from kislurm.train.trainer import MIN_STEP_ENV

REPO = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, str(REPO / "jobs" / "run_cell.py")]


def plan(root: Path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"output_root": str(root), "grid.sizes": ["cpu-xs"],
                                                        "grid.ratios": [0.5], "grid.token_budgets": [40960],
                                                        "train.eval_interval": 10,
                                                        "train.checkpoint_interval": 20})
    cell = expand(cfg)[0]
    run = write_plan(cfg, [cell])
    prepare_run(cfg, [cell])  # cells only read prepared data (kislurm submit / kislurm prepare build it)
    return run, cell


def last_step(store: Path) -> int:
    """The last stored evaluation step (the truth; STATUS heartbeats lag by up to a minute)."""
    if not store.exists():
        return 0
    steps = read_cell(store, matrix=False).step
    return int(steps[-1]) if steps.size else 0


# Each step of the killed runs takes at least this long (80 steps, an evaluation every 10: >= 1 s between two
# evaluations), so a kill within KILL_WINDOW_S of seeing a new evaluation lands before the next one on any machine.
STEP_FLOOR_S = 0.1
KILL_WINDOW_S = 0.7


def test_sigkill_five_times_then_resume_equals_uninterrupted(tmp_path):
    ref_run, cell = plan(tmp_path / "ref")
    subprocess.run([*ENTRY, str(ref_run.root), cell.name], check=True, capture_output=True, timeout=600)
    ref = read_cell(ref_run.cell(cell.name).store)

    run, _ = plan(tmp_path / "killed")
    paths = run.cell(cell.name)
    rng = random.Random(7)
    slowed = {**os.environ, MIN_STEP_ENV: str(STEP_FLOOR_S)}
    for kill in range(5):  # 5 kills, each after one new evaluation: 5 of the cell's 8 evaluations
        proc = subprocess.Popen([*ENTRY, str(run.root), cell.name], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=slowed)
        start_step = last_step(paths.store)
        deadline = time.monotonic() + 300
        while last_step(paths.store) <= start_step:  # let it store a new evaluation, then kill anywhere
            assert proc.poll() is None and time.monotonic() < deadline, f"run {kill} stored no new evaluation"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, KILL_WINDOW_S - 0.1))
        assert proc.poll() is None, "the cell ended before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not read_cell(paths.store, matrix=False).complete
    subprocess.run([*ENTRY, str(run.root), cell.name], check=True, capture_output=True, timeout=600)
    got = read_cell(paths.store)

    assert got.complete and list(got.step) == list(ref.step) == cell.eval_steps
    assert np.array_equal(got.probe_correct, ref.probe_correct)
    for name, series in ref.metrics.items():
        np.testing.assert_allclose(got.metrics[name], series, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got.train_loss, ref.train_loss, rtol=0, atol=1e-6)
    assert [e["step"] for e in got.meta["throughput"]] == cell.eval_steps  # speed history: no gaps, no repeats
    assert len(got.meta["writers"]) == 5 + 1  # every run opened the same store once: the five killed, the last
