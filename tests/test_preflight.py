"""Preflight: the grid's distinct layouts, placement refusals, and a real TP=2 CPU preflight job through submitit's
local executor (gloo), with its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kislurm.cli import main
from kislurm.plan.loader import config_from_dict, load_config
from kislurm.plan.grid import expand, resolve_layouts
from kislurm.cluster.preflight import PreflightError, distinct_layouts, run_preflight, summary_line

REPO = Path(__file__).resolve().parents[1]
LLAMA = {"position_embedding": "rope", "activation": "swiglu", "normalization": "rmsnorm", "tie_embeddings": False}


def test_paper_grid_has_one_layout_per_size():
    cfg = resolve_layouts(load_config(REPO / "configs" / "paper.yaml"))
    layouts = distinct_layouts(cfg, expand(cfg))
    assert [x.name for x in layouts] == [f"{s}_tp1_pp1_dp8_gpu" for s in cfg.grid.sizes]
    assert all((x.cells, x.nodes, x.tasks_per_node) == (16, 1, 8) for x in layouts)


def test_a_tp_group_spanning_nodes_is_refused_in_one_line():
    cfg = config_from_dict({"grid": {"sizes": ["wide"]}, "executor": {"gpus_per_node": 4},
                            "models": {"wide": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
                                                "device": "gpu", "tensor_parallel": 8}}})
    with pytest.raises(PreflightError, match="a TP group of 8 ranks would span nodes of 4 tasks; fix:") as e:
        distinct_layouts(cfg, expand(cfg))
    assert "\n" not in str(e.value)


def _cpu_config(tmp_path: Path, **model) -> dict:
    return {"name": "pf", "output_root": str(tmp_path), "grid": {"sizes": ["l2"], "ratios": [0.5, 0.9]},
            "train": {"micro_batch_size": 4, "global_batch_size": 8}, "executor": {"array_parallelism": 1},
            "models": {"l2": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
                              "seq_length": 32, **LLAMA, **model}}}


def test_tp2_llama_preflight_on_cpu_through_the_local_executor(tmp_path):
    cfg = config_from_dict(_cpu_config(tmp_path, tensor_parallel=2))
    layouts = distinct_layouts(cfg, expand(cfg))
    assert [(x.name, x.cells) for x in layouts] == [("l2_tp2_pp1_dp1_cpu", 2)]
    [report] = run_preflight(cfg, layouts, steps=6, folder=tmp_path / "pf")
    assert report["passed"], report
    checks = report["checks"]
    assert checks["tp_groups_on_one_host"]["ok"] and len(checks["tp_groups_on_one_host"]["hosts"]) == 1
    assert checks["resume_exact"]["max_abs_diff"] == 0.0 and checks["resume_exact"]["saved_at"] == 3
    assert checks["tp_matches_tp1"]["ok"] and checks["tp_matches_tp1"]["max_abs_diff"] < 1e-5
    assert len(report["losses"]) == 6 and report["tokens_per_s"] > 0 and report["mfu"] is None
    # the plain-PyTorch GPT of the same shape, same job: a measurement (never a speed assertion)
    base = report["baseline"]
    assert base["tokens_per_s"] > 0 and base["megatron_tokens_per_s_per_rank"] == report["tokens_per_s"] / 2
    assert base["ratio"] > 0 and base["mfu"] is None and base["samples_per_step"] == 8
    assert checks["dp_eval"] == {"ok": None, "skipped": "data_parallel 1: nothing to split"}
    assert "baseline_ratio" not in checks  # off by default
    on_disk = json.loads((tmp_path / "pf" / "preflight" / "l2_tp2_pp1_dp1_cpu" / "report.json").read_text())
    assert on_disk == report
    line = summary_line(report)
    assert line.startswith("l2_tp2_pp1_dp1_cpu: passed; tp_groups_on_one_host ok; resume_exact ok") and "\n" not in line
    assert f"ratio {base['ratio']:.2f} (megatron per rank / plain)" in line


def test_preflight_dry_run_lists_layouts_and_refusals_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cpu_config(tmp_path, tensor_parallel=2)))
    out = CliRunner().invoke(main, ["preflight", str(cfg), "--dry-run"])
    assert out.exit_code == 0 and out.output.strip() == "l2_tp2_pp1_dp1_cpu: 2 cells, 1 node(s) x 2 tasks"
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"grid": {"sizes": ["wide"]}, "executor": {"gpus_per_node": 4},
                               "models": {"wide": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
                                                   "device": "gpu", "tensor_parallel": 8}}}))
    out = CliRunner().invoke(main, ["preflight", str(bad), "--dry-run"])
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and "would span nodes" in lines[0]


def test_submit_after_preflight_runs_missing_preflights_then_submits(tmp_path):
    sets = ["--set", f"output_root={tmp_path}", "--set", "grid.sizes=[cpu-xxs]", "--set", "grid.ratios=[0.5]"]
    tiny = str(REPO / "configs" / "tiny.yaml")
    out = CliRunner().invoke(main, ["submit", tiny, "--after-preflight", *sets])
    assert out.exit_code == 0, out.output
    assert "cpu-xxs_tp1_pp1_dp1_cpu: passed" in out.output and "preflight: every layout passed" in out.output
    assert "1 of 1 cells to submit" in out.output
    again = CliRunner().invoke(main, ["submit", tiny, "--after-preflight", *sets])
    assert again.exit_code == 0 and ": passed" not in again.output, again.output  # the passing report is kept
    split = CliRunner().invoke(main, ["submit", tiny, "--after-preflight", *sets, "--set", "grid.sizes=[m]",
                                      "--set", "executor.tasks_per_node=1", "--set", "train.micro_batch_size=16",
                                      "--set", "models.m={num_layers: 1, hidden_size: 16, num_attention_heads: 2, "
                                               "seq_length: 32, tensor_parallel: 2}"])
    assert split.exit_code == 2, split.output
    err = [line for line in split.output.splitlines() if line.startswith("kislurm: error:")]
    assert len(err) == 1 and "a TP group of 2 ranks would span nodes of 1 tasks" in err[0]
    assert "cells to submit" not in split.output  # refused before anything was planned or submitted


def test_a_minimum_baseline_ratio_fails_a_layout_below_it(tmp_path):
    """--min-baseline-ratio turns the measurement into a check: no megatron run is a million times faster than the
    plain model, so this one fails (exit 1) and says which check."""
    sets = ["--set", f"output_root={tmp_path}", "--set", "grid.sizes=[cpu-xxs]", "--set", "grid.ratios=[0.5]"]
    tiny = str(REPO / "configs" / "tiny.yaml")
    out = CliRunner().invoke(main, ["preflight", tiny, "--steps", "2", "--min-baseline-ratio", "1e6", *sets])
    assert out.exit_code == 1, out.output
    assert "cpu-xxs_tp1_pp1_dp1_cpu: FAILED;" in out.output and "baseline_ratio FAILED" in out.output
    bad = CliRunner().invoke(main, ["preflight", tiny, "--min-baseline-ratio", "0", *sets])
    assert bad.exit_code == 2 and "min-baseline-ratio" in bad.output
