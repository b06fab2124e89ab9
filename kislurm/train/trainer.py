"""Train one cell: a megatron-core GPT on a deterministic sample order, resumable exactly from its checkpoints.

Step s trains on dataset samples [s*gbs, (s+1)*gbs): data-parallel rank r takes the r-th contiguous slice and cuts
it into micro-batches. The data position is therefore the step, and a resumed cell sees exactly the samples an
uninterrupted one would. The loss is the masked mean over every loss token of the global batch (each micro-batch's
summed loss is divided by the global count of loss tokens, and the DP ranks' gradients are summed), so TP and DP
layouts give the same losses as one process.

Optimiser: AdamW with linear warmup then cosine decay to min_lr_ratio x lr, and gradient-norm clipping.
  CPU: fp32, torch.optim.AdamW over megatron DDP's main_grad buffers (megatron's optimizers need CUDA).
  GPU: bf16 parameters (megatron's Float16Module), megatron's distributed optimizer (fp32 main weights, sharded
       over DP) via get_megatron_optimizer; exercised by tests/test_gpu.py on a GPU node, and it cannot run on a
       CPU-only machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel

from kislurm.train import checkpoint
from kislurm.plan.training import TrainConfig
from kislurm.train.distributed import DistContext, TrainError, rank0_decides, seed_all
from kislurm.plan.estimate import flops_per_token
from kislurm.train.model import build_model, count_parameters, padded_vocab_size, resolve_precision
from kislurm.plan.grid import Cell
from kislurm.train.workarounds import foreach_norms, foreach_scale_, require_megatron

__all__ = ["Trainer", "TrainError", "lr_at", "sample_ids", "CpuAdamW", "TorchAdamCheckpointFix", "PEAK_BF16_FLOPS",
           "zero_adam_state"]

ADAM_BETAS = (0.9, 0.95)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16 peak FLOP/s per GPU by device-name substring, for MFU."""
MIN_STEP_ENV = "KISLURM_MIN_STEP_S"


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio x lr."""
    warmup = int(round(cfg.warmup_frac * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def sample_ids(step: int, global_batch: int, micro_batch: int, dp: int, dp_rank: int) -> list[list[int]]:
    """Dataset indices of DP rank `dp_rank`'s micro-batches at `step`: its contiguous slice of the step's samples
    [step*global_batch, (step+1)*global_batch), cut into micro-batches."""
    per_rank = global_batch // dp
    first = step * global_batch + dp_rank * per_rank
    return [list(range(i, min(i + micro_batch, first + per_rank))) for i in range(first, first + per_rank, micro_batch)]


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Biases and norm weights are not decayed (as megatron's optimizer does)."""
    return p.dim() < 2 or name.endswith(".bias")


class CpuAdamW:
    """torch.optim.AdamW over megatron DDP's main_grad buffers, with megatron's optimizer interface.

    It mirrors megatron's FP32Optimizer (which cannot be built without CUDA): grads come from `main_grad`,
    the norm is computed once over TP shards, and the state is checkpointed sharded like the parameters.
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], cfg: TrainConfig):
        decay = [p for n, p in named_params if not _no_decay(n, p)]
        plain = [p for n, p in named_params if _no_decay(n, p)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS, eps=1e-8, foreach=True)
        self.clip_grad = cfg.clip_grad

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None  # else autograd would accumulate straight into the main_grad buffer it aliases

    @torch.no_grad()
    def step(self) -> tuple[bool, float, None]:
        params = self.parameters()
        for p in params:
            if hasattr(p, "main_grad"):
                p.grad = p.main_grad
        norm = _grad_norm(params)
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
            foreach_scale_([p.grad for p in params], scale)
        self.optimizer.step()
        return True, norm, None

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False,
                           metadata: dict | None = None) -> dict:
        if is_loading:
            zero_adam_state(self.optimizer)
        state = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.parameters())
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        if steps:
            state["state"]["common_step"] = steps.pop()  # one step shared by every parameter
        return state

    def load_state_dict(self, state: dict) -> None:
        step = state["state"].pop("common_step", None)
        if step is not None:
            for s in state["state"].values():
                s["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state)


def zero_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of a torch Adam(W) without state a zero state at step 0, so that a checkpoint has
    tensors to load into (the loaded values replace all of them)."""
    for p in (p for g in optimizer.param_groups for p in g["params"] if not optimizer.state[p]):
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}


def _grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    """Global L2 norm of the gradients: TP shards summed over the TP group, replicated tensors counted once."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = [p.grad for p in params if getattr(p, "tensor_model_parallel", False) or tp_rank == 0]
    sq = torch.stack(foreach_norms(local)).pow(2).sum() if local else torch.zeros(())
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
    return float(sq.sqrt())


def _megatron_gpu_optimizer(ddp: DistributedDataParallel, cfg: TrainConfig) -> Any:
    """megatron's distributed optimizer (bf16 params, fp32 main weights sharded over DP). GPU only."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_cfg = OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio,
                              weight_decay=cfg.weight_decay, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
                              adam_eps=1e-8, bf16=True, params_dtype=torch.bfloat16, clip_grad=cfg.clip_grad,
                              use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    from megatron.core.optimizer import distrib_optimizer

    return optimizer if distrib_optimizer.HAVE_APEX_OR_TE else TorchAdamCheckpointFix(optimizer)


class TorchAdamCheckpointFix:
    """megatron's distributed optimizer on torch.optim.AdamW (no Transformer Engine or Apex), made loadable.

    megatron-core 0.16.1 cannot load its own checkpoint in that fallback: the state of a never-stepped optimizer
    has no 'step' for `state_dict()` to read (an assert), and once it has one, the per-parameter loader copies
    every state key, 'step' included, from a source that holds none (KeyError); and the step it restores is one
    tensor shared by every parameter, which torch's foreach AdamW then advances once per parameter per step
    (wrong bias correction). This wrapper gives a fresh optimizer zero state to load into, loads the
    per-parameter part with 'step' set aside, and gives each parameter its own step again. Everything else is
    the wrapped optimizer's; with TE or Apex installed the wrapper is not used.
    """

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def _distributed(self) -> list[Any]:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False,
                           metadata: dict | None = None) -> dict:
        if is_loading:
            for opt in self._distributed():
                zero_adam_state(opt.optimizer)
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    def load_state_dict(self, state: dict) -> None:
        (opt,) = self._distributed()  # one model chunk, one dtype: what build_model makes
        state = dict(state)
        param_state, kind = state.pop("param_state"), state.pop("param_state_sharding_type")
        opt.load_state_dict(state)  # hyper-parameters and step
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        getattr(opt, f"load_parameter_state_from_{kind}")(param_state)
        for p, step in steps.items():  # megatron gave every parameter one shared tensor, which torch's foreach
            opt.optimizer.state[p]["step"] = step.clone()  # AdamW would then advance once per parameter


require_megatron("torch-adam-checkpoint", "kislurm.train.trainer.TorchAdamCheckpointFix",
                 "megatron's distributed optimizer on torch AdamW (no TE, no Apex) cannot load its own checkpoint and "
                 "shares one step tensor between parameters", tested_upto="0.16.1")


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class Trainer:
    """Trains `cell` on `dataset` (megatron GPTDataset items), resuming from the latest checkpoint in `ckpt_dir`."""

    def __init__(self, cell: Cell, dataset: Any, ckpt_dir: Path, vocab_size: int, dist: DistContext,
                 log: Callable[[str], None] = print, on_log: Callable[[dict[str, float]], None] | None = None):
        self.cell, self.dataset, self.ckpt_dir, self.dist = cell, dataset, Path(ckpt_dir), dist
        self.on_log = on_log  # called at every log line with its numbers (kislurm.train.monitor: TensorBoard, W&B)
        self.last_grad_norm = float("nan")  # of the latest step, before clipping
        self.skipped_steps = 0  # updates the optimizer skipped (non-finite gradients), over the whole cell
        self._log = log if dist.is_main else (lambda _msg: None)
        self.precision = resolve_precision(cell.model, cell.train.precision)
        self._check_inputs(vocab_size)
        # One decision per cell, before building anything: rank 0 reads the checkpoint folder, every rank follows.
        found = rank0_decides(lambda: checkpoint.check_cell(self.ckpt_dir, cell.cell_id), "where to resume")

        seed_all(cell.seed)
        self.model: GPTModel = build_model(cell.model, vocab_size, cell.train.init_std, self.precision)
        if cell.model.init_from is not None and found is None:  # a fresh start from a base model's weights
            from kislurm.plan import hf

            hf.init_from_base(self.model, cell.model)
        gpu = dist.device.type == "cuda"
        # On GPU the DP reduce-scatter of each gradient bucket starts as soon as its gradients are ready, and the
        # parameter all-gather of the distributed optimizer overlaps the next forward (megatron DDP's overlap);
        # on CPU both stay off, so CPU numerics are exactly what they were.
        overlap = gpu and cell.train.overlap_dp_comm
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                                overlap_param_gather=overlap, use_distributed_optimizer=gpu)
        # megatron DDP (contiguous grad buffers, DP all-reduce) where there is more than one replica or on GPU
        # (the distributed optimizer needs it); a lone CPU replica keeps plain .grad (about 4% faster).
        self.ddp = DistributedDataParallel(self.model.config, ddp_cfg, self.model) if gpu or dist.dp > 1 else None
        self.optimizer = _megatron_gpu_optimizer(self.ddp, cell.train) if gpu else \
            CpuAdamW(list(self.model.named_parameters()), cell.train)
        self.params = count_parameters(self.model)
        self.vocab_size = padded_vocab_size(vocab_size)
        self.saver = checkpoint.AsyncSaver() if cell.train.async_save else None
        self._saved: tuple[int, str] | None = None  # (step, format) of the newest checkpoint, known without a read
        self.last_progress = time.time()  # wall time of the last finished step (the heartbeat reports it)
        self.step = 0
        self.losses: list[float] = []  # losses[i]: global loss of the step taking self.step from i to i+1
        self._pending: list[tuple[float, float]] = []  # (loss, seconds) since the last log line
        self._peak = _peak_flops(dist.device)
        # A floor on each step's wall time, for rehearsals and tests that need a cell to outlast its time limit
        # whatever the machine's speed (KISLURM_MIN_STEP_S seconds; unset or 0 in real runs).
        self._min_step_s = float(os.environ.get(MIN_STEP_ENV) or 0.0)
        if found is not None:
            self._resume(found)

    # -- checks ----------------------------------------------------------------------------------------------------

    def _check_inputs(self, vocab_size: int) -> None:
        m, t, d = self.cell.model, self.cell.train, self.dist
        if (m.device == "gpu") != (d.device.type == "cuda"):
            raise TrainError(f"cell {self.cell.name} is a device: {m.device} preset but this process runs on "
                             f"{d.device.type}; fix: set the preset's device to match the machine")
        if m.num_attention_heads % d.tp:
            raise TrainError(f"tensor_parallel {d.tp} does not divide num_attention_heads {m.num_attention_heads}; "
                             "fix: choose a TP degree that divides the head count")
        if t.global_batch_size % (t.micro_batch_size * d.dp):
            raise TrainError(f"global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size x "
                             f"data_parallel ({t.micro_batch_size} x {d.dp}); fix: change the batch sizes")
        if self.precision == "bf16" and d.device.type != "cuda":
            raise TrainError("precision bf16 needs a GPU; fix: set train.precision to auto or fp32 for CPU cells")
        if len(self.dataset) < self.cell.n_samples:
            raise TrainError(f"dataset has {len(self.dataset)} samples but cell {self.cell.name} trains on "
                             f"{self.cell.n_samples}; fix: build the dataset with cell.n_samples samples")
        if vocab_size < 2:
            raise TrainError(f"vocab_size {vocab_size} is too small; fix: pass the tokenizer's vocab_size")

    # -- public API ------------------------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return self.cell.steps

    @property
    def tokens_per_step(self) -> int:
        return self.cell.train.global_batch_size * self.cell.model.seq_length

    def train_steps(self, n: int, stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """Run up to n steps (never past total_steps), ending early after a step at which `stop()` is true (every
        rank must get the same answer: the time-limit flag is all-reduced); returns the steps run, mean loss,
        seconds, tokens/s (and MFU on GPU)."""
        n = max(0, min(n, self.total_steps - self.step))
        losses: list[float] = []
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            loss = self._train_step()
            losses.append(loss)
            if self._min_step_s:
                time.sleep(max(0.0, self._min_step_s - (time.perf_counter() - t0)))
            self._pending.append((loss, time.perf_counter() - t0))
            self.last_progress = time.time()
            if self.step % self.cell.train.log_interval == 0 or self.step == self.total_steps:
                self._log_line()
            if stop is not None and stop():
                break
        n = len(losses)
        seconds = time.perf_counter() - start
        out = {"steps": float(n), "step": float(self.step), "seconds": seconds,
               "loss": sum(losses) / n if n else float("nan"),
               "tokens_per_s": n * self.tokens_per_step / seconds if n and seconds > 0 else float("nan"),
               "lr": lr_at(max(0, self.step - 1), self.total_steps, self.cell.train)}
        if self._peak is not None and n:
            out["mfu"] = self._mfu(out["tokens_per_s"])
        return out

    def save_checkpoint(self, fmt: str = checkpoint.ROUTINE_FORMAT) -> Path:
        """Checkpoint the current step (collective); a no-op if the newest checkpoint already is this step in this
        format (every rank knows it from the resume decision and its own saves: no filesystem read)."""
        path = self.ckpt_dir / checkpoint.step_dir_name(self.step)
        if self._saved == (self.step, checkpoint.recorded_format(self.optimizer, fmt)):
            return path
        with self.params_in_sync():
            checkpoint.save(self.ckpt_dir, self.step, self.model, self.optimizer, self.cell.cell_id, self._state(),
                            fmt=fmt, saver=self.saver)
        self._saved = (self.step, checkpoint.recorded_format(self.optimizer, fmt))
        return path

    def finish(self) -> None:
        """After the last step (collective), before the store is completed: write what train.keep_final keeps
        (CKPT/final weights, or the full checkpoint in the reshardable format) and wait for any async save."""
        keep = self.cell.train.keep_final
        if keep == "full":
            self.save_checkpoint(fmt=checkpoint.FINAL_FORMAT)
        elif keep == "weights":
            with self.params_in_sync():
                checkpoint.save(self.ckpt_dir, self.step, self.model, None, self.cell.cell_id, self._state(),
                                fmt=checkpoint.FINAL_FORMAT, saver=self.saver, folder=checkpoint.FINAL_DIR)
        self.close()

    @contextlib.contextmanager
    def params_in_sync(self) -> Iterator[None]:
        """While active, the model's parameters are this step's (collective). With overlap_param_gather (GPU),
        the distributed optimizer's updated shards are otherwise gathered only by the next forward's pre-hooks,
        so a save or an evaluation would read the previous step's weights: force the gather, as Megatron-LM does
        around its saves and evaluations."""
        overlapped = self.ddp is not None and self.ddp.ddp_config.overlap_param_gather
        if overlapped:
            self.ddp.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            if overlapped:
                self.ddp.enable_forward_pre_hook()

    def poll_saves(self) -> None:
        """Publish a finished asynchronous save (collective; a no-op for synchronous saves)."""
        if self.saver is not None:
            self.saver.finalize(blocking=False)

    def close(self) -> None:
        """Wait for and publish an asynchronous save in flight (collective)."""
        if self.saver is not None:
            self.saver.close()
            self.saver = None

    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "lr": lr_at(max(0, self.step - 1), self.total_steps, self.cell.train),
                "losses": self.losses, "tokens": self.step * self.tokens_per_step,
                "skipped_steps": self.skipped_steps}

    # -- internals -------------------------------------------------------------------------------------------------

    def _resume(self, found: checkpoint.CheckpointInfo) -> None:
        state = checkpoint.load(found, self.model, self.optimizer)
        self.step = int(state["step"])
        self._saved = (self.step, found.meta.get("optimizer_format", checkpoint.FINAL_FORMAT))
        self.losses = [float(x) for x in state.get("losses", [])][: self.step]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._log(f"resumed {self.cell.name} from {found.path} at step {self.step}/{self.total_steps}")

    def _sample_ids(self, step: int) -> list[list[int]]:
        t = self.cell.train
        return sample_ids(step, t.global_batch_size, t.micro_batch_size, self.dist.dp, self.dist.dp_rank)

    def _batch(self, ids: list[int]) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in ids]
        dev = self.dist.device
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(dev)
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if "attention_mask" in items[0] and items[0]["attention_mask"] is not None:
            batch["attention_mask"] = torch.stack([torch.as_tensor(it["attention_mask"]) for it in items]).to(dev)
        return batch

    def _dp_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.dist.dp > 1:
            dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
        return x

    def _train_step(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.cell.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.model.train()
        batches = [self._batch(ids) for ids in self._sample_ids(self.step)]
        n_tokens = self._dp_sum(sum(b["loss_mask"].float().sum() for b in batches).reshape(1))
        n_tokens = n_tokens.clamp(min=1.0)
        loss_sum = torch.zeros(1, device=self.dist.device)
        for i, b in enumerate(batches):
            # megatron DDP reduces gradients after the last micro-batch only (with overlap: during its backward)
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                per_token = (self.ddp or self.model)(b["tokens"], b["position_ids"], b.get("attention_mask"),
                                                     labels=b["labels"])
                summed = (per_token.float() * b["loss_mask"].float()).sum()
                (summed * self.dist.dp / n_tokens).backward()  # DDP averages over DP ranks; we want the sum
            loss_sum += summed.detach()
        if self.ddp is not None:
            self.ddp.finish_grad_sync()
        ok, norm, _ = self.optimizer.step()  # with overlap_param_gather, the next forward's pre-hooks gather
        self.last_grad_norm = float("nan") if norm is None else float(norm)  # megatron's is None without clipping
        if not ok:
            self.skipped_steps += 1
            self._log(f"step {self.step + 1}: optimizer skipped the update (non-finite gradients)")
        loss = float(self._dp_sum(loss_sum) / n_tokens)
        self.step += 1
        self.losses.append(loss)
        return loss

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of a throughput on this cell's GPUs (None on CPU)."""
        return self._mfu(tokens_per_s) if self._peak is not None else None

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation, with kislurm.plan.estimate.flops_per_token."""
        flops = flops_per_token(self.cell.model, self.vocab_size)  # the plan's GPU-hours count the same FLOPs
        return tokens_per_s * flops / (self._peak * self.dist.world_size)

    def _log_line(self) -> None:
        if not self._pending:
            return
        losses, secs = zip(*self._pending)
        tps = len(losses) * self.tokens_per_step / max(sum(secs), 1e-9)
        line = (f"step {self.step}/{self.total_steps} loss {sum(losses) / len(losses):.4f} "
                f"lr {lr_at(self.step - 1, self.total_steps, self.cell.train):.2e} tokens/s {tps:,.0f}")
        if self._peak is not None:
            line += f" mfu {self._mfu(tps):.1%}"
        self._log(line)
        self._pending = []
        if self.on_log is not None:
            lr = lr_at(self.step - 1, self.total_steps, self.cell.train)
            self.on_log({"step": self.step, "tokens": self.step * self.tokens_per_step,
                         "loss": sum(losses) / len(losses), "lr": lr, "grad_norm": self.last_grad_norm,
                         "skipped_steps": self.skipped_steps, "tokens_per_s": tps,
                         **({"mfu": self._mfu(tps)} if self._peak is not None else {})})
