"""Held-out general loss in the aggregate (issue 25): a rise of the loss above a ratio is detected there, relative to
the smallest-ratio cell, and the fixed_general control's view is reported beside infusion's. Real HDF5 stores of a
synthetic run, through `aggregate_runs`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kislurm.analysis.aggregate import aggregate_runs
from kislurm.analysis.heldout import loss_score
from kislurm.paths import RunPaths
from kislurm.retention.store import RetentionWriter

RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
RISE_AT, L0, RISE = 0.6, 3.0, 0.4   # infusion's loss rises by 40% around r = 0.6
BPB_PER_NAT = 0.4                    # bits per byte = nats per token x a fixed factor (same documents in every cell)


def _loss(control: str, r: float, rng: np.random.Generator) -> float:
    noise = rng.normal(0, 0.01)
    if control == "fixed_general":   # the general exposures held: no rise beyond noise
        return L0 * (1 + noise)
    x = math.log(r / (1 - r)) - math.log(RISE_AT / (1 - RISE_AT))
    return L0 * (1 + RISE / (1 + math.exp(-4 * x)) + noise)


def _store(run: RunPaths, control: str, r: float, seed: int, rng: np.random.Generator) -> None:
    n = 40
    name = f"m_r{r}_s{seed}_{control}_{abs(hash((control, r, seed))) % 10**10:010d}"
    meta = {"cell_id": name[-10:], "name": name, "size": "m", "ratio": r, "tokens": 1000, "seed": seed,
            "config": {"data": {"mix": control, "schedule": "mixed"}}, "params_total": 1e5,
            "params_non_embedding": 1e5, "n_choices": 4, "data_stats": {}}
    w = RetentionWriter.open(run.cell(name).store, meta, [f"f{i}" for i in range(n)], np.zeros(n, np.int8),
                             np.arange(n), np.zeros(n, bool))
    correct = rng.random(n) < 0.9
    loss = _loss(control, r, rng)
    w.append(10, 320, 2.0, {"general_acc": float(correct.mean()), "heldout_loss": loss,
                            "heldout_bpb": BPB_PER_NAT * loss}, correct, None)
    w.mark_complete()
    w.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run, rng = RunPaths(tmp_path_factory.mktemp("heldout") / "grid"), np.random.default_rng(0)
    for r in RATIOS:
        for seed in (0, 1):
            _store(run, "infusion", r, seed, rng)
        _store(run, "fixed_general", r, 0, rng)
    run.config.write_text("analysis: {bootstrap: 20}\n")
    result = aggregate_runs([run.root], echo=lambda *_: None)
    rows = {row["control"]: row for row in json.loads((run.reports / "heldout.json").read_text())["heldout"]}
    return run, result, rows


def test_a_rise_in_heldout_loss_is_detected_near_its_ratio(report):
    _, result, rows = report
    inf = rows["infusion"]
    assert inf["flag"] == "ok" and inf["boot_method"] == "seeds"
    assert abs(math.log(inf["r_star"] / (1 - inf["r_star"])) - math.log(RISE_AT / (1 - RISE_AT))) < 0.5
    assert inf["r_star_lo"] < RISE_AT < inf["r_star_hi"]
    assert abs(inf["relative_increase"][0]) < 1e-12                # relative to the smallest-ratio cell itself
    assert inf["relative_increase"][-1] > 0.3 and inf["heldout_bpb"][-1] == pytest.approx(
        BPB_PER_NAT * inf["heldout_loss"][-1])
    assert [c.control for c in result.heldout] == ["infusion", "fixed_general"]


def test_fixed_general_view_is_reported_beside_infusion(report):
    run, _, rows = report
    fg = rows["fixed_general"]
    assert fg["reference_loss"] == rows["infusion"]["reference_loss"]   # one reference for both views
    assert fg["flag"] == "absent" and max(abs(v) for v in fg["relative_increase"]) < 0.1
    text = (run.reports / "heldout.md").read_text()
    assert "| m | 1e+03 | infusion |" in text and "| m | 1e+03 | fixed_general |" in text
    assert (run.reports / "heldout.png").stat().st_size > 0


def test_loss_score_falls_as_the_loss_rises():
    assert loss_score(3.0, 3.0) == 1.0 and loss_score(3.3, 3.0) == pytest.approx(0.9)
