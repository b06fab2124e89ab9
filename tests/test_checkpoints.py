"""Checkpoint policy of a real cell (jobs/run_cell.py on a tiny megatron-core GPT): what a DONE cell keeps
(train.keep_final), checkpoints on a time cadence, and asynchronous saves that end in the same record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kislurm.train import checkpoint
from kislurm.plan.loader import load_config
from kislurm.data.prepare import cell_probes, load_prepared, prepare_run
from kislurm.train.distributed import init_model_parallel, seed_all, teardown
from kislurm.retention.evaluate import evaluate_retention
from kislurm.train.model import build_model
from kislurm.plan.grid import expand, size_cells
from kislurm.retention.store import read_cell
from kislurm.cluster.submit import write_plan
from kislurm.train.trainer import MIN_STEP_ENV

REPO = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, str(REPO / "jobs" / "run_cell.py")]


def run_cell(root: Path, env: dict | None = None, **train):
    """Plan, prepare and run one 20-step cpu-xs cell with these train settings; returns (run, cell, log)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "output_root": str(root), "grid.sizes": ["cpu-xs"], "grid.ratios": [0.5], "grid.token_budgets": [10240],
        "train.eval_interval": 10, **{f"train.{k}": v for k, v in train.items()}})
    cell = expand(cfg)[0]
    run = write_plan(cfg, [cell])
    prepare_run(cfg, [cell])
    subprocess.run([*ENTRY, str(run.root), cell.name], check=True, capture_output=True, timeout=600,
                   env={**os.environ, **(env or {})})
    return cfg, run, cell, run.cell(cell.name).log.read_text()


def test_keep_final_none_weights_full(tmp_path):
    _, run, cell, _ = run_cell(tmp_path / "none", keep_final="none")
    assert list(run.cell(cell.name).checkpoints.iterdir()) == []

    _, run, cell, _ = run_cell(tmp_path / "full", keep_final="full")
    ck = run.cell(cell.name).checkpoints
    assert sorted(p.name for p in ck.iterdir()) == ["latest", checkpoint.step_dir_name(cell.steps)]
    assert checkpoint.find_latest(ck).meta["kind"] == "full"

    cfg, run, cell, _ = run_cell(tmp_path / "weights")  # the default
    ck = run.cell(cell.name).checkpoints
    assert [p.name for p in ck.iterdir()] == [checkpoint.FINAL_DIR]
    # The kept weights are the trained model: evaluated afresh they give the store's last record exactly.
    prepared = load_prepared(cell.data, run.data, cell.model.seq_length)
    ctx = init_model_parallel(1)
    try:
        seed_all(cell.seed + 1)  # not the training seed: every weight must come from the checkpoint
        model = build_model(cell.model, prepared.tokenizer.vocab_size, cell.train.init_std, "fp32")
        meta = checkpoint.load_weights(ck / checkpoint.FINAL_DIR, model)
        result = evaluate_retention(model, cell_probes(prepared, cell), cell.eval.batch_size)
    finally:
        teardown(ctx)
    assert meta["kind"] == "weights" and meta["step"] == cell.steps
    rec = read_cell(run.cell(cell.name).store)
    np.testing.assert_array_equal(rec.probe_correct[-1], result.probe_correct)
    for name, series in rec.metrics.items():
        assert series[-1] == pytest.approx(result.metrics[name], abs=1e-6, nan_ok=True), name


def test_checkpoints_on_a_time_cadence(tmp_path):
    """Every step lasts at least 0.1 s and a checkpoint is due every 0.06 s: one after each of the 20 steps, none
    tied to the evaluations."""
    _, run, cell, log = run_cell(tmp_path, env={MIN_STEP_ENV: "0.1"}, checkpoint_minutes=0.001, keep_final="full")
    saved = [int(line.split("checkpoint step ")[1].split()[0]) for line in log.splitlines() if "checkpoint step" in line]
    assert saved == list(range(1, cell.steps + 1))
    assert read_cell(run.cell(cell.name).store, matrix=False).complete


def test_async_saves_give_the_synchronous_record(tmp_path):
    _, sync_run, cell, _ = run_cell(tmp_path / "sync", keep_final="full")
    _, async_run, _, log = run_cell(tmp_path / "async", keep_final="full", async_save=True)
    assert "checkpoint step 10 scheduled" in log
    ref, got = read_cell(sync_run.cell(cell.name).store), read_cell(async_run.cell(cell.name).store)
    np.testing.assert_array_equal(got.probe_correct, ref.probe_correct)
    np.testing.assert_array_equal(got.train_loss, ref.train_loss)
    final = checkpoint.find_latest(async_run.cell(cell.name).checkpoints)
    assert final.step == cell.steps and json.loads((final.path / checkpoint.META_FILE).read_text())["kind"] == "full"


def test_a_validation_cell_reruns_by_hand_from_its_cell_json(tmp_path):
    """A validation cell (a size and ratio the planner placed, in no grid of the config) runs by hand from its
    cell.json alone; a damaged record is refused in one line."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"output_root": str(tmp_path), "grid.sizes": ["cpu-xs"],
                                                        "grid.token_budgets": [5120], "train.eval_interval": 5})
    cell = size_cells(cfg, "cpu-xxs", [0.37])[0]  # what kislurm validate plans: not in expand(cfg)
    assert cell.name not in {c.name for c in expand(cfg)}
    run = write_plan(cfg, [cell])
    prepare_run(cfg, [cell])
    out = subprocess.run([*ENTRY, str(run.root), cell.name], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rec = read_cell(run.cell(cell.name).store, matrix=False)
    assert rec.complete and list(rec.step) == cell.eval_steps and rec.meta["cell_id"] == cell.cell_id

    spec = run.cell(cell.name).spec
    record = json.loads(spec.read_text())
    record["cell"]["train"]["lr"] = "fast"
    spec.write_text(json.dumps(record))
    bad = subprocess.run([*ENTRY, str(run.root), cell.name], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "cell.json: cell.train.lr: expected a number, got 'fast'" in bad.stderr, bad.stderr


def test_a_checkpoint_at_an_evaluation_step_without_its_evaluation_is_evaluated_on_resume(tmp_path):
    """A stop signal landing on an evaluation step saves there before evaluating. The resumed cell must take the
    store's word, not the checkpoint's, and evaluate that step: here the last evaluation is dropped from a finished
    cell that kept its full checkpoint at that step, and a rerun records it again, equal to the first time."""
    from kislurm.retention.store import RetentionWriter

    _, run, cell, _ = run_cell(tmp_path, keep_final="full")
    paths = run.cell(cell.name)
    before = read_cell(paths.store)
    writer = RetentionWriter.open(paths.store, before.meta, before.fact_ids, before.fact_group,
                                  before.probe_fact_index, before.probe_heldout)
    writer.truncate_after(cell.steps - 1)  # saved at the last step, its evaluation never stored
    writer.close()
    assert not read_cell(paths.store, matrix=False).complete
    out = subprocess.run([*ENTRY, str(run.root), cell.name], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    after = read_cell(paths.store)
    assert after.complete and list(after.step) == cell.eval_steps
    np.testing.assert_array_equal(after.probe_correct, before.probe_correct)
    for name, series in before.metrics.items():
        np.testing.assert_allclose(after.metrics[name], series, rtol=0, atol=1e-6, err_msg=name)
