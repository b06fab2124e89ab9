"""Downstream scores against the infusion ratio, per model size: reports/downstream.{md,csv} and
downstream_vs_ratio.png beside the retention reports (docs/downstream.md).

Two sources, kept apart in the table: the in-loop scores of the last evaluation (store metrics
downstream/TASK/METRIC, eval.downstream) and the scores of the final weights (CELL/downstream.json, written by
`kislurm downstream`). Both describe the same weights when the last evaluation scored, which it always does. A
collapse on a downstream metric is the retention machinery with analysis.metric set to downstream/TASK/METRIC
(the in-loop scores; per-document outcomes are not stored, so its interval comes from seeds and residuals, not
from resampling facts as for the probes).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kislurm.publish import atomic_write_bytes, atomic_write_text
from kislurm.retention.store import StoreError, read_digest

PREFIX = "downstream/"
SOURCES = ("in-loop", "final weights")
COUNTS = ("n", "ties")
"""Per-task bookkeeping metrics: shown beside the scores, never plotted."""
FILES = ("downstream.md", "downstream.csv", "downstream_vs_ratio.png")


def cell_scores(store: str) -> list[dict[str, Any]]:
    """One row per (source, task, metric) of one cell: its last evaluation's downstream metrics and its
    downstream.json; [] for a store that cannot be read (aggregation reports those)."""
    try:
        d = read_digest(store)
    except StoreError:
        return []
    meta = d.meta
    base = {"cell": meta.get("name"), "size": meta.get("size"), "params": meta.get("params_total"),
            "ratio": meta.get("ratio"), "tokens": meta.get("tokens"), "seed": meta.get("seed"),
            "complete": d.complete}
    per_task: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for name, value in d.final.items():
        if name.startswith(PREFIX) and value == value:
            task, _, metric = name[len(PREFIX):].rpartition("/")
            per_task[("in-loop", task)][metric] = value
    path = Path(store).parent / "downstream.json"
    if path.is_file():
        try:
            for task, entry in json.loads(path.read_text()).get("tasks", {}).items():
                per_task[("final weights", task)].update(entry.get("metrics", {}))
        except (ValueError, OSError, AttributeError):
            pass  # a damaged file is kislurm downstream's to report (it refuses to merge into it)
    rows = []
    for (source, task), metrics in sorted(per_task.items()):
        for metric, value in sorted(metrics.items()):
            if metric not in COUNTS:
                rows.append({**base, "source": source, "task": task, "metric": metric, "value": float(value),
                             "n": metrics.get("n"), "ties": metrics.get("ties")})
    return rows


def by_size_and_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per (source, task, metric, size, tokens, ratio), with the seeds and ties behind it."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["source"], r["task"], r["metric"], r["params"] or 0, r["size"], r["tokens"], r["ratio"])].append(r)
    out = []
    for (source, task, metric, params, size, tokens, ratio), rs in sorted(groups.items(), key=lambda kv: kv[0]):
        values = np.array([r["value"] for r in rs])
        out.append({"source": source, "task": task, "metric": metric, "size": size, "params": params,
                    "tokens": tokens, "ratio": ratio, "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan, "seeds": len(rs),
                    "n": rs[0]["n"], "ties": sum(int(r["ties"] or 0) for r in rs)})
    return out


def table_md(table: list[dict[str, Any]]) -> str:
    head = ["task", "metric", "source", "size", "tokens", "ratio", "mean", "std", "seeds", "documents", "ties"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        cells = [t["task"], t["metric"], t["source"], t["size"], f"{t['tokens']:.3g}", f"{t['ratio']:g}",
                 f"{t['mean']:.4f}", "" if math.isnan(t["std"]) else f"{t['std']:.4f}", t["seeds"],
                 "" if t["n"] is None else f"{t['n']:g}", t["ties"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["task", "metric", "source", "size", "params", "tokens", "ratio", "mean", "std", "seeds", "n", "ties"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for t in table:
        writer.writerow({k: t[k] for k in fields})
    return buf.getvalue()


def figure(table: list[dict[str, Any]]):
    """One panel per (task, metric): the score against the ratio, a line per size (and token budget); in-loop
    solid, final weights dashed. Returns a matplotlib Figure (drawn by the caller's backend-free savefig)."""
    from matplotlib.figure import Figure

    panels = sorted({(t["task"], t["metric"]) for t in table})
    fig = Figure(figsize=(5.2 * min(len(panels), 3), 4.0 * math.ceil(len(panels) / 3)))
    axes = fig.subplots(math.ceil(len(panels) / 3), min(len(panels), 3), squeeze=False).ravel()
    sizes = sorted({(t["params"], t["size"]) for t in table})
    colors = {s: f"C{i % 10}" for i, (_, s) in enumerate(sizes)}
    for ax, (task, metric) in zip(axes, panels):
        lines: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        for t in table:
            if (t["task"], t["metric"]) == (task, metric):
                lines[(t["params"], t["size"], t["tokens"], t["source"])].append((t["ratio"], t["mean"]))
        for (_, size, tokens, source), pts in sorted(lines.items()):
            x, y = zip(*sorted(pts))
            several = len({k[2] for k in lines}) > 1
            ax.plot(x, y, marker="o" if source == "in-loop" else "s", linestyle="-" if source == "in-loop" else "--",
                    color=colors[size], label=f"{size}" + (f" D={tokens:.3g}" if several else "") + f" ({source})")
        ratios = sorted({t["ratio"] for t in table if 0 < t["ratio"] < 1})
        if ratios:  # the retention plot's axis (log-odds), so the two figures read side by side
            ax.set_xscale("logit")
            ax.set_xticks(ratios)
            ax.set_xticklabels([f"{r:.2g}" for r in ratios], fontsize=7)
            ax.minorticks_off()
        ax.set_xlabel("infusion ratio r (log-odds scale)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Downstream scores vs infusion ratio (mean over seeds)", fontsize=11)
    fig.tight_layout()
    return fig


def reports_stand(stores: list[str], out: Path, stores_changed: bool) -> bool:
    """Whether out/downstream.* need no rewrite: no store with in-loop scores changed (`stores_changed`), and no
    cell's downstream.json is newer than downstream.csv (or exists without it)."""
    if stores_changed:
        return False
    table = out / "downstream.csv"
    stamp = table.stat().st_mtime if table.is_file() else None
    for store in stores:
        try:
            written = (Path(store).parent / "downstream.json").stat().st_mtime
        except FileNotFoundError:
            continue
        if stamp is None or written >= stamp:
            return False
    return True


def write_downstream_reports(stores: list[str], out: Path, echo: Callable[[str], Any] = print) -> list[dict]:
    """downstream.{md,csv} and downstream_vs_ratio.png in `out` when any cell has downstream scores (nothing
    otherwise); the figure is redrawn only when the table changed. Returns the table."""
    rows = [r for s in stores for r in cell_scores(s) if r["complete"]]
    if not rows:
        return []
    table = by_size_and_ratio(rows)
    out.mkdir(parents=True, exist_ok=True)
    text = table_csv(table)
    unchanged = (out / "downstream.csv").is_file() and (out / "downstream.csv").read_text() == text \
        and (out / "downstream_vs_ratio.png").is_file()
    md = table_md(table)
    atomic_write_text(out / "downstream.md", "# Downstream scores vs infusion ratio\n\n" + md)
    atomic_write_text(out / "downstream.csv", text)
    if not unchanged:
        buf = io.BytesIO()
        figure(table).savefig(buf, format="png", dpi=100)
        atomic_write_bytes(out / "downstream_vs_ratio.png", buf.getvalue())
    tasks = sorted({t["task"] for t in table})
    echo(f"downstream scores of {len({r['cell'] for r in rows})} cells on {', '.join(tasks)} vs ratio: "
         f"{out / 'downstream.md'}, downstream_vs_ratio.png")
    return table
