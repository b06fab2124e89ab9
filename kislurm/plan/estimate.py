"""Per-rank memory, FLOPs and GPU-hours of a cell, from its preset and training settings alone (pure: no torch).

The plan uses it to show what a grid costs before anything is submitted, to refuse a layout that will not fit the
GPU (executor.gpu_memory_gb), and to resolve `tensor_parallel: auto` to the smallest TP degree that fits. The
trainer uses `flops_per_token` for its MFU, so the plan's GPU-hours and the measured MFU count the same FLOPs.
`cell_gpu_hours` is kislurm's one GPU-hour model (executor.mfu, the padded vocabulary): the plan's table, the
adaptive ladder's estimate and `kislurm validate --dry-run` all price cells with it.

Memory of one rank, in bytes, for P = the parameters that rank holds ((total - replicated) / TP + replicated,
from ModelPreset.param_counts):

- weights: 2P in bf16 (megatron's Float16Module), 4P in fp32;
- gradients: 4P (megatron DDP's fp32 gradient buffer, grad_reduce_in_fp32);
- optimizer: Adam's two moments (8P) plus, in bf16, the fp32 master weights (4P): 12P or 8P, divided by DP with
  megatron's distributed optimizer (what kislurm uses on a GPU), whole without it;
- activations of one micro-batch (PP=1: a micro-batch's backward runs before the next forward), by Korthikanti et
  al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2: tensor parallelism, no
  sequence parallelism, no recomputation): per layer s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes at 16 bits. Two of
  its terms do not apply to kislurm's models and are left out: the dropout masks (kislurm trains with dropout 0,
  and torch keeps no mask at p = 0) and the 5*a*s^2*b attention scores (torch's fused attention and Transformer
  Engine's keep no score matrix). Their 24/t sharded term is written out per tensor so that grouped-query
  attention and SwiGLU count what they store (queries, keys, values, attention output, the first MLP GEMM's
  output and the activation's output); the 8 replicated bytes are the two norms' inputs and the two GEMM
  inputs after them. Plus the final norm's and output layer's inputs (4sbh);
- logits: (2 + 4)*s*b*V/t in bf16 (the output layer's bf16 logits and the cross entropy's fp32 copy live together
  in the loss's forward, then the fp32 softmax and its bf16 gradient in its backward), 8sbV/t in fp32.

Validated against the measured 1.3B run of README "On a GPU" (tests/test_estimate.py). Not against that table's
137M row: it was measured after the 1.3B run in the same process, with the 1.3B's megatron buffers possibly still
allocated (README "Memory, layouts and cost"), so it is no ground truth for this formula.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from kislurm.plan.config import ConfigError, DataConfig, ExecutorConfig
from kislurm.plan.presets import ModelPreset, resolve_precision
from kislurm.plan.training import TrainConfig

if TYPE_CHECKING:
    from kislurm.plan.grid import Cell

GIB = 2**30
VOCAB_MULTIPLE = 128
"""Embedding rows are padded to a multiple of this (as Megatron-LM does): independent of TP, so every TP degree
of a size builds the same model, and any TP up to 128 divides the vocabulary."""
GPT2_VOCAB = 50_257
"""Vocabulary assumed when planning with a tokenizer file this machine does not have."""
FIT_FRACTION = 0.9
"""Share of executor.gpu_memory_gb a layout may use: the rest is the CUDA context, NCCL buffers, the allocator's
fragmentation and the estimate's own error (within 15% of a measured run)."""


def padded_vocab_size(vocab_size: int) -> int:
    """Rows of the embedding for a tokenizer of `vocab_size` ids (pass this to ModelPreset.param_counts)."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at its peak, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def rank_parameters(preset: ModelPreset, vocab: int, tp: int) -> float:
    """Parameters one TP rank holds: the sharded ones split t ways, the replicated ones whole."""
    c = preset.param_counts(vocab)
    return (c["total"] - c["replicated"]) / tp + c["replicated"]


def activation_bytes(preset: ModelPreset, micro_batch: int, tp: int, bf16: bool) -> float:
    """Korthikanti et al.'s per-micro-batch activations without dropout masks and attention scores (see above)."""
    s, b, h = preset.seq_length, micro_batch, preset.hidden_size
    kv = preset.query_groups * (h // preset.num_attention_heads)
    fc1 = 2 * preset.ffn if preset.activation == "swiglu" else preset.ffn
    elements_sharded = s * b * (h + 2 * kv + h + fc1 + preset.ffn)  # q, k, v, attention out, fc1 out, act out
    elements_replicated = 4 * s * b * h  # two norm inputs, QKV and fc1 GEMM inputs
    element = 2 if bf16 else 4
    per_layer = element * (elements_replicated + elements_sharded / tp)
    return preset.num_layers * per_layer + element * 2 * s * b * h  # + final norm and output layer inputs


def memory_per_rank(preset: ModelPreset, train: TrainConfig, vocab: int, tp: Optional[int] = None,
                    distributed_optimizer: Optional[bool] = None) -> MemoryEstimate:
    """Peak bytes of one rank of `preset` at TP `tp` (default: the preset's), `vocab` padded embedding rows.

    distributed_optimizer defaults to what the trainer does: megatron's distributed optimizer on a GPU only.
    """
    tp = preset.tensor_parallel if tp is None else tp
    if tp == "auto":
        raise ValueError("memory_per_rank needs a TP degree; resolve tensor_parallel: auto first")
    bf16 = resolve_precision(preset, train.precision) == "bf16"
    sharded_over = preset.data_parallel if (preset.device == "gpu" if distributed_optimizer is None
                                            else distributed_optimizer) else 1
    p = rank_parameters(preset, vocab, tp)
    s, b = preset.seq_length, train.micro_batch_size
    return MemoryEstimate(
        weights=(2 if bf16 else 4) * p,
        gradients=4 * p,
        optimizer=(12 if bf16 else 8) * p / sharded_over,
        activations=activation_bytes(preset, b, tp, bf16),
        logits=(6 if bf16 else 8) * s * b * vocab / tp,
    )


def flops_per_token(preset: ModelPreset, vocab: int) -> float:
    """Training FLOPs per token, as MFU counts them: 6 x (non-embedding + output-layer) parameters for the GEMMs
    (forward and backward), plus 12 x layers x hidden x sequence for the attention scores and their use."""
    non_embedding = preset.param_counts(vocab)["non_embedding"]
    return 6 * (non_embedding + vocab * preset.hidden_size) + \
        12 * preset.num_layers * preset.hidden_size * preset.seq_length


def gpu_hours(preset: ModelPreset, tokens: int, vocab: int, mfu: float, peak_flops: float) -> float:
    """GPU-hours to train `tokens` tokens at utilisation `mfu` of `peak_flops` per GPU (any number of GPUs)."""
    return tokens * flops_per_token(preset, vocab) / (mfu * peak_flops) / 3600


def fits(estimate: MemoryEstimate, gpu_memory_gb: float) -> bool:
    return estimate.total_gib <= FIT_FRACTION * gpu_memory_gb


def tp_candidates(preset: ModelPreset, max_tp: int) -> list[int]:
    """TP degrees the preset's shape allows: dividing heads, query groups and the MLP width, within one node."""
    return [t for t in range(1, max(1, max_tp) + 1)
            if preset.num_attention_heads % t == 0 and preset.query_groups % t == 0 and preset.ffn % t == 0]


def resolve_layout(size: str, preset: ModelPreset, train: TrainConfig, executor: ExecutorConfig,
                   vocab: int, check: bool = True) -> ModelPreset:
    """The preset with `tensor_parallel: auto` resolved to the smallest TP whose estimate fits the GPU; with
    `check`, a fixed GPU layout that cannot fit executor.gpu_memory_gb is refused (one line). CPU presets resolve
    auto to 1 (there is no GPU memory to fit)."""
    limit = executor.gpu_memory_gb
    if preset.device == "cpu":
        return dataclasses.replace(preset, tensor_parallel=1) if preset.tensor_parallel == "auto" else preset
    if preset.tensor_parallel != "auto":
        if limit is not None and check:
            est = memory_per_rank(preset, train, vocab)
            if not fits(est, limit):
                raise ConfigError(
                    f"model '{size}' at tensor_parallel {preset.tensor_parallel} needs about {est.total_gib:.1f} "
                    f"GiB per GPU, over {FIT_FRACTION:.0%} of executor.gpu_memory_gb {limit:g}; fix: set "
                    "tensor_parallel: auto (or higher), lower train.micro_batch_size, or raise gpu_memory_gb")
        return preset
    if limit is None:
        raise ConfigError(f"model '{size}' has tensor_parallel: auto but executor.gpu_memory_gb is unset; fix: "
                          "set executor.gpu_memory_gb (e.g. 80 for an H100 80GB) or a fixed tensor_parallel")
    max_tp = executor.gpus_per_node or 1
    for t in tp_candidates(preset, max_tp):
        if fits(memory_per_rank(preset, train, vocab, tp=t), limit):
            return dataclasses.replace(preset, tensor_parallel=t)
    largest = tp_candidates(preset, max_tp)[-1]
    need = memory_per_rank(preset, train, vocab, tp=largest).total_gib
    raise ConfigError(f"model '{size}' does not fit executor.gpu_memory_gb {limit:g} at any tensor_parallel up to "
                      f"{largest} (one node: {max_tp} GPUs): about {need:.1f} GiB per GPU at TP {largest}; fix: "
                      "lower train.micro_batch_size or use GPUs with more memory")


def plan_vocab_size(data: DataConfig) -> int:
    """Padded embedding rows the plan assumes: the tokenizer file's size when this machine has it, the BPE
    vocab_size when the run trains its own, GPT-2's otherwise (a cluster tokenizer absent here)."""
    if data.tokenizer is None:
        return padded_vocab_size(data.vocab_size)
    path = Path(data.tokenizer)
    if not path.is_file():
        return padded_vocab_size(GPT2_VOCAB)
    try:
        spec = json.loads(path.read_text())
        vocab = dict(spec["model"]["vocab"])
        vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        return padded_vocab_size(max(vocab.values()) + 1)
    except (ValueError, KeyError, TypeError):
        return padded_vocab_size(GPT2_VOCAB)  # an unusual tokenizer format: the data stage will read it properly


def cell_gpu_hours(preset: ModelPreset, tokens: int, executor: ExecutorConfig, vocab: int) -> Optional[float]:
    """GPU-hours of one cell training `tokens` tokens: the plan's one GPU-hour model, used by the plan table, the
    adaptive ladder's estimate and `kislurm validate --dry-run` alike. The trainer's FLOPs per token at
    executor.mfu of executor.gpu_peak_tflops, `vocab` padded embedding rows (plan_vocab_size); None for a CPU cell."""
    if preset.device == "cpu":
        return None
    return gpu_hours(preset, tokens, vocab, executor.mfu, executor.gpu_peak_tflops * 1e12)


def total_gpu_hours(cells: Iterable["Cell"], executor: ExecutorConfig, vocab: int) -> Optional[float]:
    """GPU-hours of many cells (cell_gpu_hours of each; a cell listed twice counts twice); None when none is a GPU
    cell."""
    hours = [h for c in cells if (h := cell_gpu_hours(c.model, c.n_samples * c.model.seq_length, executor, vocab))
             is not None]
    return sum(hours) if hours else None


def cell_costs(preset: ModelPreset, train: TrainConfig, executor: ExecutorConfig, tokens: int,
               vocab: int) -> dict[str, Optional[float]]:
    """The plan's columns for one cell: per-rank memory (GiB) and GPU-hours (cell_gpu_hours; None for CPU cells)."""
    mem = memory_per_rank(preset, train, vocab)
    return {"mem_gib": mem.total_gib, "gpu_hours": cell_gpu_hours(preset, tokens, executor, vocab)}

