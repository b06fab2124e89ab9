"""Retention and the collapse point per frequency band (issue 25): do the rare facts go first?

A general fact's frequency is what its cell recorded in the store's fact table: the number of corpus documents holding
its subject and object (`kislurm census`, real corpora), or, in synthetic runs, the times the cell trained on it. Per
(size, token budget):
  * the reference is the cell(s) at the smallest ratio (one per seed); its frequencies define the bands (the mean over
    seeds), so a synthetic run bands by general exposures per fact at the smallest ratio;
  * a band counts only the facts that every reference cell knows at the end (every probe of the fact right): a fact
    never learned cannot be forgotten;
  * bands are analysis.frequency_bands (inner edges) or analysis.frequency_quantiles quantiles of the known facts'
    frequencies; a band thinner than analysis.min_band_facts is merged into its thinner neighbour;
  * per band, every cell's retention is the mean score of the band's facts, and the collapse point is detected as for
    the whole probe set (kislurm.analysis.collapse: logistic in log-odds, bootstrap over facts and seeds).
Plots never refit: `bands_figure` draws the stored results.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kislurm.analysis.collapse import CollapseOptions, CollapseResult, Measurement, detect_collapse, token_key

FILES = ("bands.md", "bands.json", "bands.png")


@dataclass(frozen=True)
class BandCollapse:
    """The collapse of one frequency band of one (size, token budget)."""

    size: str
    params: float
    tokens: float
    unit: str              # corpus_documents | general_exposures
    band: str              # e.g. "< 10", "[10, 100)", ">= 100", "all"
    lo: float              # frequencies in [lo, hi)
    hi: float
    n_facts: int           # known facts in the band
    n_unknown: int         # facts of the group not known by the reference cell(s) (left out of every band)
    collapse: CollapseResult


def band_edges(freq: np.ndarray, edges: Sequence[float], quantiles: int, min_facts: int) -> list[float]:
    """Inner band edges over the known facts' frequencies (a value equal to an edge falls in the upper band): the
    given edges, or quantiles; edges are removed, thinnest band first, until every band holds >= min_facts."""
    if edges:
        inner = sorted({float(e) for e in edges})
    else:
        inner = sorted(set(np.quantile(freq, np.linspace(0, 1, quantiles + 1)[1:-1]).tolist())) if len(freq) else []
    while inner:
        counts = np.bincount(np.searchsorted(inner, freq, side="right"), minlength=len(inner) + 1)
        if counts.min() >= min_facts:
            break
        i = int(np.argmin(counts))
        j = 0 if i == 0 else i - 1 if i == len(counts) - 1 or counts[i - 1] <= counts[i + 1] else i
        del inner[j]
    return inner


def band_label(b: int, inner: Sequence[float]) -> str:
    if not inner:
        return "all"
    if b == 0:
        return f"< {inner[0]:g}"
    if b == len(inner):
        return f">= {inner[-1]:g}"
    return f"[{inner[b - 1]:g}, {inner[b]:g})"


def frequency_bands(summaries: Sequence[Any], cfg: Any, rng: np.random.Generator) -> list[BandCollapse]:
    """Band collapses of every (size, tokens) whose finished infusion cells recorded per-fact scores and frequencies
    (kislurm.analysis.aggregate.CellDigest); `cfg` is the AnalysisConfig."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for s in summaries:
        if (s.complete and s.control == "infusion" and s.value is not None and s.fact_scores is not None
                and s.fact_frequency is not None and len(s.fact_frequency) == len(s.fact_scores)):
            groups[(s.params, s.size, token_key(s.tokens))].append(s)
    out: list[BandCollapse] = []
    options = CollapseOptions(safe_drop=cfg.safe_drop)
    for key in sorted(groups, key=lambda k: (k[0], k[1], -1.0 if k[2] is None else k[2])):
        out += _group_bands(groups[key], cfg, options, rng)
    return out


def _group_bands(cells: list[Any], cfg: Any, options: CollapseOptions, rng: np.random.Generator) -> list[BandCollapse]:
    if len({len(c.fact_scores) for c in cells}) != 1:
        return []                                   # cells of one group probe other facts: nothing to compare
    smallest = min(c.ratio for c in cells)
    refs = [c for c in cells if c.ratio == smallest]
    freq = np.mean([np.asarray(c.fact_frequency, float) for c in refs], axis=0)
    known = np.logical_and.reduce([np.asarray(c.fact_scores) >= 1.0 - 1e-9 for c in refs]) & (freq >= 0)
    if not known.any():
        return []
    inner = band_edges(freq[known], cfg.frequency_bands, cfg.frequency_quantiles, cfg.min_band_facts)
    band = np.searchsorted(inner, freq, side="right")
    out = []
    for b in range(len(inner) + 1):
        mask = known & (band == b)
        if not mask.any():
            continue
        ms = [Measurement(size=c.size, params=c.params, ratio=c.ratio, tokens=c.tokens, seed=c.seed,
                          retention=float(np.mean(c.fact_scores[mask])), fact_correct=np.asarray(c.fact_scores)[mask],
                          n_choices=c.n_choices, exposures_per_fact=c.exposures_per_fact, n_facts=int(mask.sum()))
              for c in cells]
        collapse = detect_collapse(ms, n_boot=cfg.bootstrap, confidence=cfg.confidence, rng=rng.spawn(1)[0],
                                   options=options)
        lo = inner[b - 1] if b > 0 else float(freq[mask].min())
        hi = inner[b] if b < len(inner) else math.inf
        out.append(BandCollapse(cells[0].size, float(cells[0].params), float(cells[0].tokens), refs[0].frequency_unit,
                                band_label(b, inner), lo, hi, int(mask.sum()), int((~known).sum()), collapse))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------


def band_rows(bands: Sequence[BandCollapse]) -> list[dict]:
    rows = []
    for b in bands:
        c = b.collapse
        rows.append({"size": b.size, "params": b.params, "tokens": b.tokens, "unit": b.unit, "band": b.band,
                     "lo": b.lo, "hi": b.hi, "facts": b.n_facts, "facts_not_known_at_smallest_ratio": b.n_unknown,
                     "r_star": c.r_star, "r_star_lo": c.lo, "r_star_hi": c.hi, "flag": c.flag,
                     "ratios": c.ratios.tolist(), "retention": c.retention.tolist(),
                     "retention_se": c.retention_se.tolist()})
    return rows


def bands_markdown(bands: Sequence[BandCollapse], metric: str) -> str:
    def num(v: float) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:.3g}"

    lines = [f"# Retention by frequency band ({metric})", "",
             "Frequency: corpus documents holding the fact's subject and object (census), or general exposures per "
             "fact at the smallest ratio (synthetic runs). Only the facts the smallest-ratio cell knows at the end "
             "count; retention at the smallest ratio is 1 by construction.", "",
             "| size | tokens | unit | band | facts | retention at each ratio | r* | interval | flag |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in bands:
        c = b.collapse
        ret = ", ".join(f"{r:g}: {y:.2f}" for r, y in zip(c.ratios, c.retention))
        lines.append(f"| {b.size} | {b.tokens:.3g} | {b.unit} | {b.band} | {b.n_facts} | {ret} | {num(c.r_star)} | "
                     f"[{num(c.lo)}, {num(c.hi)}] | {c.flag} |")
    return "\n".join(lines) + "\n"


def panel_rows(items: Sequence[Any], width: float, height: float) -> tuple[Any, list[tuple[Any, tuple, list]]]:
    """A figure with one row of axes per (params, size, tokens) of `items` (anything with those attributes), in
    first-seen order, `height` inches each: the figure and (axes, key, that key's items) per row."""
    from matplotlib.figure import Figure

    panels: dict[tuple, list[Any]] = defaultdict(list)
    for item in items:
        panels[(item.params, item.size, item.tokens)].append(item)
    fig = Figure(figsize=(width, 0.6 + height * max(len(panels), 1)))
    axes = fig.subplots(max(len(panels), 1), 1, squeeze=False)[:, 0]
    return fig, [(ax, key, group) for ax, (key, group) in zip(axes, panels.items())]


def bands_figure(bands: Sequence[BandCollapse], metric: str) -> Any:
    """Retention against ratio, one curve per band, one panel per (size, tokens)."""
    from matplotlib.lines import Line2D

    from kislurm.analysis.report import plot_retention_vs_ratio

    fig, panels = panel_rows(bands, 9.5, 4.4)
    for ax, (_, size, tokens), group in panels:
        shown = [dataclasses.replace(b.collapse, size=b.band, params=float(i + 1)) for i, b in enumerate(group)]
        plot_retention_vs_ratio(ax, shown, metric, legend=False)
        ax.set_title(f"{size}, D = {tokens:.3g}: retention of the facts known at the smallest ratio, by "
                     f"{group[0].unit.replace('_', ' ')}", fontsize=10)
        lines = ax.get_lines()
        handles = [Line2D([], [], marker="o", color=line.get_color()) for line in lines if line.get_marker() == "o"]
        ax.legend(handles, [f"{b.band} ({b.n_facts} facts)" for b in group], title="frequency band", fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.08, right=0.72, top=1 - 0.4 / height, bottom=0.6 / height, hspace=0.45)
    return fig


def write_bands(out: Path, bands: Sequence[BandCollapse], metric: str) -> list[Path]:
    """bands.md, bands.json and bands.png in `out` (atomically)."""
    from kislurm.analysis.report import jsonable, save_figure
    from kislurm.publish import atomic_write_text

    out = Path(out)
    atomic_write_text(out / "bands.md", bands_markdown(bands, metric))
    atomic_write_text(out / "bands.json", json.dumps(jsonable({"metric": metric, "bands": band_rows(bands)}),
                                                     indent=1) + "\n")
    return [out / "bands.md", out / "bands.json", save_figure(out / "bands.png", bands_figure, bands, metric)]
