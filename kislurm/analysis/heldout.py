"""Held-out general loss against the infusion ratio (issue 25): does the general stream's loss collapse, and how
much of its rise is under-exposure?

Every evaluation of a cell with `data.heldout_general` records `heldout_loss` (nats per token) and `heldout_bpb`
on the same held-out documents. Per (size, token budget), from the finished cells' last evaluation:
  * the reference L0 is the mean held-out loss of the infusion cell(s) at the smallest ratio (seeds averaged);
  * each cell's loss is turned into a retention-like score, 1 - (L - L0) / L0, the negative relative increase plus
    one: 1 at the reference, falling as the loss rises (a 10% rise is a fall of 0.1, collapse.py's min_drop). bpb is
    the same summed NLL over a fixed byte count, so its relative increase, and everything detected on it, is the
    loss's;
  * the collapse point is detected on that score by kislurm.analysis.collapse.detect_collapse (logistic in
    log-odds, the same flags): r* is where the loss has risen halfway from its plateau to its ceiling. With several
    seeds the interval resamples them; with one seed, residuals of the fit (the store holds no per-document loss);
  * a run with fixed_general control cells (kislurm.analysis.controls) is scored against the same L0, beside
    infusion: fixed_general holds the general exposures of data.reference_ratio, so the rise infusion shows and
    fixed_general does not comes from under-exposure alone.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from kislurm.analysis.collapse import CollapseOptions, CollapseResult, Measurement, detect_collapse, token_key

FILES = ("heldout.md", "heldout.json", "heldout.png")
VIEWS = ("infusion", "fixed_general")
COLOURS = {"infusion": "tab:blue", "fixed_general": "tab:green"}


@dataclass(frozen=True)
class HeldoutCurve:
    """One control's held-out loss against ratio at one (size, token budget), and the collapse detected on it."""

    control: str
    size: str
    params: float
    tokens: float
    reference_loss: float      # L0: infusion's mean held-out loss at its smallest ratio
    reference_ratio: float     # that smallest ratio
    loss: np.ndarray           # (K,) mean held-out loss per ratio (collapse.ratios)
    bpb: np.ndarray            # (K,) mean held-out bits per byte per ratio (nan where not recorded)
    collapse: CollapseResult   # on 1 - (loss - L0) / L0

    @property
    def relative_increase(self) -> np.ndarray:
        return self.loss / self.reference_loss - 1.0


def loss_score(loss: float, reference: float) -> float:
    """1 - (L - L0) / L0: the held-out loss as a score that falls where the loss rises (1 at the reference)."""
    return 1.0 - (loss - reference) / reference


def heldout_curves(digests: Sequence[Any], n_boot: int, confidence: float, rng: np.random.Generator,
                   safe_drop: float = 0.05) -> list[HeldoutCurve]:
    """Held-out loss curves of infusion and, where the run has them, fixed_general cells, per (size, tokens) that
    has finished infusion cells with a held-out loss (kislurm.analysis.aggregate.CellDigest)."""
    groups: dict[tuple, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for d in digests:
        if d.complete and d.control in VIEWS and d.heldout_loss is not None and math.isfinite(d.heldout_loss):
            groups[(d.params, d.size, token_key(d.tokens))][d.control].append(d)
    out: list[HeldoutCurve] = []
    options = CollapseOptions(safe_drop=safe_drop)
    for key in sorted(groups, key=lambda k: (k[0], k[1], -1.0 if k[2] is None else k[2])):
        by_control = groups[key]
        if not by_control.get("infusion"):
            continue
        smallest = min(d.ratio for d in by_control["infusion"])
        l0 = float(np.mean([d.heldout_loss for d in by_control["infusion"] if d.ratio == smallest]))
        for control in VIEWS:
            cells = by_control.get(control)
            if cells:
                out.append(_curve(control, cells, l0, smallest, n_boot, confidence, rng.spawn(1)[0], options))
    return out


def _curve(control: str, cells: list[Any], l0: float, smallest: float, n_boot: int, confidence: float,
           rng: np.random.Generator, options: CollapseOptions) -> HeldoutCurve:
    ms = [Measurement(size=d.size, params=d.params, ratio=d.ratio, tokens=d.tokens, seed=d.seed,
                      retention=loss_score(d.heldout_loss, l0)) for d in cells]
    c = detect_collapse(ms, n_boot=n_boot, confidence=confidence, rng=rng, options=options)
    loss = np.array([np.mean([d.heldout_loss for d in cells if d.ratio == r]) for r in c.ratios])
    bpb = np.array([np.mean([d.heldout_bpb if d.heldout_bpb is not None else math.nan
                             for d in cells if d.ratio == r]) for r in c.ratios])
    return HeldoutCurve(control, cells[0].size, float(cells[0].params), float(cells[0].tokens), l0, smallest,
                        loss, bpb, c)


# ----------------------------------------------------------------------------------------------------------------------
# Reports: heldout.md, heldout.json, heldout.png
# ----------------------------------------------------------------------------------------------------------------------


def _num(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def heldout_rows(curves: Sequence[HeldoutCurve]) -> list[dict]:
    rows = []
    for h in curves:
        c = h.collapse
        rows.append({"size": h.size, "params": h.params, "tokens": h.tokens, "control": h.control,
                     "reference_loss": h.reference_loss, "reference_ratio": h.reference_ratio,
                     "ratios": c.ratios.tolist(), "heldout_loss": h.loss.tolist(), "heldout_bpb": h.bpb.tolist(),
                     "relative_increase": h.relative_increase.tolist(), "score": c.retention.tolist(),
                     "r_star": c.r_star, "r_star_lo": c.lo, "r_star_hi": c.hi, "flag": c.flag, "reason": c.reason,
                     "boot_method": c.boot_method, "n_cells": c.n_cells})
    return rows


def heldout_markdown(curves: Sequence[HeldoutCurve]) -> str:
    lines = ["# Held-out general loss against the infusion ratio", "",
             "Loss: mean NLL per token (nats) on the held-out general documents at each cell's last evaluation "
             "(seeds averaged). Relative increase: L / L0 - 1, L0 the infusion cell at the smallest ratio. r*: the "
             "collapse point detected on 1 - (L - L0) / L0 (where the loss has risen halfway to its ceiling), with "
             "the flags and bootstrap of the retention collapse. fixed_general holds the general exposures of "
             "data.reference_ratio: infusion's rise beyond it is under-exposure.", "",
             "| size | tokens | control | loss (bpb), relative increase at each ratio | r* | interval | flag |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for h in curves:
        c = h.collapse
        cells = ", ".join(f"{r:g}: {l:.3f} ({_num(b)}), {inc:+.1%}"
                          for r, l, b, inc in zip(c.ratios, h.loss, h.bpb, h.relative_increase))
        lines.append(f"| {h.size} | {h.tokens:.3g} | {h.control} | {cells} | {_num(c.r_star)} | "
                     f"[{_num(c.lo)}, {_num(c.hi)}] | {c.flag} |")
    return "\n".join(lines) + "\n"


def heldout_figure(curves: Sequence[HeldoutCurve]) -> Any:
    """Held-out loss against ratio, infusion and fixed_general side by side, one panel per (size, tokens); dashed:
    r* of 'ok' fits, hollow markers: flagged fits."""
    from kislurm.analysis.bands import panel_rows

    fig, panels = panel_rows(curves, 7.5, 3.8)
    for ax, (_, size, tokens), group in panels:
        for h in group:
            c, col = h.collapse, COLOURS[h.control]
            ax.plot(c.ratios, h.loss, "o-", color=col, mfc=col if c.ok else "white", label=f"{h.control} ({c.flag})")
            if c.ok:
                ax.axvline(c.r_star, color=col, ls="--", lw=1)
        ax.axhline(group[0].reference_loss, color="grey", ls=":", lw=1)
        ratios = sorted({float(r) for h in group for r in h.collapse.ratios})
        ax.set_xscale("logit")
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("infusion ratio r (log-odds scale)")
        ax.set_ylabel("held-out general loss (nats/token)")
        ax.set_title(f"{size}, D = {tokens:.3g}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def write_heldout(out: Path, curves: Sequence[HeldoutCurve]) -> list[Path]:
    """heldout.md, heldout.json and heldout.png in `out` (atomically)."""
    from kislurm.analysis.report import jsonable, save_figure
    from kislurm.publish import atomic_write_text

    out = Path(out)
    atomic_write_text(out / "heldout.md", heldout_markdown(curves))
    atomic_write_text(out / "heldout.json", json.dumps(jsonable({"heldout": heldout_rows(curves)}), indent=1) + "\n")
    return [out / "heldout.md", out / "heldout.json", save_figure(out / "heldout.png", heldout_figure, curves)]
