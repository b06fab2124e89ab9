"""The scaling-law fit recovers a known law from noisy, simulated collapse curves."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from conftest import simulate_cells
from kislurm.analysis.collapse import CollapseResult, Measurement, detect_collapses
from kislurm.analysis.law import (LawFit, Prediction, covers, fit_law, interp_loglog, law_points, predict_law,
                                  unit_of_ratio, wls)

GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98, 0.99)
A, B = 1e-3, 0.6            # true law: odds(r*) = A * N^B
SIZES = {f"s{i}": float(n) for i, n in enumerate(np.geomspace(1e5, 1e7, 5))}


def true_r_star(params: float, tokens: float = 1e6, c: float = 0.0) -> float:
    odds = A * params ** B * (tokens / 1e6) ** c
    return odds / (1 + odds)


def simulate(rng: np.random.Generator, sizes=SIZES, tokens=(1e6,), c: float = 0.0, n_facts: int = 200,
             bits: float | None = None) -> list[Measurement]:
    """Every size and budget around the true law's r*, at a fixed steepness of 3, 800 exposures per fact at r = 1."""
    return [m for size, n in sizes.items() for d in tokens
            for m in simulate_cells(rng, size, n, true_r_star(n, d, c), GRID, n_facts=n_facts, tokens=d,
                                    steepness=3.0, exposures_per_fact=lambda r: 800.0 * r, knowledge_bits=bits)]


def fake(size: str, params: float, r: float, rel_width: float, flag: str = "ok", tokens: float = 1e6,
         n_boot: int = 64, seed: int = 0, interval: tuple[float, float] | None = None) -> CollapseResult:
    """A collapse result with a log-normal bootstrap around r (for weighting and bookkeeping tests)."""
    boot = np.minimum(r * np.exp(np.random.default_rng(seed).normal(0, rel_width, n_boot)), 0.9999)
    lo, hi = interval or (r * math.exp(-1.6449 * rel_width), r * math.exp(1.6449 * rel_width))
    return CollapseResult(size=size, params=params, tokens=tokens, r_star=r, lo=lo, hi=hi,
                          bracketed=flag == "ok", flag=flag, reason="test",
                          logistic=None, r_star_segmented=None, r_star_largest_drop=None, n_cells=5,
                          ratios=np.array([0.1, 0.5, 0.9]), retention=np.array([0.9, 0.5, 0.1]),
                          retention_se=np.zeros(3), n_seeds=np.ones(3), boot=boot, boot_method="facts")


@pytest.fixture(scope="module")
def fitted() -> tuple[list[CollapseResult], LawFit]:
    rng = np.random.default_rng(11)
    cs = detect_collapses(simulate(rng), n_boot=100, confidence=0.9, rng=rng)
    law = fit_law(cs, unit="odds", n_boot=400, confidence=0.9, rng=rng, targets={"1B": 1e9})
    return cs, law


def test_exponent_recovered_within_5_percent(fitted):
    cs, law = fitted
    assert all(c.flag == "ok" for c in cs), [c.reason for c in cs]
    assert law.ok and law.form == "a*N^b" and len(law.coef) == 2
    assert law.b == pytest.approx(B, rel=0.05)
    lo, hi = law.b_interval
    assert lo < B < hi and hi - lo < 0.3
    assert law.a == pytest.approx(A, rel=0.6)
    assert law.boot.shape == (400, 2) and 0.1 < law.chi2_red < 10


def test_leave_largest_out_and_predictions(fitted):
    cs, law = fitted
    (loo,) = law.leave_largest_out
    largest = max(cs, key=lambda c: c.params)
    assert loo.predicted.name == largest.size and loo.observed_r == largest.r_star
    assert abs(loo.rel_err_r) < 0.05 and loo.rel_err_unit == pytest.approx(
        loo.predicted.unit_value / loo.observed_unit - 1)
    (pred,) = law.predictions
    assert pred.name == "1B" and pred.unit_lo < pred.unit_value < pred.unit_hi
    assert pred.r_star == pytest.approx(pred.unit_value / (1 + pred.unit_value))
    assert pred.r_star == pytest.approx(true_r_star(1e9), abs=0.01)
    mid = predict_law(law, 1e6)
    assert mid.unit_value == pytest.approx(law.a * 1e6 ** law.b)


def test_units_convert_from_r_star():
    c = fake("x", 1e6, 0.8, 0.05, tokens=2e6)
    assert unit_of_ratio(c, 0.8, "odds") == pytest.approx(4.0)
    assert unit_of_ratio(c, 0.8, "tokens") == pytest.approx(1.6e6)
    assert np.isnan(unit_of_ratio(c, 0.8, "exposures"))         # no exposures recorded
    assert interp_loglog(np.array([0.2, 0.05, 2.0]), np.array([0.1, 0.4]), np.array([10.0, 40.0])) == \
        pytest.approx([20.0, 5.0, 200.0])                       # exact for a power law, also beyond the grid
    with pytest.raises(ValueError, match="unknown law unit"):
        unit_of_ratio(c, 0.8, "bits")


def test_exposures_unit_follows_recorded_exposures():
    rng = np.random.default_rng(2)
    cs = detect_collapses(simulate(rng), n_boot=30, confidence=0.9, rng=rng)
    law = fit_law(cs, unit="exposures", n_boot=50, confidence=0.9, rng=rng, targets={"big": 1e8})
    assert law.ok
    for p in law.points:
        assert p.unit_value == pytest.approx(800.0 * p.r_star, rel=1e-6)
    assert law.predictions[0].r_star is None                  # no way back from exposures to r


def test_weights_follow_interval_widths():
    """A size with a wide interval barely moves the fit; an exact line through the precise sizes is kept."""
    n = [1e5, 1e6, 1e7]
    odds = [A * x ** B for x in n]
    cs = [fake(f"s{i}", x, o / (1 + o), 0.02) for i, (x, o) in enumerate(zip(n[:2], odds))]
    cs.append(fake("s2", 1e7, 0.99, 0.02, interval=(0.5, 0.995)))   # far off the line, but very uncertain
    law = fit_law(cs, unit="odds", n_boot=0, confidence=0.9, rng=np.random.default_rng(0))
    assert law.b == pytest.approx(B, rel=0.02)
    x = np.stack([np.ones(3), np.log(n)], axis=1)
    assert np.allclose(wls(x, np.log(odds), np.ones(3))[0], [math.log(A), B])


def test_fewer_than_two_sizes_gives_reason_not_crash():
    rng = np.random.default_rng(0)
    one = [fake("a", 1e6, 0.5, 0.05), fake("b", 1e7, 0.9, 0.05, flag="unbracketed-high")]
    law = fit_law(one, unit="odds", n_boot=50, confidence=0.9, rng=rng, targets={"big": 1e9})
    assert not law.ok and "1 size(s)" in law.reason and "fix:" in law.reason
    assert math.isnan(law.b) and law.predictions == () and len(law.points) == 2
    assert [p.used for p in law.points] == [True, False] and "unbracketed-high" in law.points[1].reason
    assert not fit_law([], unit="odds", n_boot=10, confidence=0.9, rng=rng).ok
    with pytest.raises(ValueError, match="no law"):
        predict_law(law, 1e9)


def test_two_sizes_fit_exactly_without_leave_out():
    law = fit_law([fake("a", 1e6, 0.5, 0.05), fake("b", 1e7, 0.8, 0.05, seed=1)], unit="odds", n_boot=100,
                  confidence=0.9, rng=np.random.default_rng(0))
    assert law.ok and law.b == pytest.approx(math.log(4.0) / math.log(10.0))
    assert law.leave_largest_out == () and "smaller sizes" in law.leave_out_reason
    assert any("two points" in n for n in law.notes)


def test_token_budget_term_only_with_enough_points():
    rng = np.random.default_rng(4)
    sizes3 = dict(list(SIZES.items())[::2])
    cs = detect_collapses(simulate(rng, sizes=sizes3, tokens=(1e6, 4e6), c=0.3), n_boot=40, confidence=0.9,
                          rng=rng)
    law = fit_law(cs, unit="odds", n_boot=100, confidence=0.9, rng=rng)
    assert law.ok and law.form == "a*N^b*D^c"
    assert law.b == pytest.approx(B, rel=0.1) and law.c == pytest.approx(0.3, abs=0.1)
    few = [c for c in cs if not (c.tokens == 4e6 and c.params > 1e5)] + [fake("x", 5e6, 0.9, 0.05, "absent")]
    law = fit_law(few, unit="odds", n_boot=50, confidence=0.9, rng=rng)
    assert law.form == "a*N^b" and law.c is None
    assert {p.tokens for p in law.points if p.used} == {1e6}
    assert any("D term" in p.reason for p in law.points if not p.used)


def test_knowledge_bits_per_parameter_checked_against_capacity():
    rng = np.random.default_rng(6)
    sizes = dict(list(SIZES.items())[:3])
    cs = detect_collapses(simulate(rng, sizes=sizes, bits=3e5), n_boot=20, confidence=0.9, rng=rng)
    law = fit_law(cs, unit="odds", n_boot=20, confidence=0.9, rng=rng)
    bpp = {p.size: p.bits_per_param for p in law.points}
    assert bpp["s0"] == pytest.approx(3.0) and bpp["s2"] == pytest.approx(0.3)
    flags = {p.size: p.capacity_flag for p in law.points}
    assert flags == {"s0": "over-capacity", "s1": "ok", "s2": "ok"}
    assert any("bits per parameter" in n for n in law.notes)
    assert law_points(cs, "odds", 0.9)[0].bits_per_param == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------------------------------
# Honest prediction intervals: lack of fit and the observation's own interval
# ---------------------------------------------------------------------------------------------------------------------


def scattered(rng: np.random.Generator, params: list[float], tau: float, n_boot: int = 200) -> list[CollapseResult]:
    """Collapses of a known law whose sizes depart from it by N(0, tau) in log odds (size-to-size scatter), each
    observed with its own measurement noise sigma, which its bootstrap and interval describe."""
    out = []
    for i, n in enumerate(params):
        sigma = rng.uniform(0.05, 0.2)
        log_odds = math.log(A) + B * math.log(n) + rng.normal(0, tau) + rng.normal(0, sigma)
        boot = 1 / (1 + np.exp(-(log_odds + rng.normal(0, sigma, n_boot))))
        lo, hi = (1 / (1 + math.exp(-(log_odds + k * 1.6449 * sigma))) for k in (-1, 1))
        out.append(replace(fake(f"s{i}", n, 1 / (1 + math.exp(-log_odds)), 0.1), lo=lo, hi=hi, boot=boot))
    return out


def held_out_coverage(tau: float, n_sim: int, seed: int = 1) -> tuple[float, float]:
    """Share of simulations in which a held-out larger size is covered: (with lack of fit, bootstrap alone)."""
    rng = np.random.default_rng(seed)
    hits = np.zeros(2)
    for _ in range(n_sim):
        cs = scattered(rng, [*np.geomspace(1e5, 1e7, 5), 4e7], tau)
        law = fit_law(cs[:-1], unit="odds", n_boot=200, confidence=0.9, rng=rng)
        (held,) = law_points(cs[-1:], "odds", 0.9)
        pred = predict_law(law, held.params)
        for k, p in enumerate((pred, replace(pred, unit_lo=pred.fit_lo, unit_hi=pred.fit_hi))):
            hits[k] += covers(p, held.unit_value, held.unit_lo, held.unit_hi)
    return hits[0] / n_sim, hits[1] / n_sim


def test_held_out_size_covered_at_about_the_nominal_rate():
    """600 seeded simulations with a between-size scatter twice the typical r* sd: the honest interval covers
    the held-out size about 90% of the time (binomial sd 1.2%; measured 0.87), the bootstrap-only one under
    half of the time (measured 0.45). With no extra scatter both stay near or above nominal."""
    honest, bootstrap_only = held_out_coverage(tau=0.3, n_sim=600)
    assert 0.84 <= honest <= 0.95 and bootstrap_only < 0.6
    honest0, _ = held_out_coverage(tau=0.0, n_sim=200, seed=2)
    assert honest0 >= 0.86


def test_lack_of_fit_widens_only_when_chi2_above_one():
    rng = np.random.default_rng(5)
    n = [1e5, 1e6, 1e7, 1e8]
    on_line = [fake(f"s{i}", x, (A * x ** B) / (1 + A * x ** B), 0.1, seed=i) for i, x in enumerate(n)]
    law = fit_law(on_line, unit="odds", n_boot=200, confidence=0.9, rng=rng)
    assert law.chi2_red < 1 and law.tau2 == 0 and law.dof == 2
    p = predict_law(law, 1e9)
    assert (p.unit_lo, p.unit_hi) == pytest.approx((p.fit_lo, p.fit_hi))
    odds_off = [A * x ** B * math.exp(0.6 * (-1) ** i) for i, x in enumerate(n)]   # +-0.6 in log odds
    off = [fake(f"s{i}", x, o / (1 + o), 0.1, seed=i) for i, (x, o) in enumerate(zip(n, odds_off))]
    law = fit_law(off, unit="odds", n_boot=200, confidence=0.9, rng=rng)
    assert law.chi2_red > 1 and law.tau2 > 0
    p = predict_law(law, 1e9)
    assert p.unit_lo < p.fit_lo and p.unit_hi > p.fit_hi


def test_coverage_counts_the_observations_own_interval():
    pred = Prediction("x", 1e9, 1e6, 2.0, 1.0, 4.0, None, None, None)
    assert covers(pred, 4.5, 4.4, 4.6) is False          # outside, and its own interval is narrow
    assert covers(pred, 4.5, 2.5, 8.0) is True           # outside the prediction, but its own interval reaches
    assert covers(pred, 3.0, 2.9, 3.1) is True and covers(pred, 0.9, 0.5, 2.0) is True
    assert covers(pred, 3.0, math.nan, 3.1) is None


def test_safe_ratio_at_a_target_from_the_extrapolated_width(fitted):
    """Every simulated size has steepness 3: the width line is flat at 1/3 and the target's safe ratio is the true
    curve's, inside its interval."""
    cs, law = fitted
    (pred,) = law.predictions
    assert law.width is not None and law.width.coef[1] == pytest.approx(0.0, abs=0.05)
    assert pred.width == pytest.approx(1 / 3, rel=0.15)
    logit_true = math.log(A * 1e9 ** B) + math.log(0.05 / 0.95) / 3.0
    true = 1 / (1 + math.exp(-logit_true))
    assert pred.safe_lo <= true <= pred.safe_hi and pred.safe_lo <= pred.safe_r <= pred.safe_hi < pred.r_star
    for p, c in zip(law.points, cs):
        assert p.safe_r == c.safe_r < c.r_star


def test_validation_size_never_enters_the_fit_and_is_compared(fitted):
    cs, _ = fitted
    held = max(cs, key=lambda c: c.params).size
    rng = np.random.default_rng(8)
    law = fit_law(cs, unit="odds", n_boot=200, confidence=0.9, rng=rng, validate=[held])
    without = fit_law([c for c in cs if c.size != held], unit="odds", n_boot=200, confidence=0.9,
                      rng=np.random.default_rng(8))
    assert law.coef == without.coef and law.dof == without.dof == 2
    (p,) = [p for p in law.points if p.size == held]
    assert not p.used and p.role == "validate" and "validation" in p.reason
    (v,) = law.validations
    assert v.predicted.name == held and v.observed_r == p.r_star and v.observed_flag == "ok"
    assert v.predicted.r_lo < v.predicted.r_star < v.predicted.r_hi and v.predicted.safe_r < v.predicted.r_star
    assert v.err_r == pytest.approx(v.predicted.r_star - p.r_star) and abs(v.err_r) < 0.01
    assert v.covered is True and (v.observed_lo, v.observed_hi) == (p.lo, p.hi)
    assert without.validations == ()
