"""kislurm.analysis.aggregate on real stores: the incremental cache, damaged and unfinished cells, an empty run, and the
digest read giving the same answer as the datasets."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from kislurm.retention import digest
from kislurm.analysis.aggregate import CACHE_NAME, AggregateError, aggregate_runs
from kislurm.paths import RunPaths
from kislurm.retention.store import RetentionWriter

N_FACTS = 60
SIZES = (("s", 1e5, 0.3), ("m", 4e5, 0.5), ("l", 1.6e6, 0.7))
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _logit(r: float) -> float:
    return math.log(r / (1 - r))


def write_cell(run: RunPaths, size: str, params: float, mid: float, ratio: float, rng: np.random.Generator,
               steps: tuple[int, ...] = (10, 20), complete: bool = True, name: str | None = None) -> Path:
    """A store whose infused facts are retained following a logistic collapse at `mid` (per-probe bits drawn)."""
    name = name or f"{size}_r{ratio}_s0_{size}{int(ratio * 100):08d}"
    path = run.cell(name).store
    meta = {"cell_id": name[-10:], "name": name, "size": size, "ratio": ratio, "tokens": 1000, "seed": 0,
            "config": {}, "params_total": params, "params_non_embedding": params, "n_choices": 4,
            "data_stats": {"infused_facts": N_FACTS // 2}}
    group = (np.arange(N_FACTS) % 2).astype(np.int8)
    probe_fact = np.arange(2 * N_FACTS) % N_FACTS
    infused = group[probe_fact] == 1
    level = 0.25 + 0.7 / (1 + math.exp(6 * (_logit(ratio) - _logit(mid))))
    w = RetentionWriter.open(path, meta, [f"f{i}" for i in range(N_FACTS)], group, probe_fact,
                             np.arange(2 * N_FACTS) % 4 == 3)
    for step in steps:
        correct = rng.random(2 * N_FACTS) < np.where(infused, level, 0.9)
        w.append(step, step * 32, 2.0, {"general_acc": float(correct[~infused].mean()),
                                        "infused_acc": float(correct[infused].mean())}, correct, None)
    if complete:
        w.mark_complete()
    w.close()
    return path


@pytest.fixture()
def run(tmp_path: Path) -> RunPaths:
    run = RunPaths(tmp_path / "grid")
    rng = np.random.default_rng(0)
    for size, params, mid in SIZES:
        for r in RATIOS:
            write_cell(run, size, params, mid, r, rng)
    run.config.write_text("analysis: {bootstrap: 30, metric: infused_acc}\n")
    return run


def _table(result) -> list[tuple]:
    return [(c.size, round(c.r_star, 9), round(c.lo, 9), round(c.hi, 9), c.flag) for c in result.collapses]


def test_cache_reads_only_new_or_grown_stores(run, tmp_path):
    first = aggregate_runs([run.root], echo=lambda *_: None)
    assert first.n_read == len(SIZES) * len(RATIOS) and not first.unreadable and not first.excluded
    assert [c.flag for c in first.collapses] == ["ok"] * 3 and first.law.ok
    assert (run.reports / CACHE_NAME).exists()
    assert aggregate_runs([run.root]).n_read == 0  # nothing changed: the reports stand
    rng = np.random.default_rng(1)
    write_cell(run, "m", 4e5, 0.5, 0.55, rng)                          # a new cell
    grown = next(run.cells.glob("s_r0.9_*/retention.h5"))
    shutil.rmtree(grown.parent)
    write_cell(run, "s", 1e5, 0.3, 0.9, rng, steps=(10, 20, 30))       # the same cell, one evaluation more
    again = aggregate_runs([run.root], echo=lambda *_: None)
    assert again.n_read == 2
    fresh = aggregate_runs([run.root], out=tmp_path / "fresh", echo=lambda *_: None)  # no cache at all
    assert fresh.n_read == len(SIZES) * len(RATIOS) + 1
    assert _table(again) == _table(fresh)


def test_damaged_and_unfinished_cells_are_listed_and_counted(run):
    good = next(run.cells.glob("m_r0.5_*/retention.h5"))
    truncated = run.cell("m_r0.5_truncated").store
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(good.read_bytes()[:-2000])                   # the digest at its start is intact
    garbage = run.cell("garbage").store
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not hdf5 " * 100)
    write_cell(run, "l", 1.6e6, 0.7, 0.95, np.random.default_rng(2), complete=False)
    messages: list[str] = []
    result = aggregate_runs([run.root], echo=messages.append)
    reasons = dict(result.unreadable)
    assert set(reasons) == {str(truncated), str(garbage)}
    assert "truncated or modified" in reasons[str(truncated)] and "not a readable HDF5" in reasons[str(garbage)]
    assert [name for name, _ in result.excluded] == ["l_r0.95_s0_l00000095"]
    assert sum("skipping unreadable store" in m for m in messages) == 2
    summary = (run.reports / "summary.md").read_text()
    assert "m_r0.5_truncated" in summary and "garbage" in summary and "not finished" in summary
    assert [c.flag for c in result.collapses] == ["ok"] * 3  # the rest still gives the answer


def test_a_run_without_stores_is_an_error_and_writes_nothing(tmp_path):
    run = RunPaths(tmp_path / "empty")
    run.cell("planned_but_never_started").root.mkdir(parents=True)
    with pytest.raises(AggregateError, match="no retention stores under") as e:
        aggregate_runs([run.root], echo=lambda *_: None)
    assert "\n" not in str(e.value) and "fix:" in str(e.value) and not run.reports.exists()


def test_no_law_still_writes_every_report(tmp_path):
    run = RunPaths(tmp_path / "one")
    rng = np.random.default_rng(0)
    for r in RATIOS:
        write_cell(run, "s", 1e5, 0.3, r, rng)
    run.config.write_text("analysis: {bootstrap: 10, metric: infused_acc}\n")
    result = aggregate_runs([run.root], echo=lambda *_: None)
    assert len(result.collapses) == 1 and not result.law.ok
    for name in ("collapse_points.csv", "summary.md", "law.json", "law.png", "retention_vs_ratio.png"):
        assert (run.reports / name).exists(), name


def test_stores_without_digest_give_the_same_table(run, tmp_path, monkeypatch):
    """Stores written before the digest existed are read through their datasets, with the same answer."""
    with_digest = aggregate_runs([run.root], echo=lambda *_: None)
    old = RunPaths(tmp_path / "old")
    monkeypatch.setattr(digest, "userblock_size", lambda payload: 0)
    rng = np.random.default_rng(0)
    for size, params, mid in SIZES:
        for r in RATIOS:
            assert not write_cell(old, size, params, mid, r, rng).read_bytes().startswith(digest.MAGIC)
    old.config.write_text(run.config.read_text())
    without = aggregate_runs([old.root], echo=lambda *_: None)
    assert without.n_read == with_digest.n_read and _table(without) == _table(with_digest)
