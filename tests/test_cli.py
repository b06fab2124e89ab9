"""The command line: help for every command, one-line errors with exit 2 for known bad input."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from kislurm.cli import main
from kislurm.plan.loader import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["plan", "prepare", "submit", "preflight", "status", "aggregate", "fit",
                                     "validate", "pilot", "demo"])
def test_every_command_has_help(command):
    out = CliRunner().invoke(main, [command, "--help"])
    assert out.exit_code == 0 and "Usage:" in out.output and len(out.output.splitlines()) > 4


def test_plan_prints_one_row_per_cell():
    out = CliRunner().invoke(main, ["plan", str(REPO / "configs" / "demo.yaml")])
    assert out.exit_code == 0, out.output
    assert "36 cells = 4 sizes x 9 ratios x 1 token budgets x 1 seeds; executor: local" in out.output
    assert len([line for line in out.output.splitlines() if line.startswith("cpu-")]) == 36


def test_plan_shows_nodes_and_tasks_per_node():
    out = CliRunner().invoke(main, ["plan", str(REPO / "configs" / "paper.yaml"), "--set",
                                    "grid.sizes=[760M-llama, 3B-llama]", "--set", "models.760M-llama.tensor_parallel=2",
                                    "--set", "models.3B-llama.tensor_parallel=4"])
    assert out.exit_code == 0, out.output
    header, *rows = [line.split() for line in out.output.splitlines() if line.startswith(("cell ", "760M", "3B"))]
    col = {name: header.index(name) for name in ("nodes", "tasks_per_node", "gpus_per_node")}
    placed = {row[0].split("_")[0]: tuple(int(row[col[c]]) for c in col) for row in rows}
    assert placed == {"760M-llama": (2, 8, 8), "3B-llama": (4, 8, 8)}  # TP 2 x DP 8, TP 4 x DP 8 on 8-GPU nodes
    cpu = CliRunner().invoke(main, ["plan", str(REPO / "configs" / "tiny.yaml"), "--set", "grid.sizes=[m]",
                                    "--set", "train.micro_batch_size=8", "--set", "executor.tasks_per_node=2",
                                    "--set", "models.m={num_layers: 1, hidden_size: 8, num_attention_heads: 2, "
                                             "tensor_parallel: 2, data_parallel: 2}"])
    assert cpu.exit_code == 0, cpu.output
    assert all(line.split()[2:4] == ["2", "2"] for line in cpu.output.splitlines() if line.startswith("m_"))


def run(args):
    out = CliRunner().invoke(main, args)
    lines = [line for line in out.output.splitlines() if line.strip()]
    return out.exit_code, lines


def test_known_errors_are_one_line_exit_2(tmp_path):
    bad_csv = tmp_path / "m.csv"
    bad_csv.write_text("params,ratio\n1e5,0.5\n")
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("grid: {ratios: [2]}\n")
    empty_run = tmp_path / "empty"
    (empty_run / "cells").mkdir(parents=True)
    cases = [
        (["fit", str(bad_csv)], "missing column 'retention'"),
        (["aggregate", str(tmp_path / "nope")], "no such run folder"),
        (["status", str(tmp_path / "nope")], "no such run folder"),
        (["plan", str(bad_yaml)], "grid.ratios[0]: expected a ratio strictly between 0 and 1"),
        (["plan", str(tmp_path / "absent.yaml")], "config file not found"),
        (["submit", str(REPO / "configs" / "tiny.yaml"), "--set", "oops"], "expected KEY=VALUE"),
        (["aggregate", str(empty_run)], "no retention stores under"),
    ]
    for args, expected in cases:
        code, lines = run(args)
        assert code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("kislurm: error: ") and expected in lines[0], (args, lines)


def test_fit_csv_end_to_end(tmp_path):
    import numpy as np

    rows = ["params,ratio,retention,n_facts"]
    for n, mid in ((1e5, 0.3), (4e5, 0.5), (1.6e6, 0.7), (6.4e6, 0.85)):
        for r in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
            y = 0.25 + 0.7 / (1 + np.exp(6 * (np.log(r) - np.log(mid))))
            rows.append(f"{n},{r},{y:.4f},300")
    csv = tmp_path / "m.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = CliRunner().invoke(main, ["fit", str(csv), "--out", str(tmp_path / "rep"), "--target", "big=1e8"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "rep" / "collapse_points.csv").exists() and (tmp_path / "rep" / "law.png").exists()
    assert "big" in (tmp_path / "rep" / "law.txt").read_text()


def test_plan_shows_memory_gpu_hours_and_chosen_tp_for_the_paper_grid():
    out = CliRunner().invoke(main, ["plan", str(REPO / "configs" / "paper.yaml")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    header = lines[0].split()
    assert header[-3:] == ["tp", "mem_gib_per_gpu", "gpu_hours"]
    rows = [line.split() for line in lines[1:] if "-llama_r" in line]
    assert len(rows) == 80 and {r[-3] for r in rows} == {"1"}  # TP=1 fits 80 GB for every size
    assert all(0 < float(r[-2]) < 72 for r in rows)
    total = next(line for line in lines if line.startswith("estimated "))
    hours = float(total.split()[1].replace(",", ""))
    assert hours == pytest.approx(sum(float(r[-1].replace(",", "")) for r in rows), rel=0.01)
    assert "fits 90% of executor.gpu_memory_gb 80 GiB" in total
    # the same grid as an adaptive ladder's start ratios: its fixed-grid price is the table's (one GPU-hour model)
    paper_ratios = load_config(REPO / "configs" / "paper.yaml").grid.ratios
    ratios = f"grid.start_ratios=[{', '.join(f'{r:g}' for r in paper_ratios)}]"
    ladder = CliRunner().invoke(main, ["plan", str(REPO / "configs" / "paper.yaml"), "--set", "grid.ratios=adaptive",
                                       "--set", ratios])
    line = next(line for line in ladder.output.splitlines() if line.startswith("adaptive ladder:"))
    assert f"against 80 cells, ~{hours:,.0f} GPU-h for the start ratios" in line and "MFU 52%" in line, line
    code, err = run(["plan", str(REPO / "configs" / "paper.yaml"), "--set", "executor.gpu_memory_gb=4"])
    assert code == 2 and len(err) == 1 and "does not fit executor.gpu_memory_gb 4" in err[0]


def test_prepare_reports_what_it_wrote(tmp_path):
    args = ["prepare", str(REPO / "configs" / "tiny.yaml"), "--set", f"output_root={tmp_path}"]
    code, lines = run(args)
    assert code == 0, lines
    assert "4 cells" in lines[-1] and "published now" in lines[-1] and "knowledge-L" in lines[-1]
    code, lines = run(args)
    assert code == 0 and "everything was already prepared" in lines[-1]
