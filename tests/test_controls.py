"""Issue 17's controls: each control's stream holds what it should, counted through megatron-core's own datasets
(items read with __getitem__ and the stats kislurm derives from megatron's indices), ids of infusion cells stay put,
and the decision rules decide what they claim on curves of known shape."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import TINY_SEQ, tiny_data
from kislurm.data import prepare as D
from kislurm.analysis.collapse import Measurement, detect_collapse
from kislurm.plan.config import ConfigError, EvalConfig
from kislurm.plan.loader import load_config
from kislurm.plan.presets import BUILTIN_PRESETS
from kislurm.plan.training import TrainConfig
from kislurm.analysis.controls import rule_exposure, rule_interference, rule_staged, staged_drops, ControlCurve, verdict
from kislurm.analysis.pilot import pilot_cells
from kislurm.plan.grid import Cell, control_data, expand

torch.set_num_threads(1)
SEQ = TINY_SEQ
TINY = tiny_data()
TOKENS = 102_400   # 100 steps of 32 x 32 = 3,200 samples


def _cell(control: str, ratio: float, tokens: int = TOKENS, **data) -> Cell:
    cfg = control_data(dataclasses.replace(TINY, **data), control, tokens, 0.1)
    return Cell("cpu-xxs", ratio, tokens, 0, BUILTIN_PRESETS["cpu-xxs"], cfg, TrainConfig(), EvalConfig())


@pytest.fixture
def prepared(prepared_tiny):
    return prepared_tiny  # built once per session (conftest), read-only to the cells


def _fact_sentences(prepared) -> dict[tuple, int]:
    """Every trained fact sentence (seen-template probe + answer + EOD) -> its fact index in prepared.probes."""
    p, eod = prepared.probes, prepared.tokenizer.eod
    return {(*p.prompt[i].tolist(), *p.candidates[i][p.answer[i]].tolist(), eod): int(p.fact_index[i])
            for i in np.flatnonzero(~p.heldout)}


def _read(prepared, dataset, lo: int, hi: int) -> list[tuple[int, list[tuple]]]:
    """(dataset_id, sentences) of samples lo..hi-1 through megatron's __getitem__ (pad reads as EOD: dropped)."""
    eod, out = prepared.tokenizer.eod, []
    for i in range(lo, hi):
        item = dataset[i]
        tokens = item["tokens"].tolist()
        sentences, start = [], 0
        for j, t in enumerate(tokens):
            if t == eod:
                if j > start:
                    sentences.append(tuple(tokens[start: j + 1]))
                start = j + 1
        out.append((int(item["dataset_id"]), sentences))
    return out


def test_infusion_ids_unchanged_and_controls_get_their_own():
    plain = expand(load_config("configs/demo.yaml"))
    with_controls = expand(load_config("configs/demo.yaml", {
        "grid.controls": ["infusion", "fixed_general", "dilution", "staged"], "data.reference_ratio": 0.5,
        "data.stage_tokens": 100_000}))
    assert [c.cell_id for c in with_controls if c.control == "infusion"] == [c.cell_id for c in plain]
    assert len({c.cell_id for c in with_controls}) == 4 * len(plain)
    staged = [c for c in with_controls if c.control == "staged"]
    assert all("_staged_" in c.name and c.phase1_steps in c.eval_steps for c in staged)
    assert {c.data.reference_ratio for c in with_controls if c.control == "fixed_general"} == {0.5}
    assert {c.data.reference_ratio for c in with_controls if c.control != "fixed_general"} == {None}
    default_ref = expand(load_config("configs/demo.yaml", {"grid.controls": ["fixed_general"]}))
    assert {c.data.reference_ratio for c in default_ref} == {0.1}   # the grid's smallest ratio
    cfg = load_config("configs/demo-controls.yaml")
    assert [(c.control, c.ratio) for c in pilot_cells(cfg)] == [("infusion", 0.2), ("infusion", 0.98)]


def test_fixed_general_keeps_the_general_samples(prepared):
    reference = _cell("infusion", 0.5)
    g = reference.n_samples - round(0.5 * reference.n_samples)   # the reference cell's planned general samples
    sizes = []
    for r in (0.1, 0.5, 0.9):
        cell = _cell("fixed_general", r, reference_ratio=0.5)
        dataset, stats = D.cell_dataset(prepared, cell)
        items = _read(prepared, dataset, 0, cell.n_samples)
        general = sum(1 for d, _ in items if d == 0)
        assert general == stats["general_samples"] and stats["general_samples_target"] == g
        # G exactly, plus the knowledge stream's remainder K - K' (fewer than its M epochs), as in every cell
        assert 0 <= general - g < stats["knowledge_epochs"]
        assert cell.n_samples - general == stats["knowledge_samples"]
        assert abs(stats["knowledge_samples"] / cell.n_samples - r) < 32 / cell.n_samples   # within one batch
        sizes.append(cell.n_samples)
    assert sizes[0] < sizes[1] == reference.n_samples < sizes[2]   # tokens and steps grow with r


def test_dilution_holds_neutral_text_each_sentence_once(prepared):
    facts = _fact_sentences(prepared)
    subjects = {f.subject for kb in (prepared.general, prepared.knowledge) for f in kb.facts}
    for r in (0.3, 0.9):
        infusion, dilution = _cell("infusion", r), _cell("dilution", r)
        _, inf_stats = D.cell_dataset(prepared, infusion)
        dataset, stats = D.cell_dataset(prepared, dilution)
        items = _read(prepared, dataset, 0, dilution.n_samples)
        neutral = [s for d, ss in items if d == 1 for s in ss]
        general = [s for d, ss in items if d == 0 for s in ss]
        assert dilution.n_samples == infusion.n_samples
        assert sum(d == 1 for d, _ in items) == stats["knowledge_samples"] == inf_stats["knowledge_samples"]
        assert stats["general_exposures_per_fact_mean"] == inf_stats["general_exposures_per_fact_mean"]
        assert all(s in facts for s in general)
        assert not any(s in facts for s in neutral)                  # no general or infused fact sentence
        assert max(Counter(neutral).values()) == 1                   # no sentence trained twice
        assert stats["neutral_facts_max_exposures"] == stats["neutral_docs_max_draws"] == 1
        assert stats["neutral_sentences_trained"] == len(neutral)
        texts = [prepared.tokenizer.decode(s) for s in neutral[:300]]
        assert not any(w in subjects for t in texts for w in t.replace(".", " ").split())
        # the same template style and length: tokens per knowledge sample within 10% of the infusion cell's
        assert stats["knowledge_tokens"] == pytest.approx(inf_stats["knowledge_tokens"], rel=0.1)
        assert stats["infused_facts"] == 0


def test_staged_general_phase_first_then_the_mix(prepared):
    facts = _fact_sentences(prepared)
    n_general = len(prepared.general.facts)
    r = 0.8
    cell = _cell("staged", r, stage_tokens=30_000)
    infusion = _cell("infusion", r)
    dataset, stats = D.cell_dataset(prepared, cell)
    n1 = cell.phase1_samples
    assert cell.phase1_steps == 30 and n1 == 960 and cell.n_samples == n1 + infusion.n_samples
    assert cell.phase1_steps in cell.eval_steps
    phase1 = _read(prepared, dataset, 0, n1)
    phase2 = _read(prepared, dataset, n1, cell.n_samples)
    assert {d for d, _ in phase1} == {0} and all(dataset[i]["phase"] == 1 for i in (0, n1 - 1))
    assert dataset[n1]["phase"] == 2
    exposures1 = Counter(facts[s] for _, ss in phase1 for s in ss)
    assert set(exposures1) <= set(range(n_general))                 # phase 1: general facts only
    assert np.mean([exposures1.get(f, 0) for f in range(n_general)]) == pytest.approx(
        stats["phase1_general_exposures_per_fact_mean"])
    k = sum(d == 1 for d, _ in phase2)
    assert k == stats["knowledge_samples"] == round(r * infusion.n_samples)   # the infusion cell's share
    assert stats["n_samples"] == cell.n_samples and stats["phase1_samples"] == n1


def _measurements(midpoint: float, ratios, facts: int = 400, seed: int = 0, plateau: float = 0.9,
                  floor: float = 0.25, size: str = "m") -> list[Measurement]:
    rng = np.random.default_rng(seed)
    out = []
    for r in ratios:
        p = floor + (plateau - floor) / (1 + np.exp(6.0 * (np.log(r / (1 - r)) - np.log(midpoint / (1 - midpoint)))))
        correct = (rng.random(facts) < p).astype(float)
        out.append(Measurement(size=size, params=1e5, ratio=r, tokens=5e5, seed=0, retention=float(correct.mean()),
                               fact_correct=correct, n_choices=4))
    return out


RATIOS = [0.1, 0.2, 0.4, 0.6, 0.75, 0.85, 0.92, 0.96, 0.98]


def _fit(midpoint: float, seed: int = 0, **kw):
    return detect_collapse(_measurements(midpoint, RATIOS, seed=seed, **kw), n_boot=100, confidence=0.9,
                           rng=np.random.default_rng(seed))


def test_rules_tell_interference_from_dilution_and_under_exposure():
    inf = _fit(0.6)
    assert inf.flag == "ok"
    assert rule_interference(inf, _fit(0.93, seed=1)) == "interferes"     # dilution collapses much later
    assert rule_interference(inf, _fit(0.6, seed=2)) == "dilution"        # same collapse: the drop is dilution
    flat = detect_collapse(_measurements(0.999999, RATIOS, seed=3), n_boot=50, confidence=0.9,
                           rng=np.random.default_rng(3))
    assert flat.flag == "absent"
    assert rule_exposure(inf, flat, chance=0.25) == "under-exposure"     # restoring exposures removes it
    assert rule_exposure(inf, _fit(0.6, seed=4), chance=0.25) == "not under-exposure"
    at_chance = detect_collapse(_measurements(0.999999, RATIOS, seed=5, plateau=0.26), n_boot=50,
                                confidence=0.9, rng=np.random.default_rng(5))
    assert rule_exposure(inf, at_chance, chance=0.25) == "not judged"      # a floor leaves no room to drop


def test_staged_rule_counts_only_drops_beyond_their_interval():
    inf = _fit(0.6)
    final = _fit(0.6, seed=6)
    boundary = np.full(len(RATIOS), 0.9)
    drops = staged_drops(ControlCurve("staged", final, None, boundary, 400), inf, z=1.645)
    assert rule_staged(drops).startswith("forgetting at r = ") and "0.98" in rule_staged(drops)
    assert "0.1," not in rule_staged(drops)                      # on the plateau nothing is lost
    assert verdict("dilution", "not under-exposure", rule_staged(drops), drops) == "forgetting"
    same = staged_drops(ControlCurve("staged", final, None, final.retention.copy(), 400), inf, z=1.645)
    assert rule_staged(same) == "no forgetting"
    assert verdict("dilution", "under-exposure", "no forgetting", same) == "under-exposure"
    assert verdict("dilution", "not under-exposure", "no forgetting", same) == "neither"


@pytest.mark.parametrize("overrides, words", [
    ({"grid.controls": ["infusion", "forgetting"]}, "unknown control 'forgetting'"),
    ({"grid.controls": ["dilution", "dilution"]}, "expected distinct controls"),
    ({"data.mix": "fixed_general", "data.schedule": "staged"}, "staged works on the infusion mix only"),
    ({"data.mix": "dilution", "data.policy": "fixed_exposures"}, "needs policy: fixed_facts"),
    ({"data.reference_ratio": 1.0}, "strictly between 0 and 1"),
])
def test_bad_control_settings_are_one_line_errors(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def _store(run, control: str, ratio: float, level: float, rng, boundary: float | None = None) -> None:
    """A finished store of size m under `control`: general facts retained at `level` at the end (and, staged, at
    `boundary` after the general phase, step 10)."""
    from kislurm.retention.store import RetentionWriter

    n = 200
    data = {"mix": "infusion" if control in ("infusion", "staged") else control,
            "schedule": "staged" if control == "staged" else "mixed"}
    name = f"m_r{ratio}_s0_{control}_{abs(hash((control, ratio))) % 10**10:010d}"
    meta = {"cell_id": name[-10:], "name": name, "size": "m", "ratio": ratio, "tokens": 1000, "seed": 0,
            "config": {"data": data}, "params_total": 1e5, "params_non_embedding": 1e5, "n_choices": 4,
            "data_stats": {"infused_facts": n // 2, "phase1_steps": 10 if control == "staged" else None,
                           "general_exposures_per_fact_mean": 100 * (1 - ratio)}}
    group = (np.arange(n) % 2).astype(np.int8)
    w = RetentionWriter.open(run.cell(name).store, meta, [f"f{i}" for i in range(n)], group, np.arange(n),
                             np.zeros(n, bool))
    for step, p in ((10, boundary if boundary is not None else level), (20, level)):
        correct = rng.random(n) < np.where(group == 1, 0.5, p)
        w.append(step, step * 32, 2.0, {"general_acc": float(correct[group == 0].mean())}, correct, None)
    w.mark_complete()
    w.close()


def test_aggregate_fits_the_law_on_infusion_and_judges_the_controls(tmp_path):
    from kislurm.analysis.aggregate import aggregate_runs
    from kislurm.paths import RunPaths

    run, rng = RunPaths(tmp_path / "ctl"), np.random.default_rng(0)
    level = lambda r, mid: 0.25 + 0.7 / (1 + np.exp(6 * (np.log(r / (1 - r)) - np.log(mid / (1 - mid)))))
    for r in RATIOS:
        _store(run, "infusion", r, level(r, 0.6), rng)
        _store(run, "dilution", r, level(r, 0.93), rng)       # collapses far later: the knowledge interferes
        _store(run, "fixed_general", r, 0.9, rng)             # holding the general exposures removes it
        _store(run, "staged", r, level(r, 0.6), rng, boundary=0.95)
    run.config.write_text("analysis: {bootstrap: 50}\n")
    result = aggregate_runs([run.root], echo=lambda *_: None)
    assert [c.n_cells for c in result.collapses] == [len(RATIOS)]        # the law's collapse: infusion cells only
    (v,) = result.controls
    assert (v.interference, v.exposure, v.verdict) == ("interferes", "under-exposure", "both")
    assert v.forgetting_index > 0 and v.fi_lo > 0
    assert v.staged.startswith("forgetting at r = ") and "0.98" in v.staged and "0.1," not in v.staged
    text = (run.reports / "controls.md").read_text()
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| m | "):
            rows.setdefault(line.split(" | ")[1], line)   # the first table: collapse points per control
    assert "| absent |" in rows["fixed_general"] and "| ok |" in rows["infusion"]
    assert "staged, end of phase 1" in rows
    assert (run.reports / "controls.png").stat().st_size > 0 and (run.reports / "exposures.png").stat().st_size > 0
