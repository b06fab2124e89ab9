"""Experiment configuration: typed, frozen dataclasses loaded from one YAML file.

A YAML file holds only what differs from the defaults below. Keys are checked where they are set: an unknown key is
refused with the list of valid ones, and every value is checked for type and range. Every error is one line that
names the file, the key, what was expected and how to fix it (`ConfigError`).

Why one long module: it is mostly field docstrings, the config's documentation; every field sits next to its
check, and cell ids hash these dataclasses, so they stay in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kislurm.errors import ConfigError  # noqa: F401 (re-exported)


class _FieldError(ValueError):
    """Raised inside __post_init__ checks; the loader prefixes the key path."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """One model size: a GPT architecture plus its parallel layout and per-cell resources."""

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
    tensor_parallel: Union[int, Literal["auto"]] = 1
    """Tensor-parallel degree (megatron-core TP); 'auto': the smallest degree whose estimated per-rank memory fits
    executor.gpu_memory_gb (resolved by the plan, kislurm.plan.estimate.resolve_layout)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel degree; only 1 is supported by the training loop today."""
    data_parallel: int = 1
    """Data-parallel replicas; the world size of a cell is TP x PP x DP."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Where the cell trains: 'cpu' (gloo, fp32, local layers) or 'gpu' (NCCL, bf16; see transformer_impl)."""
    timeout_min: int = 60
    """Slurm time limit of one cell of this size, in minutes (the cell checkpoints and requeues when it runs out)."""
    position_embedding: Literal["learned", "rope"] = "learned"
    """learned: GPT-2's learned absolute positions; rope: rotary embeddings on queries and keys (Llama)."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    """MLP: gelu (GPT-2) or swiglu (Llama: a SiLU-gated linear unit, megatron's gated_linear_unit + F.silu)."""
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Norm of every layer and the final norm: layernorm (GPT-2) or rmsnorm (Llama)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; unset: one per attention head (plain multi-head attention).
    Must divide num_attention_heads, and tensor_parallel must divide it."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer (GPT-2); false: a separate output layer (Llama)."""
    linear_bias: bool = True
    """Biases on the attention and MLP linear layers (GPT-2, megatron's add_bias_linear); false: none (Llama). Norms
    keep theirs either way."""
    norm_eps: float = 1e-5
    """Epsilon of every norm (megatron's layernorm_epsilon); a base model imported from HuggingFace sets its own."""
    rotary_base: float = 10000.0
    """RoPE base (theta) with position_embedding: rope; a base model imported from HuggingFace sets its own."""
    init_from: Optional[str] = None
    """A HuggingFace model folder (Llama or GPT-2 family, docs/huggingface.md) the cells of this size start from,
    instead of random weights: the architecture fields are read from its config.json (write none of them; seq_length
    may be set, default its max_position_embeddings), the run's tokenizer must be the base's own (data.tokenizer
    defaults to its tokenizer.json), and retention is also evaluated at step 0, before any training. Needs the
    kislurm[hf] extra; tensor_parallel 1 (data_parallel any)."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation: local (megatron's pure-PyTorch layers, the tested path, on CPU and GPU) or
    transformer_engine (Transformer Engine's fused layers: GPU only, opt-in, never run by this project's tests;
    refused in one line when TE is not importable on the GPU node)."""
    train: Optional["TrainOverrides"] = None
    """Per-size training overrides: any train: field (lr, micro_batch_size, global_batch_size, warmup_frac, ...)
    set for this size only, e.g. {lr: 1.0e-3, global_batch_size: 256}, since a size ladder tunes them per size.
    They replace the run's train: values in this size's cells (and so enter those cells' ids); unset: none."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _check(getattr(self, key) >= 1, key, f"expected a positive integer, got {getattr(self, key)}")
        _check(self.ffn_hidden_size >= 0, "ffn_hidden_size", "expected 0 (= 4 x hidden) or a positive integer")
        _check(self.tensor_parallel == "auto" or self.tensor_parallel >= 1, "tensor_parallel",
               f"expected an integer >= 1 or auto, got {self.tensor_parallel}")
        for key in ("pipeline_parallel", "data_parallel"):
            _check(getattr(self, key) >= 1, key, f"expected an integer >= 1, got {getattr(self, key)}")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        groups = self.query_groups
        _check(groups >= 1 and self.num_attention_heads % groups == 0, "num_query_groups",
               f"num_query_groups {self.num_query_groups} does not divide num_attention_heads "
               f"{self.num_attention_heads}; fix: choose a divisor of the head count (or leave it unset)")
        if self.tensor_parallel != "auto":
            _check(
                self.num_attention_heads % self.tensor_parallel == 0,
                "tensor_parallel",
                f"tensor_parallel {self.tensor_parallel} does not divide num_attention_heads "
                f"{self.num_attention_heads}; fix: choose a TP degree that divides the head count",
            )
            _check(groups % self.tensor_parallel == 0, "tensor_parallel",
                   f"tensor_parallel {self.tensor_parallel} does not divide num_query_groups {groups}; "
                   "fix: choose a TP degree that divides the query groups")
            _check(self.ffn % self.tensor_parallel == 0, "tensor_parallel",
                   f"tensor_parallel {self.tensor_parallel} does not divide the MLP width {self.ffn}; "
                   "fix: choose a TP degree that divides ffn_hidden_size")
        _check(self.pipeline_parallel == 1, "pipeline_parallel", "only pipeline_parallel: 1 is supported; fix: set 1")
        _check(self.transformer_impl == "local" or self.device == "gpu", "transformer_impl",
               "transformer_engine layers run on GPU only; fix: set transformer_impl: local (or device: gpu)")
        _check(self.timeout_min >= 1, "timeout_min", f"expected minutes >= 1, got {self.timeout_min}")
        _check(self.init_from is None or self.tensor_parallel == 1, "tensor_parallel",
               f"init_from loads the base's weights at tensor_parallel 1 only, got {self.tensor_parallel}; fix: set "
               "tensor_parallel: 1 (data_parallel may be larger)")
        _check(0 < self.norm_eps < 1, "norm_eps", f"expected a small positive epsilon, got {self.norm_eps}")
        _check(self.rotary_base > 1, "rotary_base", f"expected a RoPE base > 1, got {self.rotary_base}")

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


def _preset(layers: int, hidden: int, heads: int, seq: int, **kw: Any) -> ModelPreset:
    return ModelPreset(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, seq_length=seq, **kw)


BUILTIN_PRESETS: dict[str, ModelPreset] = {
    # Tiny CPU sizes for laptops, CI and the demo (word-level synthetic facts fit in 32-token sequences).
    "cpu-xxs": _preset(2, 16, 2, 32),
    "cpu-xs": _preset(2, 24, 2, 32),
    "cpu-s": _preset(2, 32, 4, 32),
    "cpu-m": _preset(2, 48, 4, 32),
    "cpu-l": _preset(2, 64, 4, 32),
    "cpu-xl": _preset(2, 96, 4, 32),
    # The paper-scale ladder (Lv et al. train 137M..3B; 7B is held out to validate the prediction).
    "137M": _preset(12, 768, 12, 2048, device="gpu", timeout_min=720),
    "350M": _preset(24, 1024, 16, 2048, device="gpu", timeout_min=1440),
    "760M": _preset(24, 1536, 16, 2048, device="gpu", tensor_parallel=2, timeout_min=1440),
    "1.3B": _preset(24, 2048, 16, 2048, device="gpu", tensor_parallel=2, timeout_min=2880),
    "3B": _preset(32, 2560, 32, 2048, device="gpu", tensor_parallel=4, timeout_min=2880),
    "7B": _preset(32, 4096, 32, 2048, device="gpu", tensor_parallel=8, timeout_min=2880),
}
LLAMA = {"position_embedding": "rope", "activation": "swiglu", "normalization": "rmsnorm", "tie_embeddings": False}
"""The Llama architecture options; `<size>-llama` presets add grouped-query attention with a quarter of the heads
as key/value groups (Llama 3 8B's 32/8)."""
BUILTIN_PRESETS.update({
    f"{name}-llama": dataclasses.replace(p, **LLAMA, num_query_groups=p.num_attention_heads // 4,
                                         tensor_parallel="auto")
    for name, p in list(BUILTIN_PRESETS.items()) if p.device == "gpu"
})
BUILTIN_PRESETS["cpu-s-llama"] = dataclasses.replace(BUILTIN_PRESETS["cpu-s"], **LLAMA, num_query_groups=2)


CONTROLS = ("infusion", "fixed_general", "dilution", "staged")
"""The controls of issue 17, and the data fields each one sets (infusion: the data section as written)."""
CONTROL_DATA = {"infusion": {}, "fixed_general": {"mix": "fixed_general"}, "dilution": {"mix": "dilution"},
                "staged": {"schedule": "staged"}}


@dataclass(frozen=True)
class GridConfig:
    """The experiment grid: every combination is one cell."""

    sizes: list[str] = field(default_factory=lambda: ["cpu-s", "cpu-l"])
    """Model presets by name (built in, or defined under `models:`)."""
    ratios: list[float] | Literal["adaptive"] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    """Infusion ratios r in (0, 1): the share of training samples drawn from the knowledge stream. Or `adaptive`:
    the two smallest sizes train on `start_ratios`, each further size (by parameters) on `rung_points` ratios
    placed from the law fitted on the sizes before it (kislurm.analysis.validate), submitted when they are done."""
    token_budgets: list[int] = field(default_factory=lambda: [200_000])
    """Training tokens per cell."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (model init and data order)."""
    start_ratios: list[float] = field(default_factory=list)
    """With `ratios: adaptive`: the starting grid of the two smallest sizes (>= 4 ratios bracketing their collapse)."""
    rung_points: int = 5
    """With `ratios: adaptive`: ratios per further size (>= 4)."""
    controls: list[str] = field(default_factory=lambda: ["infusion"])
    """Controls every (size, ratio, budget, seed) is trained under (issue 17): infusion (data as written),
    fixed_general (data.mix), dilution (data.mix) and staged (data.schedule); each sets its data field in the
    cell, so control cells have ids of their own and infusion cells keep theirs."""

    @property
    def adaptive(self) -> bool:
        return self.ratios == "adaptive"

    def __post_init__(self) -> None:
        _check(len(self.sizes) > 0, "sizes", "expected at least one model size; fix: list preset names")
        if self.adaptive:
            _check(len(self.start_ratios) >= 4, "start_ratios", "ratios: adaptive needs >= 4 start_ratios for the "
                   "two smallest sizes; fix: e.g. start_ratios: [0.1, 0.3, 0.5, 0.7, 0.9]")
            _check(len(self.sizes) >= 2, "sizes", "ratios: adaptive needs >= 2 sizes; fix: list more sizes")
            _check(self.rung_points >= 4, "rung_points", f"expected >= 4 ratios per rung (two on each side of r*), "
                   f"got {self.rung_points}")
        _check(len(self.ratios) > 0, "ratios", "expected at least one infusion ratio; fix: e.g. [0.1, 0.5, 0.9]")
        for name in ("start_ratios",) if self.adaptive else ("ratios",):
            values = getattr(self, name)
            for i, r in enumerate(values):
                _check(0.0 < r < 1.0, f"{name}[{i}]", f"expected a ratio strictly between 0 and 1, got {r}; "
                       "fix: write fractions, e.g. 0.1 for 10%")
            _check(len(set(values)) == len(values), name, "duplicate ratios; fix: list each ratio once")
        _check(len(self.token_budgets) > 0, "token_budgets", "expected at least one token budget")
        for i, t in enumerate(self.token_budgets):
            _check(t >= 1, f"token_budgets[{i}]", f"expected a positive number of tokens, got {t}")
        _check(len(self.seeds) > 0, "seeds", "expected at least one seed; fix: seeds: [0]")
        _check(len(set(self.sizes)) == len(self.sizes), "sizes", "duplicate sizes; fix: list each size once")
        _check(len(self.controls) > 0 and len(set(self.controls)) == len(self.controls), "controls",
               "expected distinct controls; fix: e.g. [infusion, fixed_general, dilution, staged]")
        for i, c in enumerate(self.controls):
            _check(c in CONTROLS, f"controls[{i}]", f"unknown control {c!r}; fix: use one of {', '.join(CONTROLS)}")


@dataclass(frozen=True)
class KnowledgeBaseSpec:
    """Size of a seeded synthetic knowledge base of fictional entities."""

    entities: int = 100
    """Fictional subjects."""
    relations: int = 3
    """Relations per subject (each subject has one object per relation)."""
    values_per_relation: int = 60
    """Possible objects per relation (a fact then carries log2 of this many bits)."""

    def __post_init__(self) -> None:
        _check(self.entities >= 1, "entities", f"expected >= 1 entity, got {self.entities}")
        _check(self.relations >= 1, "relations", f"expected >= 1 relation, got {self.relations}")
        _check(self.values_per_relation >= 2, "values_per_relation",
               f"expected >= 2 values per relation, got {self.values_per_relation}")


@dataclass(frozen=True)
class GeneralCorpus:
    """A raw text corpus that `kislurm prepare` tokenizes into the general stream (as `kislurm corpus` does)."""

    files: list[str] = field(default_factory=list)
    """JSONL (.gz/.zst), parquet or .txt files and globs, relative to the config file."""
    json_key: str = "text"
    """The JSON key or parquet column that holds each document's text."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))   # hashable, as a frozen config must be
        _check(len(self.files) >= 1, "files", "expected at least one file or glob; fix: e.g. files: [corpus/*.jsonl]")


@dataclass(frozen=True)
class DataConfig:
    """Where the general and knowledge streams come from and how knowledge is infused."""

    source: Literal["synthetic", "triplets"] = "synthetic"
    """'synthetic': seeded fictional knowledge bases; 'triplets': real (subject, relation, object) files."""
    seed: int = 1234
    """Seed of the knowledge bases, templates and probe distractors (shared by every cell of a run)."""
    general: KnowledgeBaseSpec = field(default_factory=KnowledgeBaseSpec)
    """General (previously acquired) knowledge: lives only in the general stream; its forgetting is the collapse."""
    knowledge: KnowledgeBaseSpec = field(default_factory=lambda: KnowledgeBaseSpec(150, 2, 60))
    """Domain knowledge infused through the knowledge stream."""
    knowledge_triplets: Optional[str] = None
    """source=triplets: JSONL or TSV file of infused facts (subject, relation, object)."""
    general_triplets: Optional[str] = None
    """source=triplets: JSONL or TSV file of general facts (optional when general_prefix is given)."""
    templates_file: Optional[str] = None
    """source=triplets: YAML file of relation -> {train: [...], heldout: [...]} templates with {subject}/{object}."""
    train_templates: int = 3
    """Synthetic: training templates per relation."""
    heldout_templates: int = 1
    """Synthetic: probe-only templates per relation (never trained on)."""
    distractors: int = 3
    """k: wrong objects (same relation) competing with the right one in each probe."""
    policy: Literal["fixed_facts", "fixed_exposures"] = "fixed_facts"
    """fixed_facts: one knowledge base, exposures grow with r; fixed_exposures: facts grow with r at set exposures."""
    exposures_per_fact: int = 100
    """fixed_exposures: training exposures of each infused fact (exact). The knowledge stream cycles the largest
    divisor of it up to 64 as distinct pass units, so a value with a divisor near 64 (e.g. 64, 96, 128) keeps the
    neighbour sharing low; a prime above 64 gives one unit, whose facts keep their neighbours every epoch."""
    tokenizer: Optional[str] = None
    """Path to a tokenizer.json; if unset a BPE tokenizer is trained on the run's own corpus."""
    vocab_size: int = 512
    """Vocabulary size of the trained BPE tokenizer."""
    general_prefix: Optional[str] = None
    """Existing Megatron indexed-dataset prefix used as the general stream (cluster runs on a real corpus)."""
    general_probes: Optional[str] = None
    """Probe file (JSONL facts) of general knowledge known to be in general_prefix's corpus."""
    general_corpus: Optional[GeneralCorpus] = None
    """Raw text (files: [...], json_key: text) that `kislurm prepare` tokenizes with data.tokenizer into the general
    stream, once per content: the prefix lives under OUTPUT_ROOT/corpora/<fingerprint>/ and is used as
    general_prefix, so another experiment on the same files and tokenizer reuses it."""
    general_census: Optional[str] = None
    """Folder written by `kislurm census` over the general corpus with --knowledge: `kislurm prepare` refuses a
    knowledge base sharing a subject-object pair with the general probes or more contaminated than
    max_contamination, and carries each general fact's corpus count (docs_both) into the probes."""
    max_contamination: float = 0.05
    """With general_census: the largest share of knowledge facts that may already co-occur in the general corpus
    (or share a pair with a general fact) before `kislurm prepare` refuses the knowledge base."""
    heldout_general: float = 0.0
    """Share of the general stream's documents (fact sentences, or general_corpus documents) that no cell trains on,
    chosen by a hash of the document index; every evaluation scores them (mean loss and bits per byte). 0: none.
    Needs a general stream that kislurm builds (synthetic or general_corpus, not general_prefix)."""
    mix: Literal["infusion", "fixed_general", "dilution"] = "infusion"
    """Control of the mix (issue 17; kislurm.analysis.controls). infusion: the cell's budget, a share r of knowledge samples.
    fixed_general: the general samples of every cell are those of an infusion cell at reference_ratio with the same
    budget, and knowledge samples are added on top (K = G r / (1 - r)), so a cell's tokens and steps grow with r.
    dilution: the infusion cell's budget and ratio, but the knowledge stream replaced by neutral text in the same
    templates with fresh subjects and random objects, each sentence once (no fact repeated, nothing probed)."""
    schedule: Literal["mixed", "staged"] = "mixed"
    """mixed: one mix from the first step. staged: general-only training on stage_tokens first, then the infusion
    cell's mix (its budget at ratio r); retention at the phase boundary is the baseline forgetting is measured from."""
    reference_ratio: Optional[float] = None
    """mix: fixed_general: the ratio whose general share of the budget every cell keeps; unset: the smallest ratio
    of the grid (the plan writes the value into each cell, so it enters the cell's id)."""
    stage_tokens: Optional[int] = None
    """schedule: staged: general-only tokens of the first phase (rounded up to whole steps); unset: the cell's
    token budget (the plan writes the value into each cell)."""

    def __post_init__(self) -> None:
        _check(self.reference_ratio is None or 0.0 < self.reference_ratio < 1.0, "reference_ratio",
               f"expected a ratio strictly between 0 and 1, got {self.reference_ratio}")
        _check(self.stage_tokens is None or self.stage_tokens >= 1, "stage_tokens",
               f"expected a positive number of tokens, got {self.stage_tokens}")
        _check(self.schedule == "mixed" or self.mix == "infusion", "schedule",
               f"schedule: staged works on the infusion mix only, got mix: {self.mix}; fix: use one control per "
               "cell (grid.controls lists several)")
        _check(self.mix == "infusion" or self.policy == "fixed_facts", "mix",
               f"mix: {self.mix} needs policy: fixed_facts; fix: set data.policy: fixed_facts")
        _check(self.train_templates >= 1, "train_templates", "expected >= 1 training template per relation")
        _check(self.heldout_templates >= 0, "heldout_templates", "expected >= 0 held-out templates")
        _check(self.distractors >= 1, "distractors", f"expected k >= 1 distractors, got {self.distractors}")
        _check(self.exposures_per_fact >= 1, "exposures_per_fact", "expected >= 1 exposure per fact")
        _check(0.0 <= self.heldout_general < 1.0, "heldout_general",
               f"expected a share in [0, 1), got {self.heldout_general}; fix: e.g. 0.02")
        _check(self.heldout_general == 0.0 or self.general_prefix is None, "heldout_general",
               "held-out documents need a general stream that kislurm builds, not general_prefix; fix: name the raw "
               "text as data.general_corpus (`kislurm prepare` builds it, as `kislurm corpus` does, with the "
               "documents set apart), or set heldout_general: 0")
        _check(0.0 <= self.max_contamination <= 1.0, "max_contamination",
               f"expected a fraction between 0 and 1, got {self.max_contamination}")
        _check(self.vocab_size >= 64, "vocab_size", f"expected a vocabulary of >= 64 tokens, got {self.vocab_size}")
        if self.source == "triplets":
            _check(self.knowledge_triplets is not None, "knowledge_triplets",
                   "source: triplets needs knowledge_triplets; fix: give the path of a JSONL or TSV triplet file")
            _check(self.templates_file is not None, "templates_file",
                   "source: triplets needs templates_file; fix: give the path of a YAML templates file")
            _check(self.general_triplets is not None or self.general_prefix is not None, "general_triplets",
                   "source: triplets needs general_triplets or general_prefix for the general stream")
        _check(self.general_prefix is None or self.general_probes is not None, "general_probes",
               "general_prefix needs general_probes (facts known to be in that corpus) to measure retention")
        _check(self.general_corpus is None or self.general_prefix is None, "general_corpus",
               "general_corpus and general_prefix both name the general stream; fix: keep one of them")
        _check(self.general_corpus is None or (self.general_probes is not None and self.tokenizer is not None),
               "general_corpus", "general_corpus needs general_probes (facts known to be in it) and tokenizer (the "
               "tokenizer.json to encode it with); fix: set both")
        # Files are checked by the data stage when it needs them (before anything is submitted), not here:
        # a cluster config must still plan and dry-run on a laptop that lacks the cluster's data.


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
    checkpoint_minutes: float = 0.0
    """Also checkpoint once this many minutes have passed since the last save (rank 0's clock, agreed by every rank
    at a step boundary); 0 = off. Not part of the cell's id: cadence changes no result."""
    keep_final: Literal["none", "weights", "full"] = "weights"
    """What a DONE cell keeps: nothing; its final weights (CKPT/final, the model only, bf16 on GPU: 2 bytes per
    parameter, resumable at any layout as an initialisation); or the full final checkpoint (weights, optimizer
    state in the reshardable format, RNG: about 16 bytes per parameter on GPU). Not part of the cell's id."""
    async_save: bool = False
    """Write checkpoints asynchronously (megatron's dist_checkpointing async save: a forked writer while training
    goes on; published at the next step boundary once every rank's writes are done). Not part of the cell's id."""
    overlap_dp_comm: bool = True
    """GPU: overlap the DP gradient reduce-scatter with the backward pass and the distributed optimizer's parameter
    all-gather with the next forward (megatron DDP's overlap_grad_reduce / overlap_param_gather); CPU cells never
    overlap. Not part of the cell's id."""
    timeout_startup_min: float = 30.0
    """Longest time a rank may spend starting up (process group, indices, model, checkpoint load) before the cell
    fails naming the phase; as the other timeouts, not part of the cell's id."""
    timeout_step_min: float = 10.0
    """Longest time one training step (its collectives included) may take: a peer rank that died or hung fails the
    cell within this bound, not after the process group's 30 minutes."""
    timeout_eval_min: float = 30.0
    """Longest time one retention evaluation may take."""
    timeout_save_min: float = 10.0
    """Longest time one checkpoint save may take."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "global_batch_size", "eval_interval", "log_interval"):
            _check(getattr(self, key) >= 1, key, f"expected a positive integer, got {getattr(self, key)}")
        _check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
               f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        _check(0 < self.lr < 1, "lr", f"expected a learning rate in (0, 1), got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"expected a value in [0, 1], got {self.min_lr_ratio}")
        _check(0 <= self.warmup_frac < 1, "warmup_frac", f"expected a value in [0, 1), got {self.warmup_frac}")
        _check(self.weight_decay >= 0, "weight_decay", "expected a non-negative weight decay")
        _check(self.clip_grad >= 0, "clip_grad", "expected a non-negative clipping threshold (0 disables)")
        _check(self.init_std > 0, "init_std", "expected a positive std")
        _check(self.checkpoint_interval >= 0, "checkpoint_interval", "expected >= 0 (0 = at every evaluation)")
        _check(self.checkpoint_minutes >= 0, "checkpoint_minutes", "expected >= 0 (0 = off)")
        _check(self.keep_final in ("none", "weights", "full"), "keep_final",
               f"expected none, weights or full, got {self.keep_final!r}")
        for key in ("timeout_startup_min", "timeout_step_min", "timeout_eval_min", "timeout_save_min"):
            _check(getattr(self, key) > 0, key, f"expected a positive number of minutes, got {getattr(self, key)}")


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


def effective_train(base: TrainConfig, preset: ModelPreset) -> TrainConfig:
    """The TrainConfig a size's cells train with: the run's train: section with the preset's overrides applied.
    Without overrides it is `base` itself, so those cells keep their ids."""
    changes = {k: v for k, v in dataclasses.asdict(preset.train).items() if v is not None} if preset.train else {}
    return dataclasses.replace(base, **changes) if changes else base


@dataclass(frozen=True)
class DownstreamConfig:
    """lm-eval tasks scored during training, through kislurm's own scorer (docs/downstream.md; needs the
    kislurm[eval] extra). Not part of a cell's id: it adds scores, it changes no other result."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names, paths of task YAML files, or kislurm_probes (the cell's probes as an lm-eval task);
    empty: off."""
    every: int = 1
    """Score at every N-th evaluation; the first and the last evaluation always score."""
    limit: Optional[int] = None
    """Documents per task (lm-eval's limit); None: all of them."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, "every", "expected a positive number of evaluations")
        _check(self.limit is None or self.limit >= 1, "limit", "expected a positive number of documents")


@dataclass(frozen=True)
class EvalConfig:
    """Retention probing."""

    batch_size: int = 512
    """Candidate sequences scored per forward pass."""
    exact_match: bool = True
    """Also record greedy exact match (a stricter second metric)."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    """lm-eval tasks scored beside the probes (off by default)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size", "expected a positive batch size")


_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where cells run: submitit's local executor (default), a Slurm cluster, or in-process (debug)."""

    cluster: Literal["local", "slurm", "debug"] = "local"
    """local: subprocesses on this machine; slurm: job arrays; debug: in this process, one after another."""
    partition: Optional[str] = None
    """Slurm partition."""
    account: Optional[str] = None
    """Slurm account."""
    qos: Optional[str] = None
    """Slurm quality of service."""
    constraint: Optional[str] = None
    """Slurm node constraint (e.g. h100)."""
    gpus_per_node: int = 8
    """GPUs per node of the cluster; a GPU cell of world size W takes ceil(W / gpus_per_node) nodes."""
    tasks_per_node: Optional[int] = None
    """Ranks per node. Unset: a GPU cell puts gpus_per_node ranks on each node (one per GPU) and a CPU cell puts
    all its ranks on one node. A cell of world size W then takes W / tasks_per_node nodes (it must divide W)."""
    allow_tp_across_nodes: bool = False
    """Let a tensor-parallel group span nodes. Off: a cell refuses such a layout at start-up, since TP's per-layer
    all-reduces over the network are several times slower than inside a node."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun arguments for every cell's tasks, e.g. Pyxis's [--container-image=nvcr.io#nvidia/pytorch:25.01-py3].
    kislurm always adds --kill-on-bad-exit=1, so a dead rank ends its cell instead of leaving the others waiting."""
    cpus_per_task: int = 1
    """CPUs per task (per rank)."""
    mem_gb: Optional[int] = None
    """Memory per node in GB (unset: the cluster's default)."""
    time: Optional[str] = None
    """Override every preset's time limit, in Slurm format (MM, HH:MM:SS or D-HH:MM:SS)."""
    array_parallelism: int = 2
    """Tasks of one array running at once (local: processes at once)."""
    max_array_size: Optional[int] = None
    """Split arrays above this many tasks (unset: read MaxArraySize from the cluster)."""
    max_requeues: int = 20
    """Times a cell may be requeued after its time limit or a preemption (it resumes from its last checkpoint)."""
    signal_lead_s: int = 0
    """Seconds before the time limit that Slurm sends the save-and-requeue signal; 0 = derived from the slowest
    checkpoint save measured so far among the cells being submitted (kislurm.cluster.submit.signal_delay_s)."""
    prepare_partition: Optional[str] = None
    """Slurm partition of the preparation job (the one CPU job that builds the data every cell reads; the cell
    arrays wait on it). Unset: the cells' partition, with no GPU requested."""
    prepare_cpus: int = 4
    """CPUs of the preparation job."""
    prepare_time: str = "2:00:00"
    """Time limit of the preparation job, in Slurm format."""
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    """Extra sbatch options passed through as is, e.g. {mail-type: END}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each task (module load, source venv)."""
    gpu_memory_gb: Optional[float] = None
    """Memory of one GPU in GiB (80 for an H100 80GB). When set, the plan refuses GPU layouts whose estimated
    per-rank memory exceeds 90% of it and resolves `tensor_parallel: auto` (kislurm.plan.estimate); unset: no check."""
    mfu: float = 0.52
    """Model FLOPs utilisation assumed for the plan's GPU-hours (default: measured for 1.3B on an H100, README)."""
    gpu_peak_tflops: float = 989.0
    """Dense bf16 peak TFLOP/s of one GPU, for the plan's GPU-hours (989: H100 / H200)."""

    def __post_init__(self) -> None:
        _check(self.gpus_per_node >= 0, "gpus_per_node", "expected >= 0 GPUs per node")
        _check(self.cpus_per_task >= 1, "cpus_per_task", "expected >= 1 CPU per task")
        _check(self.tasks_per_node is None or self.tasks_per_node >= 1, "tasks_per_node", "expected >= 1 rank per node")
        _check(self.array_parallelism >= 1, "array_parallelism", "expected >= 1 task at once")
        _check(self.max_array_size is None or self.max_array_size >= 1, "max_array_size", "expected >= 1")
        _check(self.max_requeues >= 0, "max_requeues", "expected >= 0 requeues")
        _check(self.prepare_cpus >= 1, "prepare_cpus", "expected >= 1 CPU")
        _check(bool(_SLURM_TIME.match(self.prepare_time)), "prepare_time",
               f"'{self.prepare_time}' is not a Slurm time; fix: use MM, HH:MM:SS or D-HH:MM:SS, e.g. 2:00:00")
        _check(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "gpu_memory_gb", "expected GiB > 0 per GPU")
        _check(0 < self.mfu <= 1, "mfu", f"expected a utilisation in (0, 1], got {self.mfu}")
        _check(self.gpu_peak_tflops > 0, "gpu_peak_tflops", "expected a positive peak TFLOP/s")
        _check(self.time is None or bool(_SLURM_TIME.match(self.time)), "time",
               f"'{self.time}' is not a Slurm time; fix: use MM, HH:MM:SS or D-HH:MM:SS, e.g. 12:00:00")


@dataclass(frozen=True)
class AnalysisConfig:
    """Collapse detection and the scaling-law fit."""

    metric: str = "general_acc"
    """Retention metric whose collapse defines r* (see kislurm.retention.evaluate for the names)."""
    unit: Literal["odds", "tokens", "exposures"] = "odds"
    """Unbounded unit the law is fitted in: infusion odds r/(1-r), knowledge tokens r*D, or exposures per fact."""
    bootstrap: int = 200
    """Bootstrap resamples (facts and seeds) for the r* and exponent intervals."""
    confidence: float = 0.9
    """Coverage of the reported intervals."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    target_sizes: dict[str, float] = field(default_factory=dict)
    """Named non-embedding parameter counts to predict r* for, e.g. {7B: 6.5e9}."""
    safe_drop: float = 0.05
    """The safe infusion ratio reported per size and target: the largest r at which the fitted collapse curve has
    lost at most this fraction of its drop from plateau to floor."""
    target_width: float | None = None
    """Adaptive ladders (kislurm.analysis.validate.adaptive_ladder): add ratios to a rung until its r* interval is narrower
    than this, in log-odds (None: never)."""
    validate_sizes: list[str] = field(default_factory=list)
    """Sizes (presets) that are trained but never fitted: each one's observed r* is reported against the law's
    prediction from the other sizes (`kislurm validate RUN --size NAME` plans and submits its cells)."""
    frequency_bands: list[float] = field(default_factory=list)
    """Inner edges of the frequency bands (corpus documents per fact from the census, or general exposures per
    fact at the smallest ratio in synthetic runs), e.g. [10, 100]; empty: frequency_quantiles quantile bands."""
    frequency_quantiles: int = 3
    """Quantile bands when frequency_bands is empty (over the facts the smallest-ratio cell knows)."""
    min_band_facts: int = 30
    """A band holds at least this many facts: thinner neighbours are merged (fewer bands, never thin ones)."""

    def __post_init__(self) -> None:
        _check(self.bootstrap >= 0, "bootstrap", "expected >= 0 resamples")
        _check(0 < self.safe_drop < 0.5, "safe_drop", f"expected a fraction in (0, 0.5), got {self.safe_drop}; "
               "fix: e.g. 0.05 for 5% of the drop")
        _check(self.target_width is None or self.target_width > 0, "target_width", "expected a positive width")
        _check(len(set(self.validate_sizes)) == len(self.validate_sizes), "validate_sizes",
               "duplicate sizes; fix: list each size once")
        _check(self.frequency_quantiles >= 1, "frequency_quantiles", "expected >= 1 band")
        _check(self.min_band_facts >= 1, "min_band_facts", "expected >= 1 fact per band")
        _check(list(self.frequency_bands) == sorted(set(self.frequency_bands)), "frequency_bands",
               f"expected increasing edges, got {self.frequency_bands}; fix: e.g. [10, 100]")
        _check(0.5 <= self.confidence < 1, "confidence", f"expected a coverage in [0.5, 1), got {self.confidence}")
        for name, n in self.target_sizes.items():
            _check(n > 0, f"target_sizes.{name}", f"expected a positive parameter count, got {n}")


@dataclass(frozen=True)
class WandbConfig:
    """A Weights & Biases run per cell (rank 0 logs what TensorBoard gets); needs `pip install wandb` and a login
    (WANDB_API_KEY, or `wandb login`) on the compute nodes."""

    project: str
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (user or team); unset: the login's default."""
    mode: Literal["online", "offline"] = "online"
    """offline: write the W&B run under the cell folder only (upload later with `wandb sync`)."""


@dataclass(frozen=True)
class MonitorConfig:
    """What a user can watch while cells train (kislurm.train.monitor); rank 0 of each cell writes it."""

    tensorboard: bool = True
    """TensorBoard event files per cell (RUN/cells/CELL/tensorboard/): `tensorboard --logdir RUN` shows every cell."""
    wandb: Optional[WandbConfig] = None
    """Weights & Biases, e.g. {project: kislurm, entity: my-team}; unset: off."""


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a grid of cells sharing data, training, execution and analysis settings."""

    name: str = "experiment"
    """Run name; the run folder is output_root/name."""
    output_root: str = "runs"
    """Folder holding run folders (a relative path is relative to the working directory kislurm runs in)."""
    grid: GridConfig = field(default_factory=GridConfig)
    models: dict[str, ModelPreset] = field(default_factory=dict)
    """Extra or overriding model presets, by name."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """TensorBoard and W&B (where and how cells show their training); not part of any cell id."""

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name)), "name",
               f"'{self.name}' is not a usable folder name; fix: use letters, digits, '.', '_' and '-'")
        presets = self.presets
        for i, size in enumerate(self.analysis.validate_sizes):
            _check(size in presets, f"analysis.validate_sizes[{i}]",
                   f"unknown model preset '{size}'; fix: use one of {sorted(presets)} or define it under models:")
        for i, size in enumerate(self.grid.sizes):
            _check(size in presets, f"grid.sizes[{i}]",
                   f"unknown model preset '{size}'; fix: use one of {sorted(presets)} or define it under models:")
        for name, p in self.models.items():  # each preset's overrides, checked against this run's train:
            try:
                effective_train(self.train, p)
            except _FieldError as e:
                raise _FieldError(f"models.{name}.train.{e.key}", str(e)) from None
        for i, size in enumerate(self.grid.sizes):
            p, t = presets[size], self.train_for(size)
            _check(t.global_batch_size % (t.micro_batch_size * p.data_parallel) == 0,
                   "train.global_batch_size" if p.train is None else f"models.{size}.train.global_batch_size",
                   f"{t.global_batch_size} is not a multiple of micro_batch_size x data_parallel of "
                   f"'{size}' ({t.micro_batch_size} x {p.data_parallel})")

    @property
    def presets(self) -> dict[str, ModelPreset]:
        return {**BUILTIN_PRESETS, **self.models}

    def train_for(self, size: str) -> TrainConfig:
        """The training settings of one size's cells: train: with that preset's overrides (effective_train)."""
        return effective_train(self.train, self.presets[size])


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return {list: "a list", dict: "a mapping"}[origin]
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert one YAML value to the annotated type, or raise _FieldError naming what was expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        errors = []
        for a in inner:  # the first alternative that takes the value
            try:
                return _convert(a, value, key)
            except _FieldError as e:
                errors.append((a, e))
        for a, e in errors:  # a list with a bad item: that item's error, not the list's
            if isinstance(value, list) and typing.get_origin(a) is list:
                raise e
        raise _FieldError(key, f"expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise _FieldError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _FieldError(key, f"expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _FieldError(key, f"expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise _FieldError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            value = int(value)  # YAML reads 1e9 as a float
        if isinstance(value, str):
            value = _parse_count(value, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 3e-3 as a string
            except ValueError:
                raise _FieldError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _FieldError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _FieldError(key, f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")  # a bug in this module, not in the user's file


_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def _parse_count(text: str, key: str) -> int:
    """Accept counts written like 2M, 100B or 1e9 for token budgets."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMbBgGtT]?)\s*", text)
    try:
        assert m is not None
        return int(round(float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1)))
    except (AssertionError, ValueError):
        raise _FieldError(key, f"expected an integer (e.g. 2000000, 2M or 100B), got {text!r}") from None


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and checking each value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _FieldError(where, f"expected a mapping of {cls.__name__} settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    if cls is ModelPreset and data.get("init_from") is not None:
        data = _with_base_architecture(data, prefix)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _FieldError(f"{prefix}{key}", f"unknown key{hint}; valid keys here: {', '.join(names)}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except _FieldError as e:
        raise _FieldError(f"{prefix}{e.key}", str(e)) from None
    except TypeError as e:  # a required field is missing
        missing = re.findall(r"'(\w+)'", str(e))
        raise _FieldError(f"{prefix}{missing[0] if missing else '?'}", f"required key is missing ({e})") from None


def build_section(cls: type, data: Any, where: str) -> Any:
    """A config dataclass from its plain-data form (config_to_dict's output, or YAML), checked as a config file is:
    a bad key or value raises ConfigError naming `where`."""
    try:
        return _build(cls, data, where)
    except _FieldError as e:  # e.key starts with `where`
        raise ConfigError(f"{e.key}: {e}") from None


def _with_base_architecture(data: dict, prefix: str) -> dict:
    """A preset with init_from: its architecture fields read from the base's config.json (kislurm.plan.hf)."""
    from kislurm.errors import KislurmError
    from kislurm.plan import hf

    _check(isinstance(data["init_from"], str), f"{prefix}init_from", "expected the path of a HuggingFace folder")
    seq = data.get("seq_length")
    try:
        fields = hf.base_preset_fields(data["init_from"], seq if isinstance(seq, int) else None)
    except KislurmError as e:
        raise _FieldError(f"{prefix}init_from", str(e)) from None
    differ = [k for k in hf.ARCH_FIELDS if k in data and data[k] != fields[k]]  # a run's config.yaml repeats them
    _check(not differ, f"{prefix}{differ[0] if differ else ''}", "init_from takes the architecture from the base's "
           f"config.json, which gives {', '.join(f'{k} {fields[k]}' for k in differ)}; fix: remove "
           f"{', '.join(differ)} from this preset")
    return {**data, **fields}


def _resolve_paths(data: dict, base: Path) -> dict:
    """Make file paths in the data section relative to the config file, so a run works from any directory."""
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("knowledge_triplets", "general_triplets", "templates_file", "tokenizer", "general_probes",
                    "general_census"):
            if isinstance(section.get(key), str):
                section[key] = str((base / Path(section[key]).expanduser()).resolve())
        corpus = section.get("general_corpus")
        if isinstance(corpus, dict) and isinstance(corpus.get("files"), list):
            corpus["files"] = [str(base / Path(f).expanduser()) if isinstance(f, str) else f for f in corpus["files"]]
    models = data.get("models")
    for preset in models.values() if isinstance(models, dict) else []:
        if isinstance(preset, dict) and isinstance(preset.get("init_from"), str):
            preset["init_from"] = str((base / Path(preset["init_from"]).expanduser()).resolve())
    data["output_root"] = str(Path(data.get("output_root", "runs")).expanduser().resolve())  # relative to cwd
    return data


def config_from_dict(data: Any, source: str = "<config>", base: Path | None = None) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a plain mapping (as read from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}; "
                          "fix: start the file with keys such as name:, grid:, data:")
    data = _resolve_paths(json.loads(json.dumps(data)), base or Path.cwd())
    try:
        return _base_tokenizer(_build(ExperimentConfig, data, ""))
    except _FieldError as e:
        raise ConfigError(f"{source}: {e.key}: {e}") from None


def _base_tokenizer(cfg: ExperimentConfig) -> ExperimentConfig:
    """With init_from sizes in the grid, data.tokenizer defaults to the base's tokenizer.json (one base tokenizer
    per run); whether a given data.tokenizer is the base's is checked by the data stage (it reads both files)."""
    bases = sorted({cfg.presets[s].init_from for s in cfg.grid.sizes if cfg.presets[s].init_from is not None})
    if not bases or cfg.data.tokenizer is not None:
        return cfg
    _check(len(bases) == 1, "data.tokenizer", f"the grid starts from {len(bases)} bases ({', '.join(bases)}): "
           "one run has one tokenizer; fix: set data.tokenizer to the one they share, or one base per run")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(Path(bases[0]) /
                                                                                     "tokenizer.json")))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (safe loader), apply dotted-key overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; fix: check the path (try configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix: check indentation and quoting") from None
    for dotted, value in (overrides or {}).items():
        data = data or {}
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(data, str(path), path.parent.resolve())


def config_to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (for JSON records and hashing)."""
    return dataclasses.asdict(cfg)
