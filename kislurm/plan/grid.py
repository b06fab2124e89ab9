"""Plan: the grid becomes a list of cells, each with an id hashed from its effective config and a resolved folder.

Pure: nothing here touches the scheduler, or the disk beyond reading a tokenizer's size for the memory estimate.
Identity is the config (as in Marin's executor): two cells with the same effective settings have the same id, so a
resubmission recognises finished work, and a changed config yields a new id instead of silently mixing results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kislurm.errors import ConfigError
from kislurm.plan.config import CONTROL_DATA, DataConfig, EvalConfig, ExperimentConfig
from kislurm.plan.estimate import plan_vocab_size, resolve_layout
from kislurm.plan.fields import field_default, id_rule
from kislurm.plan.loader import build_section, config_to_dict
from kislurm.plan.presets import ModelPreset
from kislurm.plan.training import TrainConfig


@dataclass(frozen=True)
class Cell:
    """One grid cell: a model size trained at one infusion ratio, token budget and seed."""

    size: str
    ratio: float
    tokens: int
    seed: int
    model: ModelPreset
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig

    def effective(self) -> dict[str, Any]:
        """Every setting that changes what the cell computes (not where or how it is scheduled)."""
        return {"size": self.size, "ratio": self.ratio, "tokens": self.tokens, "seed": self.seed,
                "model": json.loads(section_id_json(self.model)), "data": json.loads(section_id_json(self.data)),
                "train": json.loads(section_id_json(self.train))}

    @functools.cached_property
    def cell_id(self) -> str:
        """Hash of effective(); built from cached section JSON so 10,000 cells plan in well under a second."""
        head = json.dumps({"size": self.size, "ratio": self.ratio, "tokens": self.tokens, "seed": self.seed},
                          sort_keys=True, separators=(",", ":"))
        blob = "|".join((head, section_id_json(self.model), section_id_json(self.data), section_id_json(self.train)))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        """Readable folder name: size, ratio, tokens, seed, the control (unless infusion), then the id that
        guarantees uniqueness."""
        tag = "" if self.control == "infusion" else f"_{self.control}"
        return f"{self.size}_r{self.ratio:g}_t{_short_count(self.tokens)}_s{self.seed}{tag}_{self.cell_id}"

    @property
    def control(self) -> str:
        """The issue-17 control this cell trains under: infusion, fixed_general, dilution or staged."""
        return "staged" if self.data.schedule == "staged" else self.data.mix

    @property
    def n_samples(self) -> int:
        """Training sequences: the token budget rounded up to whole global batches (plus, for the controls, the
        general phase of staged or the added knowledge of fixed_general)."""
        return self.steps * self.train.global_batch_size

    def _steps_of(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / (self.train.global_batch_size * self.model.seq_length)))

    @property
    def steps(self) -> int:
        if self.control == "fixed_general":
            gbs, g = self.train.global_batch_size, self.general_samples_fixed
            return max(math.ceil(g / (1.0 - self.ratio) / gbs), math.ceil((g + 1) / gbs))
        return self._steps_of(self.tokens) + self.phase1_steps

    @property
    def phase1_steps(self) -> int:
        """schedule staged: the general-only steps before the mix (data.stage_tokens, default the budget); else 0."""
        if self.control != "staged":
            return 0
        return self._steps_of(self.data.stage_tokens if self.data.stage_tokens is not None else self.tokens)

    @property
    def phase1_samples(self) -> int:
        return self.phase1_steps * self.train.global_batch_size

    @property
    def mix_samples(self) -> int:
        """Samples of the mixed phase (all of them but staged's general phase): the blend megatron builds."""
        return self.n_samples - self.phase1_samples

    @property
    def general_samples_fixed(self) -> int:
        """mix fixed_general: G, the general samples of the infusion cell at data.reference_ratio with this budget."""
        if self.data.reference_ratio is None:
            raise ValueError(f"cell {self.size} r={self.ratio}: mix fixed_general without data.reference_ratio "
                             "(the plan sets it); fix: build cells with kislurm.plan.grid.expand")
        n_ref = self._steps_of(self.tokens) * self.train.global_batch_size
        return n_ref - share_samples(n_ref, self.data.reference_ratio)

    @property
    def knowledge_samples(self) -> int:
        """K: the cell's knowledge (or, for dilution, neutral) samples. round(r x n) of the mixed samples; for
        fixed_general every sample beyond the fixed G general ones."""
        if self.control == "fixed_general":
            return self.n_samples - self.general_samples_fixed
        return share_samples(self.mix_samples, self.ratio)

    @property
    def eval_steps(self) -> list[int]:
        """Steps after which retention is evaluated: every eval_interval, and always the last step (and, staged, the
        end of the general phase: the baseline forgetting is measured from; and step 0, before any training, for a
        cell that starts from a base model: what the base knew)."""
        steps = list(range(self.train.eval_interval, self.steps, self.train.eval_interval))
        if self.model.init_from is not None:
            steps = [0, *steps]
        if self.phase1_steps and self.phase1_steps not in steps:
            steps = sorted([*steps, self.phase1_steps])
        return steps + [self.steps]

    def to_json(self) -> dict[str, Any]:
        """The cell.json record: id, name, the effective settings, and under `cell` every field of every section, so
        the cell can be rebuilt from this record alone (Cell.from_json), whatever config produced it."""
        return {"cell_id": self.cell_id, "name": self.name, "steps": self.steps, "n_samples": self.n_samples,
                **self.effective(), "layout": {"tensor_parallel": self.model.tensor_parallel,
                                               "pipeline_parallel": self.model.pipeline_parallel,
                                               "data_parallel": self.model.data_parallel,
                                               "device": self.model.device},
                "cell": {"size": self.size, "ratio": self.ratio, "tokens": self.tokens, "seed": self.seed,
                         **{k: config_to_dict(getattr(self, k)) for k in _SECTIONS}}}

    @classmethod
    def from_json(cls, record: dict[str, Any], source: str = "cell.json") -> "Cell":
        """The cell that wrote `record` (to_json's output); refused when the record predates the full form or its
        sections no longer hash to the recorded id (a kislurm whose defaults or id rules changed)."""
        full = record.get("cell")
        if not isinstance(full, dict):
            raise ConfigError(f"{source}: written by an older kislurm without the full cell; fix: run the cell "
                              "through its run's config (python -m kislurm.cluster.cell_job RUN CELL) or resubmit")
        try:
            cell = cls(size=str(full["size"]), ratio=float(full["ratio"]), tokens=int(full["tokens"]),
                       seed=int(full["seed"]), **{k: build_section(t, full[k], f"{source}: cell.{k}")
                                                   for k, t in _SECTIONS.items()})
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: damaged cell record ({type(e).__name__}: {e}); fix: delete it and "
                              "resubmit the run, which writes it again") from None
        if cell.cell_id != record.get("cell_id"):
            raise ConfigError(f"{source}: its settings hash to cell id {cell.cell_id}, not the recorded "
                              f"{record.get('cell_id')}; fix: use the kislurm version that wrote the run")
        return cell


_SECTIONS = {"model": ModelPreset, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
"""A cell's config sections, as Cell names its fields."""


def share_samples(n_samples: int, ratio: float) -> int:
    """The knowledge share, the one rule for it: round(r x n) kept within [1, n - 1] (preparation checks r and n
    first: kislurm.data.streams.cell_knowledge_samples)."""
    return min(max(int(round(ratio * n_samples)), 1), max(n_samples - 1, 1))


@functools.lru_cache(maxsize=2048)
def section_id_json(section: Any) -> str:
    """A section (model, data or train) as a cell's id hashes it: every field by its own rule, recorded in the
    field's metadata (kislurm.plan.fields.id_rule): always in, never in (NOT_IN_ID), or in unless it holds its
    default (IN_ID_UNLESS_DEFAULT). The eval section is not in the id at all (it scores, it changes no result)."""
    d = config_to_dict(section)
    for f in dataclasses.fields(section):
        rule = id_rule(f)
        if rule == "never" or (rule == "unless_default" and getattr(section, f.name) == field_default(f)):
            del d[f.name]
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def control_data(data: DataConfig, control: str, tokens: int, lowest_ratio: float) -> DataConfig:
    """The data config of one control's cells: its field set (config.CONTROL_DATA) and the fields it reads
    resolved (reference_ratio: default the grid's smallest ratio; stage_tokens: default the budget), the fields
    it does not read cleared, so a control's settings never change another control's ids."""
    fields = dict(CONTROL_DATA[control])
    mix = fields.get("mix", data.mix if control == "infusion" else "infusion")
    schedule = fields.get("schedule", data.schedule if control == "infusion" else "mixed")
    ref = (data.reference_ratio if data.reference_ratio is not None else lowest_ratio) \
        if mix == "fixed_general" else None
    stage = (data.stage_tokens if data.stage_tokens is not None else tokens) if schedule == "staged" else None
    return dataclasses.replace(data, mix=mix, schedule=schedule, reference_ratio=ref, stage_tokens=stage)


def _short_count(n: int) -> str:
    for suffix, unit in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= unit and n % (unit // 1000 if unit > 1000 else 1) == 0:
            return f"{n / unit:g}{suffix}"
    return str(n)


def resolve_layouts(cfg: ExperimentConfig, check: bool = True) -> ExperimentConfig:
    """The config with every grid size's `tensor_parallel: auto` resolved (kislurm.plan.estimate.resolve_layout) and,
    with `check`, every GPU layout checked against executor.gpu_memory_gb.

    The CLI resolves before anything is written, so the run folder's config holds the chosen degrees and a compute
    node re-expanding it gets the layout that was submitted (cell ids never depend on TP). Reads the tokenizer
    file's size, when the config names one, only if there is something to resolve or check.
    """
    presets = cfg.presets
    sizes = cfg.grid.sizes
    if not any(presets[s].tensor_parallel == "auto" for s in sizes) and not (check and cfg.executor.gpu_memory_gb):
        return cfg
    vocab = plan_vocab_size(cfg.data)
    resolved = {s: resolve_layout(s, presets[s], cfg.train_for(s), cfg.executor, vocab, check) for s in sizes}
    changed = {s: p for s, p in resolved.items() if p != presets[s]}
    return dataclasses.replace(cfg, models={**cfg.models, **changed}) if changed else cfg


def expand(cfg: ExperimentConfig) -> list[Cell]:
    """The grid's cells, in a stable order: size, then token budget, ratio and seed. With `grid.ratios: adaptive`,
    the cells known before any law: the two smallest sizes (ladder_order) on `grid.start_ratios`."""
    g = cfg.grid
    if g.adaptive:
        return [c for size in ladder_order(cfg)[:2] for c in size_cells(cfg, size, g.start_ratios)]
    return [c for size in g.sizes for c in size_cells(cfg, size, g.ratios)]


def size_cells(cfg: ExperimentConfig, size: str, ratios: list[float]) -> list[Cell]:
    """One size's cells at these ratios (every token budget and seed of the grid), in expand's order
    (`tensor_parallel: auto` resolved; the memory check is resolve_layouts' with check=True, which the CLI runs
    first). The cells train with the run's train: section and the preset's per-size overrides (cfg.train_for)."""
    cfg = resolve_layouts(cfg, check=False)
    g = cfg.grid
    lowest = min(g.start_ratios if g.adaptive else g.ratios)
    train = cfg.train_for(size)
    return [Cell(size=size, ratio=ratio, tokens=tokens, seed=seed, model=cfg.presets[size],
                 data=control_data(cfg.data, control, tokens, lowest), train=train, eval=cfg.eval)
            for control in g.controls
            for tokens, ratio, seed in itertools.product(g.token_budgets, sorted(ratios), g.seeds)]


def ladder_order(cfg: ExperimentConfig) -> list[str]:
    """The grid's sizes by non-embedding parameters, smallest first: the rungs of an adaptive ladder."""
    presets = cfg.presets
    return sorted(cfg.grid.sizes,
                  key=lambda s: presets[s].param_counts(cfg.data.vocab_size)["non_embedding"])


def run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_root) / cfg.name
