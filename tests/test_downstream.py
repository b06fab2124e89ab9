"""Downstream scores through lm-eval with kislurm's scorer as the model (kislurm.retention.downstream), on a tiny
prepared run (configs/tiny.yaml): the cell's probes as an lm-eval task give lm-eval an `acc` equal to the store's
probe accuracy, at DP=1, DP=2 and TP=2; ties are counted; in-loop scores survive a SIGKILL and are recorded once;
`kislurm downstream` scores final weights and skips what it has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the kislurm[eval] extra")
XDIST_GROUP = "downstream"  # one worker trains the module's cell once (tests/conftest.py)

from conftest import run_two_tasks  # noqa: E402

from kislurm.cluster.submit import write_plan  # noqa: E402
from kislurm.data import prepare as data  # noqa: E402
from kislurm.plan.loader import load_config  # noqa: E402
from kislurm.plan.grid import expand  # noqa: E402
from kislurm.retention.downstream import (PROBE_TASK, TEXT_TASK, KislurmLM, metric_name,  # noqa: E402
                                          probe_documents, run_tasks, write_probe_task)
from kislurm.retention.evaluate import EvalError, evaluate_retention  # noqa: E402
from kislurm.retention.store import read_cell  # noqa: E402
from kislurm.train.distributed import init_model_parallel, seed_all, teardown  # noqa: E402
from kislurm.train.model import build_model  # noqa: E402
from kislurm.train.trainer import MIN_STEP_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, str(REPO / "jobs" / "run_cell.py")]
ACC = metric_name(PROBE_TASK, "acc")
TIES = metric_name(PROBE_TASK, "ties")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A planned and prepared one-cell run with in-loop downstream scores on the probe task (every 2nd evaluation)."""
    root = tmp_path_factory.mktemp("downstream")
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "output_root": str(root), "grid.sizes": ["cpu-xs"], "grid.ratios": [0.5], "grid.token_budgets": [20480],
        "train.eval_interval": 8, "eval.downstream.tasks": [PROBE_TASK, TEXT_TASK], "eval.downstream.every": 2})
    cell = expand(cfg)[0]
    run = write_plan(cfg, [cell])
    data.prepare_run(cfg, [cell])
    prepared = data.load_prepared(cell.data, run.data, cell.model.seq_length)
    return {"run": run, "cell": cell, "tokenizer": prepared.tokenizer, "probes": data.cell_probes(prepared, cell),
            "root": root}


def _model(world, tp: int = 1, expected_world: int | None = None):
    """The cell's model as its trainer builds it (same seed: the same weights at any TP), untrained."""
    ctx = init_model_parallel(tp, expected_world=expected_world)
    seed_all(world["cell"].seed)
    cell = world["cell"]
    return ctx, build_model(cell.model, world["tokenizer"].vocab_size, cell.train.init_std, "fp32")


def _scores(model, world, task_dir: Path) -> tuple[dict, float, np.ndarray]:
    """lm-eval's metrics on the probe task, and the probe accuracy and scores of kislurm's own evaluation."""
    result = run_tasks(model, world["tokenizer"], [PROBE_TASK], [task_dir], batch_size=64)
    retention = evaluate_retention(model, world["probes"], 64, exact_match=False)
    return result.metrics, float(retention.probe_correct.mean()), retention.scores


@pytest.fixture(scope="module")
def task_dir(world) -> Path:
    return write_probe_task(world["probes"], world["tokenizer"], world["root"] / "task").parent


def test_probe_task_keeps_the_store_order_and_tokens(world, task_dir):
    docs = [json.loads(line) for line in (task_dir / f"{PROBE_TASK}.jsonl").read_text().splitlines()]
    probes, tok = world["probes"], world["tokenizer"]
    assert len(docs) == len(probes.prompt) > 20
    for doc, prompt, cands, answer in zip(docs, probes.prompt, probes.candidates, probes.answer):
        assert tok.encode(doc["query"]) == prompt.tolist() and doc["gold"] == answer
        assert [tok.encode(c) for c in doc["choices"]] == [c.tolist() for c in cands]
        assert all(c.startswith(" ") for c in doc["choices"])  # the delimiter is in the candidate: target_delimiter ""


def test_lm_eval_acc_equals_probe_accuracy(world, task_dir):
    ctx, model = _model(world)
    try:
        metrics, probe_acc, scores = _scores(model, world, task_dir)
    finally:
        teardown(ctx)
    n = len(world["probes"].prompt)
    top2 = np.sort(scores, axis=1)[:, -2:]
    assert metrics[TIES] == np.sum(top2[:, 1] - top2[:, 0] < 1e-5) == 0
    assert metrics[metric_name(PROBE_TASK, "n")] == n
    assert metrics[ACC] == pytest.approx(probe_acc, abs=1e-12)
    assert 0 < probe_acc < 1


def test_ties_are_counted_not_hidden(world, task_dir):
    """A model whose logits are all equal scores every candidate of a length alike: lm-eval's argmax picks the first
    of tied choices (acc above the probes', where a tie is wrong), and each tied document is counted."""
    ctx, model = _model(world)
    try:
        with torch.no_grad():
            model.decoder.final_layernorm.weight.zero_()
            model.decoder.final_layernorm.bias.zero_()
        metrics, probe_acc, scores = _scores(model, world, task_dir)
    finally:
        teardown(ctx)
    top2 = np.sort(scores, axis=1)[:, -2:]
    tied = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-5))
    n = len(world["probes"].prompt)
    assert metrics[TIES] == tied > 0
    assert probe_acc < metrics[ACC] <= probe_acc + tied / n


def _dp2_and_tp2(world_spec: dict, task_dir: str) -> list:
    """One task of a 2-task submitit job: the probe task at TP=2 (DP=1), then at DP=2 (TP=1), in one process
    group (megatron's groups are rebuilt; the process group is torn down once)."""
    torch.set_num_threads(1)
    out, first = [], None
    try:
        for tp in (2, 1):
            ctx, model = _model(world_spec, tp, expected_world=2)
            first = first or ctx
            out.append((tp, _scores(model, world_spec, Path(task_dir))[:2]))
    finally:
        teardown(first)
    return out


def test_same_acc_at_dp2_and_tp2(world, task_dir, tmp_path):
    ctx, model = _model(world)
    try:
        reference, probe_acc, _ = _scores(model, world, task_dir)
    finally:
        teardown(ctx)
    spec = {k: world[k] for k in ("cell", "tokenizer", "probes")}
    ranks = run_two_tasks(tmp_path / "jobs", _dp2_and_tp2, spec, str(task_dir), timeout_min=5)
    assert len(ranks) == 2
    for per_rank in ranks:
        assert [tp for tp, _ in per_rank] == [2, 1]
        for _, (metrics, acc) in per_rank:
            assert acc == probe_acc
            assert metrics[ACC] == pytest.approx(probe_acc, abs=1e-12) and metrics[TIES] == 0


def test_rolling_loglikelihood_sums_every_token_once(world):
    """lm-eval's rolling windows over a text longer than the model's L = 32 positions (its docstring: EOD first,
    windows predicting L tokens each, the last one with a full context): the total equals the sum of each token's
    log-probability given its window's context, computed here token by token."""
    from lm_eval.api.instance import Instance

    from kislurm.retention.evaluate import score_continuations

    tok = world["tokenizer"]
    text = " ".join(tok.decode(p) for p in world["probes"].prompt[:12])
    ids = tok.encode(text)
    assert len(ids) > 2 * 32
    ctx, model = _model(world)
    try:
        lm = KislurmLM(model, tok, batch_size=16)
        [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        full, n = [tok.eod, *ids], len(ids)
        window_end = [min(n, (j // 32 + 1) * 32) for j in range(n)]  # token j is predicted by window j // 32
        contexts = [np.asarray(full[max(0, b - 32):j + 1], np.int64) for j, b in enumerate(window_end)]
        each, _, _ = score_continuations(model, contexts, [np.asarray([t], np.int64) for t in ids], 16)
    finally:
        teardown(ctx)
    windowed = each.sum()
    assert total == pytest.approx(windowed, abs=1e-3) and total < 0


def test_generation_tasks_and_missing_task_files_are_refused(world, task_dir):
    with pytest.raises(EvalError, match="generate_until.*fix:"):
        KislurmLM.generate_until(None, [])
    with pytest.raises(EvalError, match="no_such_task.yaml: no such task file.*fix:"):
        run_tasks(None, world["tokenizer"], [str(task_dir / "no_such_task.yaml")], [task_dir])


def test_probes_whose_text_tokenizes_otherwise_are_refused(world):
    """A candidate spelled out character by character decodes to the same text, which lm-eval would tokenize
    canonically: scores of other sequences, so the task is refused instead."""
    probes, tok = world["probes"], world["tokenizer"]
    text = tok.decode(probes.candidates[3][0])
    spelled = np.array([i for ch in text for i in tok.encode(ch)], dtype=np.int32)
    assert len(spelled) > len(probes.candidates[3][0])
    cands = [list(row) for row in probes.candidates]
    cands[3][0] = spelled
    bad = type(probes)(probes.fact_ids, probes.fact_group, probes.fact_index, probes.heldout, probes.prompt, cands,
                       probes.answer, probes.n_choices)
    with pytest.raises(EvalError, match="probe 3: .* does not tokenize back.*fix:"):
        probe_documents(bad, tok)


# ----------------------------------------------------------------------------------------------------------------
# In the training loop, and after it


def _last_step(store: Path) -> int:
    return int(read_cell(store, matrix=False).step[-1]) if store.exists() and read_cell(store, matrix=False).step.size \
        else 0


@pytest.fixture(scope="module")
def trained(world):
    """The cell trained with in-loop downstream scores, SIGKILLed once just after storing a scored evaluation
    (before or after its checkpoint: either way the resumed run redoes what follows its checkpoint), then resumed."""
    run, cell = world["run"], world["cell"]
    store = run.cell(cell.name).store
    due = cell.eval_steps[::2]  # every 2nd evaluation, from the first; the last is one of them here
    assert due[-1] == cell.eval_steps[-1] and len(due) == 3
    proc = subprocess.Popen([*ENTRY, str(run.root), cell.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, MIN_STEP_ENV: "0.1"})
    deadline = time.monotonic() + 300
    while _last_step(store) < due[1]:
        assert proc.poll() is None and time.monotonic() < deadline, "the cell stored no scored evaluation"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_cell(store, matrix=False)
    assert not killed_at.complete
    subprocess.run([*ENTRY, str(run.root), cell.name], check=True, capture_output=True, timeout=300)
    return {**world, "due": due, "killed_steps": killed_at.step.tolist(), "store": read_cell(store)}


def test_in_loop_scores_survive_a_kill_and_are_recorded_once(trained):
    rec, cell, due = trained["store"], trained["cell"], trained["due"]
    assert rec.complete and rec.step.tolist() == cell.eval_steps  # each evaluation once, none lost
    assert due[1] in trained["killed_steps"] and len(rec.meta["writers"]) == 2
    acc, ties = rec.metrics[ACC], rec.metrics[TIES]
    scored = ~np.isnan(acc)
    assert rec.step[scored].tolist() == due  # every 2nd evaluation and the last; NaN in between
    probe_acc = rec.probe_correct.mean(axis=1)
    n = rec.probe_correct.shape[1]
    for row in np.flatnonzero(scored):  # lm-eval's acc is the probes' accuracy of the same step's weights
        assert probe_acc[row] <= acc[row] <= probe_acc[row] + ties[row] / n
    bpb = rec.metrics[metric_name(TEXT_TASK, "bits_per_byte")]
    assert np.array_equal(np.isnan(bpb), ~scored) and (bpb[scored] > 0).all()
    assert bpb[scored][-1] < bpb[scored][0]  # training lowers the held-out text's bits per byte
    info = rec.meta["downstream"]
    assert info["lm_eval_version"] == __import__("importlib.metadata").metadata.version("lm_eval")
    assert set(info["task_hashes"]) == {PROBE_TASK, TEXT_TASK} and info["tasks"] == [PROBE_TASK, TEXT_TASK]


@pytest.fixture(scope="module")
def final_scores(trained):
    """`kislurm downstream RUN --tasks kislurm_probes` run once on the trained cell: its output and downstream.json."""
    from click.testing import CliRunner

    from kislurm.cli import main

    run, cell = trained["run"], trained["cell"]
    first = CliRunner().invoke(main, ["downstream", str(run.root), "--tasks", PROBE_TASK])
    assert first.exit_code == 0, first.output
    return run.cell(cell.name).root / "downstream.json"


def test_cli_scores_final_weights_once(trained, final_scores):
    from click.testing import CliRunner

    from kislurm.cli import main

    cell, rec = trained["cell"], trained["store"]
    scored = json.loads(final_scores.read_text())["tasks"][PROBE_TASK]
    assert scored["metrics"]["acc"] == pytest.approx(rec.metrics[ACC][-1], abs=1e-12)  # final weights = last step
    assert scored["step"] == cell.eval_steps[-1] and scored["limit"] is None
    again = CliRunner().invoke(main, ["downstream", str(trained["run"].root), "--tasks", PROBE_TASK])
    assert again.exit_code == 0 and "skipped" in again.output
    assert json.loads(final_scores.read_text())["tasks"][PROBE_TASK] == scored


@pytest.mark.slurm
def test_on_slurm_each_cell_scores_as_an_array_task(trained, final_scores, slurm_cluster, tmp_path):
    """A copy of the run whose executor is Slurm: its cell is scored by a submitit array task, to the record the
    local scoring wrote (but the seconds); a rerun submits nothing; a task that fails is one line naming it."""
    import shutil

    import yaml
    from click.testing import CliRunner

    from kislurm.cli import main

    run, cell = trained["run"], trained["cell"]
    copy = tmp_path / run.root.name
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("submitit", "downstream.json"))
    spec = yaml.safe_load((copy / "config.yaml").read_text())
    spec.setdefault("executor", {}).update(cluster="slurm", time="10", prepare_cpus=1)  # ids do not change
    (copy / "config.yaml").write_text(yaml.safe_dump(spec))
    scored = CliRunner().invoke(main, ["downstream", str(copy), "--tasks", PROBE_TASK])
    assert scored.exit_code == 0, scored.output
    assert "submitted 1 downstream task(s) as Slurm array" in scored.output
    results = list((copy / "submitit" / "downstream").rglob("*_result.pkl"))
    assert len(results) == 1  # ran as a Slurm job, through submitit

    def without_seconds(path: Path) -> dict:
        record = json.loads(path.read_text())
        return {**record, "tasks": {t: {k: v for k, v in r.items() if k != "seconds"}
                                    for t, r in record["tasks"].items()}}
    there = without_seconds(copy / "cells" / run.cell(cell.name).root.name / "downstream.json")
    assert there == without_seconds(final_scores)
    again = CliRunner().invoke(main, ["downstream", str(copy), "--tasks", PROBE_TASK])
    assert again.exit_code == 0 and "skipped" in again.output and "submitted" not in again.output, again.output
    assert list((copy / "submitit" / "downstream").rglob("*_result.pkl")) == results

    folder = copy / "cells" / run.cell(cell.name).root.name
    (folder / "downstream.json").unlink()
    shutil.rmtree(folder / "checkpoints" / "final")  # the task fails on its node: one line naming it, exit 2
    failed = CliRunner().invoke(main, ["downstream", str(copy), "--tasks", PROBE_TASK])
    assert failed.exit_code == 2, failed.output
    lines = [line for line in failed.output.splitlines() if line.startswith("the downstream task of cell")]
    assert len(lines) == 1 and cell.name in lines[0] and "no final weights" in lines[0], failed.output
    assert "1 of 1 cells' downstream tasks failed" in failed.output and not (folder / "downstream.json").exists()


def test_on_slurm_gpu_cells_score_on_their_partition_with_one_gpu_cpu_cells_as_preparation(tmp_path):
    """The sbatch scripts (rendered by submitit) of a GPU cell's and a CPU cell's scoring task: one process, the
    cells' time limit; a GPU and the cells' partition for GPU cells, the preparation job's CPUs for CPU ones."""
    from kislurm.train.workarounds import render_sbatch

    from kislurm.cluster.downstream_job import slurm_parameters

    executor = {"executor.cluster": "slurm", "executor.partition": "gpus", "executor.prepare_partition": "cpus",
                "executor.cpus_per_task": 6, "executor.prepare_cpus": 2}

    def script(config: str, sizes: list[str]) -> str:
        cfg = load_config(REPO / "configs" / config, {**executor, "grid.sizes": sizes})
        cells = expand(cfg)[:2]
        params = slurm_parameters(cfg, cells, cells[0].model.device == "gpu")
        return render_sbatch(command="true", folder=tmp_path / "%j", map_count=2, **params)
    gpu, cpu = script("paper.yaml", ["137M-llama"]), script("tiny.yaml", ["cpu-xs"])
    assert all(line in gpu for line in ["#SBATCH --partition=gpus", "#SBATCH --gpus-per-node=1",
                                         "#SBATCH --cpus-per-task=6", "#SBATCH --ntasks-per-node=1",
                                         "#SBATCH --time=2880", "#SBATCH --job-name=kislurm-paper-downstream"]), gpu
    assert all(line in cpu for line in ["#SBATCH --partition=cpus", "#SBATCH --cpus-per-task=2",
                                         "#SBATCH --ntasks-per-node=1"]), cpu
    assert "gpus" not in cpu.replace("#SBATCH --partition=cpus", "") and "hold" not in gpu + cpu


def test_aggregate_reports_downstream_vs_ratio_and_collapses_on_it(trained, final_scores, tmp_path):
    """The report table holds both sources for the cell; analysis.metric set to a downstream metric runs the
    retention machinery on it."""
    import yaml

    from kislurm.analysis.aggregate import aggregate_runs

    run = trained["run"]
    config = yaml.safe_load(run.config.read_text())
    config["analysis"] = {**config.get("analysis", {}), "metric": ACC, "bootstrap": 20}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    lines: list[str] = []
    result = aggregate_runs([run.root], out=tmp_path / "reports", config=tmp_path / "config.yaml",
                            echo=lines.append)
    rows = list(__import__("csv").DictReader((tmp_path / "reports" / "downstream.csv").open()))
    assert {(r["source"], r["task"], r["metric"]) for r in rows} == {
        ("in-loop", PROBE_TASK, "acc"), ("final weights", PROBE_TASK, "acc"),
        *(("in-loop", TEXT_TASK, m) for m in ("bits_per_byte", "byte_perplexity", "word_perplexity"))}
    final = trained["store"].metrics
    for r in rows:
        assert float(r["mean"]) == pytest.approx(final[metric_name(r["task"], r["metric"])][-1], rel=1e-9)
    assert (tmp_path / "reports" / "downstream_vs_ratio.png").stat().st_size > 1000
    assert any(line.startswith(f"downstream scores of 1 cells on {TEXT_TASK}, {PROBE_TASK}") for line in lines)
    assert [c.size for c in result.collapses] == [trained["cell"].size]  # the downstream metric's collapse rows
    assert json.loads((tmp_path / "reports" / "collapse_points.json").read_text())

    table = tmp_path / "reports" / "downstream.csv"

    def again() -> list[str]:
        said: list[str] = []
        aggregate_runs([run.root], out=tmp_path / "reports", config=tmp_path / "config.yaml", echo=said.append)
        return said
    assert not any(line.startswith("downstream scores") for line in again())  # nothing new: the reports stand
    later = table.stat().st_mtime + 10
    os.utime(final_scores, (later, later))  # kislurm downstream ran again since
    assert any(line.startswith("downstream scores") for line in again())


def test_without_the_extra_the_command_says_what_to_install(world):
    """lm-eval absent (a None entry in sys.modules makes its import fail): one line naming kislurm[eval], exit 2."""
    code = ("import sys; sys.modules['lm_eval'] = None; from kislurm.cli import main; "
            f"main(['downstream', {str(world['run'].root)!r}, '--tasks', 'arc_easy'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if "lm-eval" in line]
    assert len(lines) == 1 and "fix: pip install 'kislurm[eval]'" in lines[0]


def test_in_loop_scores_change_no_other_result(trained, tmp_path):
    """The same cell without eval.downstream (the same id: eval settings are not part of it) trains and probes
    exactly alike: lm-eval leaves the RNGs and the model as it found them."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "output_root": str(tmp_path), "grid.sizes": ["cpu-xs"], "grid.ratios": [0.5], "grid.token_budgets": [20480],
        "train.eval_interval": 8})
    cell = expand(cfg)[0]
    assert cell.cell_id == trained["cell"].cell_id
    run = write_plan(cfg, [cell])
    data.prepare_run(cfg, [cell])
    subprocess.run([*ENTRY, str(run.root), cell.name], check=True, capture_output=True, timeout=300)
    plain, with_scores = read_cell(run.cell(cell.name).store), trained["store"]
    assert not any(k.startswith("downstream/") for k in plain.metrics)
    np.testing.assert_array_equal(plain.train_loss, with_scores.train_loss)
    np.testing.assert_array_equal(plain.probe_correct, with_scores.probe_correct)
    for name, series in plain.metrics.items():
        np.testing.assert_array_equal(series, with_scores.metrics[name], err_msg=name)
