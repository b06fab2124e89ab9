"""Multi-rank cells through `kislurm submit` on submitit's local executor (the embedded default): a DP=2 and a
TP=2 x DP=2 cell finish and the command exits 0; a rank killed mid-training fails the cell, the command exits
non-zero naming that rank, and a resubmission resumes the cell from its checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kislurm.plan.loader import load_config
from kislurm.plan.grid import expand
from kislurm.retention.store import read_cell
from kislurm.train.trainer import MIN_STEP_ENV

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SHAPE = "num_layers: 2, hidden_size: 16, num_attention_heads: 2, seq_length: 32"


def layout_sets(root: Path, tp: int, dp: int, ratios: str = "[0.5]") -> list[str]:
    """--set arguments for a one-size tiny grid at layout TP x DP (micro batch 16 / DP keeps the global batch)."""
    return ["--set", f"output_root={root}", "--set", "grid.sizes=[m]", "--set", f"grid.ratios={ratios}",
            "--set", f"train.micro_batch_size={16 // dp}", "--set", "executor.array_parallelism=1",
            "--set", f"models.m={{{SHAPE}, tensor_parallel: {tp}, data_parallel: {dp}}}"]


def kislurm(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kislurm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def cells_of(root: Path, *sets: str):
    overrides = dict(s.split("=", 1) for s in sets[1::2])
    import yaml

    cfg = load_config(TINY, {k: yaml.safe_load(v) for k, v in overrides.items()})
    return cfg, expand(cfg)


def test_dp2_and_tp2_dp2_cells_exit_zero_done(tmp_path):
    for tp, dp in ((1, 2), (2, 2)):
        sets = layout_sets(tmp_path / f"tp{tp}dp{dp}", tp, dp)
        out = kislurm("submit", str(TINY), *sets)
        assert out.returncode == 0, out.stdout + out.stderr
        cfg, cells = cells_of(tmp_path / f"tp{tp}dp{dp}", *sets)
        rec = read_cell(tmp_path / f"tp{tp}dp{dp}" / "tiny" / "cells" / cells[0].name / "retention.h5",
                        matrix=False)
        assert rec.complete and list(rec.step) == cells[0].eval_steps, (tp, dp)


def _wait(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the submit exited before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.1)


# A dead or hung rank ends the cell within its phase's budget (train.timeout_*_min; not part of the cell's id): one
# minute here, where a tiny cell's step, evaluation or save takes well under a second.
PHASE_BUDGETS = ["--set", "train.timeout_step_min=1", "--set", "train.timeout_eval_min=1",
                 "--set", "train.timeout_save_min=1"]


def _submit_until_first_evaluation(tmp_path: Path):
    """Start `kislurm submit` of a DP=2 cell and return once it stored its first evaluation: (the submit process,
    its sets, the cell, its folder, rank 1's report). Each step takes at least 0.5 s, so after that evaluation
    (step 20 of 40) the cell still needs >= 10 s: whatever the test does next lands mid-training on any machine."""
    sets = [*layout_sets(tmp_path, 1, 2), *PHASE_BUDGETS]
    _, cells = cells_of(tmp_path, *sets)
    paths = tmp_path / "tiny" / "cells" / cells[0].name
    proc = subprocess.Popen([sys.executable, "-m", "kislurm.cli", "submit", str(TINY), *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, MIN_STEP_ENV: "0.5"})
    store = paths / "retention.h5"
    _wait(lambda: store.exists() and len(read_cell(store, matrix=False).step) >= 1, proc, "first evaluation")
    return proc, sets, cells[0], paths, json.loads((paths / "ranks" / "1.json").read_text())


def test_killed_rank_fails_the_cell_names_it_and_resubmit_resumes(tmp_path):
    proc, sets, cell, paths, victim = _submit_until_first_evaluation(tmp_path)
    store = paths / "retention.h5"
    os.kill(victim["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    line = next(ln for ln in err.splitlines() if ln.startswith("kislurm: cell failed:"))
    assert f"no error report from rank 1 on {victim['node']} (pid {victim['pid']})" in line, line
    assert "rank 0 on" in line  # the survivor's own error: its collective lost the peer
    status = json.loads(kislurm("status", str(tmp_path / "tiny"), "--json").stdout)
    assert status[0]["state"] == "failed" and "rank 1" in status[0]["error"]

    again = kislurm("submit", str(TINY), *sets)
    assert again.returncode == 0, again.stdout + again.stderr
    rec = read_cell(store, matrix=False)
    assert rec.complete and list(rec.step) == cell.eval_steps  # every evaluation exactly once
    assert len(rec.meta["writers"]) == 2, "the resubmission resumed the same store"


def test_hung_rank_fails_the_cell_within_its_step_budget(tmp_path):
    """A rank that stops (SIGSTOP: no error, no closed socket) leaves its peer blocked in a collective; the peer's
    watchdog ends the cell after that phase's budget, naming the phase, and the cell is FAILED with both ranks
    accounted for."""
    proc, _, _, paths, victim = _submit_until_first_evaluation(tmp_path)
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        _wait(lambda: (paths / "STATUS").read_text().startswith("FAILED"), proc, "FAILED status")
    finally:
        os.kill(victim["pid"], signal.SIGCONT)  # it then finds its peer gone and fails too
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    status = json.loads((paths / "STATUS").read_text().splitlines()[1])
    # stopped just after an evaluation: rank 0 waits in that step's save or in the next training step
    assert re.search(r"rank 0 made no progress in (checkpoint save|training) for 1 min \(step \d+\): a peer rank "
                     r"probably died or hung; fix: .* raise train\.timeout_(save|step)_min", status["error"]), status
    assert "no error report from rank 1" in status["error"]


def test_tp_placement_check():
    from kislurm.cluster.cell_session import check_tp_placement
    from kislurm.train.distributed import TrainError

    check_tp_placement(["a", "a", "b", "b"], tp=2)  # TP inside each node, DP across
    with pytest.raises(TrainError, match="ranks 2-3 spans nodes b, c; fix: set executor.tasks_per_node"):
        check_tp_placement(["a", "a", "b", "c"], tp=2)
    check_tp_placement(["a", "b"], tp=2, allow_split=True)  # explicitly allowed


def test_master_port_is_outside_the_kernels_ephemeral_range():
    """A port an outgoing connection holds cannot be listened on (even with SO_REUSEADDR): submitit's draw from
    20000-60000 landed there in CI and rank 0 failed to bind. kislurm's draw stays below the ephemeral range."""
    import socket

    from kislurm.train.distributed import MASTER_PORTS, master_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {master_port(f"{job}_{task}") for job in range(500000, 500200) for task in range(5)}
    assert max(ports) < low and min(ports) >= MASTER_PORTS[0] and len(ports) > 900, (min(ports), max(ports), low)
    assert master_port("123_4") == master_port("123_4"), "every rank of a job draws the same port"
    # what went wrong: a listener cannot take a port that a client connection holds
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    held = client.getsockname()[1]
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with pytest.raises(OSError, match="in use"):
        probe.bind(("0.0.0.0", held))
    assert held >= low
    for s in (probe, client, server):
        s.close()


def test_a_cell_that_fails_to_start_reports_why(tmp_path):
    """A failure before the process group exists (the rendezvous, a GPU preset on a CPU node) is in the rank's
    report and STATUS, so `kislurm status` names it instead of an error-less 'failed'."""
    import dataclasses

    import torch

    from kislurm.cluster.cell_job import run_cell
    from kislurm.cluster.status import read_status, run_status
    from kislurm.cluster.submit import write_plan
    from kislurm.errors import TrainError

    if torch.cuda.is_available():
        pytest.skip("a GPU preset starts here")
    cfg = load_config(TINY, {"output_root": str(tmp_path), "grid.sizes": ["cpu-xs"], "grid.ratios": [0.5]})
    cell = expand(cfg)[0]
    cell = dataclasses.replace(cell, model=dataclasses.replace(cell.model, device="gpu"))
    run = write_plan(cfg, [cell])
    with pytest.raises(TrainError, match="no CUDA GPU is visible"):
        run_cell(run, cell)
    report = json.loads(run.cell(cell.name).rank_report(0).read_text())
    assert report["state"] == "failed" and report["error"].startswith("model preset has device: gpu"), report
    word, info = read_status(run.cell(cell.name))
    assert word == "FAILED" and info["error"] == f"rank 0 on {report['node']}: {report['error']}", info
    row = run_status(run)[0]
    assert row["state"] == "failed" and row["error"].startswith("rank 0 on "), row
    assert "no CUDA GPU is visible here; fix:" in row["error"], row
