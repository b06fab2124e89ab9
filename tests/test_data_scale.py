"""A 1B-token cell at seq_length 2048 with real megatron-core indices: the knowledge stream follows the base, not the
budget, and the shares and exposures are still exact (seconds on 2 cores: megatron's indices are the only part that
grows with the budget)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kislurm.data import prepare as D
from kislurm.data import streams
from kislurm.data.encoding import Sentences
from kislurm.plan.config import DataConfig, EvalConfig, KnowledgeBaseSpec
from kislurm.plan.presets import BUILTIN_PRESETS
from kislurm.plan.training import TrainConfig
from kislurm.plan.grid import Cell

torch.set_num_threads(1)
SEQ = 2048
TOKENS = 1_000_000_000
BASE = DataConfig(general=KnowledgeBaseSpec(40, 2, 8), knowledge=KnowledgeBaseSpec(1500, 2, 8), vocab_size=300)
PRESET = dataclasses.replace(BUILTIN_PRESETS["cpu-xxs"], seq_length=SEQ)


def _cell(data: DataConfig, ratio: float, tokens: int = TOKENS, seed: int = 0) -> Cell:
    return Cell("cpu-xxs", ratio, tokens, seed, PRESET, data, TrainConfig(), EvalConfig())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return D.prepare(BASE, tmp_path_factory.mktemp("data"), SEQ)


def _exposures_for(prepared, ratio: float) -> int:
    """fixed_exposures at an E at which about 80% of the base fits this ratio (a multiple of the pass units)."""
    s = Sentences.load(prepared.root / "knowledge_sentences.npz")
    k = _cell(BASE, ratio).knowledge_samples
    e = int(1.25 * k * SEQ / (s.n_facts * s.lengths.mean()))
    return max(streams.PASS_UNITS, e - e % streams.PASS_UNITS)


def _one_pass_bytes(prepared) -> int:
    s = Sentences.load(prepared.root / "knowledge_sentences.npz")
    _, bounds = streams.pack_units(s, s.n_facts, 1, SEQ, BASE.seed)
    return (len(bounds) - 1) * SEQ * np.dtype(prepared.tokenizer.dtype).itemsize


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("policy", ["fixed_facts", "fixed_exposures"])
def test_1b_token_cell_share_exposures_and_flat_stream(prepared, policy, ratio):
    data = BASE if policy == "fixed_facts" else dataclasses.replace(
        BASE, policy=policy, exposures_per_fact=_exposures_for(prepared, ratio))
    p = D.prepare(data, prepared.root.parent, SEQ)
    assert p.root == prepared.root                        # one base for both policies and every E
    cell = _cell(data, ratio)
    dataset, stats = D.cell_dataset(p, cell)
    n, kinfo = cell.n_samples, D.knowledge_stream(p, cell)
    assert n > 480_000 and len(dataset) >= n
    assert abs(stats["knowledge_share_positions"] - ratio) <= 0.01 * ratio
    assert stats["knowledge_samples"] == kinfo["epochs"] * kinfo["docs"] and kinfo["epochs"] > 1
    assert stats["samples_are_whole_documents"]
    if policy == "fixed_facts":
        assert stats["infused_facts"] == len(p.knowledge.facts)
        assert stats["exposures_per_fact_max"] - stats["exposures_per_fact_min"] <= 1
        assert stats["exposures_per_fact_min"] == kinfo["epochs"] * kinfo["units"]
    else:
        assert stats["exposures_per_fact_min"] == stats["exposures_per_fact_max"] == data.exposures_per_fact
        assert 0 < stats["infused_facts"] <= len(p.knowledge.facts)
    # the stream holds at most PASS_UNITS passes (plus split documents) whatever the budget
    stream_bytes = os.path.getsize(kinfo["prefix"] + ".bin")
    assert stream_bytes <= (streams.PASS_UNITS + 2) * _one_pass_bytes(p)
    assert stats["neighbour_sharing_max"] <= 1.0 and 0 < stats["neighbour_sharing_mean"] < 0.25


def test_1b_token_cells_byte_identical_per_seed(prepared, tmp_path):
    other = D.prepare(BASE, tmp_path, SEQ)
    cell = _cell(BASE, 0.3)
    a_info, b_info = D.knowledge_stream(prepared, cell), D.knowledge_stream(other, cell)
    for ext in (".bin", ".idx"):
        assert Path(a_info["prefix"] + ext).read_bytes() == Path(b_info["prefix"] + ext).read_bytes()
    a, _ = D.cell_dataset(prepared, cell)
    b, _ = D.cell_dataset(other, cell)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, cell.n_samples, size=64)
    assert all(torch.equal(a[int(i)]["tokens"], b[int(i)]["tokens"]) for i in picks)
    c, _ = D.cell_dataset(other, _cell(BASE, 0.3, seed=1))
    assert any(not torch.equal(a[int(i)]["tokens"], c[int(i)]["tokens"]) for i in picks)


def test_neighbour_sharing_counts_pairs_per_pass():
    # 4 facts, 2 passes: {0,1} {2,3} then {0,2} {1,3}: every sharing pair shares 1 of 2 exposures
    fact = np.array([0, 1, 2, 3, 0, 2, 1, 3])
    sharing = streams.neighbour_sharing(fact, np.array([0, 2, 4, 6, 8]), passes=2)
    assert sharing["max"] == 0.5 and sharing["mean_sharing_pairs"] == 0.5
    assert sharing["mean_all_pairs"] == pytest.approx(8 / 2 / (4 * 3))     # 8 (fact, neighbour) incidences
    repeated = streams.neighbour_sharing(np.array([0, 1, 2, 3, 0, 1, 2, 3]), np.array([0, 2, 4, 6, 8]), passes=2)
    assert repeated["max"] == 1.0                                         # one packing repeated: always together


def test_fixed_exposures_units_divide_e():
    assert [streams.units_for(e) for e in (8, 64, 100, 128, 101)] == [8, 64, 50, 64, 1]
