"""Submission planning: resources per cell, arrays per shape and size, dry-run scripts, refusals."""

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from kislurm.plan.loader import config_from_dict, load_config
from kislurm.plan.grid import expand
from kislurm.cluster.executors import resources_for
from kislurm.cluster.submit import SubmitError, check_cluster, dry_run, write_plan

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "paper_dryrun.sbatch"


def normalise(text: str) -> str:
    """Machine-specific parts (the absolute run folder, python) replaced so the reference holds anywhere; option
    names such as `--output=` stay (a path starts at its first `/`)."""
    text = re.sub(r"/\S*/runs/paper", "RUN", text)
    return re.sub(r"/\S*/python3?(\.\d+)? -u", "PYTHON -u", text)


def test_paper_dry_run_matches_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "paper.yaml")
    text = normalise(dry_run(cfg, expand(cfg)))
    if os.environ.get("KISLURM_UPDATE_REFERENCES"):
        REFERENCE.write_text(text)
    assert text == REFERENCE.read_text(), (
        "the rendered sbatch scripts changed; if intended, rerun with KISLURM_UPDATE_REFERENCES=1 and review the diff")


def test_resources_from_parallel_layout():
    presets = load_config(REPO / "configs" / "paper.yaml").presets
    ex = config_from_dict({"executor": {"gpus_per_node": 8}}).executor
    r = resources_for(replace(presets["760M-llama"], tensor_parallel=2), ex)  # TP 2 x DP 8 = 16 GPUs = 2 nodes
    assert (r.nodes, r.tasks_per_node, r.gpus_per_node) == (2, 8, 8)
    cpu = config_from_dict({"models": {"t": {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
                                             "tensor_parallel": 2}}, "grid": {"sizes": ["t"]}})
    r = resources_for(cpu.presets["t"], cpu.executor)
    assert (r.nodes, r.tasks_per_node, r.gpus_per_node) == (1, 2, 0)


def test_tasks_per_node_places_ranks_and_must_divide_the_world():
    model = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "tensor_parallel": 2, "data_parallel": 2}
    cfg = config_from_dict({"models": {"t": model}, "grid": {"sizes": ["t"]}, "executor": {"tasks_per_node": 2}})
    r = resources_for(cfg.presets["t"], cfg.executor)  # TP inside a node, DP across the two
    assert (r.nodes, r.tasks_per_node, r.gpus_per_node) == (2, 2, 0)
    odd = config_from_dict({"models": {"t": model}, "grid": {"sizes": ["t"]}, "executor": {"tasks_per_node": 3}})
    with pytest.raises(SubmitError, match="4 ranks .* does not fill nodes of 3 ranks; fix: make "
                                          "executor.tasks_per_node"):
        resources_for(odd.presets["t"], odd.executor)
    gpu = config_from_dict({"models": {"g": {**model, "data_parallel": 4, "device": "gpu"}}, "grid": {"sizes": ["g"]}, "train": {"micro_batch_size": 8},
                            "executor": {"gpus_per_node": 4, "tasks_per_node": 8}})
    with pytest.raises(SubmitError, match="tasks_per_node 8 is more than the 4 GPUs of a node"):
        resources_for(gpu.presets["g"], gpu.executor)


def test_srun_args_pass_through_after_kill_on_bad_exit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [0.5]},
                            "executor": {"cluster": "slurm", "srun_args": ["--container-image=nvcr.io/nvidia/pytorch:25.01-py3"]}})
    srun = next(ln for ln in dry_run(cfg, expand(cfg)).splitlines() if ln.startswith("srun "))
    assert "--kill-on-bad-exit=1 --container-image=nvcr.io/nvidia/pytorch:25.01-py3 " in srun, srun


def test_time_override_in_slurm_format():
    cfg = config_from_dict({"executor": {"time": "1-02:30:00"}})
    assert resources_for(cfg.presets["cpu-s"], cfg.executor).timeout_min == 26 * 60 + 30


def test_arrays_split_at_max_array_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [i / 11 for i in range(1, 11)]},
                            "executor": {"cluster": "slurm", "max_array_size": 3}})
    text = dry_run(cfg, expand(cfg))
    assert re.findall(r"#SBATCH --array=(\S+)", text) == ["0-2%2", "0-2%2", "0-2%2", "0-0%1"]


def test_slurm_requested_without_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    cfg = config_from_dict({"executor": {"cluster": "slurm"}})
    with pytest.raises(SubmitError, match="sbatch was not found on this machine; fix: submit from a Slurm login "
                                          "node, or set executor.cluster: local"):
        check_cluster(cfg.executor)


def test_changed_config_for_existing_cell_is_refused(tmp_path):
    base = {"output_root": str(tmp_path), "grid": {"sizes": ["cpu-s"], "ratios": [0.5]}}
    cfg = config_from_dict(base)
    run = write_plan(cfg, expand(cfg))
    assert (run.root / "config.yaml").exists() and len(list(run.cells.glob("*/cell.json"))) == 1
    changed = config_from_dict({**base, "train": {"lr": 1e-3}})
    with pytest.raises(SubmitError, match="already exists .* with a different config .*fix: use a new experiment "
                                          "name, or --force"):
        write_plan(changed, expand(changed))
    write_plan(changed, expand(changed), force=True)
    assert len(list(run.cells.glob("*/cell.json"))) == 2
    write_plan(cfg, expand(cfg))  # the same config again is fine


def test_signal_lead_follows_the_measured_save_time(tmp_path):
    from kislurm.train import checkpoint
    from kislurm.publish import atomic_write_json
    from kislurm.cluster.executors import measured_save_s, sbatch_parameters, signal_delay_s

    assert (signal_delay_s(60), signal_delay_s(2)) == (90, 15)  # nothing measured yet
    assert signal_delay_s(60, save_s=10.0) == 90  # a fast save keeps the floor
    assert signal_delay_s(600, save_s=240.0) == 540  # twice the save plus a minute
    assert signal_delay_s(10, save_s=1000.0) == 300  # at most half the time limit

    cfg = load_config(REPO / "configs" / "tiny.yaml", {"output_root": str(tmp_path), "grid.ratios": [0.3, 0.6]})
    cells = expand(cfg)
    run = write_plan(cfg, cells)
    assert measured_save_s(run, cells) is None
    step = run.cell(cells[1].name).checkpoints / checkpoint.step_dir_name(40)
    step.mkdir(parents=True)
    atomic_write_json(step / "metadata.json", {})  # what dist_checkpointing writes; kislurm.json last
    atomic_write_json(step / checkpoint.META_FILE, {"cell_id": cells[1].cell_id, "step": 40, "save_seconds": 150.0})
    assert measured_save_s(run, cells) == 150.0
    res = resources_for(cells[0].model, cfg.executor)
    assert sbatch_parameters(res, cfg.executor, "x", 150.0)["signal_delay_s"] == 360
    fixed = replace(cfg.executor, signal_lead_s=200)
    assert sbatch_parameters(res, fixed, "x", 150.0)["signal_delay_s"] == 200
