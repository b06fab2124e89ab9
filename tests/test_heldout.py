"""Held-out general loss (issue 25): documents no cell trains on, scored at every evaluation as mean loss and bits per
byte; against an unbatched float64 reference, and DP=2 against DP=1 on a real megatron-core GPTModel (CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_two_tasks
from kislurm.data.knowledge import HeldoutDocs
from kislurm.data.streams import heldout_mask
from kislurm.retention.evaluate import heldout_loss
from kislurm.train.distributed import init_model_parallel, seed_all, teardown
from kislurm.train.model import build_model
from test_evaluate import PRESET, SEED, VOCAB, model  # noqa: F401 (cpu-s, seq 32; the shared model fixture)


def _docs() -> HeldoutDocs:
    """Documents of 1 to 45 tokens (seq_length 32: the 45-token one is scored in two pieces)."""
    rng = np.random.default_rng(5)
    lengths = [3, 9, 17, 31, 32, 45, 1, 12, 20, 8, 5]
    return HeldoutDocs([rng.integers(0, VOCAB - 1, n).astype(np.int32) for n in lengths],
                       np.array([4 * n + 1 for n in lengths], dtype=np.int64), VOCAB - 1)


def _reference(model, docs: HeldoutDocs, window: int = PRESET.seq_length) -> tuple[float, int]:
    """Summed NLL, one unpadded forward per piece of at most seq_length tokens, float64 log-softmax of all logits."""
    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for doc in docs.tokens:
            doc = doc.astype(np.int64)
            for start in range(0, len(doc), window):
                piece = doc[start: start + window]
                seq = torch.as_tensor(np.concatenate([[docs.context if start == 0 else doc[start - 1]], piece[:-1]]))
                pos = torch.arange(len(seq))[None]
                mask = torch.tril(torch.ones(len(seq), len(seq), dtype=torch.bool)).logical_not()[None, None]
                logits = model(input_ids=seq[None], position_ids=pos, attention_mask=mask)[0].double()
                logp = torch.log_softmax(logits, -1)
                nll -= float(logp[torch.arange(len(piece)), torch.as_tensor(piece)].sum())
                n += len(piece)
    return nll, n


def test_mean_loss_and_bits_per_byte_equal_an_unbatched_reference(model):
    docs = _docs()
    got = heldout_loss(model, docs, batch_size=4)
    nll, n = _reference(model, docs)
    assert n == sum(len(d) for d in docs.tokens)           # every token scored once, the 45-token one in 2 pieces
    assert got["heldout_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["heldout_bpb"] == pytest.approx(nll / (math.log(2) * int(docs.n_bytes.sum())), rel=1e-5)
    assert heldout_loss(model, docs, batch_size=64) == pytest.approx(got, rel=1e-9)   # batching changes nothing


def _heldout_dp2(docs: HeldoutDocs) -> tuple[int, dict]:
    torch.set_num_threads(1)
    ctx = init_model_parallel(tp=1, expected_world=2)
    try:
        seed_all(SEED)
        gpt = build_model(PRESET, VOCAB, 0.02, "fp32")
        return ctx.dp_rank, heldout_loss(gpt, docs, batch_size=3)
    finally:
        teardown(ctx)


def test_data_parallel_2_gives_dp1_within_1e9(model, tmp_path):
    results = run_two_tasks(tmp_path / "jobs", _heldout_dp2, _docs(), timeout_min=5)
    reference = heldout_loss(model, _docs(), batch_size=3)
    assert sorted(rank for rank, _ in results) == [0, 1]
    for _, got in results:
        for key, value in reference.items():
            assert abs(got[key] - value) <= 1e-9 * abs(value), key


def test_prepare_holds_documents_out_of_the_general_stream(tmp_path):
    """The general stream of a run with heldout_general: the held-out sentences (a hash of the index, spread over
    the stream) are not in it, and heldout.npz holds them without their EOD, with their UTF-8 bytes."""
    from kislurm.data import prepare as D
    from kislurm.plan.config import DataConfig, KnowledgeBaseSpec

    data = DataConfig(general=KnowledgeBaseSpec(60, 2, 8), knowledge=KnowledgeBaseSpec(20, 2, 8), vocab_size=300,
                      heldout_general=0.1)
    prepared = D.prepare(data, tmp_path, 32)
    gdir = Path(prepared.general_prefix).parent
    z = np.load(gdir / "heldout.npz")
    s = np.load(prepared.root / "general_sentences.npz")
    n = len(s["fact"])                                                   # 60 x 2 facts x 3 templates
    held = np.flatnonzero(heldout_mask(n, 0.1, data.seed))
    assert z["index"].tolist() == held.tolist() and 0 < len(held) < 0.2 * n and held.max() > n // 2
    assert json.loads((gdir / "info.json").read_text())["sentences"] == n - len(held)
    docs = D.heldout_documents(prepared)
    for i, doc in zip(held.tolist(), docs.tokens):
        np.testing.assert_array_equal(doc, s["flat"][s["off"][i]: s["off"][i + 1] - 1])
        assert s["flat"][s["off"][i + 1] - 1] == prepared.tokenizer.eod
    text = [prepared.tokenizer.decode(d.tolist()) for d in docs.tokens]
    assert docs.n_bytes.tolist() == [len(t.encode()) for t in text] and docs.context == prepared.tokenizer.eod
    trained = np.load(gdir / "stream.npz")["fact"]                      # a held-out sentence's fact stays trained
    assert np.bincount(trained, minlength=120).tolist() == (3 - np.bincount(s["fact"][held], minlength=120)).tolist()


def test_a_general_corpus_cell_scores_documents_its_build_held_out(tmp_path):
    """data.general_corpus with heldout_general: the build sets the hashed documents (global index) apart, the
    training prefix lacks them, and every evaluation of a real cell scores them; bpb against an independent
    reference from the raw text (its own encode, its own UTF-8 bytes) on the cell's final weights."""
    import os
    import subprocess
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer as HFTokenizer

    from kislurm.cluster.submit import write_plan
    from kislurm.data import prepare as D
    from kislurm.data.tokenizer import train_bpe
    from kislurm.data.wordnet import capital_documents, wordnet_installed, write_wordnet_jsonl
    from kislurm.plan.loader import load_config
    from kislurm.plan.grid import expand
    from kislurm.retention.store import read_cell
    from kislurm.train import checkpoint

    if not wordnet_installed():
        pytest.skip("WordNet not installed (apt-get install wordnet-base; tools/dev test does it as root)")
    repo = Path(__file__).resolve().parents[1]
    write_wordnet_jsonl(tmp_path / "wn.jsonl", limit=600)
    stated = capital_documents()[:12]
    texts = [json.loads(x)["text"] for x in (tmp_path / "wn.jsonl").read_text().splitlines()] + [t for t, _ in stated]
    (tmp_path / "wn.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "capitals.jsonl").write_text("".join(json.dumps(f) + "\n" for _, f in stated))
    (tmp_path / "t.yaml").write_text("capital_of: {train: ['{subject} is the capital of {object}'], heldout: []}\n")
    train_bpe(texts, 400).save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(repo / "configs" / "tiny.yaml", {
        "output_root": str(tmp_path / "out"), "grid.sizes": ["cpu-xs"], "grid.ratios": [0.5],
        "grid.token_budgets": [10240], "train.eval_interval": 10, "data.heldout_general": 0.05,
        "data.tokenizer": str(tmp_path / "tokenizer.json"), "data.general_probes": str(tmp_path / "capitals.jsonl"),
        "data.templates_file": str(tmp_path / "t.yaml"),
        "data.general_corpus": {"files": [str(tmp_path / "wn.jsonl")]}})
    cell = expand(cfg)[0]
    run = write_plan(cfg, [cell])
    D.prepare_run(cfg, [cell])
    subprocess.run([sys.executable, str(repo / "jobs" / "run_cell.py"), str(run.root), cell.name], check=True,
                   capture_output=True, timeout=600, env=dict(os.environ))

    tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))        # the reference: raw text, its own encode
    encoded = [(t, tok.encode(t, add_special_tokens=False).ids) for t in texts]
    encoded = [(t, ids) for t, ids in encoded if ids]
    held = heldout_mask(len(encoded), 0.05, cfg.data.seed)
    assert 0 < held.sum() < 0.15 * len(encoded) and np.flatnonzero(held).max() > len(encoded) // 2
    prepared = D.load_prepared(cell.data, run.data, cell.model.seq_length)
    train = IndexedDataset(prepared.general_prefix)
    eod = tok.token_to_id("<|endoftext|>")
    kept = [ids + [eod] for (_, ids), h in zip(encoded, held) if not h]
    assert [train[i].tolist() for i in range(len(train))] == kept
    docs = D.heldout_documents(prepared)
    assert [d.tolist() for d in docs.tokens] == [ids for (_, ids), h in zip(encoded, held) if h]
    n_bytes = sum(len(t.encode("utf-8")) for (t, _), h in zip(encoded, held) if h)

    rec = read_cell(run.cell(cell.name).store)
    assert len(rec.metrics["heldout_bpb"]) == len(rec.metrics["general_acc"]) >= 2     # at every evaluation
    assert np.isfinite(rec.metrics["heldout_loss"]).all() and np.isfinite(rec.metrics["heldout_bpb"]).all()
    ctx = init_model_parallel(1)
    try:
        seed_all(cell.seed + 1)                       # every weight comes from the final checkpoint
        gpt = build_model(cell.model, prepared.tokenizer.vocab_size, cell.train.init_std, "fp32")
        checkpoint.load_weights(run.cell(cell.name).checkpoints / checkpoint.FINAL_DIR, gpt)
        nll, n = _reference(gpt, HeldoutDocs(docs.tokens, docs.n_bytes, eod), cell.model.seq_length)
    finally:
        teardown(ctx)
    assert rec.metrics["heldout_loss"][-1] == pytest.approx(nll / n, rel=1e-5)
    assert rec.metrics["heldout_bpb"][-1] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


def test_heldout_general_with_a_prefix_built_elsewhere_is_refused_naming_general_corpus():
    from kislurm.errors import KislurmError
    from kislurm.plan.loader import config_from_dict

    with pytest.raises(KislurmError, match="data.heldout_general.*general_corpus") as e:
        config_from_dict({"data": {"general_prefix": "corpora/web", "general_probes": "p.jsonl", "tokenizer": "t.json",
                                   "heldout_general": 0.02}})
    assert "\n" not in str(e.value) and "fix:" in str(e.value)
