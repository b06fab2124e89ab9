"""Trainer, checkpoints and layouts against real megatron-core, real gloo groups and a real submitit LocalExecutor.

Multi-process runs go through submitit's LocalExecutor with tasks_per_node=2 (the code path a Slurm job takes);
the kill test runs this file as a worker script (`python tests/test_train.py worker ...`) and SIGKILLs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_two_tasks
from kislurm.train import checkpoint, distributed
from kislurm.plan.config import ConfigError, DataConfig, EvalConfig
from kislurm.plan.loader import config_from_dict
from kislurm.plan.presets import BUILTIN_PRESETS, ModelPreset
from kislurm.plan.training import TrainConfig
from kislurm.train.model import padded_vocab_size
from kislurm.plan.grid import Cell
from kislurm.train.trainer import Trainer, TrainError, lr_at, sample_ids

torch.set_num_threads(1)
VOCAB = 96
SEQ = 32


class SyntheticLM(torch.utils.data.Dataset):
    """Arithmetic token sequences (learnable), in megatron GPTDataset's item format; item i depends only on i."""

    def __init__(self, n: int, seq: int = SEQ, vocab: int = VOCAB):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        start, stride = int(torch.randint(0, self.vocab, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        seq = (start + stride * torch.arange(self.seq + 1)) % self.vocab
        mask = torch.ones(self.seq)
        if i % 5:
            mask[-(i % 5):] = 0  # some samples end in padding (loss_mask 0)
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": mask, "position_ids": torch.arange(self.seq)}


def make_cell(steps: int, *, size: str = "cpu-s", tp: int = 1, dp: int = 1, mbs: int = 4, gbs: int = 8,
              seed: int = 0, **train: object) -> Cell:
    preset = dataclasses.replace(BUILTIN_PRESETS[size], tensor_parallel=tp, data_parallel=dp, seq_length=SEQ)
    tc = TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, lr=3e-3, warmup_frac=0.1, log_interval=10,
                     **train)  # type: ignore[arg-type]
    return Cell(size=size, ratio=0.5, tokens=steps * gbs * SEQ, seed=seed, model=preset, data=DataConfig(),
                train=tc, eval=EvalConfig())


def run_trainer(cell: Cell, ckpt_dir: Path, ctx: distributed.DistContext, upto: int | None = None,
                save_at: tuple[int, ...] = ()) -> Trainer:
    trainer = Trainer(cell, SyntheticLM(cell.n_samples), ckpt_dir, VOCAB, ctx, log=lambda _m: None)
    while trainer.step < (upto or trainer.total_steps):
        trainer.train_steps(1)
        if trainer.step in save_at:
            trainer.save_checkpoint()
    return trainer


def train_losses(cell: Cell, ckpt_dir: Path, ctx: distributed.DistContext, upto: int | None = None,
                 save_at: tuple[int, ...] = ()) -> list[float]:
    return list(run_trainer(cell, ckpt_dir, ctx, upto, save_at).losses)


@pytest.fixture(scope="module")
def tp1():
    ctx = distributed.init_model_parallel(tp=1)
    yield ctx
    distributed.teardown(ctx)


# -- pure pieces --------------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_frac=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert lr_at(0, 100, TrainConfig(lr=1e-3, warmup_frac=0.0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("gbs,mbs,dp", [(8, 4, 1), (8, 2, 2), (12, 3, 2), (16, 4, 4)])
def test_sample_ids_partition_each_step_exactly(gbs, mbs, dp):
    for step in (0, 1, 7):
        ranks = [sample_ids(step, gbs, mbs, dp, r) for r in range(dp)]
        flat = [i for r in ranks for mb in r for i in mb]
        assert flat == list(range(step * gbs, (step + 1) * gbs))
        assert all(len(mb) == mbs for r in ranks for mb in r)


# -- one process --------------------------------------------------------------------------------------------------


ARCHS = pytest.mark.parametrize("size", ["cpu-s", "cpu-s-llama"])  # GPT-2 and Llama (RoPE, SwiGLU, RMSNorm, GQA)


@ARCHS
def test_loss_is_masked_mean_and_decreases(tp1, tmp_path, size):
    cell = make_cell(40, size=size)
    data = SyntheticLM(cell.n_samples)
    lines: list[str] = []
    trainer = Trainer(cell, data, tmp_path, VOCAB, tp1, log=lines.append)
    with torch.no_grad():  # the step-0 loss by hand, from the untrained model
        items = [data[i] for i in range(8)]
        stack = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        per_token = trainer.model(stack["tokens"], stack["position_ids"], None, labels=stack["labels"])
        expected = float((per_token * stack["loss_mask"]).sum() / stack["loss_mask"].sum())
    first = trainer.train_steps(1)
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    rest = trainer.train_steps(100)  # clamped to the cell's 40 steps
    assert trainer.step == trainer.total_steps == 40 and rest["steps"] == 39
    assert sum(trainer.losses[-5:]) / 5 < 0.8 * sum(trainer.losses[:5]) / 5
    assert rest["tokens_per_s"] > 0 and "mfu" not in rest
    assert [ln.split()[1] for ln in lines] == ["10/40", "20/40", "30/40", "40/40"]
    assert "loss" in lines[0] and "tokens/s" in lines[0]
    assert trainer.train_steps(5)["steps"] == 0


def test_same_seed_same_losses_other_seed_differs(tp1, tmp_path):
    a = train_losses(make_cell(5), tmp_path / "a", tp1)
    b = train_losses(make_cell(5), tmp_path / "b", tp1)
    c = train_losses(make_cell(5, seed=1), tmp_path / "c", tp1)
    assert a == b and a != c


@ARCHS
def test_checkpoint_resume_is_exact_and_keeps_two(tp1, tmp_path, size):
    cell = make_cell(12, size=size)
    reference = train_losses(cell, tmp_path / "ref", tp1)
    ck = tmp_path / "ck"
    first = train_losses(cell, ck, tp1, upto=9, save_at=(3, 6, 9))
    assert first == reference[:9]
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000006", "step_00000009"]
    assert (ck / "latest").read_text().strip() == "step_00000009"
    meta = json.loads((ck / "step_00000009" / checkpoint.META_FILE).read_text())
    assert meta["cell_id"] == cell.cell_id and meta["step"] == 9 and meta["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    resumed = train_losses(cell, ck, tp1)
    assert resumed == reference  # bitwise: model, AdamW state, schedule and data position all restored


def test_half_written_and_lost_pointer_fall_back_to_complete_checkpoint(tp1, tmp_path):
    cell = make_cell(8)
    reference = train_losses(cell, tmp_path / "ref", tp1)
    ck = tmp_path / "ck"
    train_losses(cell, ck, tp1, upto=4, save_at=(2, 4))
    # a save killed half-way: a temporary folder with some files, and a step folder without its record
    (ck / ".tmp-step_00000006").mkdir()
    (ck / ".tmp-step_00000006" / "__0_0.distcp").write_bytes(b"partial")
    (ck / "step_00000007").mkdir()
    (ck / "latest").unlink()
    assert checkpoint.find_latest(ck).step == 4
    assert train_losses(cell, ck, tp1) == reference


def test_checkpoint_of_another_cell_is_refused_in_one_line(tp1, tmp_path):
    train_losses(make_cell(2), tmp_path, tp1, save_at=(2,))
    other = make_cell(2, seed=5)
    with pytest.raises(TrainError) as e:
        Trainer(other, SyntheticLM(other.n_samples), tmp_path, VOCAB, tp1)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "fix:" in msg and other.cell_id in msg


def test_bad_inputs_give_one_line_errors(tp1, tmp_path):
    # TP not dividing the heads: the config's own check, on every path that builds a layout
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        dataclasses.replace(BUILTIN_PRESETS["cpu-s"], tensor_parallel=3)
    with pytest.raises(ConfigError, match="tensor_parallel 3 does not divide") as e:
        config_from_dict({"grid": {"sizes": ["odd"]},
                          "models": {"odd": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                             "tensor_parallel": 3}}})
    assert "\n" not in str(e.value)
    cell = make_cell(2)
    fake_tp3 = dataclasses.replace(tp1, tp=3)  # a job launched with a TP the preset's heads do not allow
    with pytest.raises(TrainError, match="tensor_parallel 3 does not divide num_attention_heads 4; fix:"):
        Trainer(cell, SyntheticLM(cell.n_samples), tmp_path, VOCAB, fake_tp3)
    # a GPU preset on a machine without GPUs
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="no CUDA GPU is visible") as e:
            distributed.setup(BUILTIN_PRESETS["137M"])
        assert "\n" not in str(e.value)
        gpu_cell = dataclasses.replace(cell, model=dataclasses.replace(cell.model, device="gpu"))
        with pytest.raises(TrainError, match="device: gpu preset but this process runs on cpu"):
            Trainer(gpu_cell, SyntheticLM(cell.n_samples), tmp_path, VOCAB, tp1)
    # too few samples, bf16 on CPU
    with pytest.raises(TrainError, match="dataset has 3 samples"):
        Trainer(cell, SyntheticLM(3), tmp_path, VOCAB, tp1)
    bf16 = dataclasses.replace(cell, train=dataclasses.replace(cell.train, precision="bf16"))
    with pytest.raises(TrainError, match="bf16 needs a GPU"):
        Trainer(bf16, SyntheticLM(cell.n_samples), tmp_path, VOCAB, tp1)


# -- two processes through submitit's LocalExecutor ---------------------------------------------------------------


def _job_train(cell: Cell, ckpt_dir: str, save_at: tuple[int, ...]) -> dict:
    """Runs in each task of a submitit job: the same setup a Slurm task does."""
    import submitit

    torch.set_num_threads(1)
    ctx = distributed.setup(cell.model)
    try:
        trainer = run_trainer(cell, Path(ckpt_dir), ctx, save_at=save_at)
        return {"rank": ctx.rank, "tp": ctx.tp, "dp": ctx.dp, "dp_rank": ctx.dp_rank, "losses": trainer.losses,
                "task": submitit.JobEnvironment().global_rank, "params": trainer.params,
                "threads": torch.get_num_threads()}
    finally:
        distributed.teardown(ctx)


def _run_two_tasks(tmp_path: Path, cell: Cell, ckpt_dir: Path, save_at: tuple[int, ...] = ()) -> list[dict]:
    return run_two_tasks(tmp_path / "submitit", _job_train, cell, str(ckpt_dir), save_at)


@ARCHS
def test_tp2_and_dp2_over_two_processes_match_one_process(tp1, tmp_path, size):
    steps = 50
    reference = train_losses(make_cell(steps, size=size), tmp_path / "ref", tp1)

    tp2 = _run_two_tasks(tmp_path, make_cell(steps, size=size, tp=2), tmp_path / "tp2", save_at=(25,))
    assert [(r["tp"], r["dp"], r["task"]) for r in tp2] == [(2, 1, 0), (2, 1, 1)]
    counts = dataclasses.replace(BUILTIN_PRESETS[size], seq_length=SEQ).param_counts(padded_vocab_size(VOCAB))
    assert all(r["params"] == counts and r["threads"] == 1 for r in tp2)  # whole-model counts from a TP shard
    for r in tp2:
        assert len(r["losses"]) == steps
        assert max(abs(a - b) for a, b in zip(r["losses"], reference)) < 1e-5

    dp2 = _run_two_tasks(tmp_path, make_cell(steps, size=size, dp=2), tmp_path / "dp2")
    assert sorted(r["dp_rank"] for r in dp2) == [0, 1]
    for r in dp2:
        assert max(abs(a - b) for a, b in zip(r["losses"], reference)) < 1e-5

    # the TP=2 checkpoint of step 25 resumes in one process (resharded) and continues on the same curve
    resumed = train_losses(make_cell(steps, size=size), tmp_path / "tp2", tp1)
    assert max(abs(a - b) for a, b in zip(resumed[25:], reference[25:])) < 1e-5


# -- SIGKILL at random moments ------------------------------------------------------------------------------------

KILL_STEPS, KILL_EVERY = 60, 3


def _worker(ckpt_dir: str, record: str) -> None:
    """Train the kill-test cell, checkpointing every KILL_EVERY steps; append each event to `record`."""
    torch.set_num_threads(1)
    ctx = distributed.init_model_parallel(tp=1)
    cell = make_cell(KILL_STEPS)
    trainer = Trainer(cell, SyntheticLM(cell.n_samples), Path(ckpt_dir), VOCAB, ctx, log=lambda _m: None)

    def emit(line: str) -> None:
        with open(record, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    emit(f"START {trainer.step}")
    while trainer.step < trainer.total_steps:
        trainer.train_steps(1)
        emit(f"STEP {trainer.step} {trainer.losses[-1]!r}")
        if trainer.step % KILL_EVERY == 0:
            emit(f"SAVE {trainer.step}")
            trainer.save_checkpoint()
    emit(f"DONE {trainer.losses!r}")
    distributed.teardown(ctx)


def _replay(record: Path) -> tuple[dict[int, float], list[int], str | None]:
    """The loss series a store would hold: a START at step r drops records after r (resume reconciliation)."""
    series: dict[int, float] = {}
    starts: list[int] = []
    done = None
    for line in record.read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "START":
            r = int(rest)
            starts.append(r)
            for s in [s for s in series if s > r]:
                del series[s]
            assert sorted(series) == list(range(1, r + 1)), "a resume lost steps before its checkpoint"
        elif kind == "STEP":
            s, loss = rest.split()
            assert int(s) not in series, f"step {s} recorded twice"
            assert int(s) == max(series, default=0) + 1, f"step {s} skipped ahead"
            series[int(s)] = float(loss)
        elif kind == "DONE":
            done = rest
    return series, starts, done


def test_sigkill_at_random_moments_resumes_exactly(tp1, tmp_path):
    reference = train_losses(make_cell(KILL_STEPS), tmp_path / "ref", tp1)
    ck, record = tmp_path / "ck", tmp_path / "record.txt"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", str(ck), str(record)]
    kills = 0
    for attempt in range(15):
        err_file = tmp_path / f"stderr{attempt}.txt"
        with open(err_file, "w") as err:  # a file, not a pipe: nothing the worker leaves behind can block us
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        if kills < 6:
            _wait_for(record, proc, f"START", count=attempt + 1)
            # alternate: a kill a random number of steps in, and a kill right after a checkpoint write began;
            # counted in steps, not seconds, so it lands mid-run on a machine of any speed
            if kills % 2 == 0:
                _wait_for(record, proc, "STEP", count=_count(record, "STEP") + rng.randint(1, 4))
            else:
                _wait_for(record, proc, "SAVE", count=_count(record, "SAVE") + 1)
            time.sleep(rng.uniform(0.0, 0.01))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err_file.read_text()[-2000:]
    assert kills >= 5
    series, starts, done = _replay(record)
    assert done is not None and len(starts) == kills + 1
    assert sorted(series) == list(range(1, KILL_STEPS + 1))
    assert [series[s] for s in range(1, KILL_STEPS + 1)] == reference  # bitwise
    assert eval(done) == reference
    assert not list(ck.glob(".tmp-*")) and len(list(ck.glob("step_*"))) == 2
    assert not _processes_running(str(record)), "a killed trainer left processes behind"


def _processes_running(needle: str) -> list[int]:
    """PIDs whose command line mentions `needle` (the worker and anything it forked)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def _count(record: Path, kind: str) -> int:
    return sum(ln.startswith(kind) for ln in record.read_text().splitlines()) if record.exists() else 0


def _wait_for(record: Path, proc: subprocess.Popen, kind: str, count: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while _count(record, kind) < count:
        if proc.poll() is not None or time.time() > end:
            return
        time.sleep(0.01)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)  # a hung worker says where, instead of hanging the test
    _worker(sys.argv[2], sys.argv[3])
