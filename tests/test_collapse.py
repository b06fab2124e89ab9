"""Collapse detection on curves generated from a known logistic with per-fact binomial noise."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import least_squares

from conftest import simulate_cells
from kislurm.analysis.collapse import (ratio_axis, CollapseOptions, Logistic, Measurement, _bounds, _cell_replicates,
                                       detect_collapse, detect_collapses, fit_logistic, segmented_fit)
from kislurm.analysis.measurements_csv import MeasurementError, measurements_from_csv

GRID = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)


def simulate(rng: np.random.Generator, r_star: float, ratios=GRID, n_facts: int = 200, seeds=(0,),
             steepness: float | None = None, plateau: float = 0.95, floor: float = 0.1, size: str = "m",
             params: float = 1e6, tokens: float = 1e6) -> list[Measurement]:
    """One size's cells with ten choices per probe, and 500 exposures per fact at r = 1."""
    return simulate_cells(rng, size, params, r_star, ratios, n_facts=n_facts, seeds=seeds, tokens=tokens,
                          steepness=steepness, plateau=plateau, floor=floor, n_choices=10,
                          exposures_per_fact=lambda r: 500.0 * r)


def table(values: dict[float, float], **kw) -> list[Measurement]:
    return [Measurement("m", 1e6, r, 1e6, 0, y, **kw) for r, y in values.items()]


# ---------------------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------------------


def test_logistic_fit_reaches_scipy_optimum():
    """Grid starts + one polish per start find the optimum a brute-force multi-start scipy fit finds."""
    rng = np.random.default_rng(3)
    x = np.log(np.array(GRID))
    ys = np.stack([[m.retention for m in simulate(rng, r, n_facts=100)] for r in (0.3, 0.5, 0.7, 0.85)])
    th, sse = fit_logistic(x, ys)
    for row, t, s in zip(ys, th, sse):
        lo, hi = _bounds(x, row)   # the same box: r* near the grid, r* < 1, no arbitrarily sharp steps
        starts = [np.clip([row.max(), np.ptp(row), m0, s0], lo + 1e-9, hi - 1e-9) for m0 in x[1::2] for s0 in (2, 10)]
        best = min((least_squares(lambda p: p[0] - p[1] / (1 + np.exp(-p[3] * (x - p[2]))) - row, p0,
                                  bounds=(lo, hi)) for p0 in starts), key=lambda res: res.cost)
        assert s <= 2 * best.cost * (1 + 1e-4) + 1e-10
        if 2 * best.cost <= s * (1 + 1e-6):      # same optimum (not scipy stuck on a flat ridge): same r*
            assert abs(t[2] - best.x[2]) < 1e-3


def test_fit_stays_in_the_box_where_the_data_want_to_leave_it():
    """A step sharper than the box allows ends on the steepness cap; a rising curve ends on drop = 0 (flat)."""
    x = np.log(np.array(GRID))
    step = np.array([0.9, 0.9, 0.9, 0.9, 0.2, 0.2, 0.2])
    rising = np.linspace(0.2, 0.5, len(GRID))
    for y in (step, rising):
        lo, hi = _bounds(x, y)
        (t,), (s,) = fit_logistic(x, y)
        assert np.all((t >= lo) & (t <= hi))
        direct = min(least_squares(lambda p: p[0] - p[1] / (1 + np.exp(-p[3] * (x - p[2]))) - y,
                                   np.clip([y.max(), np.ptp(y), m0, s0], lo + 1e-9, hi - 1e-9), bounds=(lo, hi)).cost
                     for m0 in x[1::2] for s0 in (2, 10, 50))
        assert s <= 2 * direct * (1 + 1e-4) + 1e-10
    (t,), _ = fit_logistic(x, step)
    assert t[3] == pytest.approx(_bounds(x, step)[1][3], rel=1e-6) and x[3] < t[2] < x[4]
    (t,), (s,) = fit_logistic(x, rising)
    assert t[1] == pytest.approx(0.0, abs=1e-6) and s == pytest.approx(((rising - rising.mean()) ** 2).sum())


def test_polishing_only_the_best_start_loses_nothing_on_clear_curves():
    """The bootstrap polishes one start per replicate (speed): same optimum as polishing every start."""
    rng = np.random.default_rng(4)
    x = np.log(np.array(GRID))
    for r_star in (0.3, 0.6):
        ys = np.stack([[m.retention for m in simulate(rng, r_star, n_facts=200)] for _ in range(15)])
        point = fit_logistic(x, ys[:1])[0][0]
        one = fit_logistic(x, ys, start=point, n_starts=2, n_polish=1)
        every = fit_logistic(x, ys, start=point, n_starts=2)
        assert np.allclose(one[1], every[1], rtol=1e-6, atol=1e-12)
        assert np.allclose(one[0][:, 2], every[0][:, 2], atol=1e-3)


def test_segmented_midpoint_and_largest_drop_bracket_the_step():
    x = np.log(np.array(GRID))
    y = np.array([0.9, 0.9, 0.9, 0.9, 0.2, 0.2, 0.2])
    mid, k1, k2 = segmented_fit(x, y)
    assert x[3] - 1e-9 <= k1 < k2 <= x[4] + 1e-9
    assert math.exp(mid) == pytest.approx(math.sqrt(0.5 * 0.65), rel=0.05)
    c = detect_collapse(table(dict(zip(GRID, y))), n_boot=0, confidence=0.9, rng=np.random.default_rng(0))
    assert c.r_star_largest_drop == pytest.approx(math.sqrt(0.5 * 0.65))
    assert 0.5 < c.r_star < 0.65 and c.flag == "ok"


# ---------------------------------------------------------------------------------------------------------------------
# Detection, interval, flags
# ---------------------------------------------------------------------------------------------------------------------


def test_detects_known_collapse_point_with_cross_checks():
    rng = np.random.default_rng(0)
    c = detect_collapse(simulate(rng, 0.6, n_facts=500), n_boot=200, confidence=0.9, rng=rng)
    assert c.flag == "ok" and c.bracketed and c.boot_method == "facts"
    assert c.r_star == pytest.approx(0.6, rel=0.05)
    assert c.lo < 0.6 < c.hi and c.hi / c.lo < 1.3
    assert c.r_star_segmented == pytest.approx(0.6, rel=0.15)
    assert 0.5 <= c.r_star_largest_drop <= 0.8
    assert c.boot.shape == (200,) and c.n_cells == len(GRID)
    assert c.logistic.plateau == pytest.approx(0.95, abs=0.05) and c.logistic.floor == pytest.approx(0.1, abs=0.05)


def test_bootstrap_interval_covers_true_r_star_at_nominal_rate():
    """Percentile intervals from the fact bootstrap cover the true r* about `confidence` of the time."""
    rng = np.random.default_rng(2024)
    reps, conf, hits = 120, 0.8, 0
    for _ in range(reps):
        c = detect_collapse(simulate(rng, 0.45, ratios=(0.1, 0.25, 0.45, 0.65, 0.85), steepness=6.0), n_boot=50,
                            confidence=conf, rng=rng)
        hits += c.lo <= 0.45 <= c.hi
    assert 0.68 <= hits / reps <= 0.92, hits / reps


def test_same_fact_resample_for_every_cell():
    """Cells of one size share their facts: identical per-fact scores give identical bootstrap replicates."""
    fc = (np.random.default_rng(1).random(300) < 0.7).astype(float)
    ms = [Measurement("m", 1e6, r, 1e6, 0, float(fc.mean()), fc) for r in GRID]
    reps, method = _cell_replicates(ms, 40, np.random.default_rng(0))
    assert method == "facts" and reps.shape == (40, len(GRID))
    assert np.allclose(reps, reps[:, :1]) and reps[:, 0].std() > 0.005


def test_bootstrap_method_follows_available_data():
    rng = np.random.default_rng(5)
    ms = simulate(rng, 0.5, seeds=(0, 1, 2))
    assert detect_collapse(ms, n_boot=30, confidence=0.9, rng=rng).boot_method == "facts+seeds"
    plain = [Measurement(m.size, m.params, m.ratio, m.tokens, m.seed, m.retention) for m in ms]
    assert detect_collapse(plain, n_boot=30, confidence=0.9, rng=rng).boot_method == "seeds"
    one = [m for m in plain if m.seed == 0]
    c = detect_collapse(one, n_boot=30, confidence=0.9, rng=rng)
    assert c.boot_method == "residual" and np.isfinite([c.lo, c.hi]).all()
    binom = [Measurement(m.size, m.params, m.ratio, m.tokens, 0, m.retention, n_facts=200) for m in one]
    c = detect_collapse(binom, n_boot=100, confidence=0.9, rng=rng)
    assert c.boot_method == "binomial" and c.lo < c.r_star < c.hi
    assert detect_collapse(one, n_boot=0, confidence=0.9, rng=rng).boot.size == 0


def test_seeds_are_averaged_per_ratio():
    rng = np.random.default_rng(9)
    ms = simulate(rng, 0.5, seeds=(0, 1))
    c = detect_collapse(ms, n_boot=20, confidence=0.9, rng=rng)
    expected = [np.mean([m.retention for m in ms if m.ratio == r]) for r in GRID]
    assert np.allclose(c.retention, expected) and list(c.n_seeds) == [2] * len(GRID)


def exact(r_star: float, steepness: float) -> dict[float, float]:
    return dict(zip(GRID, Logistic(0.9, 0.1, float(ratio_axis(r_star)), steepness)(np.array(GRID)).tolist()))


@pytest.mark.parametrize("values, flag", [
    (exact(0.85, 12.0), "unbracketed-high"),   # r* inside the grid, but 0.9 is still only half-way down
    (exact(0.08, 4.0), "unbracketed-low"),     # r* below the grid: 0.1 already half-way down
    ({0.1: 0.9, 0.2: 0.91, 0.35: 0.9, 0.5: 0.89, 0.65: 0.88, 0.8: 0.82, 0.9: 0.6}, "unbracketed-high"),
    ({0.1: 0.9, 0.2: 0.91, 0.35: 0.88, 0.5: 0.9, 0.65: 0.87, 0.8: 0.89, 0.9: 0.86}, "absent"),
    ({0.1: 0.9, 0.2: 0.9, 0.35: 0.3, 0.5: 0.85, 0.65: 0.2, 0.8: 0.1, 0.9: 0.1}, "non-monotone"),
    ({0.1: 0.9, 0.5: 0.5, 0.9: 0.1}, "too-few-points"),
    ({0.1: 0.9, 0.2: 0.9, 0.35: 0.9, 0.5: 0.5, 0.65: 0.1, 0.8: 0.1, 0.9: 0.1}, "ok"),
])
def test_flags(values, flag):
    c = detect_collapse(table(values), n_boot=20, confidence=0.9, rng=np.random.default_rng(0))
    assert c.flag == flag, c.reason
    assert c.reason and "\n" not in c.reason
    if flag == "ok" or flag.startswith("unbracketed"):
        assert c.bracketed == (flag == "ok")
    if flag in ("absent", "too-few-points"):
        assert math.isnan(c.r_star) and c.logistic is None


@pytest.mark.parametrize("r_star, steepness", [(0.08, 4.0), (0.5, 5.0), (0.85, 3.0)])
def test_noiseless_logistic_is_recovered_even_off_grid(r_star, steepness):
    c = detect_collapse(table(exact(r_star, steepness)), n_boot=0, confidence=0.9, rng=np.random.default_rng(0))
    assert c.r_star == pytest.approx(r_star, rel=1e-4) and c.logistic.plateau == pytest.approx(0.9, abs=1e-4)


def test_one_point_past_r_star_is_not_a_bracket():
    """A floor resting on one grid point is the fit's choice, not an observation: unbracketed by default."""
    values = {0.1: 0.9, 0.2: 0.9, 0.35: 0.9, 0.5: 0.9, 0.65: 0.9, 0.8: 0.5, 0.9: 0.1}
    rng = np.random.default_rng(0)
    assert detect_collapse(table(values), n_boot=0, confidence=0.9, rng=rng).flag == "unbracketed-high"
    lenient = CollapseOptions(min_side_points=1)
    assert detect_collapse(table(values), n_boot=0, confidence=0.9, rng=rng, options=lenient).flag == "ok"
    below = simulate(np.random.default_rng(3), 0.06, ratios=GRID, steepness=3.0)   # collapse below the grid
    c = detect_collapse(below, n_boot=0, confidence=0.9, rng=rng)
    assert c.flag in ("unbracketed-low", "absent"), (c.flag, c.r_star)


def test_groups_and_mixed_input():
    rng = np.random.default_rng(1)
    ms = simulate(rng, 0.7, size="b", params=2e6) + simulate(rng, 0.5, size="a", params=1e6) + \
        simulate(rng, 0.5, size="a", params=1e6, tokens=2e6)
    cs = detect_collapses(ms, n_boot=10, confidence=0.9, rng=np.random.default_rng(5))
    assert [(c.size, c.tokens) for c in cs] == [("a", 1e6), ("a", 2e6), ("b", 1e6)]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:  # each group has its own random stream: the same result in processes
        again = detect_collapses(ms, n_boot=10, confidence=0.9, rng=np.random.default_rng(5), executor=pool)
    assert [(c.r_star, c.lo, c.hi) for c in again] == [(c.r_star, c.lo, c.hi) for c in cs]
    with pytest.raises(ValueError, match="several"):
        detect_collapse(ms, n_boot=0, confidence=0.9, rng=rng)


# ---------------------------------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.csv"
    p.write_text(text)
    return p


def test_csv_roundtrip_and_defaults(tmp_path):
    p = write(tmp_path, "# pilot\nparams,ratio,retention,n_facts,note\n1e6,0.5,0.61,300,x\n1e6,0.5,0.59,300,y\n"
                        "2e6, 0.7 ,0.9,,\n")
    ms = measurements_from_csv(p)
    assert [m.seed for m in ms] == [0, 1, 0]
    assert ms[0].size == "1e+06" and ms[0].n_facts == 300 and ms[2].n_facts is None
    assert math.isnan(ms[0].tokens) and ms[2].ratio == 0.7
    full = write(tmp_path, "size\tparams\ttokens\tratio\tseed\tretention\tn_choices\n"
                           "s\t1e6\t2e8\t0.1\t3\t0.9\t10\n")
    m = measurements_from_csv(full)[0]
    assert (m.size, m.tokens, m.seed, m.n_choices) == ("s", 2e8, 3, 10)


@pytest.mark.parametrize("text, needle", [
    ("params,retention\n1e6,0.5\n", "missing column 'ratio'"),
    ("params,ratio,retention\n1e6,abc,0.5\n", ":2: column 'ratio' value 'abc' is not a number"),
    ("params,ratio,retention\n1e6,0.5,0.5\n1e6,50,0.4\n", ":3: column 'ratio' value 50 is outside (0, 1)"),
    ("params,ratio,retention\n1e6,0.5,\n", "column 'retention' is empty"),
    ("params,ratio,retention\n", "header but no rows"),
    ("", "no header"),
    ("params,ratio,retention\n1e6,0.5\n", "2 values for 3 columns"),
    ("params,ratio,retention,seed\n1e6,0.5,0.5,1.5\n", "not an integer"),
    ("size,params,ratio,retention\na,1e6,0.5,0.5\na,2e6,0.6,0.5\n", "size 'a' has params"),
    ("params,ratio,retention,seed\n1e6,0.5,0.5,0\n1e6,0.5,0.4,0\n", "same size, tokens, ratio and seed"),
    ("params,ratio,retention\n-1,0.5,0.5\n", "not positive"),
])
def test_csv_errors_are_one_line_with_location_and_fix(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(MeasurementError) as e:
        measurements_from_csv(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "fix:" in msg and "\n" not in msg


def test_csv_missing_file(tmp_path):
    with pytest.raises(MeasurementError, match="cannot read"):
        measurements_from_csv(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------------------------------
# The safe ratio
# ---------------------------------------------------------------------------------------------------------------------

RAMP_GRID = tuple(float(r) for r in np.round(1 / (1 + np.exp(-np.linspace(-2.5, 2.5, 11))), 3))


@pytest.mark.parametrize("r_star", [0.5, 0.7])
def test_safe_ratio_recovers_the_known_curve_within_its_interval(r_star):
    """20 seeded fact-noise simulations of a known curve (steepness 3, grid points on its ramp): the safe ratio's
    90% interval holds the curve's true value in 17 of 20 (at least 15 asked: P(< 15) is ~4% at nominal), and
    the estimate is unbiased."""
    true = 1 / (1 + math.exp(-(math.log(r_star / (1 - r_star)) + math.log(0.05 / 0.95) / 3.0)))
    covered, errors = 0, []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        c = detect_collapse(simulate(rng, r_star, ratios=RAMP_GRID, steepness=3.0), n_boot=100, confidence=0.9,
                            rng=rng)
        assert c.flag == "ok" and c.safe_lo <= c.safe_r <= c.safe_hi < c.r_star
        covered += c.safe_lo <= true <= c.safe_hi
        errors.append(c.safe_r - true)
    assert covered >= 15 and abs(float(np.median(errors))) < 0.02


def test_safe_ratio_follows_safe_drop_and_reports_infused_retention():
    rng = np.random.default_rng(3)
    ms = [replace(m, infused_retention=m.ratio) for m in simulate(rng, 0.5, ratios=RAMP_GRID, steepness=3.0)]
    strict = detect_collapse(ms, n_boot=20, confidence=0.9, rng=np.random.default_rng(0),
                             options=CollapseOptions(safe_drop=0.01))
    loose = detect_collapse(ms, n_boot=20, confidence=0.9, rng=np.random.default_rng(0),
                            options=CollapseOptions(safe_drop=0.2))
    assert strict.r_star == loose.r_star and strict.safe_r < loose.safe_r < loose.r_star
    lg = loose.logistic
    lost = (lg.plateau - lg(np.array([loose.safe_r]))[0]) / (lg.plateau - lg.floor)
    assert lost == pytest.approx(0.2)
    # infused retention = r at every grid ratio: interpolated in log-odds, so close to (not exactly) r
    assert loose.infused_at_safe == pytest.approx(loose.safe_r, abs=0.02)
    assert detect_collapse([replace(m, infused_retention=None) for m in ms], n_boot=0, confidence=0.9,
                           rng=rng).infused_at_safe is None
