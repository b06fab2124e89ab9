"""Cell checkpoints with megatron.core.dist_checkpointing: never half-written, resumable at any layout.

    CKPT/step_00000120/      one complete checkpoint (dist_checkpointing files + kislurm.json, written last)
    CKPT/latest              the name of the newest complete checkpoint (replaced atomically)
    CKPT/.tmp-step_00000140/ a checkpoint being written; never loaded, removed by the next save

All ranks write into the temporary folder, each its own share (megatron's fully parallel save strategy deals the
replicated tensors over the DP ranks, so DP rank 0 does not write everything); rank 0 then adds kislurm.json,
renames the folder into place (atomic on POSIX), replaces `latest`, and deletes all but the newest `keep`
checkpoints. A process killed at any moment leaves either the previous checkpoint or the new one as `latest`.
Loading checks the recorded cell id first, so a folder belonging to another cell is refused with a one-line
TrainError instead of silently resuming the wrong model.

Two formats of megatron's distributed optimizer state (GPU; the CPU optimizer is always per parameter):
  routine saves  `dp_reshardable`: every rank writes its own DP shard of the buffers, no gather anywhere; it resumes
                 at any DP degree but the same TP x PP;
  the final save `fully_reshardable`: gathered into the canonical per-parameter shapes on DP rank 0 (a whole
                 optimizer on one rank, once per cell), resumable at any layout: the one kept for reuse.
After DONE a cell keeps none, the final weights (CKPT/final/, model only: resumable at any layout as an
initialisation) or the full final checkpoint (train.keep_final).

Asynchronous saves (train.async_save): megatron's writer runs in a forked process while training goes on; the
publishing step (kislurm.json, rename, `latest`) runs when every rank's writes are done (AsyncSaver.finalize, a
collective at step boundaries), so `latest` never names a checkpoint that is still being written.

Contents: the model's sharded state dict, the optimizer's (anything with megatron's MegatronOptimizer interface:
`sharded_state_dict(model_sd, is_loading=...)` and `load_state_dict(sd)`), a JSON-able `state` dict (step, scheduler,
loss history, ...), and each rank's RNG states (restored only when the TP x DP layout is unchanged).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from kislurm.train.distributed import TrainError
from kislurm.publish import atomic_write_json, atomic_write_text, publish as publish_path
from kislurm.train.workarounds import require_megatron, use_in_process_results_queue

META_FILE = "kislurm.json"
LATEST_FILE = "latest"
FINAL_DIR = "final"
ROUTINE_FORMAT = "dp_reshardable"
"""Routine saves: each rank writes its own shard of the distributed optimizer's buffers (no gather)."""
FINAL_FORMAT = "fully_reshardable"
"""The final checkpoint: per parameter, in the canonical shapes, resumable at another TP or DP degree (megatron's
default, fully_sharded_model_space, cannot even be saved by megatron-core 0.16.1: "ShardedTensor.flattened_range
is not supported")."""
PER_PARAMETER = "per_parameter"
"""The CPU optimizer's state: sharded exactly like the parameters, so resumable at any layout."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class ShardedOptimizer(Protocol):
    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False,
                           metadata: dict | None = None) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    meta: dict


class SaveCadence:
    """When a routine checkpoint is due: the decision torchtitan's CheckpointManager makes in `_should_save` (its
    step interval, the last step, a forced save), made here for kislurm's cadences (train.checkpoint_interval steps,
    train.checkpoint_minutes, or by default after every evaluation) and the stop signal, in one place beside the
    code that saves. It only decides (Trainer.save_checkpoint saves); the clock is a parameter so that the rule is
    tested without waiting."""

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.every_minutes, self._clock = every_steps, every_minutes, clock
        self._last_save = clock()

    @property
    def after_evaluations(self) -> bool:
        """With no cadence configured, a checkpoint follows every evaluation (the default)."""
        return not self.every_steps and not self.every_minutes

    def scheduled(self, total: int) -> list[int]:
        """The steps before the last where the step cadence saves: training must pause there."""
        return list(range(self.every_steps, total, self.every_steps)) if self.every_steps else []

    def clock_due(self) -> bool:
        """Whether checkpoint_minutes have passed since the last save. One rank's clock alone may decide (the clocks
        of different nodes need not agree): the cell asks it on rank 0 after every step and all-reduces the answer,
        which comes back as should_save's `timed`."""
        return bool(self.every_minutes) and self._clock() - self._last_save >= 60.0 * self.every_minutes

    def should_save(self, step: int, *, evaluated: bool = False, stopping: bool = False, last: bool = False,
                    timed: bool = False) -> bool:
        """Whether to checkpoint where training paused at `step`, after any evaluation there (every rank passes the
        same arguments, so every rank takes the same decision, as a save is collective):
          - stopping (the stop signal, agreed by all ranks): always, so that the requeued job resumes here;
          - timed (clock_due, as rank 0 answered it): always, the last step included;
          - otherwise never at step 0 (nothing trained) nor at the last step (Trainer.finish writes what
            train.keep_final keeps there);
          - after an evaluation, when no cadence is configured;
          - at every multiple of every_steps."""
        if stopping or timed:
            return True
        if step == 0 or last:
            return False
        return evaluated and self.after_evaluations or bool(self.every_steps) and step % self.every_steps == 0

    def saved(self) -> None:
        """A checkpoint was just written: the minutes cadence counts from now."""
        self._last_save = self._clock()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "metadata.json").is_file()


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path / META_FILE}: unreadable checkpoint record ({e}); fix: delete {path}") from None


def find_latest(ckpt_dir: Path) -> CheckpointInfo | None:
    """The newest complete checkpoint: the `latest` pointer, or (pointer lost) the highest complete step folder."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    pointer = ckpt_dir / LATEST_FILE
    candidates: list[Path] = []
    if pointer.is_file():
        candidates.append(ckpt_dir / pointer.read_text().strip())
    candidates += sorted((p for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name)), reverse=True)
    for path in candidates:
        if _STEP_DIR.match(path.name) and _is_complete(path):
            meta = _read_meta(path)
            return CheckpointInfo(path=path, step=int(meta["step"]), meta=meta)
    return None


def check_cell(ckpt_dir: Path, cell_id: str) -> CheckpointInfo | None:
    """The latest checkpoint in `ckpt_dir`, after checking it belongs to `cell_id` (TrainError otherwise)."""
    info = find_latest(ckpt_dir)
    if info is not None and info.meta.get("cell_id") != cell_id:
        raise TrainError(f"{ckpt_dir}: checkpoints belong to cell {info.meta.get('cell_id')}, not to cell {cell_id}; "
                         f"fix: give this cell its own checkpoint folder, or delete {ckpt_dir} to start afresh")
    return info


def rng_state_object(is_loading: bool) -> ShardedObject:
    """This rank's RNG states as one shard per (TP rank, DP rank) of a checkpoint (public for tools/bench_checkpoint.py,
    which saves the same contents the old way)."""
    tp, dp = _layout()["tp"], _layout()["dp"]
    state = None if is_loading else {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("kislurm.rng_state", state, (tp, dp),
                         (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()),
                         replica_id=0)


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


_WRITER_HOOK_INSTALLED = False


def _die_with_parent() -> None:
    """In a forked child: ask Linux to SIGKILL it when its parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _writers_die_with_trainer() -> None:
    """megatron forks writer processes for every save; a trainer killed mid-save (SIGKILL, OOM) would leave them
    orphaned and blocked forever on their result queues, holding the job's pipes open. On Linux, forked children
    of this process are therefore asked to die with it (what they were writing was a temporary folder anyway)."""
    global _WRITER_HOOK_INSTALLED
    if not _WRITER_HOOK_INSTALLED and sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=_die_with_parent)
        _WRITER_HOOK_INSTALLED = True


# Registered by its user, at import (kislurm.train.workarounds stays importable without megatron-core).
require_megatron("in-process-results-queue", "kislurm.train.workarounds.use_in_process_results_queue",
                 "dist_checkpointing's writer returns results through a spawn-context Manager process",
                 tested_upto="0.16.1")


def is_distributed(optimizer: Any) -> bool:
    """Whether `optimizer` is (or wraps) megatron's distributed optimizer, whose state has formats."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "optimizer", optimizer)  # TorchAdamCheckpointFix wraps it
    return any(isinstance(o, DistributedOptimizer) for o in getattr(inner, "chained_optimizers", [inner]))


def recorded_format(optimizer: Any, fmt: str) -> str:
    """The format a save in `fmt` really writes: formats exist for the distributed optimizer only."""
    return fmt if is_distributed(optimizer) else PER_PARAMETER


def _optimizer_metadata(fmt: str) -> dict[str, str]:
    return {"distrib_optim_sharding_type": fmt}


def _save_strategy() -> Any:
    """megatron's default torch_dist writer, with the replicated tensors' writes dealt over the DP group."""
    strategy = get_default_save_sharded_strategy()
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, parallel_state.get_data_parallel_group())
    return strategy


class AsyncSaver:
    """megatron's AsyncCallsQueue for one trainer: at most one save in flight; `finalize` publishes it."""

    def __init__(self) -> None:
        self.queue = AsyncCallsQueue()

    def finalize(self, blocking: bool = False) -> None:
        """Publish a finished save (collective: every rank calls it at the same step boundary)."""
        self.queue.maybe_finalize_async_calls(blocking=blocking)

    @property
    def in_flight(self) -> bool:
        return self.queue.get_num_unfinalized_calls() > 0

    def close(self) -> None:
        self.finalize(blocking=True)
        self.queue.close()


def save(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: ShardedOptimizer | None, cell_id: str,
         state: dict[str, Any], keep: int = 2, fmt: str = ROUTINE_FORMAT, saver: AsyncSaver | None = None,
         folder: str | None = None) -> Path:
    """Write a checkpoint of `step` (collective: every rank calls it); returns its folder. Without an optimizer it
    holds the model's weights only. With `saver` the write is asynchronous and published by saver.finalize."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / (folder or step_dir_name(step))
    tmp = ckpt_dir / f".tmp-{final.name}"
    started = time.perf_counter()
    if saver is not None:
        saver.finalize(blocking=True)  # the previous save is published before this one starts
    if _is_rank0():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while saving
        tmp.mkdir()
    _barrier()
    if saver is None:
        use_in_process_results_queue()
    _writers_die_with_trainer()
    model_sd = model.sharded_state_dict()
    sharded: dict[str, Any] = {"model": model_sd, "kislurm": {"step": step, "cell_id": cell_id}}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                            metadata=_optimizer_metadata(fmt))
        sharded["rng_state"] = rng_state_object(is_loading=False)
    meta = {"cell_id": cell_id, "step": step, "layout": _layout(), "state": state,
            "kind": "full" if optimizer is not None else "weights",
            "optimizer_format": recorded_format(optimizer, fmt)}

    def publish() -> None:
        _barrier()
        if _is_rank0():
            meta["save_seconds"] = round(time.perf_counter() - started, 3)
            atomic_write_json(tmp / META_FILE, meta)
            if final.exists():  # a complete checkpoint of the same step (saved again after a resume): replace it
                shutil.rmtree(final)
            publish_path(tmp, final)
            if optimizer is not None:
                atomic_write_text(ckpt_dir / LATEST_FILE, final.name + "\n")
                _prune(ckpt_dir, keep)
        _barrier()

    request = dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_save_strategy(),
                                      async_sharded_save=saver is not None)
    if saver is None:
        publish()
    else:
        request.add_finalize_fn(publish)
        saver.queue.schedule_async_request(request)
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any stale temporary folders."""
    steps = sorted((p for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name)), reverse=True)
    for old in steps[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_dir.glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load(info: CheckpointInfo, model: torch.nn.Module, optimizer: ShardedOptimizer) -> dict[str, Any]:
    """Load model, optimizer and (same layout only) RNG states from `info`; returns the saved `state` dict."""
    layout = _layout()
    same_layout = info.meta.get("layout") == layout
    fmt = info.meta.get("optimizer_format", FINAL_FORMAT)  # checkpoints written before formats were recorded
    fmt = FINAL_FORMAT if fmt == PER_PARAMETER else fmt  # megatron's metadata for a non-distributed optimizer
    saved = info.meta.get("layout", {})
    if fmt == ROUTINE_FORMAT and (saved.get("tp"), saved.get("pp")) != (layout["tp"], layout["pp"]):
        raise TrainError(f"{info.path} is a routine checkpoint ({fmt}) saved at TP={saved.get('tp')} "
                         f"PP={saved.get('pp')}, which resumes only at the same TP x PP (this job: TP={layout['tp']} "
                         f"PP={layout['pp']}); fix: resume at the saved layout, or from a final (fully_reshardable) "
                         "checkpoint")
    model_sd = model.sharded_state_dict()
    sharded: dict[str, Any] = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=_optimizer_metadata(fmt))}
    if same_layout:
        sharded["rng_state"] = rng_state_object(is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(info.path))
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    return dict(info.meta.get("state", {}))


def load_weights(path: Path, model: torch.nn.Module) -> dict:
    """Load the model weights of a checkpoint folder (a final `weights` one or any full one) into `model`, at any
    TP degree (collective); returns its kislurm.json record."""
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])
    return _read_meta(Path(path))


def keep_after_done(ckpt_dir: Path, keep_final: str) -> None:
    """Rank 0, after the cell's store is complete: delete what `keep_final` does not keep. `weights` keeps
    CKPT/final (written by the trainer before the store was completed), `full` the newest step checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    keep = {"none": set(), "weights": {FINAL_DIR}, "full": set()}[keep_final]
    if keep_final == "full":
        latest = find_latest(ckpt_dir)
        keep = {latest.path.name, LATEST_FILE} if latest is not None else set()
    for entry in ckpt_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
