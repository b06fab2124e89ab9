"""A pilot before the grid: the smallest size at the lowest and the highest ratio, and two checks on the result.

1. The plateau exists: retention at the lowest ratio sits well above chance (at least `min_excess` of the way from
   chance to 1), else the model learns too little general knowledge to lose: no collapse can be measured.
2. The grid can bracket: retention at the highest ratio has lost at least `min_loss` of that excess over chance,
   else the collapse of even the smallest size lies beyond the grid's highest ratio (larger sizes collapse later).
Chance is 1 / n_choices for an accuracy metric and 0 for a chance-corrected one (`_cc`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kislurm.plan.config import ExperimentConfig
from kislurm.plan.grid import Cell, ladder_order, size_cells
from kislurm.errors import PilotError  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class PilotResult:
    low_ratio: float
    high_ratio: float
    low: float            # retention at the lowest ratio
    high: float           # retention at the highest ratio
    chance: float

    @property
    def excess(self) -> float:
        return (self.low - self.chance) / (1.0 - self.chance) if self.chance < 1 else 0.0

    @property
    def loss(self) -> float:
        """Share of the low ratio's excess over chance lost at the high ratio."""
        return (self.low - self.high) / (self.low - self.chance) if self.low > self.chance else 0.0


def pilot_cells(cfg: ExperimentConfig) -> list[Cell]:
    """The smallest size (by parameters) at the grid's lowest and highest ratio (the first token budget and seed):
    cells of the grid itself, so the grid reuses them."""
    ratios = cfg.grid.start_ratios if cfg.grid.adaptive else cfg.grid.ratios
    size = ladder_order(cfg)[0]
    lo, hi = min(ratios), max(ratios)
    cells = size_cells(cfg, size, [lo, hi])
    return [c for c in cells if c.tokens == cfg.grid.token_budgets[0] and c.seed == cfg.grid.seeds[0]
            and c.control == cells[0].control]   # the first of grid.controls only


def chance_of(metric: str, n_choices: int) -> float:
    return 0.0 if metric.endswith("_cc") or n_choices < 2 else 1.0 / n_choices


def judge(result: PilotResult, min_excess: float = 0.3, min_loss: float = 0.5) -> str:
    """A one-line verdict; raises PilotError when the grid should not be run as it is."""
    nums = (f"retention {result.low:.3f} at r={result.low_ratio:g} and {result.high:.3f} at r={result.high_ratio:g}, "
            f"chance {result.chance:.3f}")
    if result.excess < min_excess:
        raise PilotError(f"pilot: no plateau: {nums} (only {result.excess:.0%} of the way from chance to 1, need "
                         f">= {min_excess:.0%}); fix: train longer (token budget), lower the lowest ratio, or check "
                         "the general probes are in the general stream")
    if result.loss < min_loss:
        raise PilotError(f"pilot: the grid cannot bracket: {nums} (the highest ratio lost {result.loss:.0%} of the "
                         f"excess over chance, need >= {min_loss:.0%}); fix: add higher ratios (closer to 1)")
    return f"pilot ok: {nums}: a plateau ({result.excess:.0%} above chance) that the highest ratio loses " \
           f"({result.loss:.0%} of it)"
