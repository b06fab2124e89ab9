"""The train: section (TrainConfig) and a model size's overrides of it (TrainOverrides).

A module of its own because a model preset carries TrainOverrides (kislurm.plan.presets), which is derived from
TrainConfig, and the experiment schema (kislurm.plan.config) holds both: this module sits below the two.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from kislurm.plan.fields import NOT_IN_ID, check


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, shared by every cell (the grid varies size, ratio, tokens and seed only), except where a model
    preset overrides a field for its size (ModelPreset.train)."""

    micro_batch_size: int = 16
    """Sequences per forward pass per data-parallel rank."""
    global_batch_size: int = 32
    """Sequences per optimiser step; a multiple of micro_batch_size x data_parallel."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_frac: float = 0.02
    """Share of the steps spent warming up linearly."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    init_std: float = 0.02
    """Weight initialisation std (small embeddings matter: unit variance leaves tiny models stuck at chance)."""
    eval_interval: int = 100
    """Optimiser steps between retention evaluations (the last step is always evaluated)."""
    log_interval: int = 20
    """Optimiser steps between loss / tokens-per-second log lines."""
    checkpoint_interval: int = 0
    """Optimiser steps between checkpoints. With checkpoint_minutes also 0, a checkpoint follows every evaluation;
    otherwise checkpoints follow this cadence only, and evaluations after the last checkpoint are redone after a
    restart (the resume contract)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: fp32 on CPU, bf16 on GPU."""
    checkpoint_minutes: float = field(default=0.0, metadata=NOT_IN_ID)
    """Also checkpoint once this many minutes have passed since the last save (rank 0's clock, agreed by every rank
    at a step boundary); 0 = off. Not part of the cell's id: cadence changes no result."""
    keep_final: Literal["none", "weights", "full"] = field(default="weights", metadata=NOT_IN_ID)
    """What a DONE cell keeps: nothing; its final weights (CKPT/final, the model only, bf16 on GPU: 2 bytes per
    parameter, resumable at any layout as an initialisation); or the full final checkpoint (weights, optimizer
    state in the reshardable format, RNG: about 16 bytes per parameter on GPU). Not part of the cell's id."""
    async_save: bool = field(default=False, metadata=NOT_IN_ID)
    """Write checkpoints asynchronously (megatron's dist_checkpointing async save: a forked writer while training
    goes on; published at the next step boundary once every rank's writes are done). Not part of the cell's id."""
    overlap_dp_comm: bool = field(default=True, metadata=NOT_IN_ID)
    """GPU: overlap the DP gradient reduce-scatter with the backward pass and the distributed optimizer's parameter
    all-gather with the next forward (megatron DDP's overlap_grad_reduce / overlap_param_gather); CPU cells never
    overlap. Not part of the cell's id."""
    timeout_startup_min: float = field(default=30.0, metadata=NOT_IN_ID)
    """Longest time a rank may spend starting up (process group, indices, model, checkpoint load) before the cell
    fails naming the phase; as the other timeouts, not part of the cell's id."""
    timeout_step_min: float = field(default=10.0, metadata=NOT_IN_ID)
    """Longest time one training step (its collectives included) may take: a peer rank that died or hung fails the
    cell within this bound, not after the process group's 30 minutes."""
    timeout_eval_min: float = field(default=30.0, metadata=NOT_IN_ID)
    """Longest time one retention evaluation may take."""
    timeout_save_min: float = field(default=10.0, metadata=NOT_IN_ID)
    """Longest time one checkpoint save may take."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "global_batch_size", "eval_interval", "log_interval"):
            check(getattr(self, key) >= 1, key, f"expected a positive integer, got {getattr(self, key)}")
        check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
              f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        check(0 < self.lr < 1, "lr", f"expected a learning rate in (0, 1), got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"expected a value in [0, 1], got {self.min_lr_ratio}")
        check(0 <= self.warmup_frac < 1, "warmup_frac", f"expected a value in [0, 1), got {self.warmup_frac}")
        check(self.weight_decay >= 0, "weight_decay", "expected a non-negative weight decay")
        check(self.clip_grad >= 0, "clip_grad", "expected a non-negative clipping threshold (0 disables)")
        check(self.init_std > 0, "init_std", "expected a positive std")
        check(self.checkpoint_interval >= 0, "checkpoint_interval", "expected >= 0 (0 = at every evaluation)")
        check(self.checkpoint_minutes >= 0, "checkpoint_minutes", "expected >= 0 (0 = off)")
        check(self.keep_final in ("none", "weights", "full"), "keep_final",
              f"expected none, weights or full, got {self.keep_final!r}")
        for key in ("timeout_startup_min", "timeout_step_min", "timeout_eval_min", "timeout_save_min"):
            check(getattr(self, key) > 0, key, f"expected a positive number of minutes, got {getattr(self, key)}")


def _train_overrides_class() -> type:
    """TrainOverrides: every TrainConfig field, optional (None = the run's value), so none can be forgotten."""
    hints = typing.get_type_hints(TrainConfig)
    cls = dataclasses.make_dataclass(
        "TrainOverrides", [(f.name, Optional[hints[f.name]], None) for f in dataclasses.fields(TrainConfig)],
        frozen=True)
    cls.__module__ = __name__  # pickles by reference (cells travel to compute nodes pickled)
    cls.__doc__ = ("A model preset's per-size training overrides: any TrainConfig field (see there), unset fields "
                   "keep the run's train: value (ModelPreset.train, effective_train).")
    return cls


TrainOverrides = _train_overrides_class()

