"""Runs a user can watch: per-cell TensorBoard event files and, when configured, a Weights & Biases run.

    RUN/cells/CELL/tensorboard/steps/    x = optimiser step: train/loss, train/lr, train/grad_norm,
                                         train/skipped_steps, train/tokens_per_s, train/mfu (GPU), retention/METRIC
    RUN/cells/CELL/tensorboard/tokens/   x = training tokens: train_by_tokens/loss, retention_by_tokens/METRIC

`tensorboard --logdir RUN` lists each cell as two runs (`cells/CELL/tensorboard/steps` and `.../tokens`); cells of
different sizes and batch sizes are compared on the `*_by_tokens` charts, whose x axis is tokens (the idiom
Megatron-LM uses for "lm loss vs samples": the step of those events is the token count). They are separate
folders because a resumed cell must show each step once: TensorBoard purges a folder's events at and after the
restart step (SummaryWriter's purge_step), and steps and tokens are different units.

The train/ scalars arrive at every train.log_interval (Trainer.on_log): the mean loss over the interval, the lr, grad
norm (before clipping) and cumulative skipped updates of its last step, its throughput. retention/METRIC holds every
metric of the store (kislurm.retention.evaluate) at each evaluation step. Only rank 0 writes; every other rank gets a monitor
that does nothing. W&B (monitor.wandb) gets the same step scalars with `tokens` beside them (choose it as the x axis
in W&B); a resumed cell continues its W&B run, whose redone steps W&B ignores (they repeat the same values, since
resume is exact).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import Any, Mapping, Protocol

from kislurm.plan.config import ConfigError, MonitorConfig, WandbConfig
from kislurm.plan.loader import load_config
from kislurm.paths import RunPaths
from kislurm.plan.grid import Cell

BY_TOKENS = ("train/loss", "retention/")
"""Tags (or tag prefixes) also written against tokens, as `<group>_by_tokens/<name>`."""
TRAIN_KEYS = ("loss", "lr", "grad_norm", "skipped_steps", "tokens_per_s", "mfu")
"""What Trainer.on_log hands over, written as train/<key>."""
FLUSH_S = 30
"""Seconds between TensorBoard flushes while a cell trains (every evaluation is flushed at once)."""


class Sink(Protocol):
    def write(self, step: int, tokens: int, values: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def check_monitor(cfg: MonitorConfig) -> None:
    """Refuse (one line) a monitor whose package is missing, before a cell trains."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("monitor.tensorboard is on but the tensorboard package is not installed; fix: pip install "
                          "tensorboard (a kislurm dependency), or set monitor.tensorboard: false")
    if cfg.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError("monitor.wandb is set but the wandb package is not installed; fix: pip install wandb where "
                          "the cells run, or remove monitor.wandb")


def run_monitor_config(run: RunPaths) -> MonitorConfig:
    """The run's monitor: section (RUN/config.yaml); the defaults where a run folder has no config file."""
    return load_config(run.config).monitor if run.config.is_file() else MonitorConfig()


class TensorBoardSink:
    """Two SummaryWriters: steps/ (x = step) and tokens/ (x = tokens), each purged past the resume point."""

    def __init__(self, folder: Path, start_step: int, tokens_per_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of this folder at or after it, left by an earlier session, are hidden; the step of the
        # checkpoint resumed from was logged and evaluated before it was saved, so it is kept.
        self.steps = SummaryWriter(str(folder / "steps"), purge_step=start_step + 1, flush_secs=FLUSH_S)
        self.tokens = SummaryWriter(str(folder / "tokens"), purge_step=start_step * tokens_per_step + 1,
                                    flush_secs=FLUSH_S)

    def write(self, step: int, tokens: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.steps.add_scalar(tag, value, step)
            if tag.startswith(BY_TOKENS):
                group, _, name = tag.partition("/")
                self.tokens.add_scalar(f"{group}_by_tokens/{name}", value, tokens)

    def flush(self) -> None:
        self.steps.flush()
        self.tokens.flush()

    def close(self) -> None:
        self.steps.close()
        self.tokens.close()


class WandbSink:
    """One W&B run per cell, resumed by a stable id (run folder + cell id) after a requeue."""

    def __init__(self, cfg: WandbConfig, run: RunPaths, cell: Cell):
        import wandb

        run_id = f"{cell.cell_id}-{hashlib.sha256(str(run.root.resolve()).encode()).hexdigest()[:8]}"
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, id=run_id, resume="allow",
                              name=cell.name, group=run.root.name, config=cell.to_json(),
                              dir=str(run.cell(cell.name).root))

    def write(self, step: int, tokens: int, values: Mapping[str, float]) -> None:
        self.run.log({**values, "tokens": tokens}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class CellMonitor:
    """What one cell shows while it trains: scalars against step and tokens, to every configured sink."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @classmethod
    def open(cls, run: RunPaths, cell: Cell, rank: int, start_step: int, tokens_per_step: int,
             cfg: MonitorConfig | None = None) -> "CellMonitor":
        """The cell's monitor; rank 0 reads the run's monitor: section (unless `cfg` is given) and opens its sinks,
        every other rank gets one that does nothing. `start_step`: the step the cell resumes from (0: fresh)."""
        if rank != 0:
            return cls([])
        cfg = cfg if cfg is not None else run_monitor_config(run)
        check_monitor(cfg)
        sinks: list[Sink] = []
        if cfg.tensorboard:
            sinks.append(TensorBoardSink(run.cell(cell.name).tensorboard, start_step, tokens_per_step))
        if cfg.wandb is not None:
            sinks.append(WandbSink(cfg.wandb, run, cell))
        return cls(sinks)

    def scalars(self, step: int, tokens: int, values: Mapping[str, Any]) -> None:
        """Write `values` (tag -> number) at `step` / `tokens`; non-numbers and non-finite values are left out."""
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            for sink in self.sinks:
                sink.write(step, tokens, clean)

    def train(self, record: Mapping[str, float]) -> None:
        """Trainer.on_log's record (step, tokens, loss, lr, grad_norm, skipped_steps, tokens_per_s[, mfu])."""
        self.scalars(int(record["step"]), int(record["tokens"]),
                     {f"train/{k}": record[k] for k in TRAIN_KEYS if k in record})

    def retention(self, step: int, tokens: int, metrics: Mapping[str, float]) -> None:
        """One evaluation's metrics (the store's), flushed at once so a watcher sees it."""
        self.scalars(step, tokens, {f"retention/{k}": v for k, v in metrics.items()})
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
