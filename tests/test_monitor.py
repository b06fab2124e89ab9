"""Runs a user can watch (kislurm.train.monitor): a real tiny cell's TensorBoard event files, read back with TensorBoard's
own EventAccumulator, hold its training scalars and every retention metric of its store at the evaluation steps,
against steps and against tokens; a resumed cell's folder shows each step once; W&B configured without wandb is
one line."""

import importlib.util
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kislurm.orchestrate.run import submit_run
from kislurm.plan.config import ConfigError, MonitorConfig
from kislurm.plan.loader import config_from_dict, load_config
from kislurm.train.monitor import CellMonitor
from kislurm.paths import RunPaths
from kislurm.plan.grid import expand
from kislurm.retention.store import read_cell
from kislurm.train.trainer import lr_at

REPO = Path(__file__).resolve().parents[1]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of one TensorBoard run folder, as TensorBoard itself reads it (purges applied)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_tiny_cell_writes_its_training_and_retention_to_tensorboard(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"output_root": str(tmp_path), "grid.sizes": ["cpu-xxs"],
                                                       "grid.ratios": [0.2], "train.log_interval": 20})
    (cell,) = expand(cfg)
    run = submit_run(cfg, [cell])
    rec = read_cell(run.cell(cell.name).store)
    assert rec.complete and len(cell.eval_steps) >= 2
    tb = run.cell(cell.name).tensorboard
    by_step, by_tokens = scalars(tb / "steps"), scalars(tb / "tokens")

    for metric, values in rec.metrics.items():  # every metric of the store, at the evaluation steps
        assert [s for s, _ in by_step[f"retention/{metric}"]] == cell.eval_steps
        assert [v for _, v in by_step[f"retention/{metric}"]] == pytest.approx(list(values), rel=1e-6, abs=1e-7)
        assert [s for s, _ in by_tokens[f"retention_by_tokens/{metric}"]] == list(rec.tokens)
    # log_interval = eval_interval: each logged loss is the mean over the same steps as the store's train_loss
    assert [s for s, _ in by_step["train/loss"]] == cell.eval_steps
    assert [v for _, v in by_step["train/loss"]] == pytest.approx(list(rec.train_loss), rel=1e-6)
    assert [s for s, _ in by_tokens["train_by_tokens/loss"]] == list(rec.tokens)
    assert [v for _, v in by_step["train/lr"]] == pytest.approx(
        [lr_at(s - 1, cell.steps, cell.train) for s in cell.eval_steps], rel=1e-6)
    assert all(v > 0 for _, v in by_step["train/grad_norm"] + by_step["train/tokens_per_s"])
    assert [v for _, v in by_step["train/skipped_steps"]] == [0.0] * len(cell.eval_steps)
    assert "train/mfu" not in by_step  # CPU: no peak FLOP/s, no MFU


def test_a_resumed_cell_shows_each_step_once(tmp_path):
    """A second session from the checkpoint at step 5 hides the first session's events after step 5 (and keeps step
    5, logged and evaluated before that checkpoint), in both folders."""
    run = RunPaths(tmp_path / "run")
    cell = expand(config_from_dict({"grid": {"sizes": ["cpu-xxs"], "ratios": [0.5]}}))[0]
    per_step = 100

    def session(start: int, steps: range, offset: float) -> None:
        monitor = CellMonitor.open(run, cell, rank=0, start_step=start, tokens_per_step=per_step, cfg=MonitorConfig())
        for s in steps:
            monitor.train({"step": s, "tokens": s * per_step, "loss": offset + s, "lr": 1e-3})
        monitor.retention(steps[-1], steps[-1] * per_step, {"general_acc": offset + steps[-1]})
        monitor.close()

    session(0, range(1, 11), 0.0)  # killed after step 10, with its last checkpoint at step 5
    session(5, range(6, 9), 100.0)
    by_step, by_tokens = (scalars(run.cell(cell.name).tensorboard / d) for d in ("steps", "tokens"))
    expected = [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)]
    assert by_step["train/loss"] == expected
    assert by_tokens["train_by_tokens/loss"] == [(s * per_step, v) for s, v in expected]
    assert by_step["retention/general_acc"] == [(8, 108.0)]  # the first session's step-10 evaluation is hidden


def test_only_rank_0_writes(tmp_path):
    run = RunPaths(tmp_path / "run")
    cell = expand(config_from_dict({"grid": {"sizes": ["cpu-xxs"], "ratios": [0.5]}}))[0]
    other = CellMonitor.open(run, cell, rank=1, start_step=0, tokens_per_step=1, cfg=MonitorConfig())
    other.retention(1, 1, {"general_acc": 0.5})
    other.close()
    assert not run.cell(cell.name).tensorboard.exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_configured_without_wandb_is_one_line(tmp_path):
    cfg = config_from_dict({"monitor": {"wandb": {"project": "kislurm", "entity": "team"}}})
    assert cfg.monitor.wandb.project == "kislurm" and cfg.monitor.tensorboard
    cell = expand(cfg)[0]
    with pytest.raises(ConfigError) as err:
        CellMonitor.open(RunPaths(tmp_path), cell, rank=0, start_step=0, tokens_per_step=1, cfg=cfg.monitor)
    assert "pip install wandb" in str(err.value) and "\n" not in str(err.value)
    assert not RunPaths(tmp_path).cell(cell.name).tensorboard.exists()  # refused before anything was opened


def test_monitor_config_is_checked():
    for section, words in (({"wandb": {"entity": "team"}}, "monitor.wandb.project: required key is missing"),
                           ({"tensorbord": True}, "monitor.tensorbord: unknown key (did you mean tensorboard?)"),
                           ({"wandb": {"project": "p", "mode": "sometimes"}}, "monitor.wandb.mode: expected one of")):
        with pytest.raises(ConfigError) as err:
            config_from_dict({"monitor": section})
        assert words in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_local_submit_refuses_a_missing_wandb_before_any_cell(tmp_path):
    from click.testing import CliRunner

    from kislurm.cli import main

    out = CliRunner().invoke(main, ["submit", str(REPO / "configs" / "tiny.yaml"), "--set", f"output_root={tmp_path}",
                                    "--set", "monitor.wandb={project: kislurm}"])
    assert out.exit_code == 2 and "pip install wandb" in out.output, out.output
    assert not (tmp_path / "tiny").exists()  # nothing written, nothing submitted
