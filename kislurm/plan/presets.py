"""Model presets: one model size's architecture, parallel layout and resources (ModelPreset), its parameter and
precision maths, the table of presets kislurm ships, and presets that extend presets (`base:`).

A preset written as a mapping may name a `base:` preset: it inherits every field of the base and overrides the
fields it lists (extend_presets). The shipped table is written that way too (`137M-llama` extends `137M`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

from kislurm.plan.fields import IN_ID_UNLESS_DEFAULT, NOT_IN_ID, FieldError, check
from kislurm.plan.training import TrainConfig, TrainOverrides


@dataclass(frozen=True)
class ModelPreset:
    """One model size: a GPT architecture plus its parallel layout and per-cell resources.

    The layout and the resources are not in a cell's id (NOT_IN_ID): they change where and how fast a cell runs,
    not what it computes. The architecture fields added after ids were first published enter it only at a
    non-default value (IN_ID_UNLESS_DEFAULT), so every GPT-2-shaped cell keeps the id it had before they existed.
    """

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Attention heads; must be divisible by tensor_parallel."""
    ffn_hidden_size: int = 0
    """MLP width; 0 means 4 x hidden_size (gelu) or Llama's 8/3 x hidden_size rounded up (swiglu; see `ffn`)."""
    seq_length: int = 64
    """Training and evaluation sequence length in tokens."""
    tensor_parallel: Union[int, Literal["auto"]] = field(default=1, metadata=NOT_IN_ID)
    """Tensor-parallel degree (megatron-core TP); 'auto': the smallest degree whose estimated per-rank memory fits
    executor.gpu_memory_gb (resolved by the plan, kislurm.plan.estimate.resolve_layout)."""
    pipeline_parallel: int = field(default=1, metadata=NOT_IN_ID)
    """Pipeline-parallel degree; only 1 is supported by the training loop today."""
    data_parallel: int = field(default=1, metadata=NOT_IN_ID)
    """Data-parallel replicas; the world size of a cell is TP x PP x DP."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Where the cell trains: 'cpu' (gloo, fp32, local layers) or 'gpu' (NCCL, bf16; see transformer_impl)."""
    timeout_min: int = field(default=60, metadata=NOT_IN_ID)
    """Slurm time limit of one cell of this size, in minutes (the cell checkpoints and requeues when it runs out)."""
    position_embedding: Literal["learned", "rope"] = field(default="learned", metadata=IN_ID_UNLESS_DEFAULT)
    """learned: GPT-2's learned absolute positions; rope: rotary embeddings on queries and keys (Llama)."""
    activation: Literal["gelu", "swiglu"] = field(default="gelu", metadata=IN_ID_UNLESS_DEFAULT)
    """MLP: gelu (GPT-2) or swiglu (Llama: a SiLU-gated linear unit, megatron's gated_linear_unit + F.silu)."""
    normalization: Literal["layernorm", "rmsnorm"] = field(default="layernorm", metadata=IN_ID_UNLESS_DEFAULT)
    """Norm of every layer and the final norm: layernorm (GPT-2) or rmsnorm (Llama)."""
    num_query_groups: Optional[int] = field(default=None, metadata=IN_ID_UNLESS_DEFAULT)
    """Key/value heads for grouped-query attention; unset: one per attention head (plain multi-head attention).
    Must divide num_attention_heads, and tensor_parallel must divide it."""
    tie_embeddings: bool = field(default=True, metadata=IN_ID_UNLESS_DEFAULT)
    """Share the input embedding with the output layer (GPT-2); false: a separate output layer (Llama)."""
    linear_bias: bool = field(default=True, metadata=IN_ID_UNLESS_DEFAULT)
    """Biases on the attention and MLP linear layers (GPT-2, megatron's add_bias_linear); false: none (Llama). Norms
    keep theirs either way."""
    norm_eps: float = field(default=1e-5, metadata=IN_ID_UNLESS_DEFAULT)
    """Epsilon of every norm (megatron's layernorm_epsilon); a base model imported from HuggingFace sets its own."""
    rotary_base: float = field(default=10000.0, metadata=IN_ID_UNLESS_DEFAULT)
    """RoPE base (theta) with position_embedding: rope; a base model imported from HuggingFace sets its own."""
    init_from: Optional[str] = field(default=None, metadata=IN_ID_UNLESS_DEFAULT)
    """A HuggingFace model folder (Llama or GPT-2 family, docs/huggingface.md) the cells of this size start from,
    instead of random weights: the architecture fields are read from its config.json (write none of them; seq_length
    may be set, default its max_position_embeddings), the run's tokenizer must be the base's own (data.tokenizer
    defaults to its tokenizer.json), and retention is also evaluated at step 0, before any training. Needs the
    kislurm[hf] extra; tensor_parallel 1 (data_parallel any)."""
    transformer_impl: Literal["local", "transformer_engine"] = field(default="local", metadata=IN_ID_UNLESS_DEFAULT)
    """Layer implementation: local (megatron's pure-PyTorch layers, the tested path, on CPU and GPU) or
    transformer_engine (Transformer Engine's fused layers: GPU only, opt-in, never run by this project's tests;
    refused in one line when TE is not importable on the GPU node)."""
    train: Optional[TrainOverrides] = field(default=None, metadata=NOT_IN_ID)
    """Per-size training overrides: any train: field (lr, micro_batch_size, global_batch_size, warmup_frac, ...)
    set for this size only, e.g. {lr: 1.0e-3, global_batch_size: 256}, since a size ladder tunes them per size.
    They replace the run's train: values in this size's cells (and so enter those cells' ids through the cells'
    effective TrainConfig, not here); unset: none."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            check(getattr(self, key) >= 1, key, f"expected a positive integer, got {getattr(self, key)}")
        check(self.ffn_hidden_size >= 0, "ffn_hidden_size", "expected 0 (= 4 x hidden) or a positive integer")
        check(self.tensor_parallel == "auto" or self.tensor_parallel >= 1, "tensor_parallel",
              f"expected an integer >= 1 or auto, got {self.tensor_parallel}")
        for key in ("pipeline_parallel", "data_parallel"):
            check(getattr(self, key) >= 1, key, f"expected an integer >= 1, got {getattr(self, key)}")
        check(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        groups = self.query_groups
        check(groups >= 1 and self.num_attention_heads % groups == 0, "num_query_groups",
              f"num_query_groups {self.num_query_groups} does not divide num_attention_heads "
              f"{self.num_attention_heads}; fix: choose a divisor of the head count (or leave it unset)")
        if self.tensor_parallel != "auto":
            check(
                self.num_attention_heads % self.tensor_parallel == 0,
                "tensor_parallel",
                f"tensor_parallel {self.tensor_parallel} does not divide num_attention_heads "
                f"{self.num_attention_heads}; fix: choose a TP degree that divides the head count",
            )
            check(groups % self.tensor_parallel == 0, "tensor_parallel",
                  f"tensor_parallel {self.tensor_parallel} does not divide num_query_groups {groups}; "
                  "fix: choose a TP degree that divides the query groups")
            check(self.ffn % self.tensor_parallel == 0, "tensor_parallel",
                  f"tensor_parallel {self.tensor_parallel} does not divide the MLP width {self.ffn}; "
                  "fix: choose a TP degree that divides ffn_hidden_size")
        check(self.pipeline_parallel == 1, "pipeline_parallel", "only pipeline_parallel: 1 is supported; fix: set 1")
        check(self.transformer_impl == "local" or self.device == "gpu", "transformer_impl",
              "transformer_engine layers run on GPU only; fix: set transformer_impl: local (or device: gpu)")
        check(self.timeout_min >= 1, "timeout_min", f"expected minutes >= 1, got {self.timeout_min}")
        check(self.init_from is None or self.tensor_parallel == 1, "tensor_parallel",
              f"init_from loads the base's weights at tensor_parallel 1 only, got {self.tensor_parallel}; fix: set "
              "tensor_parallel: 1 (data_parallel may be larger)")
        check(0 < self.norm_eps < 1, "norm_eps", f"expected a small positive epsilon, got {self.norm_eps}")
        check(self.rotary_base > 1, "rotary_base", f"expected a RoPE base > 1, got {self.rotary_base}")

    @property
    def ffn(self) -> int:
        """MLP width: ffn_hidden_size, else 4 x hidden (gelu) or Llama's rule for swiglu: 8/3 x hidden rounded up
        to a multiple of 256 (hidden >= 1024) or 8 (smaller), which keeps the MLP near the GeLU one's size."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "gelu":
            return 4 * self.hidden_size
        multiple = 256 if self.hidden_size >= 1024 else 8
        return -(-(8 * self.hidden_size) // (3 * multiple)) * multiple

    @property
    def query_groups(self) -> int:
        """Key/value heads (num_query_groups, or the head count when unset)."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def world_size(self) -> int:
        if self.tensor_parallel == "auto":
            raise ValueError("tensor_parallel: auto is resolved by the plan (kislurm.plan.grid.expand); a bug if seen here")
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    def param_counts(self, vocab_size: int) -> dict[str, int]:
        """Parameter counts of megatron-core's GPTModel with this shape, `vocab_size` embedding rows (padded).

        Embedding = word embeddings + learned positions + the output layer when untied; the scaling law uses the
        non-embedding count, as Kaplan et al. and the knowledge-capacity literature do. `replicated` is the part
        every TP rank holds whole (norms, row-parallel biases, learned positions): per rank a model holds
        (total - replicated) / TP + replicated.
        """
        h, f, layers = self.hidden_size, self.ffn, self.num_layers
        kv = self.query_groups * (h // self.num_attention_heads)  # key (and value) width
        norm = 2 * h if self.normalization == "layernorm" else h  # RMSNorm has no bias
        fc1 = 2 * f if self.activation == "swiglu" else f  # the gated unit's two halves
        b = 1 if self.linear_bias else 0
        qkv = h * (h + 2 * kv) + b * (h + 2 * kv)
        per_layer = norm + qkv + (h * h + b * h) + norm + (h * fc1 + b * fc1) + (f * h + b * h)
        non_embedding = layers * per_layer + norm  # final norm
        positions = self.seq_length * h if self.position_embedding == "learned" else 0
        embedding = vocab_size * h * (1 if self.tie_embeddings else 2) + positions
        replicated = layers * (2 * norm + 2 * b * h) + norm + positions
        return {"total": non_embedding + embedding, "non_embedding": non_embedding, "embedding": embedding,
                "replicated": replicated}


def resolve_precision(preset: ModelPreset, precision: str) -> str:
    """'auto' means fp32 on CPU and bf16 on GPU."""
    if precision == "auto":
        return "bf16" if preset.device == "gpu" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision '{precision}'; fix: use auto, fp32 or bf16")
    return precision


def extend_presets(specs: Mapping[str, Any], shipped: Mapping[str, ModelPreset], where: str) -> dict[str, Any]:
    """`specs` (preset name -> its fields as written) with every `base:` resolved: a preset naming a base inherits
    every field of the base and overrides the fields it lists. The base is another preset of `specs` or, failing
    that (or when a preset names itself), a `shipped` one; chains resolve in turn. An unknown base or a cycle is a
    FieldError at `where.NAME.base`. Entries that are not mappings are left for the loader to refuse."""
    return {name: _extended(name, specs, shipped, where, ()) for name in specs}


def _extended(name: str, specs: Mapping[str, Any], shipped: Mapping[str, ModelPreset], where: str,
              chain: tuple[str, ...]) -> Any:
    spec = specs[name]
    if not isinstance(spec, Mapping) or "base" not in spec:
        return spec
    key, base = f"{where}.{name}.base", spec["base"]
    own = {k: v for k, v in spec.items() if k != "base"}
    check(isinstance(base, str), key, f"expected the name of a preset to extend, got {base!r}")
    if base in specs and (base != name or base not in shipped):  # a preset naming itself extends the shipped one
        cycle = " -> ".join((*chain, name, base))
        check(base not in chain and base != name, key, f"presets extend each other in a cycle ({cycle}); fix: give "
              "one of them its fields, or a shipped preset as base")
        inherited = _extended(base, specs, shipped, where, (*chain, name))
        check(isinstance(inherited, Mapping), key, f"base preset '{base}' is not a mapping of settings; fix: give "
              f"{where}.{base} its fields as a mapping")
        return {**inherited, **own}
    if base in shipped:
        return {**dataclasses.asdict(shipped[base]), **own}
    names = sorted({*specs, *shipped})
    raise FieldError(key, f"unknown base preset '{base}'; fix: use one of {names} (a shipped preset, or another "
                          f"one under {where}:)")


def _size(layers: int, hidden: int, heads: int, seq: int, **kw: Any) -> dict[str, Any]:
    return {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "seq_length": seq, **kw}


LLAMA = {"position_embedding": "rope", "activation": "swiglu", "normalization": "rmsnorm", "tie_embeddings": False}
"""The Llama architecture options; `<size>-llama` presets add grouped-query attention with a quarter of the heads
as key/value groups (Llama 3 8B's 32/8)."""

_SHIPPED: dict[str, dict[str, Any]] = {
    # Tiny CPU sizes for laptops, CI and the demo (word-level synthetic facts fit in 32-token sequences).
    "cpu-xxs": _size(2, 16, 2, 32),
    "cpu-xs": _size(2, 24, 2, 32),
    "cpu-s": _size(2, 32, 4, 32),
    "cpu-m": _size(2, 48, 4, 32),
    "cpu-l": _size(2, 64, 4, 32),
    "cpu-xl": _size(2, 96, 4, 32),
    # The paper-scale ladder (Lv et al. train 137M..3B; 7B is held out to validate the prediction).
    "137M": _size(12, 768, 12, 2048, device="gpu", timeout_min=720),
    "350M": _size(24, 1024, 16, 2048, device="gpu", timeout_min=1440),
    "760M": _size(24, 1536, 16, 2048, device="gpu", tensor_parallel=2, timeout_min=1440),
    "1.3B": _size(24, 2048, 16, 2048, device="gpu", tensor_parallel=2, timeout_min=2880),
    "3B": _size(32, 2560, 32, 2048, device="gpu", tensor_parallel=4, timeout_min=2880),
    "7B": _size(32, 4096, 32, 2048, device="gpu", tensor_parallel=8, timeout_min=2880),
}
_SHIPPED.update({f"{name}-llama": {"base": name, **LLAMA, "num_query_groups": spec["num_attention_heads"] // 4,
                                   "tensor_parallel": "auto"}
                 for name, spec in list(_SHIPPED.items()) if spec.get("device") == "gpu"})
_SHIPPED["cpu-s-llama"] = {"base": "cpu-s", **LLAMA, "num_query_groups": 2}

BUILTIN_PRESETS: dict[str, ModelPreset] = {
    name: ModelPreset(**fields) for name, fields in extend_presets(_SHIPPED, {}, "BUILTIN_PRESETS").items()}
"""The presets kislurm ships, by name; a config's `models:` adds to them or overrides them."""


def effective_train(base: TrainConfig, preset: ModelPreset) -> TrainConfig:
    """The TrainConfig a size's cells train with: the run's train: section with the preset's overrides applied.
    Without overrides it is `base` itself, so those cells keep their ids."""
    changes = {k: v for k, v in dataclasses.asdict(preset.train).items() if v is not None} if preset.train else {}
    return dataclasses.replace(base, **changes) if changes else base

