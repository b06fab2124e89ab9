"""Forgetting or under-exposure? The analysis of a run that holds issue 17's controls, and its report.

At a fixed token budget a higher infusion ratio r both adds knowledge text (which may interfere with what the
general stream taught: forgetting) and removes general text (each general fact is seen fewer times:
under-exposure). The controls (kislurm.plan.config.DataConfig.mix / schedule, grid.controls) separate the two:

- infusion: the grid as usual; its collapse point r* is the one the law fits.
- dilution: the same general samples as infusion at every r, the knowledge replaced by neutral text that teaches
  nothing. What infusion loses beyond it is caused by the knowledge itself.
- fixed_general: the general samples of every cell held at those of the infusion cell at data.reference_ratio,
  knowledge added on top. A drop that remains is caused by the added knowledge; one that vanishes was under-exposure.
- staged: general-only training first, then the infusion mix; the drop from the phase boundary to the end is
  forgetting of knowledge the model had (measured directly, against its own earlier level).

Decision rules (per size and token budget; intervals at analysis.confidence, from the collapse bootstrap):
- R1 interference: infusion and dilution both 'ok' and their r* intervals disjoint with infusion's lower, or
  infusion 'ok' and dilution 'absent' (it never collapses on the grid): the knowledge interferes. Both 'ok' with
  overlapping intervals: the collapse is the dilution of the general stream. Otherwise not judged. The forgetting
  index is logit r*_dilution - logit r*_infusion (log-odds; > 0: infusion collapses earlier than dilution), its
  interval the percentile interval of the difference of the two bootstraps.
- R2 under-exposure: fixed_general 'absent' while infusion is 'ok', or both 'ok' with fixed_general's r* interval
  above infusion's: restoring the general exposures removes or moves the collapse. Both 'ok' with overlapping
  intervals: not under-exposure. Not judged when fixed_general's retention at its lowest ratio is within a quarter
  of the way from chance to 1 (a floor leaves no room to drop) or a flag is neither.
- R3 forgetting (staged): at each ratio, drop = retention at the phase boundary - retention at the end, with a
  normal interval from the per-fact binomial variance of both (F general facts, treated as independent); forgetting
  at r when the interval's lower end is above 0 and the drop is at least min_drop (0.05).
- Verdict: forgetting if R1 says interferes or R3 finds forgetting at some ratio where infusion has collapsed
  (retention below the midpoint of its fitted curve), under-exposure if R2 says so, both when both hold, neither
  when R1, R2 and R3 were judged and none holds, else not judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

CONTROL_ORDER = ("infusion", "dilution", "fixed_general", "staged")
CONTROL_COLOURS = {"infusion": "tab:blue", "dilution": "tab:orange", "fixed_general": "tab:green",
                   "staged": "tab:red"}
MIN_DROP = 0.05


@dataclass(frozen=True)
class ControlCurve:
    """One control at one size and budget: its collapse fit and what was measured per ratio."""

    control: str
    collapse: Any                                 # kislurm.analysis.collapse.CollapseResult
    general_exposures: Optional[np.ndarray]       # (K,) mean general exposures per fact at each ratio
    boundary: Optional[np.ndarray] = None         # (K,) staged: retention at the end of the general phase
    n_facts: Optional[int] = None
    steps: Optional[np.ndarray] = None            # (K,) optimiser steps trained (fixed_general and staged: > budget's)


@dataclass(frozen=True)
class SizeVerdict:
    """The decision rules' outcome for one size and budget."""

    size: str
    params: float
    tokens: float
    forgetting_index: Optional[float]
    fi_lo: Optional[float]
    fi_hi: Optional[float]
    interference: str                 # R1: interferes | dilution | not judged
    exposure: str                     # R2: under-exposure | not under-exposure | not judged
    staged: str                       # R3: forgetting at r=... | no forgetting | not judged
    staged_drops: list = field(default_factory=list)   # (ratio, drop, lo, hi, collapsed) per ratio
    verdict: str = "not judged"


def _logit(r: float) -> float:
    return math.log(r) - math.log1p(-r)


def _disjoint(a: Any, b: Any) -> Optional[int]:
    """-1: a's interval lies below b's, +1: above, 0: they overlap, None: an interval is missing."""
    if not all(math.isfinite(v) for v in (a.lo, a.hi, b.lo, b.hi)):
        return None
    return -1 if a.hi < b.lo else (1 if a.lo > b.hi else 0)


def forgetting_index(inf: Any, dil: Any, confidence: float) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """logit r*_dilution - logit r*_infusion and the percentile interval of the bootstrap difference."""
    if not (math.isfinite(inf.r_star) and math.isfinite(dil.r_star)):
        return None, None, None
    fi = _logit(dil.r_star) - _logit(inf.r_star)
    n = min(len(inf.boot), len(dil.boot))
    if n < 2:
        return fi, None, None
    diff = np.log(dil.boot[:n] / (1 - dil.boot[:n])) - np.log(inf.boot[:n] / (1 - inf.boot[:n]))
    a = (1 - confidence) / 2
    return fi, float(np.quantile(diff, a)), float(np.quantile(diff, 1 - a))


def rule_interference(inf: Any, dil: Any) -> str:
    if inf is None or dil is None or inf.flag != "ok":
        return "not judged"
    if dil.flag == "absent":
        return "interferes"
    if dil.flag != "ok":
        return "not judged"
    side = _disjoint(inf, dil)
    return {None: "not judged", -1: "interferes", 0: "dilution", 1: "infusion collapses later"}[side]


def rule_exposure(inf: Any, fg: Any, chance: float) -> str:
    if inf is None or fg is None or inf.flag != "ok":
        return "not judged"
    if fg.retention.size and fg.retention[0] < chance + 0.25 * (1 - chance):
        return "not judged"
    if fg.flag == "absent":
        return "under-exposure"
    if fg.flag != "ok":
        return "not judged"
    side = _disjoint(fg, inf)
    return {None: "not judged", 1: "under-exposure", 0: "not under-exposure", -1: "not under-exposure"}[side]


def staged_drops(st: Optional[ControlCurve], inf: Any, z: float) -> list[tuple[float, float, float, float, bool]]:
    """(ratio, drop, lo, hi, infusion collapsed there) per ratio of the staged control."""
    if st is None or st.boundary is None or not st.n_facts:
        return []
    c, out = st.collapse, []
    mid = None
    if inf is not None and inf.logistic is not None:
        mid = (inf.logistic.plateau + inf.logistic.floor) / 2
    for r, p1, p2 in zip(c.ratios, st.boundary, c.retention):
        if not (math.isfinite(p1) and math.isfinite(p2)):
            continue
        se = math.sqrt(max(p1 * (1 - p1), 0) / st.n_facts + max(p2 * (1 - p2), 0) / st.n_facts)
        collapsed = False
        if mid is not None and inf is not None:
            at = np.flatnonzero(np.isclose(inf.ratios, r))
            collapsed = bool(at.size and inf.retention[at[0]] < mid)
        out.append((float(r), float(p1 - p2), float(p1 - p2 - z * se), float(p1 - p2 + z * se), collapsed))
    return out


def rule_staged(drops: list) -> str:
    if not drops:
        return "not judged"
    hit = [d for d in drops if d[2] > 0 and d[1] >= MIN_DROP]
    return ("forgetting at r = " + ", ".join(f"{d[0]:g}" for d in hit)) if hit else "no forgetting"


def verdict(interference: str, exposure: str, staged: str, drops: list) -> str:
    forgetting = interference == "interferes" or any(d[2] > 0 and d[1] >= MIN_DROP and d[4] for d in drops)
    under = exposure == "under-exposure"
    if forgetting and under:
        return "both"
    if forgetting:
        return "forgetting"
    if under:
        return "under-exposure"
    if "not judged" not in (interference, exposure, staged):
        return "neither"
    return "not judged"


def judge(curves: dict[str, dict[tuple, ControlCurve]], confidence: float, chance: float) -> list[SizeVerdict]:
    """Apply R1-R3 to every (size, budget) that has infusion cells."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    out = []
    for key, inf_c in sorted(curves.get("infusion", {}).items(), key=lambda kv: (kv[0][0], kv[0][2] or 0)):
        inf = inf_c.collapse
        get = lambda name: curves.get(name, {}).get(key)
        dil, fg, st = get("dilution"), get("fixed_general"), get("staged")
        fi, lo, hi = forgetting_index(inf, dil.collapse, confidence) if dil else (None, None, None)
        r1 = rule_interference(inf, dil.collapse if dil else None)
        r2 = rule_exposure(inf, fg.collapse if fg else None, chance)
        drops = staged_drops(st, inf, z)
        r3 = rule_staged(drops)
        out.append(SizeVerdict(inf.size, inf.params, inf.tokens, fi, lo, hi, r1, r2, r3, drops,
                               verdict(r1, r2, r3, drops)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Building the curves from the aggregator's cell digests
# ---------------------------------------------------------------------------------------------------------------------


def control_curves(digests: Sequence[Any], measurements_of: Any, metric: str, n_boot: int, confidence: float,
                   seed: int) -> dict[str, dict[tuple, ControlCurve]]:
    """Collapse fits per control and (size, budget); measurements_of(digests, metric) is the aggregator's."""
    from kislurm.analysis.collapse import detect_collapses, token_key

    out: dict[str, dict[tuple, ControlCurve]] = {}
    rng = np.random.default_rng(seed)
    controls = sorted({d.control for d in digests}, key=lambda c: CONTROL_ORDER.index(c) if c in CONTROL_ORDER else 9)
    for control, child in zip(controls, rng.spawn(len(controls))):
        mine = [d for d in digests if d.control == control and d.complete and d.value is not None]
        ms, _ = measurements_of(mine, metric)
        for c in detect_collapses(ms, n_boot=n_boot, confidence=confidence, rng=child):
            cells = [d for d in mine if d.size == c.size and token_key(d.tokens) == token_key(c.tokens)]
            gexp = _per_ratio(cells, c.ratios, "general_exposures")
            bound = _per_ratio(cells, c.ratios, "boundary_value") if control == "staged" else None
            n_facts = next((len(d.fact_scores) for d in cells if d.fact_scores is not None), None)
            steps = np.array([np.mean([int(d.step[-1]) for d in cells if np.isclose(d.ratio, r) and len(d.step)]
                                      or [math.nan]) for r in c.ratios])
            out.setdefault(control, {})[(c.params, c.size, token_key(c.tokens))] = ControlCurve(
                control, c, gexp, bound, n_facts, steps)
    return out


def _per_ratio(cells: Sequence[Any], ratios: np.ndarray, attr: str) -> Optional[np.ndarray]:
    vals = []
    for r in ratios:
        xs = [getattr(d, attr) for d in cells if np.isclose(d.ratio, r) and getattr(d, attr) is not None]
        vals.append(float(np.mean(xs)) if xs else math.nan)
    arr = np.array(vals)
    return None if np.all(np.isnan(arr)) else arr


# ---------------------------------------------------------------------------------------------------------------------
# Reports: controls.md / controls.json, controls.png (retention vs ratio), exposures.png (vs general exposures)
# ---------------------------------------------------------------------------------------------------------------------


def _f(v: Any, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{d}g}" if isinstance(v, float) else str(v)


def controls_md(curves: dict, verdicts: list[SizeVerdict], summary: dict) -> str:
    from kislurm.analysis.collapse import interp_logodds

    rules = __doc__.split("Decision rules")[1].strip()
    out = ["# Controls: forgetting or under-exposure (issue 17)\n",
           f"Metric `{summary.get('metric', 'retention')}`; " + ", ".join(
               f"{k}: {v}" for k, v in summary.items() if k not in ("metric",)) + "\n",
           "## Decision rules (stated before any result)\n", "Decision rules " + rules + "\n",
           "## Collapse points per control\n",
           "| size | control | r* | interval | flag | general exposures per fact at r* | general exposures per "
           "fact (lowest to highest r) |", "|---|---|---|---|---|---|---|"]
    for control in CONTROL_ORDER:
        for key, cc in sorted(curves.get(control, {}).items(), key=lambda kv: kv[0][0]):
            c = cc.collapse
            g = " / ".join(_f(float(x), 3) for x in cc.general_exposures) if cc.general_exposures is not None else "-"
            at = interp_logodds(c.ratios, cc.general_exposures, c.r_star) if math.isfinite(c.r_star) else None
            out.append(f"| {c.size} | {control} | {_f(c.r_star)} | [{_f(c.lo)}, {_f(c.hi)}] | {c.flag} | {_f(at)} "
                       f"| {g} |")
    out += ["\n## Retention per ratio\n", "| size | control | " + " | ".join(
        f"r={r:g}" for r in _all_ratios(curves)) + " |", "|---|---|" + "---|" * len(_all_ratios(curves))]
    ratios = _all_ratios(curves)
    for key in sorted({k for cs in curves.values() for k in cs}, key=lambda k: k[0]):
        for control in CONTROL_ORDER:
            cc = curves.get(control, {}).get(key)
            if cc is None:
                continue
            vals = dict(zip(np.round(cc.collapse.ratios, 6), cc.collapse.retention))
            out.append(f"| {key[1]} | {control} | " + " | ".join(_f(vals.get(round(r, 6)), 3) for r in ratios) + " |")
            if cc.boundary is not None:
                b = dict(zip(np.round(cc.collapse.ratios, 6), cc.boundary))
                out.append(f"| {key[1]} | staged, end of phase 1 | " + " | ".join(
                    _f(b.get(round(r, 6)), 3) for r in ratios) + " |")
    out += ["\n## Training steps per ratio (fixed_general and staged train more than the budget)\n",
            "| control | " + " | ".join(f"r={r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for control in CONTROL_ORDER:
        cc = next(iter(curves.get(control, {}).values()), None)
        if cc is not None and cc.steps is not None:
            st = dict(zip(np.round(cc.collapse.ratios, 6), cc.steps))
            out.append(f"| {control} | " + " | ".join(_f(st.get(round(r, 6)), 5) for r in ratios) + " |")
    out += ["\n## Verdicts\n", "| size | forgetting index (logit r*_dil - logit r*_inf) | R1 infusion vs dilution "
            "| R2 fixed_general | R3 staged | largest staged drop | verdict |", "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        big = max(v.staged_drops, key=lambda d: d[1]) if v.staged_drops else None
        drop = f"{big[1]:.3f} [{big[2]:.3f}, {big[3]:.3f}] at r={big[0]:g}" if big else "-"
        out.append(f"| {v.size} | {_f(v.forgetting_index)} [{_f(v.fi_lo)}, {_f(v.fi_hi)}] | {v.interference} | "
                   f"{v.exposure} | {v.staged} | {drop} | **{v.verdict}** |")
    return "\n".join(out) + "\n"


def _all_ratios(curves: dict) -> list[float]:
    return sorted({round(float(r), 6) for cs in curves.values() for cc in cs.values() for r in cc.collapse.ratios})


def controls_json(curves: dict, verdicts: list[SizeVerdict]) -> dict:
    from kislurm.analysis.report import collapse_row, jsonable

    return jsonable({
        "collapses": [{"control": control, **collapse_row(cc.collapse),
                       "general_exposures_per_fact": cc.general_exposures, "phase1_retention": cc.boundary,
                       "steps": cc.steps,
                       "ratios": cc.collapse.ratios, "retention": cc.collapse.retention}
                      for control in CONTROL_ORDER for cc in curves.get(control, {}).values()],
        "verdicts": [v.__dict__ for v in verdicts]})


def _panels(curves: dict, title: str, xlabel: str, x_of: Any, logit_x: bool) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    keys = sorted({k for cs in curves.values() for k in cs}, key=lambda k: k[0])
    fig = Figure(figsize=(4.2 * max(len(keys), 1) + 1.6, 4.4))
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    fig.subplots_adjust(left=0.6 / fig.get_size_inches()[0], right=1 - 1.7 / fig.get_size_inches()[0],
                        bottom=0.18, top=0.8, wspace=0.25)
    for ax, key in zip(axes, keys):
        for control in CONTROL_ORDER:
            cc = curves.get(control, {}).get(key)
            if cc is None:
                continue
            x = x_of(cc)
            if x is None:
                continue
            c = cc.collapse
            col = CONTROL_COLOURS[control]
            ax.plot(x, c.retention, "o-", color=col, mfc=col if c.flag == "ok" else "white", lw=1.5)
            if cc.boundary is not None and logit_x:   # the boundary's own exposures are phase 1's: ratio view only
                ax.plot(x, cc.boundary, "^:", color=col, lw=1, alpha=0.7)
            if logit_x and c.flag == "ok" and math.isfinite(c.r_star):
                ax.axvline(c.r_star, color=col, ls="--", lw=1, alpha=0.8)
        if logit_x:
            from kislurm.analysis.report import ratio_ticks

            ax.set_xscale("logit")
            ratio_ticks(ax, [float(r) for cs in curves.values() for cc in cs.values() for r in cc.collapse.ratios])
        else:
            ax.set_xscale("log")
        ax.set_title(f"{key[1]}", fontsize=11)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("general retention")
    handles = [Line2D([], [], color=CONTROL_COLOURS[c], marker="o") for c in CONTROL_ORDER if c in curves]
    labels = [c for c in CONTROL_ORDER if c in curves]
    if "staged" in curves and logit_x:
        handles.append(Line2D([], [], color=CONTROL_COLOURS["staged"], marker="^", ls=":"))
        labels.append("staged, end of phase 1")
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def controls_figure(curves: dict) -> Any:
    return _panels(curves, "Retention vs ratio per control (dashed: r* of ok fits; hollow: flagged)",
                   "infusion ratio r (log-odds scale)", lambda cc: cc.collapse.ratios, True)


def exposures_figure(curves: dict) -> Any:
    return _panels(curves, "Retention vs general exposures per fact",
                   "general exposures per fact (log)", lambda cc: cc.general_exposures, False)


def write_controls(out: Path, curves: dict, verdicts: list[SizeVerdict], summary: dict) -> list[Path]:
    import json

    from kislurm.analysis.report import atomic_write_text, save_figure

    atomic_write_text(out / "controls.md", controls_md(curves, verdicts, summary))
    atomic_write_text(out / "controls.json", json.dumps(controls_json(curves, verdicts), indent=1) + "\n")
    return [out / "controls.md", out / "controls.json", save_figure(out / "controls.png", controls_figure, curves),
            save_figure(out / "exposures.png", exposures_figure, curves)]
