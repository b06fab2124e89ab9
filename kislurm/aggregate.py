"""Aggregate: every retention store of one or more runs becomes measurements, collapse points, a law and reports.

Reading is the expensive part at scale (thousands of cells, nightly), so each file is summarised once and the
summary cached by (path, size, mtime): a re-run reads only new or grown files. Unreadable files (truncated,
garbage, foreign, mid-write by an old writer) are listed with the reason and excluded, never fatal. Outputs are
written atomically by kislurm.report, so a reader never sees a half-written report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import __version__
from .config import AnalysisConfig, ConfigError, load_config
from .paths import RunPaths
from .store import StoreError, read_digest

CACHE_NAME = ".aggregate-cache.pkl"
CACHE_VERSION = 2
_METRIC = re.compile(r"^(general|infused)_(seen_|heldout_)?acc(_cc)?$")


class AggregateError(RuntimeError):
    """Nothing could be aggregated (e.g. no run folder); one line with the fix."""


@dataclass
class CellDigest:
    """What aggregation needs of one store: small enough to cache thousands of them."""

    path: str
    name: str
    size: str
    params: float
    ratio: float
    tokens: float
    seed: int
    complete: bool
    n_choices: int
    exposures_per_fact: Optional[float]
    n_infused_facts: Optional[int]
    values_per_relation: Optional[int]
    step: np.ndarray
    metric_names: tuple[str, ...]
    series: np.ndarray              # (steps, metrics) float32, one array (not one per metric): for the curves plot
    final: dict[str, float]         # each metric at the last evaluation, full precision (for the analysis)
    final_correct: Optional[np.ndarray]  # (P,) bool at the last evaluation
    probe_fact_index: Optional[np.ndarray]
    probe_heldout: Optional[np.ndarray]
    fact_group: Optional[np.ndarray]


def summarise(path: str) -> CellDigest | str:
    """Read one store into a CellDigest, or return the one-line reason it is unusable."""
    try:
        d = read_digest(Path(path))  # one attribute read per store written by this kislurm
    except StoreError as e:
        return str(e)
    meta = d.meta
    stats = meta.get("data_stats") or {}
    data_cfg = (meta.get("config") or {}).get("data") or {}
    return CellDigest(
        path=path, name=meta.get("name", Path(path).parent.name), size=str(meta.get("size")),
        params=float(meta.get("params_non_embedding", np.nan)), ratio=float(meta.get("ratio", np.nan)),
        tokens=float(meta.get("tokens", np.nan)), seed=int(meta.get("seed", 0)), complete=d.complete,
        n_choices=int(meta.get("n_choices", 0)),
        exposures_per_fact=_num(stats.get("exposures_per_fact_mean")),
        n_infused_facts=_num(stats.get("infused_facts"), int),
        values_per_relation=_num((data_cfg.get("knowledge") or {}).get("values_per_relation"), int),
        step=np.asarray(d.step, np.int32), metric_names=d.metric_names, series=d.series, final=d.final,
        final_correct=d.last_correct, probe_fact_index=d.probe_fact_index,
        probe_heldout=d.probe_heldout, fact_group=d.fact_group)


def _num(value: Any, kind: type = float) -> Any:
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Scanning with an incremental cache
# ----------------------------------------------------------------------------------------------------------------------


def find_stores(runs: list[Path]) -> list[Path]:
    stores: list[Path] = []
    for run in runs:
        if not run.is_dir():
            raise AggregateError(f"{run}: no such run folder; fix: pass folders created by `kislurm submit` "
                                 "(output_root/name)")
        stores += sorted(run.glob("cells/*/retention.h5")) if (run / "cells").is_dir() else sorted(
            run.glob("**/retention.h5"))
    return stores


def _load_cache(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            cache = pickle.load(f)
        return cache["entries"] if cache.get("version") == CACHE_VERSION else {}
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError, TypeError):
        return {}  # a missing or damaged cache only costs a cold read


def _save_cache(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"version": CACHE_VERSION, "entries": entries}, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def store_keys(stores: list[Path]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every store that still exists, by path: what the cache and the fingerprint key on."""
    keys: dict[str, tuple[int, int]] = {}
    for p in stores:
        try:
            st = p.stat()
        except OSError:
            continue
        keys[str(p)] = (st.st_size, st.st_mtime_ns)
    return keys


def load_summaries(stores: list[Path], cache_path: Optional[Path], workers: int = 0,
                   keys: Optional[dict[str, tuple[int, int]]] = None) -> tuple[
        list[CellDigest], list[tuple[str, str]], int]:
    """Summaries of readable stores, (path, reason) of unreadable ones, and how many files were actually read;
    `keys` (store_keys of the same stores) saves stat'ing them again."""
    cache = _load_cache(cache_path) if cache_path else {}
    fresh: dict = {}
    todo: list[str] = []
    keys = store_keys(stores) if keys is None else keys
    for path, key in keys.items():
        hit = cache.get(path)
        if hit is not None and hit[0] == key:
            fresh[path] = hit
        else:
            todo.append(path)
    workers = workers or min(os.cpu_count() or 1, 4)
    if len(todo) >= 64 and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(summarise, todo, chunksize=max(1, len(todo) // (workers * 8))))
    else:
        results = [summarise(p) for p in todo]
    for p, r in zip(todo, results):
        fresh[p] = (keys[p], r)
    if cache_path:
        _save_cache(cache_path, fresh)
    good = [v for _, v in fresh.values() if isinstance(v, CellDigest)]
    bad = [(p, v) for p, (_, v) in fresh.items() if isinstance(v, str)]
    return sorted(good, key=lambda s: (s.params, s.tokens, s.ratio, s.seed)), sorted(bad), len(todo)


def fingerprint(keys: dict[str, tuple[int, int]], cfg: AnalysisConfig) -> str:
    """Identity of an aggregation's inputs: every store's (path, size, mtime) (store_keys) and the analysis
    settings."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    h.update(__version__.encode())
    for path in sorted(keys):
        size, mtime = keys[path]
        h.update(f"{path}|{size}|{mtime}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Summaries -> measurements
# ----------------------------------------------------------------------------------------------------------------------


def fact_scores(s: CellDigest, metric: str) -> Optional[np.ndarray]:
    """Per-fact accuracy behind an accuracy metric at the last evaluation (for bootstrapping over facts)."""
    m = _METRIC.match(metric)
    if not m or s.final_correct is None or s.probe_fact_index is None or s.fact_group is None:
        return None
    group = 0 if m.group(1) == "general" else 1
    probes = s.fact_group[s.probe_fact_index] == group
    if m.group(2) == "seen_":
        probes &= ~s.probe_heldout
    elif m.group(2) == "heldout_":
        probes &= s.probe_heldout
    facts = s.probe_fact_index[probes]
    hits = np.bincount(facts, weights=s.final_correct[probes], minlength=len(s.fact_group))
    counts = np.bincount(facts, minlength=len(s.fact_group))
    keep = counts > 0
    scores = hits[keep] / counts[keep]
    if m.group(3):  # chance-corrected: the same linear map per fact
        chance = 1.0 / s.n_choices
        scores = (scores - chance) / (1 - chance)
    return scores


def measurements(summaries: list[CellDigest], metric: str) -> tuple[list, list[tuple[str, str]]]:
    """Measurements of finished cells, and (cell, reason) for those left out."""
    from .collapse import Measurement

    out, excluded = [], []
    for s in summaries:
        if not s.complete:
            excluded.append((s.name, "not finished (still running, or killed before completion)"))
            continue
        if metric not in s.final:
            excluded.append((s.name, f"no '{metric}' recorded; fix: choose analysis.metric among "
                                     f"{sorted(s.metric_names)}"))
            continue
        scores = fact_scores(s, metric)
        bits = (s.n_infused_facts * float(np.log2(s.values_per_relation))
                if s.n_infused_facts and s.values_per_relation else None)
        out.append(Measurement(size=s.size, params=s.params, ratio=s.ratio, tokens=s.tokens, seed=s.seed,
                               retention=s.final[metric], fact_correct=scores,
                               n_choices=s.n_choices, exposures_per_fact=s.exposures_per_fact,
                               n_facts=None if scores is None else len(scores), knowledge_bits=bits))
    return out, excluded


# ----------------------------------------------------------------------------------------------------------------------
# The whole stage
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class AggregateResult:
    out: Path
    collapses: list
    law: Any
    table_markdown: str
    law_text: str
    excluded: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    n_read: int = 0


def _analysis_config(runs: list[Path], config: Optional[Path]) -> AnalysisConfig:
    if config is not None:
        return load_config(config).analysis
    for run in runs:
        path = RunPaths(run).config
        if path.exists():
            try:
                return load_config(path).analysis
            except ConfigError:
                continue
    return AnalysisConfig()


def analyse(ms: list, cfg: AnalysisConfig, out: Path, summary: dict, curves: list) -> AggregateResult:
    """Collapse per (size, token budget), the law across sizes, and the reports: shared by runs and CSVs."""
    from .collapse import detect_collapses
    from .law import fit_law
    from .report import collapse_table_md, law_text, write_reports

    rng = np.random.default_rng(cfg.seed)
    collapses = detect_collapses(ms, n_boot=cfg.bootstrap, confidence=cfg.confidence, rng=rng,
                                 workers=min(os.cpu_count() or 1, 4) if len(ms) >= 20 else 1)
    law = fit_law(collapses, unit=cfg.unit, n_boot=cfg.bootstrap, confidence=cfg.confidence, rng=rng,
                  targets=cfg.target_sizes)
    write_reports(out, collapses, law, summary, curves)
    return AggregateResult(out=out, collapses=collapses, law=law, table_markdown=collapse_table_md(collapses),
                           law_text=law_text(law))


def aggregate_runs(runs: list[Path], out: Optional[Path] = None, config: Optional[Path] = None,
                   echo: Callable[[str], Any] = print, cache: Optional[Path] = None) -> AggregateResult:
    """Aggregate one or more run folders into RUN/reports (or `out`); `cache` defaults to out/CACHE_NAME."""
    runs = [Path(r) for r in runs]
    stores = find_stores(runs)
    out = out or runs[0] / "reports"
    cfg = _analysis_config(runs, config)
    keys = store_keys(stores)
    print_ = fingerprint(keys, cfg)
    previous = _load_result(out, print_)
    if previous is not None:
        return previous  # nothing changed since the last aggregation: its reports stand
    summaries, unreadable, n_read = load_summaries(stores, cache or out / CACHE_NAME, keys=keys)
    for path, reason in unreadable:
        echo(f"kislurm: skipping unreadable store: {reason}")
    ms, excluded = measurements(summaries, cfg.metric)
    summary = {"title": f"kislurm report: {', '.join(r.name for r in runs)}", "metric": cfg.metric,
               "runs": ", ".join(str(r) for r in runs), "stores found": len(stores),
               "stores read this time (others cached)": n_read, "cells used": len(ms),
               "excluded_cells": {**{name: reason for name, reason in excluded},
                                  **{Path(p).parent.name: f"unreadable: {reason}" for p, reason in unreadable}}}
    from .report import Curve

    curves = [Curve(size=s.size, ratio=s.ratio, tokens=s.tokens, seed=s.seed, step=s.step,
                    retention=s.series[:, s.metric_names.index(cfg.metric)])
              for s in summaries if cfg.metric in s.metric_names]
    if not stores:
        echo(f"kislurm: no retention stores under {', '.join(map(str, runs))} (nothing has run yet?)")
    result = analyse(ms, cfg, out, summary, curves)
    result.excluded, result.unreadable, result.n_read = excluded, unreadable, n_read
    _save_result(out, print_, result)
    return result


_RESULT_NAME = ".aggregate-result.pkl"


def _load_result(out: Path, print_: str) -> Optional[AggregateResult]:
    try:
        with open(out / _RESULT_NAME, "rb") as f:
            saved_print, result = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        return None
    if saved_print != print_ or not (out / "collapse_points.csv").exists():
        return None
    result.n_read = 0
    return result


def _save_result(out: Path, print_: str, result: AggregateResult) -> None:
    """Written last, after every report: its presence means the reports match this fingerprint."""
    tmp = out / f".{_RESULT_NAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump((print_, result), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, out / _RESULT_NAME)


def fit_measurements_csv(csv: Path, out: Path, unit: str = "odds", targets: Optional[dict[str, float]] = None,
                         bootstrap: int = 200) -> AggregateResult:
    """`kislurm fit`: the same analysis on a plain table of results produced elsewhere."""
    from .collapse import measurements_from_csv

    ms = measurements_from_csv(csv)
    cfg = AnalysisConfig(unit=unit, target_sizes=targets or {}, bootstrap=bootstrap)  # type: ignore[arg-type]
    summary = {"title": f"kislurm fit: {csv.name}", "source": str(csv), "rows used": len(ms),
               "metric": "retention"}
    return analyse(ms, cfg, out, summary, [])


__all__ = ["AggregateError", "CellDigest", "aggregate_runs", "fit_measurements_csv", "load_summaries",
           "measurements", "summarise", "find_stores"]
