"""Collapse detection: the infusion ratio r* at which general-knowledge retention collapses, per (size, tokens).

Definitions (each recorded in every output through `CollapseOptions` and `CollapseResult`):

- Retention y at ratio r is summarised by a four-parameter logistic in x = log(r / (1 - r)), the log-odds of r
  (the same as log r for small r; unlike log r it spreads the ratios near 1 where wide models collapse),
      y(x) = plateau - drop * sigmoid(steepness * (x - logit r*)),    floor = plateau - drop,
  whose midpoint is the collapse point r*: retention is halfway between plateau and floor there.
- Several seeds at one ratio are averaged (equal weight) before fitting; the bootstrap resamples them.
- Bracketed: at least `min_side_points` (2) grid ratios below r* keep retention >= floor + (1/2 + margin) * drop,
  and as many above r* have retention <= floor + (1/2 - margin) * drop (margin 0.25: >= 75% and <= 25% of the
  way from floor to plateau). Two, not one: a single point on a side can always be absorbed by the fitted
  asymptote (a collapse below the grid then looks like a plateau resting on the first point).
- Flags, first that applies: 'too-few-points' (< min_points distinct ratios), 'absent' (largest decline between
  any two grid points, or the fitted drop, < min_drop), 'non-monotone' (a higher ratio beats a lower one by more
  than max(min_rise, rise_z * standard error of the difference)), 'unbracketed-low' / 'unbracketed-high' (no clear
  point on that side of r*), else 'ok'. Only 'ok' enters the law.
- Interval: percentile bootstrap of r*. With per-fact scores, facts are resampled (one resample shared by every
  cell of the size, since they are the same facts); with several seeds, seeds are resampled within each ratio;
  without per-fact scores, a parametric bootstrap: binomial with n_facts, else residuals of the logistic fit.
- Fitting: MINPACK Levenberg-Marquardt (scipy.optimize.leastsq), falling back to scipy.optimize.least_squares with
  box bounds (`_bounds`) when the optimum leaves the box; started from the best points of a
  (midpoint, steepness) grid whose plateau and drop are solved exactly; the bootstrap replicates also start from
  the point estimate, and polish only their best start (one scipy fit per replicate).
- Safe ratio (the ratio to use): the largest r at which the fitted curve has lost at most `safe_drop` (5%) of its
  drop from plateau to floor, logit r_safe = midpoint + logit(safe_drop) / steepness; its interval from the same
  bootstrap replicates (each replicate's midpoint and steepness). Beside it, the infused-fact retention at r_safe,
  interpolated in log-odds between the grid ratios where it was measured (None outside the grid).
- Cross-checks: a segmented regression (plateau, linear ramp in log-odds, floor; its r* is the ramp's midpoint, the
  analogue of the logistic midpoint) and the largest single drop between neighbouring grid points (the baseline).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import math
import warnings
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

if TYPE_CHECKING:
    from scipy.optimize import OptimizeResult


def expit(x: Any) -> Any:
    """scipy.special.expit, imported at the first call, which rebinds this module's name to the ufunc itself (so
    the fitting loops call it directly): importing scipy costs ~0.6 s, and unpickling a finished aggregation
    (the nightly's nothing-changed path) needs none of it."""
    global expit
    from scipy.special import expit as ufunc

    expit = ufunc
    return ufunc(x)


def load_scipy() -> None:
    """Import what fitting needs now (e.g. before forking the processes that fit)."""
    import scipy.optimize  # noqa: F401

    expit(0.0)


FLAGS = ("ok", "unbracketed-low", "unbracketed-high", "absent", "non-monotone", "too-few-points")


@dataclass(frozen=True)
class Measurement:
    """One finished cell, as the aggregator or a user's CSV gives it."""

    size: str
    params: float
    ratio: float
    tokens: float          # training tokens D (nan when unknown)
    seed: int
    retention: float       # the metric at the cell's last evaluation
    fact_correct: np.ndarray | None = field(default=None, compare=False)
    """(F,) per-fact score behind `retention`, same scale, same fact order in every cell of a size."""
    n_choices: int | None = None
    exposures_per_fact: float | None = None   # for unit="exposures"
    n_facts: int | None = None                # probe facts behind `retention` (binomial bootstrap without fact_correct)
    knowledge_bits: float | None = None       # bits infused: n_infused_facts * log2(values per relation)
    infused_retention: float | None = None    # the infused facts' counterpart of `retention` (what r buys)


@dataclass(frozen=True)
class CollapseOptions:
    """Thresholds of collapse detection (retention units)."""

    min_points: int = 4          # distinct ratios needed for a four-parameter fit
    min_drop: float = 0.1        # smaller total decline = no collapse ('absent')
    bracket_margin: float = 0.25  # how clearly grid points must sit on each side of r* (fraction of the drop)
    min_rise: float = 0.1        # a rise with r larger than this (and than rise_z SEs) is 'non-monotone'
    rise_z: float = 3.0
    min_side_points: int = 2     # clear grid points needed on each side of r* (one can be absorbed by the fit)
    safe_drop: float = 0.05      # the safe ratio loses at most this fraction of the plateau-to-floor drop


def ratio_axis(r: Any) -> np.ndarray:
    """The axis collapse curves are fitted on: log-odds of the infusion ratio."""
    r = np.asarray(r, float)
    return np.log(r) - np.log1p(-r)


def axis_ratio(x: Any) -> Any:
    """Inverse of ratio_axis."""
    return expit(x)


@dataclass(frozen=True)
class Logistic:
    """y(r) = plateau - (plateau - floor) * sigmoid(steepness * (logit r - midpoint)); midpoint = logit r*."""

    plateau: float
    floor: float
    midpoint: float
    steepness: float

    def __call__(self, r: np.ndarray) -> np.ndarray:
        h = expit(self.steepness * (ratio_axis(r) - self.midpoint))
        return self.plateau - (self.plateau - self.floor) * h


@dataclass(frozen=True)
class CollapseResult:
    """The collapse point of one (size, token budget), with its interval, flag and cross-checks."""

    size: str
    params: float
    tokens: float
    r_star: float                    # nan when not estimated ('too-few-points', 'absent')
    lo: float                        # bootstrap interval (nan without bootstrap)
    hi: float
    bracketed: bool
    flag: str
    reason: str                      # one line: why this flag
    logistic: Logistic | None
    r_star_segmented: float | None
    r_star_largest_drop: float | None
    n_cells: int
    ratios: np.ndarray = field(compare=False)          # (K,) distinct ratios, ascending
    retention: np.ndarray = field(compare=False)       # (K,) mean retention per ratio (what was fitted)
    retention_se: np.ndarray = field(compare=False)    # (K,) bootstrap SE per ratio (0 without bootstrap)
    n_seeds: np.ndarray = field(compare=False)         # (K,) cells per ratio
    boot: np.ndarray = field(compare=False)            # (B,) bootstrap r* samples
    boot_method: str = "none"
    confidence: float = 0.9
    exposures: np.ndarray | None = field(default=None, compare=False)       # (K,) exposures per fact
    knowledge_bits: np.ndarray | None = field(default=None, compare=False)  # (K,) bits infused
    n_choices: int | None = None
    options: CollapseOptions = CollapseOptions()
    boot_steepness: np.ndarray = field(default_factory=lambda: np.empty(0), compare=False)  # (B,) with boot
    infused: np.ndarray | None = field(default=None, compare=False)     # (K,) mean infused retention per ratio
    safe_r: float = math.nan         # largest r losing at most options.safe_drop of the drop (see the top)
    safe_lo: float = math.nan        # its bootstrap interval
    safe_hi: float = math.nan
    infused_at_safe: float | None = None   # infused retention at safe_r, where the grid measured it

    @property
    def ok(self) -> bool:
        return self.flag == "ok"


# ---------------------------------------------------------------------------------------------------------------------
# Fitting primitives (pure, vectorised over bootstrap replicates)
# ---------------------------------------------------------------------------------------------------------------------
# Parameter vector th = (plateau, drop, midpoint, steepness); y = plateau - drop * expit(steepness * (x - midpoint)).


def _model(x: np.ndarray, th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = expit(th[:, 3:4] * (x[None, :] - th[:, 2:3]))
    return th[:, 0:1] - th[:, 1:2] * h, h


def _residuals(th: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return th[0] - th[1] * expit(th[3] * (x - th[2])) - y


def _jacobian(th: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d residuals / d (plateau, drop, midpoint, steepness), analytic, one row per parameter (4, K): MINPACK's
    column-major layout (col_deriv), so nothing is transposed per call."""
    u = x - th[2]
    h = expit(th[3] * u)
    dh = th[1] * h * (1.0 - h)
    j = np.empty((4, x.size))
    j[0], j[1], j[2], j[3] = 1.0, -h, th[3] * dh, -u * dh
    return j


def _jacobian_rows(th: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The Jacobian as least_squares takes it: (K, 4)."""
    return _jacobian(th, x, y).T


def _bounds(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box bounds: plateau up to max(1, data), floor down to min(0, data); midpoint within half a grid span of the
    grid (and r* < 1); steepness such that the 10-90% width is at least half the finest grid step (a step between
    two grid points then puts r* between them rather than anywhere)."""
    span = x[-1] - x[0]
    ext = max(float(y.max() - y.min()), 0.1)
    s_max = 4.0 * math.log(9.0) / max(float(np.diff(x).min()), 1e-3)
    m_hi = x[-1] + 0.5 * span
    p_hi, f_lo = max(y.max() + 0.25 * ext, 1.0), min(y.min() - 0.25 * ext, 0.0)  # asymptotes may lie off the grid
    lo = np.array([y.min() - 0.25 * ext, 0.0, x[0] - 0.5 * span, 0.5])
    hi = np.array([p_hi, p_hi - f_lo, m_hi, max(s_max, 1.0)])
    return lo, hi


def _plateau_drop_lstsq(h: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form least squares of each row of ys (B, K) ~ plateau - drop * h for every shape h (C, K):
    plateau, drop and SSE, each (B, C) (variable projection: the linear parameters are solved exactly)."""
    k = h.shape[1]
    sh, shh = h.sum(1), (h * h).sum(1)
    det = k * shh - sh * sh
    sy, shy, yy = ys.sum(1, keepdims=True), ys @ h.T, (ys * ys).sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (shh * sy - sh * shy) / det
        d = (sh * sy - k * shy) / det
        sse = yy - p * sy + d * shy
    return p, d, np.where(det > 1e-9, sse, np.inf)


def _grid_init(x: np.ndarray, ys: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_starts: int) -> np.ndarray:
    """The n_starts best (midpoint, steepness) of a grid for every row of ys: starts (B, n_starts, 4)."""
    mm, ss = np.meshgrid(np.linspace(lo[2], hi[2], 41), np.geomspace(lo[3], hi[3], 12), indexing="ij")
    mm, ss = mm.ravel(), ss.ravel()
    p, d, sse = _plateau_drop_lstsq(expit(ss[:, None] * (x[None, :] - mm[:, None])), ys)
    sse = np.where(d >= 0, sse, np.inf)
    best = np.argsort(sse, axis=1)[:, :n_starts]                   # (B, S)
    rows = np.arange(ys.shape[0])[:, None]
    th = np.stack([p[rows, best], d[rows, best], mm[best], ss[best]], axis=2)
    flat = ~np.isfinite(sse[rows, best])                            # no decreasing shape fits: start flat
    th[flat] = [0.0, 0.0, 0.5 * (lo[2] + hi[2]), 1.0]
    th[..., 0] = np.where(flat, np.broadcast_to(ys.mean(1, keepdims=True), flat.shape), th[..., 0])
    return np.clip(th, lo, hi)


def _warm_start(x: np.ndarray, ys: np.ndarray, start: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`start`'s shape (midpoint, steepness) with plateau and drop re-solved for every row: (B, 1, 4)."""
    th = np.tile(np.clip(start, lo, hi), (ys.shape[0], 1))
    p, d, sse = _plateau_drop_lstsq(_model(x, th[:1])[1], ys)
    ok = np.isfinite(sse[:, 0]) & (d[:, 0] >= 0)
    th[ok, 0], th[ok, 1] = p[ok, 0], d[ok, 0]
    return np.clip(th, lo, hi)[:, None, :]


_LM_MAX_NFEV = 40    # an unbounded LM run longer than this is leaving the box (e.g. a sharper step than allowed)
_TRF_MAX_NFEV = 100  # bounded runs longer than this crawl along a flat valley (r* not determined by the data)


def _trf(x: np.ndarray, y: np.ndarray, th: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> OptimizeResult:
    """Bounded fit; gtol is an absolute test on the gradient: tightened so a near-exact fit (tiny residuals, tiny
    gradient) is not stopped early (ftol and xtol are relative and end the noisy fits)."""
    from scipy.optimize import least_squares  # imported where fitting starts: reading results needs no optimizer

    return least_squares(_residuals, th, jac=_jacobian_rows, bounds=(lo, hi), method="trf", x_scale="jac",
                         gtol=1e-12, max_nfev=_TRF_MAX_NFEV, args=(x, y))


def _polish(x: np.ndarray, y: np.ndarray, th: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares fit of one curve from th within the box [lo, hi], by scipy.optimize: (th, SSE).

    MINPACK's Levenberg-Marquardt first (unbounded, several times cheaper per iteration than the bounded methods):
    a converged optimum inside the box is the bounded optimum too. Otherwise (a sharper step than the box allows,
    an asymptote off the box, ...) the trust-region reflective method with the box, from the LM point clipped into
    the box (close to the bounded optimum), and from th as well if that ends worse than th started."""
    from scipy.optimize import leastsq  # ~0.4 s to import once: not needed to unpickle a finished aggregation

    start = th
    if x.size >= th.size:   # MINPACK needs at least as many points as parameters
        # scipy's direct MINPACK interface: the very call least_squares(method="lm", x_scale="jac") makes (same
        # tolerances, scaling and evaluation budget) without its per-call set-up, which is most of the cost of the
        # thousands of small bootstrap fits; full_output=False skips the covariance matrix nobody reads
        xl, ier = leastsq(_residuals, th, args=(x, y), Dfun=_jacobian, col_deriv=True, ftol=1e-8, xtol=1e-8,
                          gtol=1e-8, maxfev=_LM_MAX_NFEV)
        if ier in (1, 2, 3, 4) and np.all((xl >= lo) & (xl <= hi)):
            r = _residuals(xl, x, y)
            return xl, float(r @ r)
        if np.isfinite(xl).all():
            th = np.clip(xl, lo, hi)
    fit = _trf(x, y, th, lo, hi)
    r0 = _residuals(start, x, y)
    if th is not start and 2.0 * fit.cost > r0 @ r0:
        again = _trf(x, y, start, lo, hi)
        fit = again if again.cost < fit.cost else fit
    return fit.x, 2.0 * float(fit.cost)


def fit_logistic(x: np.ndarray, ys: np.ndarray, start: np.ndarray | None = None,
                 bounds: tuple[np.ndarray, np.ndarray] | None = None, n_starts: int = 3,
                 n_polish: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit the logistic to each row of ys (B, K) at x = ratio_axis(r) (K,); returns th (B, 4) and SSE (B,).

    Multi-start (the surface has local minima, e.g. a step between two grid points): each row's candidates are the
    n_starts best points of a (midpoint, steepness) grid and `start` (a warm start, e.g. the point estimate), each
    with plateau and drop solved exactly for the row; `_polish` (scipy) fits from the n_polish candidates with the
    lowest SSE (all by default) and the row keeps the best fit."""
    x, ys = np.asarray(x, float), np.atleast_2d(np.asarray(ys, float))
    lo, hi = bounds if bounds is not None else _bounds(x, ys[0])
    starts = _grid_init(x, ys, lo, hi, n_starts)
    if start is not None:
        starts = np.concatenate([starts, _warm_start(x, ys, np.asarray(start, float), lo, hi)], axis=1)
    b, s = starts.shape[:2]
    f0 = _model(x, starts.reshape(b * s, 4))[0].reshape(b, s, -1) - ys[:, None, :]
    order = np.argsort((f0 * f0).sum(2), axis=1, kind="stable")[:, :n_polish or s]
    th, sse = np.empty((b, 4)), np.full(b, np.inf)
    with warnings.catch_warnings():  # leastsq warns when it runs out of evaluations: _polish goes on with TRF
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(b):
            for k in order[i]:
                t, f = _polish(x, ys[i], starts[i, k], lo, hi)
                if f < sse[i]:
                    th[i], sse[i] = t, f
    return th, sse


def segmented_fit(x: np.ndarray, y: np.ndarray, n_knots: int = 60) -> tuple[float, float, float] | None:
    """Plateau / linear ramp / floor in x with knots k1 < k2 inside the grid; returns (mid, k1, k2) in x or None."""
    knots = np.linspace(x[0], x[-1], n_knots)
    i, j = np.triu_indices(n_knots, 1)
    k1, k2 = knots[i], knots[j]
    h = np.clip((x[None, :] - k1[:, None]) / (k2 - k1)[:, None], 0.0, 1.0)  # (C, K): 0 on plateau, 1 on floor
    _, d, sse = _plateau_drop_lstsq(h, y[None, :])
    sse = np.where(d[0] > 0, sse[0], np.inf)
    if not np.isfinite(sse).any():
        return None
    tied = np.flatnonzero(sse <= sse.min() * (1 + 1e-9) + 1e-12)
    best = tied[np.argmax((k2 - k1)[tied])]      # a clean step: the widest ramp, midway between the grid points
    return 0.5 * (k1[best] + k2[best]), float(k1[best]), float(k2[best])


def largest_drop(r: np.ndarray, y: np.ndarray) -> float | None:
    """Geometric mean of the two neighbouring ratios with the largest fall in retention (None if none falls)."""
    drops = y[:-1] - y[1:]
    if drops.size == 0 or drops.max() <= 0:
        return None
    i = int(np.argmax(drops))
    return float(math.sqrt(r[i] * r[i + 1]))


def safe_logit(midpoint: Any, steepness: Any, safe_drop: float) -> Any:
    """Log-odds of the largest ratio at which the logistic has lost at most `safe_drop` of its drop."""
    return midpoint + math.log(safe_drop / (1.0 - safe_drop)) / np.asarray(steepness, float)


def interp_logodds(ratios: np.ndarray, values: np.ndarray | None, r: float) -> float | None:
    """values (K,) at ratio r, linear in log-odds between grid ratios; None outside the grid or without values."""
    if values is None or not math.isfinite(r) or not ratios[0] <= r <= ratios[-1]:
        return None
    return float(np.interp(ratio_axis(r), ratio_axis(ratios), values))


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if s.size < 2:
        return math.nan, math.nan
    q = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(s, [q, 100 - q])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------------


def _group_by_ratio(ms: list[Measurement]) -> tuple[np.ndarray, list[np.ndarray]]:
    ratios = np.array(sorted({m.ratio for m in ms}))
    cells = [np.array([i for i, m in enumerate(ms) if m.ratio == r]) for r in ratios]
    return ratios, cells


def _per_ratio(values: list[float | None], cells: list[np.ndarray]) -> np.ndarray | None:
    if any(v is None for v in values):
        return None
    v = np.asarray(values, float)
    return np.array([v[c].mean() for c in cells])


def _cell_replicates(ms: list[Measurement], n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray | None, str]:
    """(B, n_cells) bootstrap replicates of each cell's retention, or None when only residuals are left."""
    y = np.array([m.retention for m in ms])
    fc = [m.fact_correct for m in ms]
    if all(f is not None for f in fc) and len({np.shape(f) for f in fc}) == 1 and np.size(fc[0]) > 0:
        mat = np.stack([np.asarray(f, float) for f in fc])             # (n_cells, F)
        n_f = mat.shape[1]
        idx = rng.integers(0, n_f, size=(n_boot, n_f)) + n_f * np.arange(n_boot)[:, None]
        counts = np.bincount(idx.ravel(), minlength=n_boot * n_f).reshape(n_boot, n_f)
        return y + (counts @ mat.T) / n_f - mat.mean(1), "facts"
    if all(m.n_facts for m in ms):
        n = np.array([m.n_facts for m in ms])
        p = np.clip(y, 0.0, 1.0)
        return y + rng.binomial(n, p, size=(n_boot, len(ms))) / n - p, "binomial"
    return None, "residual"


def _ratio_replicates(cell_reps: np.ndarray, cells: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Average cells per ratio, resampling seeds within each ratio when it has several."""
    out = np.empty((cell_reps.shape[0], len(cells)))
    rows = np.arange(cell_reps.shape[0])[:, None]
    for k, c in enumerate(cells):
        block = cell_reps[:, c]
        if len(c) > 1:
            block = block[rows, rng.integers(0, len(c), size=block.shape)]
        out[:, k] = block.mean(1)
    return out


def _replicates(ms: list[Measurement], cells: list[np.ndarray], x: np.ndarray, y: np.ndarray, point: np.ndarray,
                n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(B, K) bootstrap replicates of the mean retention per ratio, and the method used."""
    if n_boot <= 0:
        return np.empty((0, y.size)), "none"
    cell_reps, method = _cell_replicates(ms, n_boot, rng)
    several = any(len(c) > 1 for c in cells)
    if cell_reps is None and several:
        cell_reps, method = np.broadcast_to([m.retention for m in ms], (n_boot, len(ms))), "seeds"
    elif several:
        method += "+seeds"   # conservative: fact noise is in the seed spread too, and is counted twice
    if cell_reps is not None:
        return _ratio_replicates(cell_reps, cells, rng), method
    fitted = _model(x, point[None, :])[0]   # residual bootstrap: weak with few ratios (4 parameters, K points)
    resid = (y - fitted[0]) * math.sqrt(y.size / max(y.size - 4, 1))
    return fitted + resid[rng.integers(0, y.size, size=(n_boot, y.size))], "residual"


def _bracket(x: np.ndarray, y: np.ndarray, th: np.ndarray, opts: CollapseOptions) -> tuple[bool, bool]:
    """(enough clear points below r*, enough clear points above r*)."""
    plateau, drop, mid = th[0], th[1], th[2]
    floor, margin = plateau - drop, opts.bracket_margin
    high = (x < mid) & (y >= floor + (0.5 + margin) * drop)
    low = (x > mid) & (y <= floor + (0.5 - margin) * drop)
    return int(high.sum()) >= opts.min_side_points, int(low.sum()) >= opts.min_side_points


def _largest_rise(y: np.ndarray, se: np.ndarray, opts: CollapseOptions) -> tuple[float, int, int] | None:
    i, j = np.triu_indices(y.size, 1)
    rise = y[j] - y[i]
    tol = np.maximum(opts.min_rise, opts.rise_z * np.sqrt(se[i] ** 2 + se[j] ** 2))
    bad = np.flatnonzero(rise > tol)
    if bad.size == 0:
        return None
    w = bad[np.argmax(rise[bad])]
    return float(rise[w]), int(i[w]), int(j[w])


def _unbracketed(has_high: bool, has_low: bool, x: np.ndarray, mid: float, r_star: float, n: int) -> tuple[str, str]:
    if not has_high and (has_low or mid < 0.5 * (x[0] + x[-1])):
        return "unbracketed-low", (f"fewer than {n} grid ratios below r*={r_star:.3g} are clearly on the plateau; "
                                   "fix: add lower ratios")
    return "unbracketed-high", (f"fewer than {n} grid ratios above r*={r_star:.3g} are clearly collapsed; "
                                "fix: add higher ratios")


def detect_collapse(ms: list[Measurement], *, n_boot: int, confidence: float, rng: np.random.Generator,
                    options: CollapseOptions = CollapseOptions()) -> CollapseResult:
    """Collapse point of one (size, tokens) from all its cells (every ratio and seed)."""
    if not ms:
        raise ValueError("detect_collapse got no measurements; fix: pass the cells of one (size, tokens)")
    keys = {(m.size, m.params, token_key(m.tokens)) for m in ms}
    if len(keys) != 1:
        raise ValueError(f"detect_collapse got cells of several (size, params, tokens): {sorted(map(str, keys))}; "
                         "fix: group with detect_collapses()")
    ratios, cells = _group_by_ratio(ms)
    x = ratio_axis(ratios)
    y = np.array([np.mean([ms[i].retention for i in c]) for c in cells])
    base = dict(size=ms[0].size, params=float(ms[0].params), tokens=float(ms[0].tokens), n_cells=len(ms),
                ratios=ratios, retention=y, n_seeds=np.array([len(c) for c in cells]), confidence=confidence,
                exposures=_per_ratio([m.exposures_per_fact for m in ms], cells),
                knowledge_bits=_per_ratio([m.knowledge_bits for m in ms], cells),
                infused=_per_ratio([m.infused_retention for m in ms], cells),
                n_choices=ms[0].n_choices, options=options)
    empty = dict(r_star=math.nan, lo=math.nan, hi=math.nan, bracketed=False, logistic=None,
                 r_star_segmented=None, r_star_largest_drop=None, boot=np.empty(0), retention_se=np.zeros(y.size))
    if ratios.size < options.min_points:
        return CollapseResult(**base, **empty, flag="too-few-points",
                              reason=f"{ratios.size} distinct ratios, need >= {options.min_points}; fix: add ratios")
    i, j = np.triu_indices(y.size, 1)
    decline = float((y[i] - y[j]).max())
    if decline < options.min_drop:
        return CollapseResult(**base, **empty, flag="absent",
                              reason=f"retention never falls by >= {options.min_drop:g} (largest decline "
                                     f"{decline:.3f}); fix: extend the ratio grid or train longer")

    lo_b, hi_b = _bounds(x, y)
    point = fit_logistic(x, y[None, :], bounds=(lo_b, hi_b))[0][0]
    reps, method = _replicates(ms, cells, x, y, point, n_boot, rng)
    # sampling SE per ratio; residual replicates would fold lack of fit into it (and hide a non-monotone dip)
    se = reps.std(0, ddof=1) if reps.shape[0] > 1 and method != "residual" else np.zeros(y.size)
    # one scipy fit per replicate, from the best of its grid starts and the point estimate
    bth = fit_logistic(x, reps, start=point, bounds=(lo_b, hi_b), n_starts=2, n_polish=1)[0] \
        if reps.shape[0] else np.empty((0, 4))
    boot = axis_ratio(bth[:, 2])

    r_star = float(axis_ratio(point[2]))
    lo, hi = percentile_interval(boot, confidence)
    has_high, has_low = _bracket(x, y, point, options)
    seg = segmented_fit(x, y)
    rise = _largest_rise(y, se, options)
    if point[1] < options.min_drop:
        flag, reason = "absent", f"fitted drop {point[1]:.3f} < {options.min_drop:g}; fix: extend the ratio grid"
    elif rise is not None:
        v, a, b = rise
        flag, reason = "non-monotone", (f"retention rises by {v:.3f} from r={ratios[a]:g} to r={ratios[b]:g}; "
                                        "fix: check those cells (unfinished, diverged?) or add seeds")
    elif not (has_high and has_low):
        flag, reason = _unbracketed(has_high, has_low, x, point[2], r_star, options.min_side_points)
    else:
        flag, reason = "ok", f"bracketed between grid ratios; interval by {method} bootstrap"
    safe = float(axis_ratio(safe_logit(point[2], point[3], options.safe_drop)))
    safe_lo, safe_hi = percentile_interval(axis_ratio(safe_logit(bth[:, 2], bth[:, 3], options.safe_drop)),
                                           confidence)
    return CollapseResult(
        **base, r_star=r_star, lo=lo, hi=hi, bracketed=has_high and has_low, flag=flag, reason=reason,
        logistic=Logistic(float(point[0]), float(point[0] - point[1]), float(point[2]), float(point[3])),
        r_star_segmented=float(axis_ratio(seg[0])) if seg else None,
        r_star_largest_drop=largest_drop(ratios, y), retention_se=se, boot=boot, boot_method=method,
        boot_steepness=bth[:, 3], safe_r=safe, safe_lo=safe_lo, safe_hi=safe_hi,
        infused_at_safe=interp_logodds(ratios, base["infused"], safe))


def token_key(tokens: float) -> float | None:
    """A token budget as a grouping key: unknown budgets (nan, which equals nothing) all become None."""
    return float(tokens) if math.isfinite(tokens) else None


def detect_collapses(ms: list[Measurement], *, n_boot: int, confidence: float, rng: np.random.Generator,
                     options: CollapseOptions = CollapseOptions(),
                     executor: Executor | None = None) -> list[CollapseResult]:
    """detect_collapse for every (size, tokens), ordered by params then tokens; each group draws from its own
    child generator spawned from `rng` (independent streams, reproducible for a given set of groups, and so the
    same result in this process or in `executor`'s processes)."""
    groups: dict[tuple, list[Measurement]] = defaultdict(list)
    for m in ms:
        groups[(m.params, m.size, token_key(m.tokens))].append(m)
    keys = sorted(groups, key=lambda k: (k[0], k[1], -1.0 if k[2] is None else k[2]))
    children = rng.spawn(len(keys))
    jobs = [(groups[k], n_boot, confidence, g, options) for k, g in zip(keys, children)]
    if executor is not None and len(jobs) > 1:
        return list(executor.map(_detect_one, jobs))
    return [_detect_one(job) for job in jobs]


def _detect_one(job: tuple) -> CollapseResult:
    group, n_boot, confidence, rng, options = job
    return detect_collapse(group, n_boot=n_boot, confidence=confidence, rng=rng, options=options)
