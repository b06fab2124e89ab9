"""Report files: written atomically, parseable, and complete even when no law could be fitted."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

import kislurm.analysis.collapse
import kislurm.analysis.law
import kislurm.analysis.report
from conftest import simulate_cells
from kislurm.analysis.collapse import ratio_axis, Logistic, detect_collapses
from kislurm.analysis.measurements_csv import measurements_from_csv
from kislurm.analysis.law import fit_law
from kislurm.analysis.report import (Curve, collapse_table_csv, plot_law, plot_retention_vs_ratio, summary_md,
                                     write_reports)

GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98)


def simulate(rng: np.random.Generator, r_stars: dict[str, tuple[float, float]], n_facts: int = 200):
    """Cells of every size (r*, params) on GRID with binomial fact noise, plus retention-vs-step curves that end at
    each cell's expected retention."""
    ms, curves = [], []
    steps = np.arange(0, 1001, 100)
    for size, (r_star, params) in r_stars.items():
        cells = simulate_cells(rng, size, params, r_star, GRID, n_facts=n_facts, knowledge_bits=1e4)
        curve = Logistic(0.95, 0.1, float(ratio_axis(r_star)), 3.0 / (1.0 - r_star))
        ms += cells
        curves += [Curve(size, m.ratio, 1e6, 0, steps, p + (0.1 - p) * np.exp(-steps / 200.0))
                   for m in cells for p in [float(curve(np.array([m.ratio]))[0])]]
    return ms, curves


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    ms, curves = simulate(rng, {"s": (0.5, 1e5), "m": (0.7, 4e5), "l": (0.85, 1.6e6), "xl": (0.999, 6.4e6)})
    cs = detect_collapses(ms, n_boot=50, confidence=0.9, rng=rng)
    law = fit_law(cs, unit="odds", n_boot=100, confidence=0.9, rng=rng, targets={"1B": 1e9})
    return cs, law, curves


def test_reports_written_and_parse(tmp_path, results):
    cs, law, curves = results
    assert law.ok and [c.flag for c in cs][-1] != "ok"    # xl never collapses on the grid: excluded, reported
    summary = {"title": "test run", "metric": "general_acc", "run": "r1", "excluded_cells": {"s_r0.5_s1": "FAILED"}}
    files = write_reports(tmp_path / "reports", cs, law, summary, curves)
    names = {f.name for f in files}
    assert names == {"collapse_points.md", "collapse_points.csv", "collapse_points.json", "law.json", "law.txt",
                     "summary.md", "retention_vs_ratio.png", "law.png", "curves.png"}
    assert (tmp_path / "reports/law.txt").read_text().startswith("odds(r*) = ")
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted(names)   # no temp files left

    rows = list(csv.DictReader((tmp_path / "reports/collapse_points.csv").open()))
    assert [r["size"] for r in rows] == [c.size for c in cs] and rows[0]["flag"] == "ok"
    assert float(rows[0]["r_star"]) == pytest.approx(cs[0].r_star)
    assert list(rows[0])[-5:] == ["safe_r", "safe_lo", "safe_hi", "safe_drop", "infused_at_safe"]
    assert float(rows[0]["safe_lo"]) <= float(rows[0]["safe_r"]) <= float(rows[0]["safe_hi"]) < cs[0].r_star
    data = json.loads((tmp_path / "reports/collapse_points.json").read_text())
    assert len(data["collapses"]) == len(cs) and "r_star" in data["definitions"]
    assert len(data["collapses"][0]["boot"]) == 50 and data["collapses"][0]["logistic"]["plateau"] > 0.8
    lj = json.loads((tmp_path / "reports/law.json").read_text())
    assert lj["law"]["b"] == pytest.approx(law.b) and lj["law"]["unit"] == "odds" and lj["summary"]["run"] == "r1"
    assert lj["law"]["predictions"][0]["name"] == "1B" and lj["definitions"]["law"]["unit"] == "odds"
    pred = lj["law"]["predictions"][0]
    assert pred["safe_lo"] <= pred["safe_r"] <= pred["safe_hi"] and pred["safe_r"] < pred["r_star"]
    assert len(lj["law"]["width"]["coef"]) == 2
    assert pred["unit_lo"] <= pred["fit_lo"] and lj["law"]["points"][0]["safe_r"] == pytest.approx(cs[0].safe_r)

    md = (tmp_path / "reports/summary.md").read_text()
    for needle in ("# test run", "general_acc", "odds(r*) =", "Leave-largest-out", "Predictions", "1B",
                   "s_r0.5_s1", "FAILED", "xl", "Capacity"):
        assert needle in md, needle
    table = (tmp_path / "reports/collapse_points.md").read_text()
    assert "| xl |" in table and "| safe r | safe interval | infused at safe r |" in table
    assert "safe r" in md and "reduced chi2" in md and ">> 1" not in md
    for png in ("retention_vs_ratio.png", "law.png", "curves.png"):
        img = imread(tmp_path / "reports" / png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.05


def test_no_law_still_writes_every_report(tmp_path):
    rng = np.random.default_rng(1)
    ms, _ = simulate(rng, {"s": (0.5, 1e5), "xl": (0.999, 6.4e6)})
    cs = detect_collapses(ms, n_boot=20, confidence=0.9, rng=rng)
    law = fit_law(cs, unit="odds", n_boot=20, confidence=0.9, rng=rng, targets={"1B": 1e9})
    assert not law.ok
    files = write_reports(tmp_path, cs, law, {})
    assert {f.name for f in files} >= {"summary.md", "law.png", "law.json", "collapse_points.csv"}
    assert "curves.png" not in {f.name for f in files}
    md = (tmp_path / "summary.md").read_text()
    assert "No law fitted" in md and law.reason in md and law.reason in (tmp_path / "law.txt").read_text()
    assert json.loads((tmp_path / "law.json").read_text())["law"]["ok"] is False


def test_plots_take_an_axis_and_never_refit(results, monkeypatch):
    cs, law, _ = results
    def refit(*a, **k):
        pytest.fail("a plot function fitted something")

    for module, name in ((kislurm.analysis.law, "fit_law"), (kislurm.analysis.law, "wls"), (kislurm.analysis.collapse, "fit_logistic"),
                         (kislurm.analysis.collapse, "_polish")):
        monkeypatch.setattr(module, name, refit)
    fig = Figure()
    ax = fig.subplots()
    assert plot_retention_vs_ratio(ax, cs, "general_acc") is fig
    assert ax.get_xscale() == "logit" and ax.get_ylabel() == "general_acc" and ax.get_xlabel()
    assert len([ln for ln in ax.get_lines() if len(ln.get_xdata()) > 100]) == sum(c.logistic is not None for c in cs)
    fig2 = Figure()
    ax2 = fig2.subplots()
    assert plot_law(ax2, law) is fig2
    assert ax2.get_xscale() == "log" and ax2.get_yscale() == "log" and "odds" in ax2.get_ylabel()


def test_tables_render_missing_values(results):
    cs, law, _ = results
    text = collapse_table_csv(cs)
    assert "nan" not in text.lower() and text.count("\n") == len(cs) + 1
    md = summary_md(cs, law, {"metric": "general_acc", "extra": {"a": [1, 2]}})
    assert '{"a": [1, 2]}' in md and "nan" not in md


def test_csv_to_reports_end_to_end(tmp_path):
    """`kislurm fit TABLE.csv` path: a plain table (no per-fact data) gives a binomial bootstrap, a law, reports."""
    rng = np.random.default_rng(3)
    ms, _ = simulate(rng, {"s": (0.5, 1e5), "m": (0.7, 4e5), "l": (0.85, 1.6e6)}, n_facts=300)
    lines = ["size,params,tokens,ratio,retention,n_facts"] + \
        [f"{m.size},{m.params:g},{m.tokens:g},{m.ratio},{m.retention},300" for m in ms]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    cs = detect_collapses(measurements_from_csv(tmp_path / "t.csv"), n_boot=60, confidence=0.9, rng=rng)
    assert [c.flag for c in cs] == ["ok"] * 3 and {c.boot_method for c in cs} == {"binomial"}
    law = fit_law(cs, unit="odds", n_boot=60, confidence=0.9, rng=rng)
    write_reports(tmp_path / "out", cs, law, {"source": "t.csv"})
    assert law.ok and "binomial" in (tmp_path / "out/collapse_points.csv").read_text()


def test_curves_average_seeds_and_cap_the_panels():
    from kislurm.analysis.report import MAX_CURVE_PANELS, curves_figure, mean_curves

    steps = np.arange(10, 110, 10)
    seeds = [Curve("s", 0.5, 1e6, k, steps, np.full(10, 0.2 * k)) for k in range(3)]
    ((ratio, step, mean, n),) = mean_curves(seeds)
    assert ratio == 0.5 and n == 3 and np.allclose(mean, 0.2) and np.array_equal(step, steps)
    # 8 sizes x 3 budgets = 24 (size, budget) panels: only the largest budget of each size is drawn
    many = [Curve(f"m{i}", r, d, 0, steps, np.linspace(0.3, 0.9, 10)) for i in range(8) for d in (1e5, 1e6, 1e7)
            for r in (0.1, 0.5)]
    fig = curves_figure(many, "general_acc")
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(shown) == 8 <= MAX_CURVE_PANELS and all("D=1e+07" in ax.get_title() for ax in shown)


def test_fit_csv_role_column_holds_a_size_out_and_reports_it(tmp_path):
    """`kislurm fit` with role=validate rows: that size never enters the law; the summary, law.txt and law.json
    set its observed r* against the prediction; the law plot draws it."""
    from kislurm.analysis.aggregate import fit_measurements_csv

    rng = np.random.default_rng(4)
    ms, _ = simulate(rng, {"s": (0.5, 1e5), "m": (0.7, 4e5), "l": (0.85, 1.6e6), "v": (0.9, 3.2e6)}, n_facts=300)
    lines = ["size,params,tokens,ratio,retention,n_facts,role"] + \
        [f"{m.size},{m.params:g},{m.tokens:g},{m.ratio},{m.retention},300,{'validate' if m.size == 'v' else ''}"
         for m in ms]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    result = fit_measurements_csv(tmp_path / "t.csv", tmp_path / "out", bootstrap=60)
    law = result.law
    assert law.ok and [p.size for p in law.points if p.used] == ["s", "m", "l"]
    (v,) = law.validations
    assert v.predicted.name == "v" and v.covered is not None
    md = (tmp_path / "out/summary.md").read_text()
    assert "### Validation (held-out sizes, never fitted)" in md and "| v |" in md.split("### Validation")[1]
    assert "validation v: r* predicted" in result.law_text
    lj = json.loads((tmp_path / "out/law.json").read_text())
    assert lj["law"]["validations"][0]["predicted"]["name"] == "v"
    fig = plot_law(Figure().subplots(), law)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "validation: observed (never fitted)" in labels and "validation: predicted" in labels


@pytest.mark.parametrize("rows, needle", [
    (["1e5,0.1,0.9,fit", "1e5,0.2,0.8,validate"], "either fitted or validated"),
    (["1e5,0.1,0.9,held"], "neither 'fit' nor 'validate'"),
])
def test_fit_csv_role_errors_are_one_line(tmp_path, rows, needle):
    from kislurm.analysis.measurements_csv import MeasurementError

    (tmp_path / "t.csv").write_text("\n".join(["params,ratio,retention,role", *rows]) + "\n")
    with pytest.raises(MeasurementError, match=needle) as e:
        measurements_from_csv(tmp_path / "t.csv")
    assert "\n" not in str(e.value) and "fix:" in str(e.value)
