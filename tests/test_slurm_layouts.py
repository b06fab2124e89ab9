"""Layouts across the project's real two-node Slurm cluster, through `kislurm submit` (`tools/slurm_cluster.sh start
--nodes 2`): a DP=2 cell with one rank per node, and a TP=2 x DP=2 cell with two ranks per node (TP inside a node, DP
across nodes), give the same loss and retention series as the same cells on one node; the preflight of a TP=2 x DP=2
layout passes across the two nodes.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kislurm.cli import main, submit_run
from kislurm.retention.store import read_cell
from slurm_fixtures import SHAPE, TINY, all_done, job_of, plan, sacct
from slurm_fixtures import wait_for_cells as wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


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
