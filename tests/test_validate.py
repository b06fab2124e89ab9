"""Validation planning: ratios placed around a law's prediction bracket the true collapse; `kislurm validate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kislurm.cli import main
from kislurm.analysis.collapse import Logistic, Measurement, detect_collapse, detect_collapses, ratio_axis
from kislurm.plan.loader import config_from_dict, config_to_dict
from kislurm.analysis.law import fit_law, predict_law
from kislurm.paths import RunPaths
from kislurm.analysis.validate import ValidationError, full_sweep, plan_ratios, validation_cells

A, B, STEEP = 1e-3, 0.6, 3.0            # true law odds(r*) = A N^B; every curve has steepness 3 in log-odds
FIT_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98, 0.99)


def true_r(n: float, scatter: float = 0.0) -> float:
    odds = A * n ** B * math.exp(scatter)
    return odds / (1 + odds)


def cells_at(rng: np.random.Generator, size: str, n: float, r_star: float, ratios, n_facts: int = 200):
    curve = Logistic(0.95, 0.1, float(ratio_axis(r_star)), STEEP)
    out = []
    for r in ratios:
        fc = (rng.random(n_facts) < curve(np.array([r]))[0]).astype(float)
        out.append(Measurement(size, n, r, 1e6, 0, float(fc.mean()), fc))
    return out


def test_planned_ratios_bracket_any_r_star_in_the_interval():
    for r_lo, r_hi, w, k in ((0.3, 0.5, 1 / 3, 4), (0.9, 0.97, 0.2, 5), (0.6, 0.61, None, 7)):
        ratios = plan_ratios(r_lo, r_hi, w, k)
        assert len(ratios) == k and ratios == sorted(ratios) and all(0 < r < 1 for r in ratios)
        x = ratio_axis(np.array(ratios))
        wid = w or 1 / 3
        # even if r* sits at either end of its interval, two ratios keep >= 75% and two lose >= 75% of the drop
        assert np.sum(x <= ratio_axis(r_lo) - math.log(3) * wid) >= 2
        assert np.sum(x >= ratio_axis(r_hi) + math.log(3) * wid) >= 2
    with pytest.raises(ValidationError, match="needs >= 4"):
        plan_ratios(0.3, 0.5, 0.3, 3)


def test_validation_ratios_from_a_fitted_law_bracket_the_true_collapse():
    """Ten seeded worlds whose sizes scatter about the law (sd 0.2 in log odds): the law fitted on four sizes
    places five ratios for a fifth, larger size. Whenever the true r* lies inside the 90% prediction interval the
    detected collapse is bracketed ('ok'), as the planner's margin guarantees; here that holds 9 times of 10
    (the tenth: the scatter put r* just below an interval narrowed by a chi2 < 1 fit, and the second ratio
    sat at the edge of the plateau). Bracketed collapses land close to the truth."""
    sizes = {f"s{i}": float(n) for i, n in enumerate(np.geomspace(1e5, 1e7, 4))}
    target = 5e7
    ok = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        ms = [m for s, n in sizes.items() for m in cells_at(rng, s, n, true_r(n, rng.normal(0, 0.2)), FIT_GRID)]
        law = fit_law(detect_collapses(ms, n_boot=60, confidence=0.9, rng=rng), unit="odds", n_boot=200,
                      confidence=0.9, rng=rng)
        pred = predict_law(law, target, safe=True)
        truth = true_r(target, rng.normal(0, 0.2))
        ratios = plan_ratios(pred.r_lo, pred.r_hi, pred.width, 5)
        c = detect_collapse(cells_at(rng, "v", target, truth, ratios), n_boot=60, confidence=0.9, rng=rng)
        assert ratios[0] < truth < ratios[-1], (seed, ratios, truth)
        if pred.r_lo <= truth <= pred.r_hi:
            assert c.flag == "ok", (seed, c.reason)
        if c.flag == "ok":
            ok += 1
            assert abs(ratio_axis(c.r_star) - ratio_axis(truth)) < 0.3
    assert ok >= 9


def _law_on_presets(sizes):
    rng = np.random.default_rng(0)
    from kislurm.plan.presets import BUILTIN_PRESETS

    ms = []
    for s in sizes:
        n = BUILTIN_PRESETS[s].param_counts(512)["non_embedding"]
        ms += cells_at(rng, s, n, 0.4 * n / 14496 / (1 + 0.4 * n / 14496), FIT_GRID)
    return fit_law(detect_collapses(ms, n_boot=40, confidence=0.9, rng=rng), unit="odds", n_boot=100,
                   confidence=0.9, rng=rng)


def test_validation_cells_and_their_errors():
    cfg = config_from_dict({"grid": {"sizes": ["cpu-xs", "cpu-s", "cpu-m"], "ratios": [0.1, 0.5, 0.9],
                                     "seeds": [0, 1]},
                            "analysis": {"validate_sizes": ["cpu-l"]}})
    law = _law_on_presets(["cpu-xs", "cpu-s", "cpu-m"])
    vp = validation_cells(cfg, law, "cpu-l", points=5)
    assert len(vp.ratios) == 5 and len(vp.cells) == 10 and {c.size for c in vp.cells} == {"cpu-l"}
    assert vp.ratios[1] < vp.prediction.r_lo and vp.ratios[-2] > vp.prediction.r_hi
    assert len({c.cell_id for c in vp.cells}) == 10
    sweep = full_sweep(cfg, "cpu-l")
    assert len(sweep) == 6 and {c.ratio for c in sweep} == {0.1, 0.5, 0.9}
    for size, needle in (("cpu-s", "'cpu-s' is fitted"), ("cpu-xl", "is not a validation size"),
                         ("nope", "unknown size")):
        with pytest.raises(ValidationError, match=needle) as e:
            validation_cells(cfg, law, size)
        assert "\n" not in str(e.value)
    with pytest.raises(ValidationError, match="needs >= 4"):
        validation_cells(cfg, law, "cpu-l", points=3)
    with pytest.raises(ValidationError, match="no law"):
        validation_cells(cfg, _law_on_presets(["cpu-xs"]), "cpu-l")


def test_cli_validate_refuses_a_run_without_a_law(tmp_path):
    cfg = config_from_dict({"name": "v", "output_root": str(tmp_path), "analysis": {"validate_sizes": ["cpu-l"]},
                            "grid": {"sizes": ["cpu-xs", "cpu-s"]}})
    run = RunPaths(tmp_path / "v")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = CliRunner().invoke(main, ["validate", str(run.root), "--size", "cpu-l", "--dry-run"])
    assert out.exit_code == 2
    lines = [s for s in out.output.splitlines() if s.strip()]
    assert len(lines) == 1 and "no law yet" in lines[0] and "kislurm aggregate" in lines[0]


def test_cli_validate_dry_run_on_an_aggregated_run(tmp_path):
    """Real stores of three presets collapsing on a known law; after `kislurm aggregate`, `kislurm validate
    --dry-run` plans the held-out size's cells with GPU-hours beside a full sweep, and refuses bad requests in
    one line."""
    from test_aggregate import write_cell

    from kislurm.plan.presets import BUILTIN_PRESETS

    run = RunPaths(tmp_path / "grid")
    rng = np.random.default_rng(0)
    for size in ("cpu-xs", "cpu-s", "cpu-m"):
        n = BUILTIN_PRESETS[size].param_counts(512)["non_embedding"]
        odds = 0.4 * n / 14496
        for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            write_cell(run, size, n, odds / (1 + odds), r, rng)
    run.config.write_text("name: grid\ngrid: {sizes: [cpu-xs, cpu-s, cpu-m], ratios: [0.1, 0.5, 0.9]}\n"
                          "analysis: {bootstrap: 30, metric: infused_acc, validate_sizes: [cpu-l]}\n")
    assert CliRunner().invoke(main, ["aggregate", str(run.root)]).exit_code == 0
    out = CliRunner().invoke(main, ["validate", str(run.root), "--size", "cpu-l", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "cpu-l (N=1e+05): predicted r*" in out.output and "ratios " in out.output
    assert len([s for s in out.output.splitlines() if s.strip().startswith("cpu-l_r")]) == 5
    assert "5 cells" in out.output and "a full sweep of cpu-l on the grid: 3 cells" in out.output
    assert not any(p.name.startswith("cpu-l") for p in run.cells.iterdir())      # a dry run adds nothing
    for args, needle in ((["--size", "cpu-s"], "'cpu-s' is fitted"), (["--size", "cpu-l", "--points", "3"],
                                                                      "needs >= 4")):
        out = CliRunner().invoke(main, ["validate", str(run.root), *args, "--dry-run"])
        lines = [s for s in out.output.splitlines() if s.strip()]
        assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0], out.output


def test_adaptive_ladder_brackets_every_rung_with_fewer_cells_than_the_fixed_grid():
    """Six seeded worlds, six sizes (1e5..3e7) scattering about the law by sd 0.2 in log odds. The fixed grid trains
    11 ratios at every size (66 cells) and misses the largest collapse (unbracketed-high) in 3 of 6. The adaptive
    ladder trains the two smallest on the same 11, then 5 ratios per size from the law so far, adding ratios
    until each rung's r* interval is < 0.2 wide in log-odds: every rung bracketed, 339 cells in all against 396,
    and a narrower exponent interval (median width 0.029 against 0.040)."""
    from kislurm.analysis.validate import adaptive_ladder

    sizes = {f"s{i}": float(n) for i, n in enumerate(np.geomspace(1e5, 3e7, 6))}
    cells, widths = np.zeros(2), [[], []]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        truth = {s: true_r(n, rng.normal(0, 0.2)) for s, n in sizes.items()}

        def measure(s, n, ratios, rng=rng, truth=truth):
            return cells_at(rng, s, n, truth[s], ratios)

        def fit(ms, rng=rng):
            cs = detect_collapses(ms, n_boot=60, confidence=0.9, rng=rng)
            return cs, fit_law(cs, unit="odds", n_boot=200, confidence=0.9, rng=rng)

        rungs, law = adaptive_ladder(sizes, list(FIT_GRID), measure, fit, points=5, target_width=0.2)
        assert [p.flag for p in law.points] == ["ok"] * 6
        for rung in rungs:
            assert rung.ratios[1] < truth[rung.size] < rung.ratios[-2], (seed, rung)
        _, fixed = fit(sum((measure(s, n, list(FIT_GRID)) for s, n in sizes.items()), []))
        cells += [sum(len(r.ratios) for r in rungs), len(FIT_GRID) * len(sizes)]
        for k, lw in enumerate((law, fixed)):
            widths[k].append(lw.b_interval[1] - lw.b_interval[0])
    assert cells[0] < cells[1] and cells.tolist() == [339, 396]
    assert np.median(widths[0]) < np.median(widths[1])


ADAPTIVE = {"name": "ladder", "grid": {"sizes": ["cpu-m", "cpu-xs", "cpu-s", "cpu-l"], "ratios": "adaptive",
                                       "start_ratios": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                                       "rung_points": 5},
            "analysis": {"bootstrap": 30, "metric": "infused_acc"}}


def test_adaptive_config_plans_the_two_smallest_first(tmp_path):
    from kislurm.plan.grid import expand, ladder_order

    cfg = config_from_dict({**ADAPTIVE, "output_root": str(tmp_path)})
    assert cfg.grid.adaptive and ladder_order(cfg) == ["cpu-xs", "cpu-s", "cpu-m", "cpu-l"]
    cells = expand(cfg)
    assert [(c.size, c.ratio) for c in cells][::9] == [("cpu-xs", 0.1), ("cpu-s", 0.1)] and len(cells) == 18
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**ADAPTIVE, "output_root": str(tmp_path)}))
    out = CliRunner().invoke(main, ["plan", str(tmp_path / "c.yaml")])
    assert out.exit_code == 0, out.output
    assert "adaptive ladder: 18 cells now" in out.output and "10 more expected" in out.output
    assert "28 cells" in out.output and "against 36 cells" in out.output
    bad = {**ADAPTIVE, "grid": {**ADAPTIVE["grid"], "start_ratios": [0.1, 0.5, 0.9]}}
    with pytest.raises(Exception, match="needs >= 4 start_ratios"):
        config_from_dict(bad)
    with pytest.raises(Exception, match="expected a list or one of 'adaptive'"):
        config_from_dict({"grid": {"ratios": "some"}})


def test_ladder_plan_places_each_rung_once_its_predecessors_are_done(tmp_path):
    from test_aggregate import write_cell

    from kislurm.analysis.aggregate import aggregate_runs
    from kislurm.plan.presets import BUILTIN_PRESETS
    from kislurm.plan.grid import expand
    from kislurm.orchestrate.ladder import ladder_plan

    cfg = config_from_dict({**ADAPTIVE, "output_root": str(tmp_path)})
    run = RunPaths(tmp_path / "ladder")

    def law_of(r):
        result = aggregate_runs([r.root], echo=lambda *_: None)
        return result.collapses, result.law

    cells, why = ladder_plan(cfg, run, law_of)
    assert cells == expand(cfg) and "cpu-m is placed once the 18 unfinished cells" in why
    run.cells.mkdir(parents=True)
    run.config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    rng = np.random.default_rng(0)
    mid = {}
    for c in cells:
        n = BUILTIN_PRESETS[c.size].param_counts(512)["non_embedding"]
        odds = 0.4 * n / 14496
        mid[c.size] = odds / (1 + odds)
        write_cell(run, c.size, n, mid[c.size], c.ratio, rng, name=c.name)
    cells, why = ladder_plan(cfg, run, law_of)
    rung = [c for c in cells if c.size == "cpu-m"]
    assert len(cells) == 23 and len(rung) == 5 and "cpu-m placed at ratios" in why
    n_m = BUILTIN_PRESETS["cpu-m"].param_counts(512)["non_embedding"]
    truth = 0.4 * n_m / 14496 / (1 + 0.4 * n_m / 14496)
    ratios = sorted(c.ratio for c in rung)
    assert ratios[1] < truth < ratios[-2]
    # once planned (cell.json written), a rung is read back, never re-placed; the next waits for it
    for c in rung:
        run.cell(c.name).root.mkdir(parents=True, exist_ok=True)
        run.cell(c.name).spec.write_text(json.dumps(c.to_json()))
    again, why = ladder_plan(cfg, run, law_of)
    assert [c.cell_id for c in again] == [c.cell_id for c in cells] and "cpu-l is placed once the 5" in why
    # the rung trained (60 facts: noisy): while its collapse is not bracketed, it gets ratios beyond the side it
    # missed; once it is, cpu-l is placed
    known, m_ratios = 23, set(ratios)
    for c in rung:
        write_cell(run, c.size, n_m, truth, c.ratio, rng, name=c.name)
    for _ in range(3):
        nxt, why = ladder_plan(cfg, run, law_of)
        added = nxt[known:]
        if "cpu-l placed at ratios" in why:
            break
        assert "cpu-m gets ratios" in why and "unbracketed" in why and {c.size for c in added} == {"cpu-m"}
        side = max if "unbracketed-high" in why else min
        assert all((c.ratio > max(m_ratios)) if side is max else (c.ratio < min(m_ratios)) for c in added)
        for c in added:   # as submitting them would: cell.json, then (trained) the store
            run.cell(c.name).root.mkdir(parents=True, exist_ok=True)
            run.cell(c.name).spec.write_text(json.dumps(c.to_json()))
            write_cell(run, c.size, n_m, truth, c.ratio, rng, name=c.name)
            m_ratios.add(c.ratio)
        known = len(nxt)
    assert "cpu-l placed at ratios" in why and {c.size for c in added} == {"cpu-l"} and len(added) == 5
    # asked for an r* interval narrower than it got, the bracketed cpu-m rung gets ratios across its interval first
    strict = config_from_dict({**ADAPTIVE, "output_root": str(tmp_path),
                               "analysis": {**ADAPTIVE["analysis"], "target_width": 0.01}})
    more, why = ladder_plan(strict, run, law_of)
    added = more[known:]
    assert {c.size for c in added} == {"cpu-m"} and "cpu-m gets ratios" in why and "(ok," in why
    assert added and not {c.ratio for c in added} & m_ratios
