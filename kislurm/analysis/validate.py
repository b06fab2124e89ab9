"""Validation planning: where to spend a held-out size's compute, from the law fitted on the other sizes.

`plan_ratios` (pure) turns a predicted r* interval into infusion ratios spaced evenly in log-odds (the axis the
collapse curve is fitted on), widened so that the collapse is bracketed wherever in the interval it falls: the
two lowest ratios lie at least `margin` x ln 3 x width below the interval (where the curve keeps >= 75% of its
drop: kislurm.analysis.collapse's bracketing rule, with a 50% safety margin at the default 1.5), the two highest as far
above it, the rest evenly between; `width` is the predicted 1/steepness (kislurm.analysis.law's width line).
`validation_cells` builds the cells (ids as usual) for `kislurm validate`. The adaptive ladder's rules
(`next_rung_ratios`, `more_ratios`, and `adaptive_ladder` as a pure driver) live here too; reading a run folder and
submitting is kislurm.orchestrate's, and pricing cells kislurm.plan.estimate's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from kislurm.plan.config import ExperimentConfig
from kislurm.analysis.collapse import CollapseResult
from kislurm.analysis.law import LawFit, Prediction, predict_law
from kislurm.plan.grid import Cell, size_cells
from kislurm.errors import ValidationError  # noqa: F401 (re-exported)

MIN_POINTS = 4           # the collapse fit's minimum: two ratios on each side of r*
DEFAULT_WIDTH = 1 / 3.0  # 1/steepness when the law has no width line (a typical curve in log-odds)


def _logit(r: float) -> float:
    return math.log(r / (1.0 - r))


def _round_ratio(r: float) -> float:
    """Three significant digits of r, or of 1 - r near 1 (so 0.99731 stays 0.997, not 1.0)."""
    if r <= 0.5:
        return float(f"{r:.3g}")
    return 1.0 - float(f"{1.0 - r:.3g}")


def plan_ratios(r_lo: float, r_hi: float, width: float | None, points: int = 5, margin: float = 1.5) -> list[float]:
    """`points` ratios spanning [r_lo, r_hi] in log-odds, widened to bracket the collapse (see the module doc)."""
    if points < MIN_POINTS:
        raise ValidationError(f"{points} validation ratios: the collapse fit needs >= {MIN_POINTS} (two on each side "
                              f"of r*); fix: --points {MIN_POINTS} or more")
    if not (0.0 < r_lo <= r_hi < 1.0):
        raise ValidationError(f"predicted r* interval [{r_lo:g}, {r_hi:g}] is not inside (0, 1); fix: check the law "
                              "(a unit without a ratio, or a prediction beyond r = 1)")
    w = width if width is not None and math.isfinite(width) and width > 0 else DEFAULT_WIDTH
    g = margin * math.log(3.0) * w
    inner_lo, inner_hi = _logit(r_lo) - g, _logit(r_hi) + g
    step = (inner_hi - inner_lo) / (points - 3)
    xs = [inner_lo - step + k * step for k in range(points)]
    out = sorted({_round_ratio(1.0 / (1.0 + math.exp(-x))) for x in xs})
    return [r for r in out if 0.0 < r < 1.0]


@dataclass(frozen=True)
class ValidationPlan:
    size: str
    params: float
    prediction: Prediction
    ratios: list[float]
    cells: list[Cell]


def validation_cells(cfg: ExperimentConfig, law: LawFit, size: str, points: int = 5) -> ValidationPlan:
    """The cells (every token budget and seed of the grid) that validate `size` against `law`."""
    presets = cfg.presets
    if size not in presets:
        raise ValidationError(f"unknown size {size!r}; fix: use one of {sorted(presets)} or define it under models:")
    if size not in cfg.analysis.validate_sizes:
        where = "is fitted (in grid.sizes)" if size in cfg.grid.sizes else "is not a validation size"
        raise ValidationError(f"size {size!r} {where}; fix: list it under analysis.validate_sizes in the run's "
                              "config.yaml so that it never enters the fit, then re-aggregate")
    if not law.ok:
        raise ValidationError(f"the run has no law to validate: {law.reason}")
    if any(p.used and p.size == size for p in law.points):
        raise ValidationError(f"size {size!r} is in the law's fit; fix: re-aggregate after adding it to "
                              "analysis.validate_sizes")
    model = presets[size]
    params = float(model.param_counts(cfg.data.vocab_size)["non_embedding"])
    pred = predict_law(law, params, name=size, safe=True)
    if pred.r_lo is None or pred.r_hi is None:
        raise ValidationError(f"the law's unit {law.unit!r} gives no ratio interval at {size}; fix: fit in odds "
                              "(analysis.unit: odds) to plan validation ratios")
    ratios = plan_ratios(pred.r_lo, pred.r_hi, pred.width, points)
    return ValidationPlan(size, params, pred, ratios, size_cells(cfg, size, ratios))


def full_sweep(cfg: ExperimentConfig, size: str) -> list[Cell]:
    """The cells the fixed grid would give `size` (every grid ratio, budget and seed; an adaptive grid's start
    ratios): what validation or the ladder saves."""
    return size_cells(cfg, size, cfg.grid.start_ratios if cfg.grid.adaptive else cfg.grid.ratios)


# ---------------------------------------------------------------------------------------------------------------------
# The adaptive ladder: each further size's ratios placed from the law fitted on the sizes already done
# ---------------------------------------------------------------------------------------------------------------------


def next_rung_ratios(law: LawFit, params: float, points: int = 5) -> list[float]:
    """The ratios for the next size of a ladder: the validation planner around the law's prediction there."""
    if not law.ok:
        raise ValidationError(f"no law to place the next rung from: {law.reason}; fix: widen the starting grid so "
                              "the two smallest sizes' collapses are bracketed")
    pred = predict_law(law, params, safe=True)
    if pred.r_lo is None or pred.r_hi is None:
        raise ValidationError(f"the law's unit {law.unit!r} gives no ratio interval; fix: analysis.unit: odds")
    return plan_ratios(pred.r_lo, pred.r_hi, pred.width, points)


@dataclass(frozen=True)
class Rung:
    size: str
    params: float
    ratios: list[float]     # every ratio trained at this size (the planned ones, then any added)


def _extend(ratios: list[float], flag: str, n: int = 2) -> list[float]:
    """n more ratios beyond the side a collapse was not bracketed on (both sides when no collapse was seen), at the
    rung's own log-odds spacing."""
    x = sorted(_logit(r) for r in ratios)
    step = float(sorted(b - a for a, b in zip(x, x[1:]))[len(x) // 2 - 1]) if len(x) > 1 else 1.0
    new = []
    if flag in ("unbracketed-high", "absent", "too-few-points", "non-monotone"):
        new += [x[-1] + k * step for k in range(1, n + 1)]
    if flag in ("unbracketed-low", "absent", "too-few-points", "non-monotone"):
        new += [x[0] - k * step for k in range(1, n + 1)]
    out = {_round_ratio(1.0 / (1.0 + math.exp(-v))) for v in new}
    return sorted(r for r in out if 0.0 < r < 1.0 and r not in ratios)


def more_ratios(c: CollapseResult, ratios: list[float], points: int, target_width: float | None) -> list[float]:
    """Ratios a finished rung still needs: beyond the side its collapse was missed on, or (with target_width)
    `points` across its r* interval while that is wider than target_width in log-odds; [] when it is done."""
    if c.flag != "ok":
        return _extend(ratios, c.flag)
    if target_width is not None and math.isfinite(c.lo) and _logit(c.hi) - _logit(c.lo) > target_width:
        width = 1.0 / c.logistic.steepness if c.logistic else None
        return [r for r in plan_ratios(c.lo, c.hi, width, points) if r not in ratios]
    return []


def adaptive_ladder(sizes: dict[str, float], start: list[float], measure: Callable[[str, float, list[float]], list],
                    fit: Callable[[list], tuple[list, LawFit]], points: int = 5, target_width: float | None = None,
                    max_rounds: int = 3) -> tuple[list[Rung], LawFit]:
    """Run a ladder: the two smallest sizes on `start`, each further size (by params) on `points` ratios placed from
    the law of the sizes before it (next_rung_ratios). `measure(size, params, ratios)` trains (or simulates) those
    cells and returns their measurements; `fit(measurements)` returns (collapses, law). A rung whose collapse is
    not bracketed (the prediction missed: with two or three sizes the law's lack of fit is barely known) gets two
    more ratios beyond the side it missed, at its own spacing; with `target_width`, a bracketed rung whose r*
    interval is wider (in log-odds) gets `points` more placed across that interval. At most `max_rounds` additions
    per rung."""
    order = sorted(sizes, key=sizes.get)
    if len(order) < 2 or len(start) < MIN_POINTS:
        raise ValidationError(f"an adaptive ladder needs >= 2 sizes and >= {MIN_POINTS} starting ratios; fix: list "
                              "more sizes or ratios")
    ms: list = []
    rungs: list[Rung] = []
    law: LawFit | None = None
    for k, size in enumerate(order):
        n = sizes[size]
        ratios = sorted(start) if k < 2 else next_rung_ratios(law, n, points)
        ms += measure(size, n, ratios)
        collapses, law = fit(ms)
        for _ in range(max_rounds if k >= 2 else 0):
            extra = more_ratios(next(c for c in collapses if c.size == size), ratios, points, target_width)
            if not extra:
                break
            ms += measure(size, n, extra)
            ratios = sorted(ratios + extra)
            collapses, law = fit(ms)
        rungs.append(Rung(size, n, ratios))
    return rungs, law
