"""The knowledge-infusion scaling law: how the collapse point r* moves with model size N (and token budget D).

r is bounded by 1, so the law is fitted in an unbounded unit u (recorded in every output):
    'odds'      u = r / (1 - r)                       (default)
    'tokens'    u = r * D                             (knowledge tokens seen)
    'exposures' u = exposures per infused fact at r*  (interpolated log-log between grid ratios)
Forms, by weighted least squares on log u (weights 1 / sigma^2, sigma = the r* interval's width in log u / (2 z),
floored at a quarter of the median so one very narrow interval cannot carry the fit):
    log u = log a + b log N                    (one token budget)
    log u = log a + b log N + c log D          (only with >= 2 budgets and >= 5 points: few points, few parameters)
Only collapses flagged 'ok' enter. Intervals: bootstrap over the per-size bootstrap samples of r* (each replicate
takes one random r* sample of every size, independently, and refits), so r* is re-detected on resampled facts and
seeds and the law refitted. The coefficient intervals (coef_lo/coef_hi, b_interval) reflect r* uncertainty only.
Prediction intervals also carry the law's lack of fit: when the sizes scatter about the line more than their r*
intervals allow (reduced chi2 > 1), the between-size scatter is estimated as an extra variance tau^2 of log u
(DerSimonian-Laird moment estimator of meta-regression: tau^2 = (Q - dof) / sum_i w_i (1 - h_i), Q the weighted
residual sum of squares, h_i the leverages; 0 when Q <= dof) and added in quadrature to the bootstrap half-widths,
twice: to the fitted line (tau^2 x'Mx, M = (X'WX)^-1 X'W^2X (X'WX)^-1, the coefficients' extra sampling variance)
and to the new size itself (tau^2: its own departure from the line), with a Student t quantile on dof degrees
of freedom (tau^2 comes from few sizes). With reduced chi2 <= 1 the intervals are the bootstrap's alone. The
bootstrap-only interval stays in Prediction.fit_lo / fit_hi. A held-out observation counts as covered when
prediction minus observation lies within both intervals combined (half-widths added in quadrature, each on its
own side), so the observation's own r* interval counts too.
Validation: leave-largest-out (fit on the smaller sizes, predict the largest, relative error of r* and of u), and
validation sizes (`validate`): sizes trained but never fitted, each one's observed r* set against the prediction.
Safe ratio at a target size (see kislurm.analysis.collapse for fitted sizes): the logistic's width 1/steepness (in log-odds of
r) is extrapolated by a line log(1/steepness) = alpha + beta log N fitted by least squares over the fitted sizes'
curves (its interval: the bootstrap of that line over per-size steepness replicates, widened by the line's residual
scatter as an ordinary least-squares prediction interval), and logit r_safe = logit r* + logit(safe_drop) * width.
The interval combines the r* prediction interval and the width interval in quadrature on the log-odds axis (the
wider width pairs with the lower r*: both lower the safe ratio).
Capacity: knowledge bits infused at r* per parameter, flagged beyond `capacity_bits` (about 2 bits/param,
Allen-Zhu and Li, Physics of LMs 3.3).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import numpy as np

from kislurm.analysis.collapse import CollapseResult, axis_ratio, percentile_interval, ratio_axis

UNITS = ("odds", "tokens", "exposures")
MIN_POINTS_D_TERM = 5


@dataclass(frozen=True)
class LawPoint:
    """One (size, tokens) collapse as the law sees it: used, or excluded with the reason."""

    size: str
    params: float
    tokens: float
    flag: str
    r_star: float
    lo: float
    hi: float
    unit_value: float
    unit_lo: float
    unit_hi: float
    used: bool
    reason: str                       # why excluded ('' when used)
    sigma: float = math.nan           # sd of log u used for the weight
    bits_per_param: float | None = None
    capacity_flag: str | None = None  # 'ok' | 'over-capacity' | None (unknown)
    safe_r: float = math.nan          # the collapse's safe ratio and interval (kislurm.analysis.collapse)
    safe_lo: float = math.nan
    safe_hi: float = math.nan
    infused_at_safe: float | None = None
    role: str = "fit"                 # 'fit' | 'validate' (held out: never fitted, compared with the prediction)


@dataclass(frozen=True)
class Prediction:
    name: str
    params: float
    tokens: float
    unit_value: float
    unit_lo: float
    unit_hi: float
    r_star: float | None              # None for unit 'exposures' (no way back to r without the data recipe)
    r_lo: float | None
    r_hi: float | None
    fit_lo: float = math.nan          # the unit's interval from the bootstrap alone (no lack of fit)
    fit_hi: float = math.nan
    safe_r: float | None = None       # predicted safe ratio and interval (None without r* or a width line)
    safe_lo: float | None = None
    safe_hi: float | None = None
    width: float | None = None        # predicted logistic width 1/steepness (log-odds of r)


@dataclass(frozen=True)
class WidthLine:
    """log(1/steepness) = coef[0] + coef[1] log N over the fitted sizes: how the collapse's width extrapolates."""

    coef: tuple[float, float]
    s2: float                         # residual variance (0 without degrees of freedom)
    dof: int
    xtx_inv: np.ndarray = field(compare=False)
    boot: np.ndarray = field(default_factory=lambda: np.empty((0, 2)), compare=False)


@dataclass(frozen=True)
class LeaveOut:
    """The largest size predicted by a law fitted without it; errors are signed, relative to the observation."""

    predicted: Prediction
    observed_r: float
    observed_unit: float
    rel_err_r: float | None
    rel_err_unit: float
    covered: bool | None              # observation within the prediction interval combined with its own (None
    # without bootstrap)
    observed_lo: float = math.nan     # the observation's own r* interval
    observed_hi: float = math.nan
    observed_flag: str = "ok"         # the observation's collapse flag (not 'ok': no coverage judged)

    @property
    def err_r(self) -> float | None:
        """Predicted minus observed r* (absolute, in r)."""
        return self.predicted.r_star - self.observed_r if self.predicted.r_star is not None else None


@dataclass(frozen=True)
class LawFit:
    unit: str
    confidence: float
    ok: bool
    reason: str                                   # why no fit (or '' when ok)
    form: str                                     # 'a*N^b' or 'a*N^b*D^c'
    coef: tuple[float, ...] = ()                  # (log a, b[, c]), natural log
    coef_lo: tuple[float, ...] = ()
    coef_hi: tuple[float, ...] = ()
    boot: np.ndarray = field(default_factory=lambda: np.empty((0, 0)), compare=False)   # (B, len(coef))
    points: tuple[LawPoint, ...] = ()
    predictions: tuple[Prediction, ...] = ()
    leave_largest_out: tuple[LeaveOut, ...] = ()
    leave_out_reason: str = ""
    validations: tuple[LeaveOut, ...] = ()      # one per validation size with a collapse
    chi2_red: float = math.nan
    dof: int = 0                                  # fitted points minus coefficients
    tau2: float = 0.0                             # between-size variance of log u beyond the r* intervals
    extra_cov: np.ndarray = field(default_factory=lambda: np.empty((0, 0)), compare=False)  # M (p, p): see top
    safe_drop: float = 0.05
    width: WidthLine | None = None
    capacity_bits: float = 2.0
    n_boot: int = 0
    notes: tuple[str, ...] = ()

    @property
    def a(self) -> float:
        return math.exp(self.coef[0]) if self.coef else math.nan

    @property
    def b(self) -> float:
        return self.coef[1] if self.coef else math.nan

    @property
    def c(self) -> float | None:
        return self.coef[2] if len(self.coef) > 2 else None

    @property
    def b_interval(self) -> tuple[float, float]:
        return (self.coef_lo[1], self.coef_hi[1]) if self.coef_lo else (math.nan, math.nan)


# ---------------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------------


def interp_loglog(r: np.ndarray, ratios: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Piecewise-linear in log-log, extended linearly beyond the grid by the end segments."""
    x, v, q = np.log(ratios), np.log(values), np.log(np.asarray(r, float))
    out = np.interp(q, x, v)
    if x.size > 1:
        lo_slope, hi_slope = (v[1] - v[0]) / (x[1] - x[0]), (v[-1] - v[-2]) / (x[-1] - x[-2])
        out = np.where(q < x[0], v[0] + lo_slope * (q - x[0]), out)
        out = np.where(q > x[-1], v[-1] + hi_slope * (q - x[-1]), out)
    return np.exp(out)


def unit_of_ratio(c: CollapseResult, r: np.ndarray | float, unit: str) -> np.ndarray:
    """The unit at ratio(s) r for this collapse's size and budget (nan where it cannot be computed)."""
    r = np.asarray(r, float)
    if unit == "odds":
        return r / (1.0 - r)
    if unit == "tokens":
        return r * c.tokens
    if unit == "exposures":
        if c.exposures is None or np.any(c.exposures <= 0):
            return np.full(r.shape, math.nan)
        return interp_loglog(r, c.ratios, c.exposures)
    raise ValueError(f"unknown law unit {unit!r}; fix: use one of {', '.join(UNITS)}")


def ratio_of_unit(u: float, unit: str, tokens: float) -> float | None:
    """r for a unit value; None when it has no ratio (exposures, unknown D, or more knowledge tokens than D)."""
    if unit == "odds":
        return u / (1.0 + u)
    if unit == "tokens" and math.isfinite(tokens) and u < tokens:
        return u / tokens
    return None


def _capacity(c: CollapseResult, capacity_bits: float) -> tuple[float | None, str | None]:
    if c.knowledge_bits is None or not math.isfinite(c.r_star) or np.any(c.knowledge_bits <= 0):
        return None, None
    bpp = float(interp_loglog(np.array(c.r_star), c.ratios, c.knowledge_bits)) / c.params
    return bpp, ("over-capacity" if bpp > capacity_bits else "ok")


def law_points(collapses: list[CollapseResult], unit: str, confidence: float,
               capacity_bits: float = 2.0) -> list[LawPoint]:
    """Every collapse with its unit value and whether it can enter the fit (flag 'ok' and a finite unit)."""
    from scipy.special import ndtri  # scipy.stats.norm.ppf without scipy.stats' 1.5 s import; here, not at the top:
    # unpickling a finished aggregation needs no scipy
    z = ndtri(0.5 + confidence / 2)
    out = []
    for c in collapses:
        u, ulo, uhi = (float(v) for v in unit_of_ratio(c, np.array([c.r_star, c.lo, c.hi]), unit))
        sigma = (math.log(uhi) - math.log(ulo)) / (2 * z) if ulo > 0 and uhi > 0 else math.nan
        reason = ""
        if c.flag != "ok":
            reason = f"flag {c.flag}: {c.reason}"
        elif not (math.isfinite(u) and u > 0):
            reason = f"unit {unit!r} unknown for this cell (needs {'tokens' if unit == 'tokens' else 'exposures'})"
        bpp, cap = _capacity(c, capacity_bits)
        out.append(LawPoint(c.size, c.params, c.tokens, c.flag, c.r_star, c.lo, c.hi, u, ulo, uhi,
                            used=not reason, reason=reason, sigma=sigma, bits_per_param=bpp, capacity_flag=cap,
                            safe_r=c.safe_r, safe_lo=c.safe_lo, safe_hi=c.safe_hi, infused_at_safe=c.infused_at_safe))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Fit and predict (pure)
# ---------------------------------------------------------------------------------------------------------------------


def _design(params: np.ndarray, tokens: np.ndarray, with_d: bool) -> np.ndarray:
    cols = [np.ones_like(params), np.log(params)] + ([np.log(tokens)] if with_d else [])
    return np.stack(cols, axis=-1)


def wls(x: np.ndarray, ys: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares of every row of ys (B, n) on design x (n, p): coefficients (B, p)."""
    xw = x * w[:, None]
    return np.linalg.solve(x.T @ xw, xw.T @ np.atleast_2d(ys).T).T


def _weights(sigma: np.ndarray) -> np.ndarray:
    finite = np.isfinite(sigma) & (sigma > 0)
    if not finite.any():
        return np.ones_like(sigma)
    floor = 0.25 * float(np.median(sigma[finite]))
    s = np.where(finite, np.maximum(sigma, floor), float(sigma[finite].max()))
    return 1.0 / s ** 2


def _choose_points(points: list[LawPoint]) -> tuple[list[LawPoint], bool, list[str]]:
    """Keep the D term only with >= 2 budgets and enough points; else keep the budget with the most sizes."""
    used = [p for p in points if p.used]
    budgets = sorted({p.tokens for p in used if math.isfinite(p.tokens)})
    if len(budgets) >= 2 and len(used) >= MIN_POINTS_D_TERM and len({p.params for p in used}) >= 2:
        x = _design(np.array([p.params for p in used]), np.array([p.tokens for p in used]), True)
        if np.linalg.matrix_rank(x) == 3:
            return points, True, []
    if len(budgets) < 2:
        return points, False, []
    keep = max(budgets, key=lambda t: (sum(p.tokens == t for p in used), t))
    why = (f"other token budget than {keep:g} (a D term needs >= {MIN_POINTS_D_TERM} points over >= 2 budgets "
           "and >= 2 sizes)")
    out = [p if (not p.used or p.tokens == keep) else _exclude(p, why) for p in points]
    return out, False, [f"several token budgets but too few points for a D term: fitted on D={keep:g} only"]


def _exclude(p: LawPoint, reason: str) -> LawPoint:
    return replace(p, used=False, reason=reason)


def _boot_log_units(collapses: list[CollapseResult], idx: list[int], unit: str, n_boot: int,
                    rng: np.random.Generator) -> np.ndarray | None:
    """(B, n) log u of one randomly drawn bootstrap r* per used point, per replicate."""
    if n_boot <= 0 or any(collapses[i].boot.size == 0 for i in idx):
        return None
    cols = []
    for i in idx:
        c = collapses[i]
        draw = c.boot[rng.integers(0, c.boot.size, size=n_boot)]
        cols.append(np.log(unit_of_ratio(c, draw, unit)))
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class _Fit:
    """One weighted fit: coefficients, their bootstrap, and its lack of fit (see the module docstring)."""

    coef: np.ndarray
    boot: np.ndarray
    chi2_red: float
    dof: int
    tau2: float
    extra_cov: np.ndarray


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile (the normal one for dof < 1, where nothing better is known)."""
    from scipy.special import ndtri, stdtrit

    p = 0.5 + confidence / 2
    return float(stdtrit(dof, p)) if dof >= 1 else float(ndtri(p))


def _predict(fit: _Fit, unit: str, confidence: float, name: str, params: float, tokens: float) -> Prediction:
    x = _design(np.array([params]), np.array([tokens]), fit.coef.size > 2)[0]
    c = float(x @ fit.coef)
    u = math.exp(c)
    lo_b, hi_b = percentile_interval(fit.boot @ x, confidence) if fit.boot.size else (math.nan, math.nan)
    extra = fit.tau2 * (float(x @ fit.extra_cov @ x) + 1.0) if fit.tau2 > 0 else 0.0
    q = t_quantile(confidence, fit.dof)
    lo = c - math.hypot(max(c - lo_b, 0.0), q * math.sqrt(extra))
    hi = c + math.hypot(max(hi_b - c, 0.0), q * math.sqrt(extra))
    ulo, uhi = math.exp(lo), math.exp(hi)
    r, rlo, rhi = (ratio_of_unit(v, unit, tokens) for v in (u, ulo, uhi))
    return Prediction(name, params, tokens, u, ulo, uhi, r, rlo, rhi, fit_lo=math.exp(lo_b), fit_hi=math.exp(hi_b))


def covers(pred: Prediction, unit_value: float, unit_lo: float, unit_hi: float) -> bool | None:
    """Is an observation consistent with a prediction, counting both intervals? The log difference must lie within
    the two facing half-widths added in quadrature (None when either interval is unknown)."""
    vals = (pred.unit_value, pred.unit_lo, pred.unit_hi, unit_value, unit_lo, unit_hi)
    if not all(math.isfinite(v) and v > 0 for v in vals):
        return None
    d = math.log(unit_value) - math.log(pred.unit_value)
    if d >= 0:
        allowed = math.hypot(math.log(pred.unit_hi / pred.unit_value), math.log(unit_value / unit_lo))
    else:
        allowed = math.hypot(math.log(pred.unit_value / pred.unit_lo), math.log(unit_hi / unit_value))
    return abs(d) <= allowed


def predict_law(law: LawFit, params: float, tokens: float | None = None, name: str = "",
                safe: bool = False) -> Prediction:
    """Prediction (with the bootstrap interval) of the unit, and r where the unit allows, at size N and budget D;
    with safe=True also the safe ratio (from the width line).

    D defaults to the largest budget among the fitted points."""
    if not law.ok:
        raise ValueError(f"no law to predict from: {law.reason}")
    if tokens is None:
        tokens = max((p.tokens for p in law.points if p.used), default=math.nan)
    fit = _Fit(np.array(law.coef), law.boot, law.chi2_red, law.dof, law.tau2, law.extra_cov)
    pred = _predict(fit, law.unit, law.confidence, name, params, tokens)
    return _with_safe(pred, law.width, law.safe_drop, law.confidence) if safe and law.width is not None else pred


def width_line(collapses: list[CollapseResult], n_boot: int, rng: np.random.Generator) -> WidthLine | None:
    """The width line over these collapses (None with fewer than two sizes with a fitted curve)."""
    cs = [c for c in collapses if c.logistic is not None and c.logistic.steepness > 0]
    if len({c.params for c in cs}) < 2:
        return None
    x = np.stack([np.ones(len(cs)), np.log([c.params for c in cs])], axis=1)
    y = -np.log([c.logistic.steepness for c in cs])
    xtx_inv = np.linalg.inv(x.T @ x)
    coef = xtx_inv @ x.T @ y
    dof = len(cs) - 2
    s2 = float(np.sum((y - x @ coef) ** 2) / dof) if dof > 0 else 0.0
    boot = np.empty((0, 2))
    if n_boot > 0 and all(c.boot_steepness.size for c in cs):
        ys = np.stack([-np.log(c.boot_steepness[rng.integers(0, c.boot_steepness.size, n_boot)]) for c in cs], 1)
        boot = (xtx_inv @ x.T @ ys.T).T
    return WidthLine((float(coef[0]), float(coef[1])), s2, dof, xtx_inv, boot)


def predict_width(line: WidthLine, params: float, confidence: float) -> tuple[float, float, float]:
    """Width 1/steepness at N with its interval (bootstrap of the line and residual scatter, in quadrature)."""
    x = np.array([1.0, math.log(params)])
    c = float(x @ np.array(line.coef))
    lo_b, hi_b = percentile_interval(line.boot @ x, confidence) if line.boot.size else (c, c)
    extra = t_quantile(confidence, line.dof) * math.sqrt(line.s2 * (1.0 + float(x @ line.xtx_inv @ x)))
    lo, hi = c - math.hypot(max(c - lo_b, 0.0), extra), c + math.hypot(max(hi_b - c, 0.0), extra)
    return math.exp(c), math.exp(lo), math.exp(hi)


def _with_safe(pred: Prediction, line: WidthLine, safe_drop: float, confidence: float) -> Prediction:
    if pred.r_star is None or not 0 < pred.r_star < 1:
        return pred
    w, wlo, whi = predict_width(line, pred.params, confidence)
    g = math.log(safe_drop / (1 - safe_drop))          # < 0
    mid = float(ratio_axis(pred.r_star))
    centre = mid + g * w
    r_ok = pred.r_lo is not None and pred.r_hi is not None and 0 < pred.r_lo and pred.r_hi < 1
    lo_r, hi_r = (float(ratio_axis(pred.r_lo)), float(ratio_axis(pred.r_hi))) if r_ok else (mid, mid)
    lo = centre - math.hypot(mid - lo_r, -g * (whi - w))
    hi = centre + math.hypot(hi_r - mid, -g * (w - wlo))
    safe, slo, shi = (float(axis_ratio(v)) for v in (centre, lo, hi))
    return replace(pred, safe_r=safe, safe_lo=slo if r_ok else None, safe_hi=shi if r_ok else None, width=w)


def _fit(points: list[LawPoint], log_u_boot: np.ndarray | None, with_d: bool) -> _Fit:
    n = np.array([p.params for p in points])
    t = np.array([p.tokens for p in points])
    x = _design(n, t, with_d)
    y = np.log([p.unit_value for p in points])
    w = _weights(np.array([p.sigma for p in points]))
    coef = wls(x, y, w)[0]
    dof = len(points) - x.shape[1]
    q = float(np.sum(w * (y - x @ coef) ** 2))
    chi2 = q / dof if dof > 0 else math.nan
    boot = wls(x, log_u_boot, w) if log_u_boot is not None else np.empty((0, x.shape[1]))
    inv = np.linalg.inv(x.T @ (x * w[:, None]))
    extra_cov = inv @ (x.T @ (x * (w ** 2)[:, None])) @ inv
    leverage = w * np.einsum("ij,jk,ik->i", x, inv, x)
    denom = float(np.sum(w * (1.0 - leverage)))
    tau2 = max(0.0, (q - dof) / denom) if dof > 0 and denom > 0 else 0.0
    return _Fit(coef, boot, chi2, dof, tau2, extra_cov)


def _leave_largest_out(points: list[LawPoint], log_u_boot: np.ndarray | None, with_d: bool, unit: str,
                       confidence: float) -> tuple[tuple[LeaveOut, ...], str]:
    largest = max(p.params for p in points)
    train = [i for i, p in enumerate(points) if p.params < largest]
    if len({points[i].params for i in train}) < 2 or (with_d and len(train) < MIN_POINTS_D_TERM):
        return (), "needs >= 2 smaller sizes (and enough points for the D term)"
    boot = log_u_boot[:, train] if log_u_boot is not None else None
    fit = _fit([points[i] for i in train], boot, with_d)
    out = [compare(_predict(fit, unit, confidence, p.size, p.params, p.tokens), p)
           for p in points if p.params == largest]
    return tuple(out), ""


def compare(pred: Prediction, p: LawPoint) -> LeaveOut:
    """A prediction against the observed collapse of the same size: signed errors and coverage (None unless the
    observation is flagged 'ok': an unbracketed r* is not a measurement to judge the law by)."""
    finite = math.isfinite(p.r_star) and p.r_star > 0
    err_r = (pred.r_star - p.r_star) / p.r_star if pred.r_star is not None and finite else None
    err_u = (pred.unit_value - p.unit_value) / p.unit_value if math.isfinite(p.unit_value) and p.unit_value > 0 \
        else math.nan
    covered = covers(pred, p.unit_value, p.unit_lo, p.unit_hi) if p.flag == "ok" else None
    return LeaveOut(pred, p.r_star, p.unit_value, err_r, err_u, covered, observed_lo=p.lo, observed_hi=p.hi,
                    observed_flag=p.flag)


def fit_law(collapses: list[CollapseResult], *, unit: str = "odds", n_boot: int, confidence: float,
            rng: np.random.Generator, targets: dict[str, float] | None = None, target_tokens: float | None = None,
            capacity_bits: float = 2.0, safe_drop: float = 0.05, validate: Collection[str] = ()) -> LawFit:
    """Fit the law on the 'ok' collapses of every size not in `validate`; with fewer than two sizes, a LawFit with
    ok=False and the reason. Sizes in `validate` never enter the fit: each is compared with its prediction."""
    if unit not in UNITS:
        raise ValueError(f"unknown law unit {unit!r}; fix: use one of {', '.join(UNITS)}")
    points = [replace(p, used=False, role="validate", reason="validation size: held out of the fit")
              if p.size in validate else p for p in law_points(collapses, unit, confidence, capacity_bits)]
    points, with_d, notes = _choose_points(points)
    form = "a*N^b*D^c" if with_d else "a*N^b"
    base = dict(unit=unit, confidence=confidence, form=form, capacity_bits=capacity_bits, n_boot=n_boot,
                safe_drop=safe_drop)
    used = [i for i, p in enumerate(points) if p.used]
    sizes = sorted({points[i].size for i in used})
    if len({points[i].params for i in used}) < 2:
        why = (f"{len(sizes)} size(s) with a bracketed collapse ({', '.join(sizes) or 'none'}); a law needs >= 2: "
               "fix: add sizes or widen the ratio grid so the collapse is bracketed")
        return LawFit(**base, ok=False, reason=why, points=tuple(points), notes=tuple(notes))
    if len(used) == 2:
        notes.append("two points: the law passes through both (no degrees of freedom left to check it)")
    log_u_boot = _boot_log_units(collapses, used, unit, n_boot, rng)
    if n_boot > 0 and log_u_boot is None:
        notes.append("some collapse has no bootstrap samples: no intervals on the law")
    fitted = [points[i] for i in used]
    fit = _fit(fitted, log_u_boot, with_d)
    coef, boot = fit.coef, fit.boot
    ci = np.array([percentile_interval(col, confidence) for col in boot.T]) if boot.size else \
        np.full((coef.size, 2), math.nan)
    loo, loo_reason = _leave_largest_out(fitted, log_u_boot, with_d, unit, confidence)
    over = [p.size for p in points if p.capacity_flag == "over-capacity"]
    if over:
        notes.append(f"knowledge bits per parameter at r* exceed {capacity_bits:g} for {', '.join(over)}: check "
                     "the exposure accounting or the retention metric")
    law = LawFit(**base, ok=True, reason="", coef=tuple(map(float, coef)), coef_lo=tuple(map(float, ci[:, 0])),
                 coef_hi=tuple(map(float, ci[:, 1])), boot=boot, points=tuple(points), leave_largest_out=loo,
                 leave_out_reason=loo_reason, chi2_red=fit.chi2_red, dof=fit.dof, tau2=fit.tau2,
                 extra_cov=fit.extra_cov, notes=tuple(notes))
    # drawn last: the law's own numbers do not depend on whether a width line could be fitted
    law = replace(law, width=width_line([collapses[i] for i in used], n_boot, rng))
    preds = tuple(predict_law(law, n, target_tokens, name, safe=True) for name, n in (targets or {}).items())
    checks = tuple(compare(predict_law(law, p.params, p.tokens, p.size, safe=True), p)
                   for p in points if p.role == "validate")
    law = replace(law, validations=checks)
    beyond = [p.name for p in preds if unit == "tokens" and p.r_star is None]
    if beyond:
        notes.append(f"predicted knowledge tokens exceed the budget D for {', '.join(beyond)}: no ratio r < 1 "
                     "reaches the collapse there (r* given as '-')")
    return replace(law, predictions=preds, notes=tuple(notes))
