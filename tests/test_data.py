"""Prepared data and per-cell blends with real megatron-core datasets: shares, exposures, caching, bad input."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import TINY_SEQ, tiny_data
from kislurm.data import folder
from kislurm.data import prepare as D
from kislurm.plan.config import DataConfig, EvalConfig, KnowledgeBaseSpec
from kislurm.plan.presets import BUILTIN_PRESETS
from kislurm.plan.training import TrainConfig
from kislurm.data.knowledge import DataError
from kislurm.plan.grid import Cell

torch.set_num_threads(1)
SEQ = TINY_SEQ
TINY = tiny_data()


def _cell(data: DataConfig, ratio: float, tokens: int = 102_400, seed: int = 0) -> Cell:
    """A cpu-xxs cell; 102,400 tokens = 100 steps of 32 x 32 = 3,200 samples."""
    return Cell("cpu-xxs", ratio, tokens, seed, BUILTIN_PRESETS["cpu-xxs"], data, TrainConfig(), EvalConfig())


@pytest.fixture
def prepared(prepared_tiny):
    return prepared_tiny  # built once per session (conftest), read-only to the cells


@pytest.fixture(scope="module")
def prepared_fe(tmp_path_factory):
    data = dataclasses.replace(TINY, policy="fixed_exposures", exposures_per_fact=8,
                               knowledge=KnowledgeBaseSpec(800, 2, 8))   # enough facts for r = 0.9
    return D.prepare(data, tmp_path_factory.mktemp("data_fe"), SEQ)


def _sentence_map(prepared) -> dict[tuple, int]:
    """Training sentence tokens -> index into prepared.probes.fact_ids, from the seen-template probes."""
    p, eod = prepared.probes, prepared.tokenizer.eod
    out = {}
    for i in np.flatnonzero(~p.heldout):
        key = (*p.prompt[i].tolist(), *p.candidates[i][p.answer[i]].tolist(), eod)
        out[key] = int(p.fact_index[i])
    return out


def _count_from_items(prepared, dataset, n: int) -> tuple[int, Counter]:
    """Read the first n samples through megatron's __getitem__: knowledge samples and per-fact exposures, checking
    that every sample is whole sentences followed by padding with loss_mask 0 exactly there."""
    sentences, eod = _sentence_map(prepared), prepared.tokenizer.eod
    knowledge, exposures = 0, Counter()
    for i in range(n):
        item = dataset[i]
        tokens, labels, mask = item["tokens"].tolist(), item["labels"].tolist(), item["loss_mask"]
        assert len(tokens) == SEQ and set(item) >= {"tokens", "labels", "loss_mask", "position_ids"}
        ends = [j for j, t in enumerate(tokens) if t == eod]   # megatron maps pad to 0 == eod in tokens
        content, start = [], 0
        for j in ends:
            key = tuple(tokens[start: j + 1])
            if key not in sentences:
                break
            content.append(sentences[key])
            start = j + 1
        assert content, f"sample {i} does not start with a whole fact sentence"
        # loss on every target inside the content except right after an EOD (eod_mask_loss, the workaround for
        # megatron's cached-loss-mask bug); none from the last EOD on (its target is padding)
        expected = [j < start - 1 and tokens[j] != eod for j in range(SEQ)]
        assert mask.bool().tolist() == expected, f"sample {i}"
        assert labels[: start - 1] == tokens[1:start]
        if int(item["dataset_id"]) == 1:
            knowledge += 1
            exposures.update(content)
    return knowledge, exposures


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 0.9])
def test_fixed_facts_share_and_exposures(prepared, ratio):
    cell = _cell(TINY, ratio)
    dataset, stats = D.cell_dataset(prepared, cell)
    n = cell.n_samples
    assert len(dataset) >= n and stats["n_samples"] == n
    assert abs(stats["knowledge_share_positions"] - ratio) <= 0.01 * ratio
    assert stats["samples_are_whole_documents"] and 0 < stats["knowledge_share_tokens"] < 1
    knowledge, exposures = _count_from_items(prepared, dataset, n)
    assert knowledge == stats["knowledge_samples"] == round(ratio * n)
    n_general = len(prepared.general.facts)
    infused = [exposures.get(n_general + f, 0) for f in range(len(prepared.knowledge.facts))]
    assert (min(infused), max(infused)) == (stats["exposures_per_fact_min"], stats["exposures_per_fact_max"])
    assert np.mean(infused) == pytest.approx(stats["exposures_per_fact_mean"])
    assert max(infused) - min(infused) <= 1                    # fixed facts: spread evenly over the base
    assert stats["infused_facts"] == len(prepared.knowledge.facts)
    assert stats["general_exposures_per_fact_min"] >= 0
    json.dumps(stats)


def test_fixed_facts_exposures_grow_with_ratio(prepared):
    means = [D.cell_dataset(prepared, _cell(TINY, r))[1]["exposures_per_fact_mean"] for r in (0.1, 0.5, 0.9)]
    assert means[0] < means[1] < means[2]


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 0.9])
def test_fixed_exposures_exact_and_probes_prefix(prepared_fe, ratio):
    cell = _cell(prepared_fe.data, ratio)
    dataset, stats = D.cell_dataset(prepared_fe, cell)
    assert abs(stats["knowledge_share_positions"] - ratio) <= 0.01 * ratio
    knowledge, exposures = _count_from_items(prepared_fe, dataset, cell.n_samples)
    n_general, facts = len(prepared_fe.general.facts), stats["infused_facts"]
    assert facts >= 1 and stats["exposures_per_fact_min"] == stats["exposures_per_fact_max"] == 8
    assert {f - n_general for f in exposures} == set(range(facts))   # exactly a prefix of the base
    assert set(exposures.values()) == {8}
    probes = D.cell_probes(prepared_fe, cell)
    full = prepared_fe.probes
    assert probes.fact_ids == full.fact_ids[: n_general + facts]
    assert int((probes.fact_group == 1).sum()) == facts
    first = int(np.flatnonzero(full.fact_index == n_general)[0]) if facts else 0
    assert all(np.array_equal(a, b) for a, b in zip(probes.prompt, full.prompt[: len(probes.prompt)]))
    assert len(probes.prompt) == first + facts * (TINY.train_templates + TINY.heldout_templates)
    assert not any(n_general + f in exposures for f in range(facts, len(prepared_fe.knowledge.facts)))


def test_fixed_exposures_facts_grow_with_ratio_and_too_small_base_fails(prepared_fe):
    facts = [D.cell_dataset(prepared_fe, _cell(prepared_fe.data, r))[1]["infused_facts"] for r in (0.01, 0.1)]
    assert facts[0] < facts[1]
    with pytest.raises(DataError) as e:       # 1600 facts at 8 exposures cannot fill 90% of 62,500 samples
        D.cell_dataset(prepared_fe, _cell(prepared_fe.data, 0.9, tokens=2_000_000))
    assert "knowledge base has" in str(e.value) and "\n" not in str(e.value)


def test_same_seed_same_bytes_and_samples(prepared, tmp_path):
    other = D.prepare(TINY, tmp_path, SEQ)
    for rel in ("tokenizer.json", "probes.npz", "general-L32/stream.bin", "general-L32/stream.idx"):
        assert (prepared.root / rel).read_bytes() == (other.root / rel).read_bytes(), rel
    a, _ = D.cell_dataset(prepared, _cell(TINY, 0.3))
    b, _ = D.cell_dataset(other, _cell(TINY, 0.3))
    assert Path(prepared.root.parent / "builds.log").exists()
    for i in range(0, len(a), 97):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])
    c, _ = D.cell_dataset(other, _cell(TINY, 0.3, seed=1))
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(50))


def test_cells_reuse_the_shared_build(tmp_path):
    first = D.prepare(TINY, tmp_path, SEQ)
    stream = first.root / "general-L32" / "stream.bin"
    mtime = stream.stat().st_mtime_ns
    for ratio in (0.2, 0.4):
        again = D.prepare(TINY, tmp_path, SEQ)
        D.cell_dataset(again, _cell(TINY, ratio))
        D.cell_dataset(again, _cell(TINY, ratio))          # second time: every megatron index is a cache hit
    assert stream.stat().st_mtime_ns == mtime
    log = (tmp_path / "builds.log").read_text().splitlines()
    streams = [str(Path(D.knowledge_stream(first, _cell(TINY, r))["prefix"]).parent.relative_to(tmp_path))
               for r in (0.2, 0.4)]
    assert [line.split()[0] for line in log] == [
        first.root.name, f"{first.root.name}/general-L32", *dict.fromkeys(streams)]   # each stream published once
    for ratio in (0.2, 0.4):                                # each cell's megatron cache: its own, listed complete
        cell_cache = first.cell_cache(_cell(TINY, ratio))
        assert len(json.loads((cell_cache / "complete.json").read_text())) == len(os.listdir(cell_cache)) - 1 > 0


def _prepare_in_child(args):
    data_dir, ratio = args
    torch.set_num_threads(1)
    p = D.prepare(TINY, Path(data_dir), SEQ)
    return str(p.root), D.knowledge_stream(p, _cell(TINY, ratio))["docs"]


def test_concurrent_prepare_builds_once(tmp_path):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_prepare_in_child, [(str(tmp_path), 0.5)] * 3)
    assert len(set(results)) == 1
    log = (tmp_path / "builds.log").read_text().splitlines()
    assert len(log) == 3 and len({line.split()[0] for line in log}) == 3   # base, general, knowledge: once each
    assert not list(tmp_path.glob("**/.tmp-*"))


def test_error_midway_leaves_nothing_and_a_retry_works(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(D, "_build_general_stream", broken)
    with pytest.raises(OSError):
        D.prepare(TINY, tmp_path, SEQ)
    root = next(tmp_path.glob("prep-*"))                    # the base was published before the stream failed
    assert not (root / "general-L32").exists() and not list(tmp_path.glob("**/.tmp-*"))
    monkeypatch.undo()
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    (root / f".tmp-general-L32-{folder.HOST}-{dead.pid}-deadbeef").mkdir()   # as a SIGKILLed builder here leaves it
    elsewhere = root / ".tmp-general-L32-othernode-1-cafecafe"            # another node's: may still be writing
    elsewhere.mkdir()
    p = D.prepare(TINY, tmp_path, SEQ)
    assert (p.root / "general-L32" / "stream.idx").is_file()
    assert list(tmp_path.glob("**/.tmp-*")) == [elsewhere]
    cell = _cell(TINY, 0.5)
    p.cell_cache(cell).mkdir(parents=True)
    (p.cell_cache(cell) / "deadbeef-GPTDataset-train-shuffle_index.npy").write_bytes(b"half")   # a crashed write
    D.cell_dataset(p, cell)
    assert not (p.cell_cache(cell) / "deadbeef-GPTDataset-train-shuffle_index.npy").exists()


def test_a_lost_publication_race_keeps_the_published_copy(tmp_path):
    p = D.prepare(TINY, tmp_path, SEQ)
    target = p.root / "general-L32"
    before = (target / "stream.bin").read_bytes()
    with folder.publish_folder(target, tmp_path) as tmp:                # another writer published first (no lock shared)
        (tmp / "stream.bin").write_bytes(b"other")
    assert (target / "stream.bin").read_bytes() == before and not list(tmp_path.glob("**/.tmp-*"))


def test_cells_only_read_prepared_data(tmp_path):
    from kislurm.plan.loader import load_config
    from kislurm.plan.grid import expand

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", {"output_root": str(tmp_path)})
    cells = expand(cfg)
    data_dir, seq = tmp_path / "tiny" / "data", cells[0].model.seq_length
    with pytest.raises(DataError) as e:
        D.load_prepared(cfg.data, data_dir, seq)
    assert "kislurm prepare" in str(e.value) and "\n" not in str(e.value)
    D.prepare(cfg.data, data_dir, seq)                      # base only: the cells' streams are still missing
    readonly = D.load_prepared(cfg.data, data_dir, seq)
    with pytest.raises(DataError) as e:
        D.cell_dataset(readonly, cells[0])
    assert "kislurm prepare" in str(e.value) and cells[0].name in str(e.value)
    assert not list((readonly.root).glob("knowledge-L*/*"))
    ticks = []
    summary = D.prepare_run(cfg, progress=ticks.append)
    assert summary["cells"] == len(cells) == len(ticks) and summary["streams"] >= 1
    assert summary["built"] and all(b.startswith(readonly.root.name + "/knowledge-L") for b in summary["built"])
    assert summary["bytes_written"] > 0
    _, stats = D.cell_dataset(D.load_prepared(cfg.data, data_dir, seq), cells[0])
    assert stats["knowledge_samples"] > 0
    again = D.prepare_run(cfg)
    assert again["built"] == [] and again["streams"] == summary["streams"]


def _assert_clean(data_dir: Path) -> None:
    assert not list(data_dir.glob("prep-*")) and not list(data_dir.glob("**/.tmp-*"))


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_inputs_are_one_line_errors_and_leave_nothing(tmp_path):
    t = _write(tmp_path / "t.yaml", "born_in:\n  train: ['{subject} was born in {object}']\n  heldout: []\n")
    good = "".join(f"P{i}\tborn_in\tCity{i % 5}\n" for i in range(20))
    cases = {
        "malformed": (dict(knowledge_triplets=_write(tmp_path / "k1.tsv", good + "Zed\tborn_in\n")), "k1.tsv:21:"),
        "no templates": (dict(knowledge_triplets=_write(tmp_path / "k2.tsv", good + "Zed\tworks_at\tAcme\n")),
                         "works_at"),
        "empty": (dict(knowledge_triplets=_write(tmp_path / "k3.tsv", "\n")), "no facts"),
    }
    for name, (kw, expect) in cases.items():
        cfg = DataConfig(source="triplets", templates_file=t, general_triplets=_write(tmp_path / "g.tsv", good),
                         distractors=3, **kw)
        with pytest.raises(DataError) as e:
            D.prepare(cfg, tmp_path / name, SEQ)
        assert expect in str(e.value) and "\n" not in str(e.value), name
        _assert_clean(tmp_path / name)
    tok_file = tmp_path / "tok.json"
    D.prepare(TINY, tmp_path / "src", SEQ).tokenizer.save(tok_file)
    cfg = dataclasses.replace(TINY, tokenizer=str(tok_file))
    tok_file.unlink()                                         # removed between submission and the job
    with pytest.raises(DataError) as e:
        D.prepare(cfg, tmp_path / "tok", SEQ)
    assert "tok.json" in str(e.value)
    _assert_clean(tmp_path / "tok")


def test_missing_prefix_and_bad_ratio(prepared, tmp_path):
    probes = _write(tmp_path / "gp.jsonl", "")
    cfg = DataConfig(general_prefix=str(tmp_path / "corpus"), general_probes=probes, tokenizer=None)
    with pytest.raises(DataError) as e:
        D.prepare(cfg, tmp_path / "d", SEQ)
    assert "\n" not in str(e.value)
    (tmp_path / "tok.json").write_text(prepared.tokenizer.tok.to_str())
    cfg = dataclasses.replace(cfg, tokenizer=str(tmp_path / "tok.json"))
    with pytest.raises(DataError) as e:
        D.prepare(cfg, tmp_path / "d", SEQ)
    assert "corpus.bin not found" in str(e.value)
    _assert_clean(tmp_path / "d")
    for ratio in (0.0, 1.0, 1.5, -0.1):
        cell = dataclasses.replace(_cell(TINY, 0.5), ratio=ratio)
        with pytest.raises(DataError) as e:
            D.cell_dataset(prepared, cell)
        assert "strictly between 0 and 1" in str(e.value)


def test_user_corpus_as_general_stream(prepared, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = prepared.tokenizer
    (tmp_path / "tok.json").write_text(tok.tok.to_str())
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), dtype=np.uint16)
    for _ in range(300):                                      # variable-length documents ending in EOD
        doc = np.append(rng.integers(2, tok.vocab_size, size=int(rng.integers(5, 80))), tok.eod)
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "corpus.idx"))
    facts = [{"subject": f"Person{i}", "relation": "born_in", "object": f"Town{i % 6}"} for i in range(12)]
    gp = _write(tmp_path / "gp.jsonl", "\n".join(json.dumps(f) for f in facts))
    t = _write(tmp_path / "t.yaml", "born_in: {train: ['{subject} was born in {object}'], heldout: []}\n")
    cfg = dataclasses.replace(TINY, general_prefix=str(tmp_path / "corpus"), general_probes=gp, templates_file=t,
                              tokenizer=str(tmp_path / "tok.json"))
    p = D.prepare(cfg, tmp_path / "d", SEQ)
    assert p.general_prefix == str(tmp_path / "corpus") and len(p.general.facts) == 12
    assert int((p.probes.fact_group == 0).sum()) == 12
    dataset, stats = D.cell_dataset(p, _cell(cfg, 0.25))
    assert abs(stats["knowledge_share_positions"] - 0.25) <= 0.0025
    assert stats["general_exposures_per_fact_mean"] is None and stats["general_tokens_assumed_unpadded"]
    general = next(dataset[i] for i in range(len(dataset)) if int(dataset[i]["dataset_id"]) == 0)
    expected = (general["tokens"] != tok.eod).float()       # packed across documents: no padding
    expected[-1] = 0.0                                          # no extra token: the last position has no target
    assert torch.equal(general["loss_mask"], expected)


def test_caller_process_group_is_kept(prepared):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dataset, stats = D.cell_dataset(prepared, _cell(TINY, 0.7))
        assert dist.is_initialized() and stats["samples_are_whole_documents"]
    finally:
        dist.destroy_process_group()
    D.cell_dataset(prepared, _cell(TINY, 0.7))
    assert not dist.is_initialized()                           # our own one-process group is torn down


def test_seq_length_mismatch(prepared):
    cell = dataclasses.replace(_cell(TINY, 0.5), model=dataclasses.replace(BUILTIN_PRESETS["cpu-xxs"],
                                                                           seq_length=64))
    with pytest.raises(DataError) as e:
        D.cell_dataset(prepared, cell)
    assert "seq_length" in str(e.value)
