"""Retention by frequency band in the aggregate (issue 25): a synthetic run whose rare facts collapse first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kislurm.analysis.aggregate import aggregate_runs
from kislurm.analysis.bands import band_edges
from kislurm.paths import RunPaths
from kislurm.retention.store import RetentionWriter, read_cell

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BANDS = ((3, 0.3), (30, 0.5), (300, 0.7))   # (frequency, the ratio where that band's facts are forgotten)
PER_BAND, UNLEARNED = 40, 12


def _logit(r: float) -> float:
    return math.log(r / (1 - r))


def _facts() -> tuple[np.ndarray, np.ndarray]:
    """Each fact's frequency and the ratio beyond which it is wrong (spread around its band's collapse point);
    the last UNLEARNED facts are never learned (wrong at every ratio)."""
    rng = np.random.default_rng(3)
    freq = np.concatenate([rng.integers(f, 3 * f, PER_BAND) for f, _ in BANDS] + [np.full(UNLEARNED, 50)])
    mids = np.concatenate([np.full(PER_BAND, _logit(m)) for _, m in BANDS] + [np.full(UNLEARNED, -np.inf)])
    forget = 1 / (1 + np.exp(-(mids + rng.normal(0, 0.35, len(mids)))))
    return freq, forget


def write_run(root: Path) -> RunPaths:
    """General facts only, one probe per fact; a fact is right while the cell's ratio is below its threshold."""
    run = RunPaths(root)
    freq, forget = _facts()
    n = len(freq)
    for r in RATIOS:
        name = f"s_r{r}_s0_{int(r * 100):010d}"
        meta = {"cell_id": name[-10:], "name": name, "size": "s", "ratio": r, "tokens": 1000, "seed": 0,
                "config": {}, "params_total": 1e5, "params_non_embedding": 1e5, "n_choices": 4,
                "data_stats": {}, "fact_frequency_unit": "corpus_documents"}
        w = RetentionWriter.open(run.cell(name).store, meta, [f"general:{i}:rel" for i in range(n)],
                                 np.zeros(n, np.int8), np.arange(n), np.zeros(n, bool), fact_frequency=freq)
        correct = r < forget
        w.append(10, 320, 2.0, {"general_acc": float(correct.mean())}, correct, None)
        w.mark_complete()
        w.close()
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunPaths:
    return write_run(tmp_path_factory.mktemp("bands") / "grid")


def _bands(run: RunPaths, tmp: Path, analysis: str) -> list[dict]:
    (tmp / "analysis.yaml").write_text(f"analysis: {{bootstrap: 20, {analysis}}}\n")
    result = aggregate_runs([run.root], out=tmp / "reports", config=tmp / "analysis.yaml", echo=lambda _: None)
    rows = json.loads((tmp / "reports" / "bands.json").read_text())["bands"]
    assert len(rows) == len(result.bands) and (tmp / "reports" / "bands.png").stat().st_size > 0
    return rows


def test_the_store_keeps_each_facts_frequency(run):
    rec = read_cell(next(run.root.glob("cells/*/retention.h5")))
    np.testing.assert_array_equal(rec.fact_frequency, _facts()[0])


@pytest.mark.parametrize("analysis", ["frequency_bands: [10, 100]", "frequency_quantiles: 3"])
def test_rare_facts_collapse_first_and_unlearned_facts_are_left_out(run, tmp_path, analysis):
    rows = _bands(run, tmp_path, analysis)
    assert [r["facts"] for r in rows] == [PER_BAND] * 3            # the 12 facts never learned count in no band
    assert all(r["facts_not_known_at_smallest_ratio"] == UNLEARNED for r in rows)
    assert all(r["retention"][0] == 1.0 for r in rows)                 # known at the smallest ratio, by definition
    stars = [r["r_star"] for r in rows]
    assert stars == sorted(stars)                                      # the rare go first
    for r, (_, mid) in zip(rows, BANDS):
        assert r["r_star_lo"] <= mid + 0.05 and r["r_star_hi"] >= mid - 0.05 and r["flag"] == "ok"
    if "[10, 100]" in analysis:
        assert [r["band"] for r in rows] == ["< 10", "[10, 100)", ">= 100"]


def test_thin_bands_are_merged_into_their_thinner_neighbour():
    freq = np.array([1] * 40 + [20] * 10 + [200] * 45, float)
    assert band_edges(freq, [10, 100], 3, 30) == [100]                 # 10 facts in [10, 100): joined to the 40 below
    assert band_edges(freq, [], 3, 30) == [200]                        # the tertile edge at 1 leaves an empty band
    assert band_edges(freq, [10, 100], 3, 60) == []                    # no split leaves 60 on both sides: one band


def test_synthetic_cells_record_general_exposures_per_fact(prepared_tiny):
    """What a synthetic cell writes into its fact table: the times it trains on each general fact (megatron's own
    indices), the same counts blend_stats summarises; the infused facts get -1 (no corpus frequency)."""
    from kislurm.data import prepare as D
    from kislurm.plan.config import EvalConfig
    from kislurm.plan.presets import BUILTIN_PRESETS
    from kislurm.plan.training import TrainConfig
    from kislurm.plan.grid import Cell

    cell = Cell("cpu-xxs", 0.3, 102_400, 0, BUILTIN_PRESETS["cpu-xxs"], prepared_tiny.data, TrainConfig(),
                EvalConfig())
    dataset, stats = D.cell_dataset(prepared_tiny, cell)
    probes = D.cell_probes(prepared_tiny, cell)
    freq, unit = D.fact_frequency(prepared_tiny, cell, dataset, probes)
    general = freq[probes.fact_group == 0]
    assert unit == "general_exposures" and len(general) == 60 and (freq[probes.fact_group == 1] == -1).all()
    assert (general.min(), general.mean(), general.max()) == pytest.approx(
        (stats["general_exposures_per_fact_min"], stats["general_exposures_per_fact_mean"],
         stats["general_exposures_per_fact_max"]))
