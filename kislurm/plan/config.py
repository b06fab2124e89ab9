"""The experiment file's schema: typed, frozen dataclasses, one per section, each field documented and checked.

A YAML file holds only what differs from the defaults below; kislurm.plan.loader reads it into these classes.
Every value is checked where it is set (__post_init__): a bad one is a one-line error naming the key, what was
expected and how to fix it. Model presets live in kislurm.plan.presets, the train: section in
kislurm.plan.training; a field's place in a cell's id is in its metadata (kislurm.plan.fields).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from kislurm.errors import ConfigError  # noqa: F401 (re-exported: the plan stage's config error)
from kislurm.plan.fields import IN_ID_UNLESS_DEFAULT, FieldError, check
from kislurm.plan.presets import BUILTIN_PRESETS, ModelPreset, effective_train
from kislurm.plan.training import TrainConfig


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
        check(len(self.sizes) > 0, "sizes", "expected at least one model size; fix: list preset names")
        if self.adaptive:
            check(len(self.start_ratios) >= 4, "start_ratios", "ratios: adaptive needs >= 4 start_ratios for the "
                  "two smallest sizes; fix: e.g. start_ratios: [0.1, 0.3, 0.5, 0.7, 0.9]")
            check(len(self.sizes) >= 2, "sizes", "ratios: adaptive needs >= 2 sizes; fix: list more sizes")
            check(self.rung_points >= 4, "rung_points", f"expected >= 4 ratios per rung (two on each side of r*), "
                  f"got {self.rung_points}")
        check(len(self.ratios) > 0, "ratios", "expected at least one infusion ratio; fix: e.g. [0.1, 0.5, 0.9]")
        for name in ("start_ratios",) if self.adaptive else ("ratios",):
            values = getattr(self, name)
            for i, r in enumerate(values):
                check(0.0 < r < 1.0, f"{name}[{i}]", f"expected a ratio strictly between 0 and 1, got {r}; "
                      "fix: write fractions, e.g. 0.1 for 10%")
            check(len(set(values)) == len(values), name, "duplicate ratios; fix: list each ratio once")
        check(len(self.token_budgets) > 0, "token_budgets", "expected at least one token budget")
        for i, t in enumerate(self.token_budgets):
            check(t >= 1, f"token_budgets[{i}]", f"expected a positive number of tokens, got {t}")
        check(len(self.seeds) > 0, "seeds", "expected at least one seed; fix: seeds: [0]")
        check(len(set(self.sizes)) == len(self.sizes), "sizes", "duplicate sizes; fix: list each size once")
        check(len(self.controls) > 0 and len(set(self.controls)) == len(self.controls), "controls",
              "expected distinct controls; fix: e.g. [infusion, fixed_general, dilution, staged]")
        for i, c in enumerate(self.controls):
            check(c in CONTROLS, f"controls[{i}]", f"unknown control {c!r}; fix: use one of {', '.join(CONTROLS)}")


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
        check(self.entities >= 1, "entities", f"expected >= 1 entity, got {self.entities}")
        check(self.relations >= 1, "relations", f"expected >= 1 relation, got {self.relations}")
        check(self.values_per_relation >= 2, "values_per_relation",
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
        check(len(self.files) >= 1, "files", "expected at least one file or glob; fix: e.g. files: [corpus/*.jsonl]")


@dataclass(frozen=True)
class DataConfig:
    """Where the general and knowledge streams come from and how knowledge is infused.

    The fields of issue 17's controls, issue 25's census and issue 24's general_corpus enter a cell's id only at a
    non-default value (IN_ID_UNLESS_DEFAULT), so every infusion cell keeps the id it had before they existed (the
    demo's table stays reproducible)."""

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
    general_corpus: Optional[GeneralCorpus] = field(default=None, metadata=IN_ID_UNLESS_DEFAULT)
    """Raw text (files: [...], json_key: text) that `kislurm prepare` tokenizes with data.tokenizer into the general
    stream, once per content: the prefix lives under OUTPUT_ROOT/corpora/<fingerprint>/ and is used as
    general_prefix, so another experiment on the same files and tokenizer reuses it."""
    general_census: Optional[str] = field(default=None, metadata=IN_ID_UNLESS_DEFAULT)
    """Folder written by `kislurm census` over the general corpus with --knowledge: `kislurm prepare` refuses a
    knowledge base sharing a subject-object pair with the general probes or more contaminated than
    max_contamination, and carries each general fact's corpus count (docs_both) into the probes."""
    max_contamination: float = field(default=0.05, metadata=IN_ID_UNLESS_DEFAULT)
    """With general_census: the largest share of knowledge facts that may already co-occur in the general corpus
    (or share a pair with a general fact) before `kislurm prepare` refuses the knowledge base."""
    heldout_general: float = field(default=0.0, metadata=IN_ID_UNLESS_DEFAULT)
    """Share of the general stream's documents (fact sentences, or general_corpus documents) that no cell trains on,
    chosen by a hash of the document index; every evaluation scores them (mean loss and bits per byte). 0: none.
    Needs a general stream that kislurm builds (synthetic or general_corpus, not general_prefix)."""
    mix: Literal["infusion", "fixed_general", "dilution"] = field(default="infusion", metadata=IN_ID_UNLESS_DEFAULT)
    """Control of the mix (issue 17; kislurm.analysis.controls). infusion: the cell's budget, a share r of knowledge samples.
    fixed_general: the general samples of every cell are those of an infusion cell at reference_ratio with the same
    budget, and knowledge samples are added on top (K = G r / (1 - r)), so a cell's tokens and steps grow with r.
    dilution: the infusion cell's budget and ratio, but the knowledge stream replaced by neutral text in the same
    templates with fresh subjects and random objects, each sentence once (no fact repeated, nothing probed)."""
    schedule: Literal["mixed", "staged"] = field(default="mixed", metadata=IN_ID_UNLESS_DEFAULT)
    """mixed: one mix from the first step. staged: general-only training on stage_tokens first, then the infusion
    cell's mix (its budget at ratio r); retention at the phase boundary is the baseline forgetting is measured from."""
    reference_ratio: Optional[float] = field(default=None, metadata=IN_ID_UNLESS_DEFAULT)
    """mix: fixed_general: the ratio whose general share of the budget every cell keeps; unset: the smallest ratio
    of the grid (the plan writes the value into each cell, so it enters the cell's id)."""
    stage_tokens: Optional[int] = field(default=None, metadata=IN_ID_UNLESS_DEFAULT)
    """schedule: staged: general-only tokens of the first phase (rounded up to whole steps); unset: the cell's
    token budget (the plan writes the value into each cell)."""

    def __post_init__(self) -> None:
        check(self.reference_ratio is None or 0.0 < self.reference_ratio < 1.0, "reference_ratio",
              f"expected a ratio strictly between 0 and 1, got {self.reference_ratio}")
        check(self.stage_tokens is None or self.stage_tokens >= 1, "stage_tokens",
              f"expected a positive number of tokens, got {self.stage_tokens}")
        check(self.schedule == "mixed" or self.mix == "infusion", "schedule",
              f"schedule: staged works on the infusion mix only, got mix: {self.mix}; fix: use one control per "
              "cell (grid.controls lists several)")
        check(self.mix == "infusion" or self.policy == "fixed_facts", "mix",
              f"mix: {self.mix} needs policy: fixed_facts; fix: set data.policy: fixed_facts")
        check(self.train_templates >= 1, "train_templates", "expected >= 1 training template per relation")
        check(self.heldout_templates >= 0, "heldout_templates", "expected >= 0 held-out templates")
        check(self.distractors >= 1, "distractors", f"expected k >= 1 distractors, got {self.distractors}")
        check(self.exposures_per_fact >= 1, "exposures_per_fact", "expected >= 1 exposure per fact")
        check(0.0 <= self.heldout_general < 1.0, "heldout_general",
              f"expected a share in [0, 1), got {self.heldout_general}; fix: e.g. 0.02")
        check(self.heldout_general == 0.0 or self.general_prefix is None, "heldout_general",
              "held-out documents need a general stream that kislurm builds, not general_prefix; fix: name the raw "
              "text as data.general_corpus (`kislurm prepare` builds it, as `kislurm corpus` does, with the "
              "documents set apart), or set heldout_general: 0")
        check(0.0 <= self.max_contamination <= 1.0, "max_contamination",
              f"expected a fraction between 0 and 1, got {self.max_contamination}")
        check(self.vocab_size >= 64, "vocab_size", f"expected a vocabulary of >= 64 tokens, got {self.vocab_size}")
        if self.source == "triplets":
            check(self.knowledge_triplets is not None, "knowledge_triplets",
                  "source: triplets needs knowledge_triplets; fix: give the path of a JSONL or TSV triplet file")
            check(self.templates_file is not None, "templates_file",
                  "source: triplets needs templates_file; fix: give the path of a YAML templates file")
            check(self.general_triplets is not None or self.general_prefix is not None, "general_triplets",
                  "source: triplets needs general_triplets or general_prefix for the general stream")
        check(self.general_prefix is None or self.general_probes is not None, "general_probes",
              "general_prefix needs general_probes (facts known to be in that corpus) to measure retention")
        check(self.general_corpus is None or self.general_prefix is None, "general_corpus",
              "general_corpus and general_prefix both name the general stream; fix: keep one of them")
        check(self.general_corpus is None or (self.general_probes is not None and self.tokenizer is not None),
              "general_corpus", "general_corpus needs general_probes (facts known to be in it) and tokenizer (the "
              "tokenizer.json to encode it with); fix: set both")
        # Files are checked by the data stage when it needs them (before anything is submitted), not here:
        # a cluster config must still plan and dry-run on a laptop that lacks the cluster's data.



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
        check(self.every >= 1, "every", "expected a positive number of evaluations")
        check(self.limit is None or self.limit >= 1, "limit", "expected a positive number of documents")


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
        check(self.batch_size >= 1, "batch_size", "expected a positive batch size")


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
    checkpoint save measured so far among the cells being submitted (kislurm.cluster.executors.signal_delay_s)."""
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
        check(self.gpus_per_node >= 0, "gpus_per_node", "expected >= 0 GPUs per node")
        check(self.cpus_per_task >= 1, "cpus_per_task", "expected >= 1 CPU per task")
        check(self.tasks_per_node is None or self.tasks_per_node >= 1, "tasks_per_node", "expected >= 1 rank per node")
        check(self.array_parallelism >= 1, "array_parallelism", "expected >= 1 task at once")
        check(self.max_array_size is None or self.max_array_size >= 1, "max_array_size", "expected >= 1")
        check(self.max_requeues >= 0, "max_requeues", "expected >= 0 requeues")
        check(self.prepare_cpus >= 1, "prepare_cpus", "expected >= 1 CPU")
        check(bool(_SLURM_TIME.match(self.prepare_time)), "prepare_time",
              f"'{self.prepare_time}' is not a Slurm time; fix: use MM, HH:MM:SS or D-HH:MM:SS, e.g. 2:00:00")
        check(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "gpu_memory_gb", "expected GiB > 0 per GPU")
        check(0 < self.mfu <= 1, "mfu", f"expected a utilisation in (0, 1], got {self.mfu}")
        check(self.gpu_peak_tflops > 0, "gpu_peak_tflops", "expected a positive peak TFLOP/s")
        check(self.time is None or bool(_SLURM_TIME.match(self.time)), "time",
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
        check(self.bootstrap >= 0, "bootstrap", "expected >= 0 resamples")
        check(0 < self.safe_drop < 0.5, "safe_drop", f"expected a fraction in (0, 0.5), got {self.safe_drop}; "
              "fix: e.g. 0.05 for 5% of the drop")
        check(self.target_width is None or self.target_width > 0, "target_width", "expected a positive width")
        check(len(set(self.validate_sizes)) == len(self.validate_sizes), "validate_sizes",
              "duplicate sizes; fix: list each size once")
        check(self.frequency_quantiles >= 1, "frequency_quantiles", "expected >= 1 band")
        check(self.min_band_facts >= 1, "min_band_facts", "expected >= 1 fact per band")
        check(list(self.frequency_bands) == sorted(set(self.frequency_bands)), "frequency_bands",
              f"expected increasing edges, got {self.frequency_bands}; fix: e.g. [10, 100]")
        check(0.5 <= self.confidence < 1, "confidence", f"expected a coverage in [0.5, 1), got {self.confidence}")
        for name, n in self.target_sizes.items():
            check(n > 0, f"target_sizes.{name}", f"expected a positive parameter count, got {n}")


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
    """Extra or overriding model presets, by name; one may extend another, or a shipped one, with `base: NAME` and
    list only the fields it changes (kislurm.plan.presets.extend_presets)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """TensorBoard and W&B (where and how cells show their training); not part of any cell id."""

    def __post_init__(self) -> None:
        check(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name)), "name",
              f"'{self.name}' is not a usable folder name; fix: use letters, digits, '.', '_' and '-'")
        presets = self.presets
        for i, size in enumerate(self.analysis.validate_sizes):
            check(size in presets, f"analysis.validate_sizes[{i}]",
                  f"unknown model preset '{size}'; fix: use one of {sorted(presets)} or define it under models:")
        for i, size in enumerate(self.grid.sizes):
            check(size in presets, f"grid.sizes[{i}]",
                  f"unknown model preset '{size}'; fix: use one of {sorted(presets)} or define it under models:")
        for name, p in self.models.items():  # each preset's overrides, checked against this run's train:
            try:
                effective_train(self.train, p)
            except FieldError as e:
                raise FieldError(f"models.{name}.train.{e.key}", str(e)) from None
        for i, size in enumerate(self.grid.sizes):
            p, t = presets[size], self.train_for(size)
            check(t.global_batch_size % (t.micro_batch_size * p.data_parallel) == 0,
                  "train.global_batch_size" if p.train is None else f"models.{size}.train.global_batch_size",
                  f"{t.global_batch_size} is not a multiple of micro_batch_size x data_parallel of "
                  f"'{size}' ({t.micro_batch_size} x {p.data_parallel})")

    @property
    def presets(self) -> dict[str, ModelPreset]:
        return {**BUILTIN_PRESETS, **self.models}

    def train_for(self, size: str) -> TrainConfig:
        """The training settings of one size's cells: train: with that preset's overrides (effective_train)."""
        return effective_train(self.train, self.presets[size])
