"""A cell SIGKILLed at random moments and restarted each time ends with exactly the uninterrupted run's record:
the same final loss and retention series, no evaluation step lost or repeated (jobs/run_cell.py's contract)."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kislurm.config import load_config
from kislurm.plan import expand
from kislurm.store import read_cell
from kislurm.submit import write_plan

REPO = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, str(REPO / "jobs" / "run_cell.py")]


def plan(root: Path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"output_root": str(root), "grid.sizes": ["cpu-xs"],
                                                        "grid.ratios": [0.5], "grid.token_budgets": [40960],
                                                        "train.eval_interval": 10})
    cell = expand(cfg)[0]
    return write_plan(cfg, [cell]), cell


def last_step(store: Path) -> int:
    """The last stored evaluation step (the truth; STATUS heartbeats lag by up to a minute)."""
    if not store.exists():
        return 0
    steps = read_cell(store, matrix=False).step
    return int(steps[-1]) if steps.size else 0


def test_sigkill_five_times_then_resume_equals_uninterrupted(tmp_path):
    ref_run, cell = plan(tmp_path / "ref")
    subprocess.run([*ENTRY, str(ref_run.root), cell.name], check=True, capture_output=True, timeout=600)
    ref = read_cell(ref_run.cell(cell.name).store)

    run, _ = plan(tmp_path / "killed")
    paths = run.cell(cell.name)
    rng = random.Random(7)
    kills = 0
    while kills < 5:
        proc = subprocess.Popen([*ENTRY, str(run.root), cell.name], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start_step = last_step(paths.store)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # let it store a new evaluation, then kill anywhere
            if last_step(paths.store) > start_step:
                break
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is not None:
            break  # finished before we could kill it again: the remaining kills would be no-ops
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3, "the cell finished too fast to be interrupted; make it longer"
    finished_already = read_cell(paths.store, matrix=False).complete  # the last kill can land just after the end
    subprocess.run([*ENTRY, str(run.root), cell.name], check=True, capture_output=True, timeout=600)
    got = read_cell(paths.store)

    assert got.complete and list(got.step) == list(ref.step) == cell.eval_steps
    assert np.array_equal(got.probe_correct, ref.probe_correct)
    for name, series in ref.metrics.items():
        np.testing.assert_allclose(got.metrics[name], series, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got.train_loss, ref.train_loss, rtol=0, atol=1e-6)
    assert [e["step"] for e in got.meta["throughput"]] == cell.eval_steps  # speed history: no gaps, no repeats
    # every run that trained opened the same store once: each killed one, and the final one unless the cell was
    # already complete (then the final run trains nothing and opens nothing)
    assert len(got.meta["writers"]) == kills + (0 if finished_already else 1)
