"""Aggregate: every retention store of one or more runs becomes measurements, collapse points, a law and reports.

Reading is the expensive part at scale (thousands of cells, nightly), so each file is summarised once and the
summary cached by (path, size, mtime): a re-run reads only new or grown files. Unreadable files (truncated,
garbage, foreign, mid-write by an old writer) are listed with the reason and excluded, never fatal. Outputs are
written atomically by kislurm.analysis.report, so a reader never sees a half-written report.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from kislurm import __version__
from kislurm.plan.config import AnalysisConfig, ConfigError
from kislurm.plan.loader import load_config
from kislurm.paths import CELLS, STORE, RunPaths
from kislurm.publish import publishing
from kislurm.retention.store import StoreDigest, StoreError, read_digest
from kislurm.errors import AggregateError  # noqa: F401 (re-exported)

CACHE_NAME = ".aggregate-cache.pkl"
CACHE_VERSION = 7
_METRIC = re.compile(r"^(general|infused)_(seen_|heldout_)?acc(_cc)?$")


@dataclass
class CellDigest:
    """What aggregation needs of one store for one metric: ~1.5 KB pickled, so thousands of them travel between
    processes and into the cache cheaply (its arrays are pickled as plain bytes: ~4x faster than ndarrays)."""

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
    metric: str                           # what value, series and fact_scores are of
    metric_names: tuple[str, ...]
    value: Optional[float]                # the metric at the last evaluation, full precision (None: not recorded)
    infused_value: Optional[float]        # its infused-facts counterpart there (what the ratio buys), if recorded
    step: np.ndarray                      # (S,) int32
    series: Optional[np.ndarray]          # (S,) float32: the metric over training (the curves plot)
    fact_scores: Optional[np.ndarray]     # (F,) float64 per-fact accuracy behind the metric at the last evaluation
    control: str = "infusion"             # issue 17's control (kislurm.analysis.controls): infusion, dilution, fixed_general, staged
    general_exposures: Optional[float] = None   # mean general exposures per fact (data_stats; None: a user's corpus)
    boundary_value: Optional[float] = None      # staged: the metric at the end of the general-only phase
    fact_frequency: Optional[np.ndarray] = None  # (F,) float64 beside fact_scores: corpus documents or exposures
    frequency_unit: str = ""
    heldout_loss: Optional[float] = None        # held-out general loss at the last evaluation (data.heldout_general)
    heldout_bpb: Optional[float] = None         # its bits per byte

    _PACKED = {"step": np.int32, "series": np.float32, "fact_scores": np.float64, "fact_frequency": np.float64}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key, dtype in self._PACKED.items():
            if state[key] is not None:
                state[key] = np.asarray(state[key], dtype).tobytes()
        return state

    def __setstate__(self, state: dict) -> None:
        for key, dtype in self._PACKED.items():
            if state.get(key) is not None:
                state[key] = np.frombuffer(state[key], dtype)
        self.__dict__.update(state)


_SHARED: dict[tuple, tuple] = {}


def summarise(path: str, metric: str) -> CellDigest | str:
    """Read one store into a CellDigest for `metric`, or return the one-line reason it is unusable."""
    try:
        d = read_digest(path)  # one plain read of the store's user block (kislurm.retention.digest)
    except StoreError as e:
        return str(e)
    meta = d.meta
    stats = meta.get("data_stats") or {}
    data_cfg = (meta.get("config") or {}).get("data") or {}
    column = d.metric_names.index(metric) if metric in d.metric_names else None
    control = "staged" if data_cfg.get("schedule") == "staged" else str(data_cfg.get("mix") or "infusion")
    boundary = None
    if control == "staged" and column is not None and stats.get("phase1_steps") in list(d.step):
        boundary = float(d.series[list(d.step).index(stats["phase1_steps"]), column])
    return CellDigest(
        path=path, name=meta.get("name") or os.path.basename(os.path.dirname(path)), size=str(meta.get("size")),
        params=float(meta.get("params_non_embedding", np.nan)), ratio=float(meta.get("ratio", np.nan)),
        tokens=float(meta.get("tokens", np.nan)), seed=int(meta.get("seed", 0)), complete=d.complete,
        n_choices=int(meta.get("n_choices", 0)),
        exposures_per_fact=_num(stats.get("exposures_per_fact_mean")),
        n_infused_facts=_num(stats.get("infused_facts"), int),
        values_per_relation=_num((data_cfg.get("knowledge") or {}).get("values_per_relation"), int),
        metric=metric, metric_names=_SHARED.setdefault(d.metric_names, d.metric_names),  # one copy per pickled batch
        value=d.final.get(metric), infused_value=d.final.get(infused_metric(metric)),
        step=np.asarray(d.step, np.int32),
        series=None if column is None else np.array(d.series[:, column], np.float32),
        fact_scores=fact_scores(d, metric), control=control,
        general_exposures=_num(stats.get("general_exposures_per_fact_mean")), boundary_value=boundary,
        fact_frequency=fact_frequencies(d, metric), frequency_unit=str(meta.get("fact_frequency_unit") or ""),
        heldout_loss=d.final.get("heldout_loss"), heldout_bpb=d.final.get("heldout_bpb"))


def infused_metric(metric: str) -> str:
    """The infused-facts counterpart of a retention metric (general_acc -> infused_acc); itself otherwise."""
    return "infused_" + metric[len("general_"):] if metric.startswith("general_") else metric


def _num(value: Any, kind: type = float) -> Any:
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Scanning with an incremental cache
# ----------------------------------------------------------------------------------------------------------------------


def find_stores(runs: list[Path]) -> list[str]:
    """Every run's stores: RUN/cells/<cell>/retention.h5 (one directory listing; the cell folders are not listed,
    store_keys stats each store once), or any retention.h5 below RUN for a folder without cells/. Paths as str:
    10,000 pathlib joins cost ~0.1 s."""
    stores: list[str] = []
    for run in runs:
        if not run.is_dir():
            raise AggregateError(f"{run}: no such run folder; fix: pass folders created by `kislurm submit` "
                                 "(output_root/name)")
        cells = run / CELLS
        stores += ([os.path.join(cells, name, STORE) for name in sorted(os.listdir(cells))]
                   if cells.is_dir() else sorted(map(str, run.glob(f"**/{STORE}"))))
    return stores


def _load_cache(path: Path, metric: str) -> dict:
    try:
        with open(path, "rb") as f:
            cache = pickle.load(f)
        ok = cache.get("version") == CACHE_VERSION and cache.get("metric") == metric
        return cache["entries"] if ok else {}
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError, TypeError, ImportError):
        return {}  # a missing or damaged cache (or one for another metric) only costs a cold read


def _save_cache(path: Path, metric: str, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with publishing(path) as tmp, open(tmp, "wb") as f:
        pickle.dump({"version": CACHE_VERSION, "metric": metric, "entries": entries}, f,
                    protocol=pickle.HIGHEST_PROTOCOL)


def store_keys(stores: list[str] | list[Path], executor: Optional[ProcessPoolExecutor] = None) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every store that still exists, by path: what the cache and the fingerprint key on.
    Thousands of stats of a cold file system run in `executor`'s processes when one is given: a thread would
    wait for the GIL after every stat while the analysis imports run."""
    paths = [str(p) for p in stores]
    if executor is None or len(paths) < 1024:
        return _stat_all(paths)
    keys: dict[str, tuple[int, int]] = {}
    for part in executor.map(_stat_all, [paths[i:i + 512] for i in range(0, len(paths), 512)]):
        keys.update(part)
    return keys


def _stat_all(paths: list[str]) -> dict[str, tuple[int, int]]:
    keys: dict[str, tuple[int, int]] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        keys[p] = (st.st_size, st.st_mtime_ns)
    return keys


def read_summaries(paths: list[str], metric: str, executor: Optional[ProcessPoolExecutor] = None,
                   ) -> list[CellDigest | str]:
    """summarise() every path, in order, in `executor`'s processes when there are many. Threads do not help: a
    digest read is ~0.2 ms of mostly Python, and they contend for the GIL."""
    if len(paths) < 256 or executor is None:
        return [summarise(p, metric) for p in paths]
    chunk = max(1, len(paths) // (8 * (os.cpu_count() or 1)))
    return list(executor.map(functools.partial(summarise, metric=metric), paths, chunksize=chunk))


def _one_blas_thread() -> Any:
    """The fits multiply small matrices: multithreaded BLAS only spins (it doubled the CPU time of the fits on 2
    cores), and each worker process is already one CPU's worth of work. A context manager as well (the parent
    restores its own setting afterwards)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def worker_pool(workers: int = 0) -> ProcessPoolExecutor:
    """Processes for one aggregation: one more than the CPUs by default (a process waiting for the disk leaves
    its CPU to another), at most 8. Forked: a worker starts with what the parent has imported."""
    return ProcessPoolExecutor(workers or min((os.cpu_count() or 1) + 1, 8), initializer=_one_blas_thread)


def _import_analysis() -> None:
    """scipy.optimize and matplotlib take ~2 s to import: done in a thread while the stores are read, and before
    the analysis workers are forked (so that none of them imports them again)."""
    from kislurm.analysis import collapse, law, report  # noqa: F401

    collapse.load_scipy()


def load_summaries(keys: dict[str, tuple[int, int]], cache_path: Optional[Path], metric: str,
                   executor: Optional[ProcessPoolExecutor] = None) -> tuple[
        list[CellDigest], list[tuple[str, str]], int]:
    """Summaries for `metric` of the readable stores among `keys` (store_keys: path -> size, mtime), (path, reason)
    of unreadable ones, and how many files were actually read (the others came from the cache)."""
    cache = _load_cache(cache_path, metric) if cache_path else {}
    fresh: dict = {}
    todo: list[str] = []
    for path, key in keys.items():
        hit = cache.get(path)
        if hit is not None and hit[0] == key:
            fresh[path] = hit
        else:
            todo.append(path)
    for p, r in zip(todo, read_summaries(todo, metric, executor)):
        fresh[p] = (keys[p], r)
    if cache_path:
        _save_cache(cache_path, metric, fresh)
    good = [v for _, v in fresh.values() if isinstance(v, CellDigest)]
    bad = [(p, v) for p, (_, v) in fresh.items() if isinstance(v, str)]
    return sorted(good, key=lambda s: (s.params, s.tokens, s.ratio, s.seed)), sorted(bad), len(todo)


def fingerprint(keys: dict[str, tuple[int, int]], cfg: AnalysisConfig) -> str:
    """Identity of an aggregation's inputs: every store's (path, size, mtime) (store_keys) and the analysis
    settings."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    h.update(f"{__version__}|{CACHE_VERSION}".encode())   # a new digest layout means new reports, too
    for path in sorted(keys):
        size, mtime = keys[path]
        h.update(f"{path}|{size}|{mtime}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Summaries -> measurements
# ----------------------------------------------------------------------------------------------------------------------


def fact_scores(d: StoreDigest, metric: str) -> Optional[np.ndarray]:
    """Per-fact accuracy behind an accuracy metric at the last evaluation (for bootstrapping over facts)."""
    m = _METRIC.match(metric)
    if not m or d.last_correct is None or d.probe_fact_index is None or d.fact_group is None:
        return None
    n_choices = int(d.meta.get("n_choices") or 0)
    if m.group(3) and n_choices < 2:
        return None
    probes, facts, counts, keep = _probe_selection(d.probe_fact_index.dtype.str, d.probe_fact_index.tobytes(),
                                                   np.packbits(d.probe_heldout).tobytes(), d.fact_group.tobytes(),
                                                   m.group(1), m.group(2) or "")
    hits = np.bincount(facts, weights=d.last_correct[probes], minlength=len(counts))
    scores = hits[keep] / counts[keep]
    if m.group(3):  # chance-corrected: the same linear map per fact
        scores = (scores - 1.0 / n_choices) / (1 - 1.0 / n_choices)
    return scores


def fact_frequencies(d: StoreDigest, metric: str) -> Optional[np.ndarray]:
    """The recorded frequency of each fact behind fact_scores (same facts, same order), or None."""
    m = _METRIC.match(metric)
    if not m or d.fact_frequency is None or d.probe_fact_index is None or d.fact_group is None:
        return None
    keep = _probe_selection(d.probe_fact_index.dtype.str, d.probe_fact_index.tobytes(),
                            np.packbits(d.probe_heldout).tobytes(), d.fact_group.tobytes(), m.group(1),
                            m.group(2) or "")[3]
    return np.asarray(d.fact_frequency, np.float64)[keep]


@functools.lru_cache(maxsize=16)
def _probe_selection(index_dtype: str, index: bytes, heldout_bits: bytes, fact_group: bytes, group_name: str,
                     split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which probes a metric scores, the fact of each, probes per fact, facts with probes: a function of the probe
    set alone, which the cells of a run share, so it is worked out once per run, not once per store."""
    pfi = np.frombuffer(index, index_dtype)
    group = np.frombuffer(fact_group, np.int8)
    held = np.unpackbits(np.frombuffer(heldout_bits, np.uint8), count=len(pfi)).view(bool)
    probes = group[pfi] == (0 if group_name == "general" else 1)
    if split == "seen_":
        probes &= ~held
    elif split == "heldout_":
        probes &= held
    facts = pfi[probes]
    counts = np.bincount(facts, minlength=len(group))
    return probes, facts, counts, counts > 0


def measurements(summaries: list[CellDigest], metric: str) -> tuple[list, list[tuple[str, str]]]:
    """Measurements of finished cells, and (cell, reason) for those left out."""
    from kislurm.analysis.collapse import Measurement

    out, excluded = [], []
    for s in summaries:
        if s.metric != metric:
            raise ValueError(f"{s.path} was summarised for {s.metric!r}, not {metric!r}; fix: load_summaries with "
                             "the analysis metric")
        if not s.complete:
            excluded.append((s.name, "not finished (still running, or killed before completion)"))
            continue
        if s.value is None:
            excluded.append((s.name, f"no '{metric}' recorded; fix: choose analysis.metric among "
                                     f"{sorted(s.metric_names)}"))
            continue
        scores = s.fact_scores
        bits = (s.n_infused_facts * float(np.log2(s.values_per_relation))
                if s.n_infused_facts and s.values_per_relation else None)
        out.append(Measurement(size=s.size, params=s.params, ratio=s.ratio, tokens=s.tokens, seed=s.seed,
                               retention=s.value, fact_correct=scores,
                               n_choices=s.n_choices, exposures_per_fact=s.exposures_per_fact,
                               n_facts=None if scores is None else len(scores), knowledge_bits=bits,
                               infused_retention=s.infused_value))
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
    controls: list = field(default_factory=list)   # kislurm.analysis.controls.SizeVerdict per size, when the run has controls
    bands: list = field(default_factory=list)      # kislurm.analysis.bands.BandCollapse, when stores record frequencies
    heldout: list = field(default_factory=list)    # kislurm.analysis.heldout.HeldoutCurve, when stores record it


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


def analyse(ms: list, cfg: AnalysisConfig, out: Path, summary: dict, curves: list,
            executor: Optional[ProcessPoolExecutor] = None) -> AggregateResult:
    """Collapse per (size, token budget), the law across sizes, and the reports: shared by runs and CSVs. With an
    executor, the collapse groups are fitted in its processes and then the three figures drawn in them at once
    (all cores busy to the end: drawing the curves plot during the fits left a core idle while the last figure
    was drawn)."""
    from kislurm.analysis.collapse import CollapseOptions, detect_collapses
    from kislurm.analysis.law import fit_law
    from kislurm.analysis.report import collapse_table_md, law_text, write_reports

    rng = np.random.default_rng(cfg.seed)
    collapses = detect_collapses(ms, n_boot=cfg.bootstrap, confidence=cfg.confidence, rng=rng,
                                 options=CollapseOptions(safe_drop=cfg.safe_drop),
                                 executor=executor if len(ms) >= 20 else None)
    law = fit_law(collapses, unit=cfg.unit, n_boot=cfg.bootstrap, confidence=cfg.confidence, rng=rng,
                  targets=cfg.target_sizes, safe_drop=cfg.safe_drop, validate=cfg.validate_sizes)
    write_reports(out, collapses, law, summary, curves, executor=executor)
    return AggregateResult(out=out, collapses=collapses, law=law, table_markdown=collapse_table_md(collapses),
                           law_text=law_text(law))


def aggregate_runs(runs: list[Path], out: Optional[Path] = None, config: Optional[Path] = None,
                   echo: Callable[[str], Any] = print, cache: Optional[Path] = None) -> AggregateResult:
    """Aggregate one or more run folders into RUN/reports (or `out`); `cache` defaults to out/CACHE_NAME.

    Order, for a cold run over thousands of stores on few cores: the reading processes are forked first (light:
    no scipy or matplotlib, and no thread exists yet to be forked mid-import) and stat the stores; unless nothing
    changed, the analysis imports (~2 s) then load in a thread while they read the stores; the analysis processes
    are forked after both are done."""
    runs = [Path(r) for r in runs]
    out = out or RunPaths(runs[0]).reports
    cfg = _analysis_config(runs, config)
    with _one_blas_thread():
        with worker_pool() as readers:
            readers.submit(int).result()  # every reader is forked now, before the import thread starts
            keys = store_keys(find_stores(runs), readers)
            if not keys:
                raise AggregateError(f"no retention stores under {', '.join(map(str, runs))}: nothing has written "
                                     "an evaluation yet; fix: check the folder, or wait for cells to run "
                                     "(`kislurm status RUN`)")
            print_ = fingerprint(keys, cfg)
            previous = _load_result(out, print_)
            if previous is not None:
                return _with_downstream(previous, keys, out, echo, None)  # nothing changed: its reports stand
            importing = threading.Thread(target=_import_analysis, name="kislurm-imports")
            importing.start()
            summaries, unreadable, n_read = load_summaries(keys, cache or out / CACHE_NAME, cfg.metric,
                                                           executor=readers)
            importing.join()
        with worker_pool() as pool:  # forked with no other thread alive (the readers' are shut down)
            result = _aggregate(runs, keys, cfg, out, summaries, unreadable, n_read, echo, pool)
    _save_result(out, print_, result)
    return _with_downstream(result, keys, out, echo, summaries)


def _with_downstream(result: AggregateResult, keys: dict[str, tuple[int, int]], out: Path,
                     echo: Callable[[str], Any], summaries: Optional[list[CellDigest]]) -> AggregateResult:
    """Downstream scores vs ratio (kislurm.analysis.downstream) beside the reports. CELL/downstream.json (kislurm
    downstream) is not among the inputs the cached result is keyed on, so it is looked at every time (a stat per
    cell); the stores are read again only when some cell has downstream scores that the reports lack."""
    from kislurm.analysis.downstream import reports_stand, write_downstream_reports

    in_loop = summaries is not None and any(n.startswith("downstream/") for s in summaries for n in s.metric_names)
    if not reports_stand(list(keys), out, stores_changed=in_loop):
        write_downstream_reports(list(keys), out, echo)
    return result


def _aggregate(runs: list[Path], keys: dict[str, tuple[int, int]], cfg: AnalysisConfig, out: Path,
               summaries: list[CellDigest], unreadable: list[tuple[str, str]], n_read: int,
               echo: Callable[[str], Any], pool: ProcessPoolExecutor) -> AggregateResult:
    for path, reason in unreadable:
        echo(f"kislurm: skipping unreadable store: {reason}")
    controls = sorted({s.control for s in summaries})
    everything, summaries = summaries, [s for s in summaries if s.control == "infusion"]
    ms, excluded = measurements(summaries, cfg.metric)
    summary = {"title": f"kislurm report: {', '.join(r.name for r in runs)}", "metric": cfg.metric,
               "runs": ", ".join(str(r) for r in runs), "stores found": len(keys),
               "stores read this time (others cached)": n_read, "cells used": len(ms),
               "excluded_cells": {**{name: reason for name, reason in excluded},
                                  **{Path(p).parent.name: f"unreadable: {reason}" for p, reason in unreadable}}}
    from kislurm.analysis.report import Curve

    curves = [Curve(size=s.size, ratio=s.ratio, tokens=s.tokens, seed=s.seed, step=s.step, retention=s.series)
              for s in summaries if s.series is not None]
    if controls != ["infusion"]:
        summary["controls"] = ", ".join(controls) + " (collapse points and the law: infusion cells only; the "\
                              "controls in controls.md)"
    result = analyse(ms, cfg, out, summary, curves, executor=pool)
    result.excluded, result.unreadable, result.n_read = excluded, unreadable, n_read
    result.bands = analyse_bands(summaries, cfg, out)
    result.heldout = analyse_heldout(everything, cfg, out)
    if controls != ["infusion"]:
        result.controls = analyse_controls(everything, cfg, out, runs)
    return result


def analyse_bands(summaries: list[CellDigest], cfg: AnalysisConfig, out: Path) -> list:
    """Issue 25: retention and the collapse point per frequency band, bands.{md,json,png} (when any store recorded
    fact frequencies)."""
    from kislurm.analysis.bands import frequency_bands, write_bands

    bands = frequency_bands(summaries, cfg, np.random.default_rng([cfg.seed, 25]))
    if bands:
        write_bands(out, bands, cfg.metric)
    return bands


def analyse_heldout(summaries: list[CellDigest], cfg: AnalysisConfig, out: Path) -> list:
    """Issue 25: held-out general loss against ratio, its collapse, and fixed_general's view beside infusion's,
    heldout.{md,json,png} (when any store recorded heldout_loss)."""
    from kislurm.analysis.heldout import heldout_curves, write_heldout

    curves = heldout_curves(summaries, cfg.bootstrap, cfg.confidence, np.random.default_rng([cfg.seed, 2025]),
                            cfg.safe_drop)
    if curves:
        write_heldout(out, curves)
    return curves


def analyse_controls(summaries: list[CellDigest], cfg: AnalysisConfig, out: Path, runs: list[Path]) -> list:
    """Issue 17: collapse points per control and size, the decision rules, controls.{md,json,png}, exposures.png."""
    from kislurm.analysis.controls import control_curves, judge, write_controls

    curves = control_curves(summaries, measurements, cfg.metric, cfg.bootstrap, cfg.confidence, cfg.seed)
    chance = 1.0 / max((s.n_choices for s in summaries), default=1) if cfg.metric.endswith("acc") else 0.0
    verdicts = judge(curves, cfg.confidence, chance)
    write_controls(out, curves, verdicts, {"metric": cfg.metric, "runs": ", ".join(str(r) for r in runs),
                                           "confidence": cfg.confidence})
    return verdicts


_RESULT_NAME = ".aggregate-result.pkl"


def _load_result(out: Path, print_: str) -> Optional[AggregateResult]:
    """The last aggregation's result if its inputs had this fingerprint. The fingerprint is pickled first and read
    alone: a changed run costs no unpickling of results (nor the scipy and matplotlib imports that would need)."""
    try:
        with open(out / _RESULT_NAME, "rb") as f:
            if pickle.load(f) != print_ or not (out / "collapse_points.csv").exists():
                return None
            result = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, ImportError):
        return None
    result.n_read = 0
    return result


def _save_result(out: Path, print_: str, result: AggregateResult) -> None:
    """Written last, after every report: its presence means the reports match this fingerprint."""
    with publishing(out / _RESULT_NAME) as tmp, open(tmp, "wb") as f:
        pickle.dump(print_, f, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)


def fit_measurements_csv(csv: Path, out: Path, unit: str = "odds", targets: Optional[dict[str, float]] = None,
                         bootstrap: int = 200) -> AggregateResult:
    """`kislurm fit`: the same analysis on a plain table of results produced elsewhere."""
    from kislurm.analysis.measurements_csv import read_measurements_csv

    ms, validate = read_measurements_csv(csv)
    cfg = AnalysisConfig(unit=unit, target_sizes=targets or {}, bootstrap=bootstrap,  # type: ignore[arg-type]
                         validate_sizes=validate)
    summary = {"title": f"kislurm fit: {csv.name}", "source": str(csv), "rows used": len(ms),
               "metric": "retention"}
    return analyse(ms, cfg, out, summary, [])


__all__ = ["AggregateError", "CellDigest", "aggregate_runs", "fit_measurements_csv", "load_summaries",
           "measurements", "summarise", "find_stores"]
