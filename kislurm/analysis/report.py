"""Reports: the collapse-point table (Markdown, CSV, JSON), the law (JSON), a one-page summary and PNG plots.

Plot functions take an axis and results and return the figure; they never fit anything (the law's band is drawn
from its stored bootstrap coefficients through `predict_law`). Every file is written atomically (temp + rename).

Why one long module: one independent function per report file or plot, sharing the table formats and the
atomic writes; splitting them would scatter the report's formats, not simplify them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import cm, colors, ticker
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D
from matplotlib.figure import Figure

from kislurm.analysis.collapse import axis_ratio, ratio_axis, CollapseOptions, CollapseResult
from kislurm.analysis.law import LawFit, predict_law
from kislurm.publish import atomic_write_bytes, atomic_write_text

FILES = ("collapse_points.md", "collapse_points.csv", "collapse_points.json", "law.json", "law.txt", "summary.md",
         "retention_vs_ratio.png", "law.png", "curves.png")
TABLE_COLUMNS = ("size", "params", "tokens", "r_star", "lo", "hi", "flag", "bracketed", "r_star_segmented",
                 "r_star_largest_drop", "plateau", "floor", "steepness", "n_ratios", "n_cells", "boot_method",
                 "n_boot", "confidence", "reason", "safe_r", "safe_lo", "safe_hi", "safe_drop", "infused_at_safe")


@dataclass(frozen=True)
class Curve:
    """Retention over training of one cell: data for the curves plot (from the cell's store)."""

    size: str
    ratio: float
    tokens: float
    seed: int
    step: np.ndarray
    retention: np.ndarray


# ---------------------------------------------------------------------------------------------------------------------
# Tables and JSON (pure)
# ---------------------------------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy to Python, non-finite floats to None, dataclasses to dicts."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def collapse_row(c: CollapseResult) -> dict[str, Any]:
    lg = c.logistic
    return {"size": c.size, "params": c.params, "tokens": c.tokens, "r_star": c.r_star, "lo": c.lo, "hi": c.hi,
            "flag": c.flag, "bracketed": c.bracketed, "r_star_segmented": c.r_star_segmented,
            "r_star_largest_drop": c.r_star_largest_drop, "plateau": lg.plateau if lg else None,
            "floor": lg.floor if lg else None, "steepness": lg.steepness if lg else None,
            "n_ratios": int(c.ratios.size), "n_cells": c.n_cells, "boot_method": c.boot_method,
            "n_boot": int(c.boot.size), "confidence": c.confidence, "reason": c.reason, "safe_r": c.safe_r,
            "safe_lo": c.safe_lo, "safe_hi": c.safe_hi, "safe_drop": c.options.safe_drop,
            "infused_at_safe": c.infused_at_safe}


def definitions(collapses: Sequence[CollapseResult], law: LawFit | None) -> dict[str, Any]:
    """What every number means, recorded beside the numbers."""
    opts = collapses[0].options if collapses else CollapseOptions()
    out = {
        "r_star": "midpoint of a four-parameter logistic in the log-odds of r (plateau, floor, midpoint, steepness) fitted to "
                  "the mean retention per ratio (seeds averaged): retention is halfway between plateau and floor",
        "bracketed": f">= {opts.min_side_points} grid ratios below r* hold >= floor + {0.5 + opts.bracket_margin:g} "
                     f"* drop and >= {opts.min_side_points} above r* <= floor + {0.5 - opts.bracket_margin:g} * drop",
        "flags": "too-few-points > absent > non-monotone > unbracketed-low/high > ok (first that applies)",
        "interval": "percentile bootstrap: facts resampled (one resample for every cell of a size), seeds "
                    "resampled within a ratio; without per-fact data binomial (n_facts) or residual",
        "r_star_segmented": "midpoint of a plateau / linear ramp in log-odds / floor regression",
        "r_star_largest_drop": "geometric mean of the neighbouring ratios with the largest fall",
        "safe_r": f"largest r at which the fitted logistic has lost at most {opts.safe_drop:g} of its drop from "
                  "plateau to floor (logit r_safe = midpoint + logit(safe_drop) / steepness), interval from the same "
                  "bootstrap; for targets the width 1/steepness is extrapolated by a line in log N (kislurm.analysis.law)",
        "infused_at_safe": "infused-fact retention at safe_r, linear in log-odds between measured grid ratios "
                           "(empty outside the grid)",
        "options": asdict(opts),
    }
    if law is not None:
        out["law"] = {"unit": law.unit, "form": law.form, "fit": "weighted least squares on log unit, weights "
                      "1/sigma^2 from each r* interval", "interval": "bootstrap over per-size r* samples",
                      "confidence": law.confidence, "capacity_bits_per_param": law.capacity_bits}
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "/") for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def collapse_table_md(collapses: Sequence[CollapseResult]) -> str:
    header = ("size", "params", "tokens", "r*", "interval", "flag", "segmented r*", "largest-drop r*", "cells",
              "bootstrap", "safe r", "safe interval", "infused at safe r")
    rows = [(c.size, c.params, c.tokens, c.r_star, f"[{_fmt(c.lo)}, {_fmt(c.hi)}]", c.flag, c.r_star_segmented,
             c.r_star_largest_drop, c.n_cells, f"{c.boot_method} x{c.boot.size}", c.safe_r,
             f"[{_fmt(c.safe_lo)}, {_fmt(c.safe_hi)}]", c.infused_at_safe) for c in collapses]
    conf = f"{collapses[0].confidence:.0%}" if collapses else "-"
    drop = f"{collapses[0].options.safe_drop:.0%}" if collapses else "-"
    return (f"# Collapse points\n\nInterval: {conf} bootstrap. Flags other than 'ok' stay out of the law. Safe r: the "
            f"largest ratio losing at most {drop} of the plateau-to-floor drop.\n\n") + _md_table(header, rows)


def collapse_table_csv(collapses: Sequence[CollapseResult]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    w.writeheader()
    for c in collapses:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                    for k, v in collapse_row(c).items()})
    return buf.getvalue()


def collapse_json(collapses: Sequence[CollapseResult], law: LawFit | None) -> dict[str, Any]:
    cells = [{**collapse_row(c), "ratios": c.ratios, "retention": c.retention, "retention_se": c.retention_se,
              "n_seeds": c.n_seeds, "exposures": c.exposures, "knowledge_bits": c.knowledge_bits,
              "logistic": c.logistic, "boot": c.boot} for c in collapses]
    return jsonable({"definitions": definitions(collapses, law), "collapses": cells})


def law_json(law: LawFit, summary: Mapping[str, Any]) -> dict[str, Any]:
    d = {k: v for k, v in law.__dict__.items() if k not in ("boot", "width")}
    if law.width is not None:
        d["width"] = {"form": "log(1/steepness) = coef[0] + coef[1] log N", "coef": law.width.coef,
                      "residual_variance": law.width.s2, "dof": law.width.dof}
    d.update(a=law.a, b=law.b, c=law.c, b_interval=law.b_interval, n_boot_fits=int(law.boot.shape[0]))
    return jsonable({"law": d, "summary": dict(summary)})


def _law_line(law: LawFit) -> str:
    if not law.ok:
        return f"**No law fitted**: {law.reason}\n"
    lo, hi = law.b_interval
    d_term = f" * D^{law.c:.3f}" if law.c is not None else ""
    c_int = f", c [{_fmt(law.coef_lo[2])}, {_fmt(law.coef_hi[2])}]" if law.c is not None and law.coef_lo else ""
    return (f"{law.unit}(r*) = {law.a:.4g} * N^{law.b:.3f}{d_term}; {law.confidence:.0%} intervals: b "
            f"[{_fmt(lo)}, {_fmt(hi)}]{c_int}; {fit_quality(law)}\n")


def fit_quality(law: LawFit) -> str:
    """What this fit's reduced chi2 means, in words: consistent with the r* intervals, or not (and what the
    prediction intervals do about it). 'Clearly above 1': its chi2 tail probability on dof is below 5%."""
    if law.dof < 1 or not math.isfinite(law.chi2_red):
        return "no degrees of freedom left to check the fit against the r* intervals"
    from scipy.special import chdtrc

    p = float(chdtrc(law.dof, law.chi2_red * law.dof))
    head = f"reduced chi2 {_fmt(law.chi2_red)} on {law.dof} dof"
    if law.chi2_red <= 1:
        return f"{head}: consistent with the r* intervals (prediction intervals from the bootstrap alone)"
    widened = (f"prediction intervals widened by a between-size scatter of sd {math.sqrt(law.tau2):.3g} in "
               f"log {law.unit}")
    if p >= 0.05:
        return f"{head}: within sampling of 1 (p={p:.2f}), consistent with the r* intervals; {widened}"
    return f"{head}: sizes scatter more than their r* intervals (p={p:.2g}); {widened}"


def law_text(law: LawFit) -> str:
    """The law in a few plain lines (for terminals): formula and interval, or why there is none, then notes."""
    lines = [_law_line(law).replace("**", "").strip()]
    lines += [f"leave-largest-out {lo.predicted.name}: r* predicted {_fmt(lo.predicted.r_star)}, observed "
              f"{_fmt(lo.observed_r)}, unit error {lo.rel_err_unit:+.1%}" for lo in law.leave_largest_out]
    lines += [f"validation {v.predicted.name}: r* predicted {_fmt(v.predicted.r_star)} [{_fmt(v.predicted.r_lo)}, "
              f"{_fmt(v.predicted.r_hi)}], observed {_fmt(v.observed_r)} [{_fmt(v.observed_lo)}, {_fmt(v.observed_hi)}]"
              f" ({v.observed_flag}), {_covered_word(v.covered)}" for v in law.validations]
    lines += [f"{p.name}: {law.unit} {_fmt(p.unit_value)} [{_fmt(p.unit_lo)}, {_fmt(p.unit_hi)}], r* {_fmt(p.r_star)}"
              f", safe r {_fmt(p.safe_r)} [{_fmt(p.safe_lo)}, {_fmt(p.safe_hi)}]" for p in law.predictions]
    return "\n".join(lines + [f"note: {n}" for n in law.notes]) + "\n"


def _covered_word(covered: bool | None) -> str:
    return {True: "covered", False: "NOT covered", None: "coverage not judged"}[covered]


def validation_rows(law: LawFit) -> list[tuple[Any, ...]]:
    """One row per validation size: prediction and observation with their intervals, errors, coverage."""
    return [(v.predicted.name, v.predicted.params, v.predicted.r_star,
             f"[{_fmt(v.predicted.r_lo)}, {_fmt(v.predicted.r_hi)}]", v.observed_r,
             f"[{_fmt(v.observed_lo)}, {_fmt(v.observed_hi)}]", v.observed_flag,
             f"{v.err_r:+.3f}" if v.err_r is not None and math.isfinite(v.err_r) else "-",
             f"{v.rel_err_unit:+.1%}" if math.isfinite(v.rel_err_unit) else "-", _covered_word(v.covered),
             v.predicted.safe_r) for v in law.validations]


VALIDATION_HEADER = ("size", "params", "predicted r*", "prediction interval", "observed r*", "observed interval",
                     "flag", "r* error (pred - obs)", "unit error", "covered", "predicted safe r")


def summary_md(collapses: Sequence[CollapseResult], law: LawFit, summary: Mapping[str, Any]) -> str:
    """The one-page summary: run, cells used and excluded (why), the law, validation, predictions, capacity."""
    title = summary.get("title", "kislurm report")
    metric = summary.get("metric", "retention")
    out = [f"# {title}\n", f"Retention metric: `{metric}`. Law unit: `{law.unit}`.\n"]
    run = [(k, v if isinstance(v, (str, int, float)) else json.dumps(jsonable(v)))
           for k, v in summary.items() if k not in ("title", "metric", "excluded_cells")]
    if run:
        out += ["## Run\n", _md_table(("key", "value"), run)]
    out += ["## Collapse points\n", _md_table(
        ("size", "params", "tokens", "r*", "interval", "flag", "in law", "why not", "safe r", "safe interval",
         "infused at safe r"),
        [(p.size, p.params, p.tokens, p.r_star, f"[{_fmt(p.lo)}, {_fmt(p.hi)}]", p.flag, "yes" if p.used else "no",
          p.reason, p.safe_r, f"[{_fmt(p.safe_lo)}, {_fmt(p.safe_hi)}]", p.infused_at_safe) for p in law.points])]
    excluded = summary.get("excluded_cells") or {}
    if excluded:
        items = excluded.items() if isinstance(excluded, Mapping) else excluded
        out += ["Cells left out before detection:\n", _md_table(("cell", "reason"), list(items))]
    out += ["## Law\n", _law_line(law)]
    for note in law.notes:
        out.append(f"- {note}\n")
    if law.ok:
        out.append("\n### Leave-largest-out\n\n")
        if law.leave_largest_out:
            out.append(_md_table(("size", "predicted r*", "observed r*", "r* error", "unit error", "in interval"), [
                (lo.predicted.name, lo.predicted.r_star, lo.observed_r,
                 f"{lo.rel_err_r:+.1%}" if lo.rel_err_r is not None else "-", f"{lo.rel_err_unit:+.1%}", lo.covered)
                for lo in law.leave_largest_out]))
        else:
            out.append(f"Not done: {law.leave_out_reason}\n")
        if law.validations:
            out += ["\n### Validation (held-out sizes, never fitted)\n\n", _md_table(VALIDATION_HEADER,
                                                                                 validation_rows(law)),
                    "\nCovered: prediction minus observation within both intervals combined (the observation's own "
                    "r* interval counts; kislurm.analysis.law).\n"]
        if law.predictions:
            out += ["\n### Predictions\n\n", _md_table(
                ("target", "params", "tokens", law.unit, "interval", "r*", "r* interval", "safe r", "safe interval"),
                [(p.name, p.params, p.tokens, p.unit_value, f"[{_fmt(p.unit_lo)}, {_fmt(p.unit_hi)}]", p.r_star,
                  f"[{_fmt(p.r_lo)}, {_fmt(p.r_hi)}]", p.safe_r, f"[{_fmt(p.safe_lo)}, {_fmt(p.safe_hi)}]")
                 for p in law.predictions])]
            out.append(f"\nSafe r at targets: the collapse width 1/steepness extrapolated by a line in log N over "
                       f"the fitted sizes' curves (safe drop {law.safe_drop:g}).\n")
    cap = [(p.size, p.bits_per_param, p.capacity_flag) for p in law.points if p.bits_per_param is not None]
    if cap:
        out += [f"\n## Capacity (flag beyond {law.capacity_bits:g} bits/parameter)\n\n",
                _md_table(("size", "bits/param at r*", "flag"), cap)]
    return "\n".join(s.rstrip("\n") + "\n" for s in out)


# ---------------------------------------------------------------------------------------------------------------------
# Plots: an axis and results in, the figure out; nothing is fitted here
# ---------------------------------------------------------------------------------------------------------------------


def _size_colors(params: Sequence[float]) -> dict[float, Any]:
    uniq = sorted(set(params))
    norm = colors.Normalize(vmin=-0.15, vmax=max(len(uniq) - 1, 1) + 0.15)
    return {p: cm.viridis(norm(i)) for i, p in enumerate(uniq)}


def ratio_ticks(ax: Axes, ratios: Sequence[float], min_gap: float = 0.06) -> None:
    """Label the grid ratios, dropping any closer than min_gap of the axis span (in log-odds, the axis' own scale)
    to a kept one, with two significant digits: a grid of dozens of ratios stays legible."""
    ticks = sorted(set(float(r) for r in ratios))
    pos = {t: float(ratio_axis(t)) for t in ticks}
    span = max(pos[ticks[-1]] - pos[ticks[0]], 1e-9)
    kept = [ticks[-1]]
    for t in reversed(ticks[:-1]):
        if pos[kept[-1]] - pos[t] >= min_gap * span:
            kept.append(t)
    ax.set_xticks(kept[::-1])
    ax.set_xticklabels([f"{t:.2g}" for t in kept[::-1]])
    ax.minorticks_off()


def plot_retention_vs_ratio(ax: Axes, collapses: Sequence[CollapseResult], metric: str = "retention",
                            legend: bool = True) -> Figure:
    """Mean retention per ratio (+-1 bootstrap SE), the fitted logistic and r* with its interval, per size."""
    color = _size_colors([c.params for c in collapses])
    all_r = [float(r) for c in collapses for r in c.ratios]
    for c in collapses:
        col, ok = color[c.params], c.flag == "ok"
        label = c.size + ("" if ok else f" ({c.flag})")
        # markers and +-SE bars as two artists (errorbar makes four per size, ~15 ms each over many sizes)
        ax.vlines(c.ratios, c.retention - c.retention_se, c.retention + c.retention_se, color=col, lw=1.2, zorder=3)
        ax.plot(c.ratios, c.retention, "o", ms=6, color=col, mfc=col if ok else "white", label=label, zorder=3)
        if c.logistic is not None:
            lo_x, hi_x = ratio_axis(min(all_r)), ratio_axis(max(all_r))
            grid = axis_ratio(np.linspace(lo_x - 0.3, hi_x + 0.3, 300))
            ax.plot(grid, c.logistic(grid), "-" if ok else ":", color=col, lw=1.8)
        if math.isfinite(c.r_star):
            ax.axvline(c.r_star, color=col, ls="--", lw=1, alpha=0.8 if ok else 0.4)
            if ok and math.isfinite(c.lo) and math.isfinite(c.hi):
                ax.axvspan(c.lo, c.hi, color=col, alpha=0.12, lw=0)
    ax.set_xscale("logit")  # the fitting axis: log-odds, like log r for small r, spread out near 1
    if all_r:
        ratio_ticks(ax, all_r)
    ax.set_xlabel("infusion ratio r (log-odds scale)")
    ax.set_ylabel(metric)
    ax.yaxis.set_major_locator(ticker.MaxNLocator(6, steps=[1, 2, 5, 10]))
    ax.set_title("Retention vs infusion ratio: logistic fit, r* (dashed), interval (band)\n"
                 "hollow markers and dotted curves: flagged, not in the law", fontsize=11)
    ax.grid(alpha=0.3)
    if collapses and legend:
        ax.legend(title="model size", fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax.figure


def plot_law(ax: Axes, law: LawFit, n_grid: int = 60) -> Figure:
    """r* in the law's unit vs parameters (log-log): points, the law and its band, leave-largest-out, predictions."""
    used = [p for p in law.points if p.used]
    other = [p for p in law.points if not p.used and p.role != "validate" and math.isfinite(p.unit_value)
             and p.unit_value > 0]
    for pts, style, label, off in ((used, dict(fmt="o", color="C0"), "r* (in the fit)" if law.ok else "r* (flag ok)",
                                    (6, -14)),
                                   (other, dict(fmt="o", color="0.55", mfc="white"), "r* (excluded: flag)", (6, 4))):
        if pts:
            u = np.array([p.unit_value for p in pts])
            err = np.array([[u_ - (p.unit_lo if math.isfinite(p.unit_lo) else u_),
                             (p.unit_hi if math.isfinite(p.unit_hi) else u_) - u_] for p, u_ in zip(pts, u)]).T
            ax.errorbar([p.params for p in pts], u, yerr=np.clip(err, 0, None), capsize=3, ms=7, label=label,
                        zorder=3, **style)
            for p in _one_per_size(pts):
                ax.annotate(f"{p.size}\nr*={p.r_star:.3g}", (p.params, p.unit_value), textcoords="offset points",
                            xytext=off, fontsize=8, color=style["color"])
    if law.ok:
        xs = [p.params for p in law.points] + [p.params for p in law.predictions]
        grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, n_grid)
        budgets = sorted({p.tokens for p in used}) if law.c is not None else [None]
        for k, d in enumerate(budgets):
            preds = [predict_law(law, n, d) for n in grid]
            lab = f"law {law.form}" + (f", D={d:.3g}" if d is not None else "")
            ax.plot(grid, [p.unit_value for p in preds], color=f"C{k + 1}", lw=2, label=lab)
            if law.boot.size:
                ax.fill_between(grid, [p.unit_lo for p in preds], [p.unit_hi for p in preds], color=f"C{k + 1}",
                                alpha=0.18, lw=0, label=f"{law.confidence:.0%} prediction band" if k == 0 else None)
        errors = ", ".join(f"{lo.rel_err_unit:+.0%}" for lo in law.leave_largest_out)
        for k, lo in enumerate(law.leave_largest_out):
            q = lo.predicted
            ax.errorbar([q.params], [q.unit_value], yerr=[[q.unit_value - q.unit_lo], [q.unit_hi - q.unit_value]]
                        if math.isfinite(q.unit_lo) else None, fmt="D", color="C3", mfc="white", capsize=3, ms=7,
                        label=None if k else f"leave-largest-out ({errors})")
        _plot_validations(ax, law)
        for q in law.predictions:
            ax.errorbar([q.params], [q.unit_value], yerr=[[q.unit_value - q.unit_lo], [q.unit_hi - q.unit_value]]
                        if math.isfinite(q.unit_lo) else None, fmt="*", color="C4", ms=13, capsize=3)
            txt = q.name + (f"\nr*={q.r_star:.3g}" if q.r_star is not None else "")
            ax.annotate(txt, (q.params, q.unit_value), textcoords="offset points", xytext=(8, 4), fontsize=8,
                        color="C4")
        lo_b, hi_b = law.b_interval
        d_term = f" D^{law.c:.3f}" if law.c is not None else ""
        ax.set_title(f"Law: {law.unit}(r*) = {law.a:.3g} N^{law.b:.3f}{d_term}  (b in [{_fmt(lo_b)}, {_fmt(hi_b)}])")
    else:
        ax.set_title("Law: not fitted")
        ax.text(0.5, 0.97, _wrap(f"no law: {law.reason}", 70), transform=ax.transAxes, ha="center", va="top",
                fontsize=10, color="C3", bbox=dict(facecolor="white", edgecolor="C3", alpha=0.9))
    ax.set_xscale("log")
    if used or other:
        ax.set_yscale("log")
        _at_least_a_decade(ax)
    ax.set_xlabel("parameters N (log scale)")
    unit_label = {"odds": "infusion odds r*/(1-r*)", "tokens": "knowledge tokens r*·D",
                  "exposures": "exposures per fact at r*"}[law.unit]
    ax.set_ylabel(f"{unit_label} (log scale)")
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    if ax.get_xscale() == "log":  # minor ticks at 2 and 5 only: each tick is a few ms to lay out and draw
        ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    if ax.get_legend_handles_labels()[0]:
        # a fitted law rises with N, leaving the upper left empty ("best" costs ~0.5 s over many points); without
        # one the top holds the reason
        ax.legend(fontsize=9, loc="upper left" if law.ok else "best")
    return ax.figure


def _plot_validations(ax: Axes, law: LawFit) -> None:
    """Validation sizes: the observation (filled red square, its interval) beside the prediction (hollow red
    square, its prediction interval, drawn a little to the right), labelled covered or not."""
    for k, v in enumerate(law.validations):
        q, n = v.predicted, v.predicted.params
        if math.isfinite(q.unit_lo):
            ax.errorbar([n * 1.08], [q.unit_value], yerr=[[q.unit_value - q.unit_lo], [q.unit_hi - q.unit_value]],
                        fmt="s", color="C3", mfc="white", capsize=3, ms=7, zorder=4,
                        label=None if k else "validation: predicted")
        u = v.observed_unit
        if math.isfinite(u) and u > 0:
            pts = [p for p in law.points if p.role == "validate" and p.size == q.name and p.params == n]
            err = None
            if pts and math.isfinite(pts[0].unit_lo) and math.isfinite(pts[0].unit_hi):
                err = [[u - pts[0].unit_lo], [pts[0].unit_hi - u]]
            ax.errorbar([n], [u], yerr=err, fmt="s", color="C3", capsize=3, ms=7, zorder=4,
                        label=None if k else "validation: observed (never fitted)")
            ax.annotate(f"{q.name} (validation)\n{_covered_word(v.covered)}", (n, u), textcoords="offset points",
                        xytext=(8, -18), fontsize=8, color="C3")


def _one_per_size(points: Sequence[Any]) -> list[Any]:
    """The point of each size with the largest token budget: one label per size, however many budgets."""
    best: dict[str, Any] = {}
    for p in points:
        if p.size not in best or p.tokens > best[p.size].tokens:
            best[p.size] = p
    return list(best.values())


def _at_least_a_decade(ax: Axes) -> None:
    """A log y axis spanning less than a decade has no labelled major tick: widen it, and label the y ticks as
    plain numbers (minor ones too while the axis spans under two decades)."""
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 10:
        mid = math.sqrt(lo * hi)
        lo, hi = ax.set_ylim(mid / 4, mid * 4)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo < 100 else ticker.NullFormatter())


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join(lines + [cur])


def mean_curves(curves: Sequence[Curve]) -> list[tuple[float, np.ndarray, np.ndarray, int]]:
    """(ratio, step, mean retention, n_seeds) per ratio: seeds averaged where they share their evaluation steps
    (each seed is its own line otherwise), so a grid of many seeds stays readable and cheap to draw."""
    by_ratio: dict[float, list[Curve]] = {}
    for c in curves:
        by_ratio.setdefault(c.ratio, []).append(c)
    out = []
    for r in sorted(by_ratio):
        group = sorted(by_ratio[r], key=lambda c: c.seed)
        if len({tuple(np.asarray(c.step).tolist()) for c in group}) == 1:
            out.append((r, np.asarray(group[0].step), np.mean([c.retention for c in group], axis=0), len(group)))
        else:
            out += [(r, np.asarray(c.step), np.asarray(c.retention), 1) for c in group]
    return out


def _plot_lines(ax: Axes, lines: Sequence[tuple[float, np.ndarray, np.ndarray, int]], size: str, tokens: float,
                metric: str, legend: bool = True) -> Figure:
    lines = [m for m in lines if len(m[1])]
    if lines:
        ratios = np.array([m[0] for m in lines])
        rgba = _ratio_colors(ratios)(ratios)
        ax.add_collection(LineCollection([np.column_stack([m[1], m[2]]) for m in lines], colors=rgba, lw=1.6))
        if max(len(m[1]) for m in lines) < 30:
            ax.scatter(np.concatenate([m[1] for m in lines]), np.concatenate([m[2] for m in lines]), s=9,
                       c=np.repeat(rgba, [len(m[1]) for m in lines], axis=0), zorder=3)
        ax.autoscale_view()
        seeds = max(m[3] for m in lines)
        ax.set_title(f"{size}, D={tokens:.3g}" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""), fontsize=11)
        if legend:
            ax.legend(*_ratio_legend(lines), fontsize=8, ncol=2 if len(lines) > 5 else 1, loc="best")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return ax.figure


def _ratio_legend(lines: Sequence[tuple[float, np.ndarray, np.ndarray, int]]) -> tuple[list[Line2D], list[str]]:
    """One legend entry per ratio, in the lines' colours."""
    ratios = sorted({m[0] for m in lines})
    color = _ratio_colors(ratios)
    return [Line2D([], [], lw=1.6, color=color(r)) for r in ratios], [f"r={r:g}" for r in ratios]


def _ratio_colors(ratios: Sequence[float]) -> Any:
    """Colour of an infusion ratio among `ratios`: log scale over the lower 85% of plasma (its top is too pale)."""
    norm = colors.LogNorm(vmin=min(ratios), vmax=max(ratios) * 1.0001)
    return lambda r: cm.plasma(0.85 * norm(r))


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    """Every figure has fixed margins (in inches): a tight bounding box or constrained layout would draw it twice
    or more, most of the cost of a report over thousands of cells."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, pil_kwargs={"compress_level": 3})
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_figure(path: Path, make: Any, *args: Any) -> Path:
    """Build a figure with make(*args) and write it as PNG: one picklable call, so figures render in parallel."""
    return _save(make(*args), Path(path))


def _by_tokens(collapses: Sequence[CollapseResult]) -> dict[float, list[CollapseResult]]:
    out: dict[float, list[CollapseResult]] = {}
    for c in collapses:
        out.setdefault(c.tokens, []).append(c)
    return out


def _margins(fig: Figure, left: float, right: float, bottom: float, top: float, **kw: float) -> None:
    """subplots_adjust with margins in inches."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        **kw)


def retention_figure(collapses: Sequence[CollapseResult], metric: str) -> Figure:
    groups = _by_tokens(collapses) or {math.nan: []}
    several = len(groups) > 1
    fig = Figure(figsize=(11.0, (1.3 if several else 0.55) + 4.9 * len(groups)))
    _margins(fig, 0.8, 2.7, 0.55, 1.25 if several else 0.8, hspace=0.38)
    for ax, (tokens, cs) in zip(fig.subplots(len(groups), 1, squeeze=False)[:, 0], groups.items()):
        plot_retention_vs_ratio(ax, cs, metric, legend=not several)
        if several:
            ax.set_title(f"D = {tokens:.3g} training tokens", fontsize=11)
    if several:
        fig.suptitle("Retention vs infusion ratio: logistic fit, r* (dashed), interval (band); hollow markers and "
                     "dotted curves: flagged, not in the law", fontsize=10)
        color = _size_colors([c.params for c in collapses])
        sizes = {c.params: c.size for c in collapses}
        fig.legend([Line2D([], [], marker="o", color=color[p]) for p in sorted(sizes)],
                   [sizes[p] for p in sorted(sizes)], title="model size", fontsize=9, frameon=False,
                   loc="upper left", bbox_to_anchor=(1 - 2.6 / 11.0, 1 - 1.25 / fig.get_size_inches()[1]))
    return fig


def law_figure(law: LawFit) -> Figure:
    fig = Figure(figsize=(8.5, 6))
    _margins(fig, 0.95, 0.3, 0.65, 0.45)
    plot_law(fig.subplots(), law)
    return fig


MAX_CURVE_PANELS = 9
"""curves.png shows every (size, token budget) up to this many panels, else the largest budget of each size."""


@dataclass(frozen=True)
class CurvePanels:
    """What curves.png shows: per panel (size, tokens, mean line per ratio), the title and every ratio. A few KB
    however many cells: the parent works it out and a drawing process gets only this."""

    title: str
    panels: list[tuple[str, float, list[tuple[float, np.ndarray, np.ndarray, int]]]]
    ratios: list[float]


def curve_panels(curves: Sequence[Curve]) -> CurvePanels:
    keys = sorted({(c.size, c.tokens) for c in curves}, key=lambda k: (k[1], k[0]))
    order = {s: i for i, s in enumerate(dict.fromkeys(c.size for c in curves))}
    keys.sort(key=lambda k: (k[1], order[k[0]]))
    title = "Retention during training, per infusion ratio (colour)"
    if len(keys) > MAX_CURVE_PANELS:  # dozens of panels are unreadable and slow: the largest budget of each size
        largest = {size: tokens for size, tokens in keys}  # keys are sorted by tokens: the last one wins
        keys = sorted(largest.items(), key=lambda k: order[k[0]])
        keys = [keys[round(i)] for i in np.linspace(0, len(keys) - 1, min(len(keys), MAX_CURVE_PANELS))]
        title += f"; largest token budget of {len(keys)} of {len(order)} sizes"
    members: dict[tuple, list[Curve]] = {k: [] for k in keys}
    for c in curves:
        if (c.size, c.tokens) in members:
            members[(c.size, c.tokens)].append(c)
    return CurvePanels(title, [(size, tokens, mean_curves(members[(size, tokens)])) for size, tokens in keys],
                       sorted({c.ratio for c in curves}))


def curves_figure(curves: Sequence[Curve] | CurvePanels, metric: str) -> Figure:
    """Retention over training, one panel per (size, token budget) up to MAX_CURVE_PANELS."""
    shown = curves if isinstance(curves, CurvePanels) else curve_panels(curves)
    ncol = min(3, len(shown.panels))
    nrow = math.ceil(len(shown.panels) / ncol)
    width, height = 4.6 * ncol + 1.1, 3.6 * nrow + 0.7
    fig = Figure(figsize=(width, height))
    _margins(fig, 0.75, 1.3, 0.55, 0.75, wspace=0.3, hspace=0.45)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True).ravel()  # one retention scale to compare panels
    for i, (ax, (size, tokens, lines)) in enumerate(zip(axes, shown.panels)):
        _plot_lines(ax, lines, size, tokens, metric, legend=False)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(5, steps=[1, 2, 5, 10]))
        if i % ncol:  # the shared scale is labelled in the first column only (fewer texts to lay out and draw)
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
    for ax in axes[len(shown.panels):]:
        ax.set_visible(False)
    fig.suptitle(shown.title, fontsize=13)
    ratios = shown.ratios
    if len(ratios) <= 16:
        fig.legend(*_ratio_legend([(r, np.empty(0), np.empty(0), 1) for r in ratios]), loc="center right",
                   fontsize=9, title="ratio", frameon=False)
    else:  # a long legend is unreadable: a colour bar of the ratio instead
        top = ratios[0] * (ratios[-1] / ratios[0]) ** (1 / 0.85)  # lines use the lower 85% of the colour map
        sm = cm.ScalarMappable(norm=colors.LogNorm(vmin=ratios[0], vmax=max(top, ratios[0] * 1.0001)), cmap="plasma")
        fig.colorbar(sm, cax=fig.add_axes((1 - 0.9 / width, 0.2, 0.15 / width, 0.6)), label="infusion ratio")
    return fig


def write_reports(outdir: str | Path, collapses: Sequence[CollapseResult], law: LawFit,
                  summary: Mapping[str, Any] | None = None, curves: Sequence[Curve] = (),
                  executor: Executor | None = None) -> list[Path]:
    """Write every report file (atomically) into outdir; returns the paths written. The figures render in
    `executor`'s processes when one is given (each takes ~1 s of matplotlib).

    summary: free key/values shown in the summary's Run table, plus optional 'title', 'metric' (the retention
    metric's name) and 'excluded_cells' (cell name -> reason, for cells left out before detection)."""
    out, summary = Path(outdir), dict(summary or {})
    metric = str(summary.get("metric", "retention"))
    written = []

    def text(name: str, content: str) -> None:
        atomic_write_text(out / name, content)
        written.append(out / name)

    text("collapse_points.md", collapse_table_md(collapses))
    text("collapse_points.csv", collapse_table_csv(collapses))
    text("collapse_points.json", json.dumps(collapse_json(collapses, law), indent=1) + "\n")
    text("law.json", json.dumps({**law_json(law, summary), "definitions": jsonable(definitions(collapses, law))},
                                indent=1) + "\n")
    text("law.txt", law_text(law))
    text("summary.md", summary_md(collapses, law, summary))
    # the largest job first; its data reduced to what is drawn before it travels to a drawing process
    figures = [(out / "curves.png", curves_figure, curve_panels(curves), metric)] if curves else []
    figures += [(out / "retention_vs_ratio.png", retention_figure, collapses, metric),
                (out / "law.png", law_figure, law)]
    if executor is None:
        return written + [save_figure(*job) for job in figures]
    return written + [f.result() for f in [executor.submit(save_figure, *job) for job in figures]]
