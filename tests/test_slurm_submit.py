"""`kislurm submit` against the project's real Slurm cluster (tools/slurm_cluster.sh): job arrays of real cells,
status from sacct, cancel and resubmit, MaxArraySize splitting. Time-limit requeue and resume, failures and
placement across nodes are in tests/test_slurm_nodes.py."""

import json
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kislurm.analysis.aggregate import aggregate_runs
from kislurm.cli import main
from kislurm.orchestrate.run import submit_run
from kislurm.plan.loader import load_config
from kislurm.plan.grid import expand
from kislurm.cluster.submissions import latest_submissions
from slurm_fixtures import max_array_size, wait_for_cells as wait_for

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def slurm_config(root: Path, **overrides):
    base = {"output_root": str(root), "executor.cluster": "slurm", "executor.time": "10"}
    cfg = load_config(TINY, {**base, **overrides})
    return cfg, expand(cfg)


def test_array_status_cancel_resubmit_aggregate(slurm_cluster, tmp_path):
    cfg, cells = slurm_config(tmp_path)
    run = submit_run(cfg, cells)
    subs = latest_submissions(run)
    assert len({s.job_id.split("_")[0] for s in subs.values()}) == 1, "one array for one resource shape"
    victim = cells[-1].name
    subprocess.run(["scancel", subs[victim].job_id], check=True)
    rows = wait_for(run, lambda rows: all(r["state"] in ("done", "cancelled") for r in rows))
    states = {r["cell"]: r["state"] for r in rows}
    assert states.pop(victim) == "cancelled" and set(states.values()) == {"done"}

    runner = CliRunner()
    shown = json.loads(runner.invoke(main, ["status", str(run.root), "--json"]).output)
    assert {r["cell"]: r["state"] for r in shown}[victim] == "cancelled"
    again = runner.invoke(main, ["submit", str(TINY), "--set", f"output_root={tmp_path}", "--set",
                                 "executor.cluster=slurm", "--set", "executor.time=10"])
    assert again.exit_code == 0, again.output
    assert "1 of 4 cells to submit (skipping 3 done)" in again.output
    wait_for(run, lambda rows: all(r["state"] == "done" for r in rows))
    result = aggregate_runs([run.root])
    assert len(result.collapses) >= 1 and not result.unreadable and not result.excluded


def test_arrays_split_at_cluster_max_array_size(slurm_cluster, tmp_path):
    ratios = [round(0.05 + 0.09 * i, 2) for i in range(10)]
    cfg, cells = slurm_config(tmp_path, **{"grid.sizes": ["cpu-xxs"], "grid.ratios": ratios,
                                           "grid.token_budgets": [1024], "train.eval_interval": 1})
    with max_array_size(slurm_cluster, 3):
        run = submit_run(cfg, cells)  # MaxArraySize read from the cluster's configuration
        arrays = {s.job_id.split("_")[0] for s in latest_submissions(run).values()}
        assert len(arrays) == 4
        wait_for(run, lambda rows: all(r["state"] == "done" for r in rows))


def test_unknown_partition_refused_before_submission(slurm_cluster, tmp_path):
    out = CliRunner().invoke(main, ["submit", str(TINY), "--set", f"output_root={tmp_path}", "--set",
                                    "executor.cluster=slurm", "--set", "executor.partition=nope"])
    assert out.exit_code == 2
    assert "unknown partition 'nope'; fix: set executor.partition to one of" in out.output
    assert not (tmp_path / "tiny").exists(), "nothing is written or submitted"


def test_preparation_is_a_job_the_arrays_wait_on(slurm_cluster, tmp_path):
    cfg, cells = slurm_config(tmp_path, **{"grid.sizes": ["cpu-xxs"], "grid.ratios": [0.5]})
    run = submit_run(cfg, cells)
    returned = time.time()
    prep = json.loads(run.preparation.read_text())["job"]
    assert {s.after for s in latest_submissions(run).values()} == {prep}
    wait_for(run, lambda rows: all(r["state"] == "done" for r in rows))
    state = json.loads(run.preparation.read_text())
    assert state["state"] == "done" and state["time"] > returned, "submit returned before preparation finished"
    prep_end = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "End", "-j", prep], capture_output=True, text=True,
                              check=True).stdout.split()[0]
    cell_start = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "Start", "-j",
                                 latest_submissions(run)[cells[0].name].job_id], capture_output=True, text=True,
                                check=True).stdout.split()[0]
    assert cell_start >= prep_end, (prep_end, cell_start)  # ISO times: the array waited (afterok)
    # a second seed reads the same published data: no preparation job, no dependency (Slurm forgets old job ids)
    again = CliRunner().invoke(main, ["submit", str(TINY), "--set", f"output_root={tmp_path}", "--set",
                                      "executor.cluster=slurm", "--set", "grid.sizes=[cpu-xxs]", "--set",
                                      "grid.ratios=[0.5]", "--set", "grid.seeds=[0, 1]"])
    assert again.exit_code == 0 and "1 of 2 cells to submit" in again.output, again.output
    assert "preparation job" not in again.output
    assert [s.after for s in latest_submissions(run).values() if s.cell != cells[0].name] == [""]
    wait_for(run, lambda rows: all(r["state"] == "done" for r in rows))


def test_failing_preparation_leaves_no_cell_running_and_status_says_why(slurm_cluster, tmp_path):
    good = "".join(f"P{i}\tborn_in\tCity{i % 5}\n" for i in range(20))
    (tmp_path / "t.yaml").write_text("born_in:\n  train: ['{subject} was born in {object}']\n  heldout: []\n")
    (tmp_path / "g.tsv").write_text(good)
    (tmp_path / "k.tsv").write_text(good + "Zed\tborn_in\n")  # line 21: a triplet without its object
    cfg, cells = slurm_config(tmp_path, **{"data": {"source": "triplets", "templates_file": str(tmp_path / "t.yaml"),
                                                    "general_triplets": str(tmp_path / "g.tsv"),
                                                    "knowledge_triplets": str(tmp_path / "k.tsv"), "distractors": 3}})
    run = submit_run(cfg, cells)
    rows = wait_for(run, lambda rows: all(r["state"] in ("cancelled", "failed", "done") for r in rows))
    assert {r["state"] for r in rows} == {"cancelled"}, rows  # none ran: they waited on the preparation
    assert all("preparation job" in r["error"] and "k.tsv:21:" in r["error"] for r in rows), rows
    shown = CliRunner().invoke(main, ["status", str(run.root)])
    prep_line = next(line for line in shown.output.splitlines() if line.startswith("preparation job"))
    assert ": failed: " in prep_line and "k.tsv:21:" in prep_line, shown.output
    assert not run.cell(cells[0].name).store.exists()
