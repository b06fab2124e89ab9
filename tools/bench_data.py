"""Benchmark kislurm.data.prepare: tokenization + dataset building against raw `tokenizers` batch encoding, and the time to
build a run's data for one million facts.

    python tools/bench_data.py [--facts 1000000] [--seq-length 64] [--repeats 2]

Throughput: the same training sentences (every fact x every training template) are (a) encoded by the raw
`tokenizers` encode_batch (the baseline; it only tokenizes) and (b) tokenized, packed into seq_length documents and
written as a megatron indexed dataset by kislurm (encode_facts + training_sentences + packing + IndexedDatasetBuilder).
The ratio is kislurm's sentences/s over the baseline's (target >= 0.8). Runs alternate and the best of each is kept,
because the machine may be shared.

Build time: prepare() (bases, tokenizer training, encoding, probes, general stream) plus one cell's knowledge stream
and megatron blend, for a knowledge base of --facts facts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kislurm.data import prepare as D  # noqa: E402
from kislurm.plan.config import DataConfig, EvalConfig, KnowledgeBaseSpec  # noqa: E402
from kislurm.plan.presets import BUILTIN_PRESETS  # noqa: E402
from kislurm.plan.training import TrainConfig  # noqa: E402
from kislurm.data.knowledge import render, synthetic_bases  # noqa: E402
from kislurm.plan.grid import Cell  # noqa: E402
from kislurm.data.encoding import Sentences, corpus_texts, encode_facts, training_sentences  # noqa: E402
from kislurm.data.streams import pack, write_stream  # noqa: E402
from kislurm.data.tokenizer import train_bpe  # noqa: E402


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def raw_encode(tok, texts: list[str], chunk: int = 200_000) -> int:
    """Baseline: tokenizers' encode_batch over the texts (chunked to bound memory); returns tokens produced."""
    n = 0
    for i in range(0, len(texts), chunk):
        n += sum(len(e.ids) for e in tok.tok.encode_batch(texts[i: i + chunk], add_special_tokens=False))
    return n


def kislurm_build(tok, kb, templates, seq_length: int, out: Path) -> int:
    """kislurm: encode every slot, assemble training sentences, pack one pass and write the indexed dataset."""
    enc = encode_facts(tok, kb, templates)
    flat, off, fact, first = training_sentences(kb, enc, tok)
    s = Sentences(flat, off, fact, first)
    ids = np.arange(len(off) - 1)
    bounds = pack(s.lengths, seq_length)
    out.mkdir(parents=True, exist_ok=True)
    write_stream(out, s, ids, bounds, seq_length, tok, {"kind": "bench"})
    return int(len(flat))


def throughput(facts: int, seq_length: int, repeats: int, work: Path) -> None:
    data = DataConfig(general=KnowledgeBaseSpec(100, 3, 60), knowledge=KnowledgeBaseSpec(facts // 3, 3, 200))
    (gen, kb, templates), t_gen = _timed(synthetic_bases, data)
    tok, t_tok = _timed(lambda: train_bpe(corpus_texts([kb], templates, D.TOKENIZER_SENTENCES), data.vocab_size))
    texts = [render(t, f) for f in kb.facts for t in templates[f.relation].train]
    print(f"knowledge base: {len(kb.facts):,} facts, {len(texts):,} training sentences; generated in {t_gen:.1f} s, "
          f"BPE ({tok.vocab_size} tokens) trained on <= {D.TOKENIZER_SENTENCES:,} corpus sentences in {t_tok:.1f} s")
    best_raw = best_ours = float("inf")
    for r in range(repeats):
        n_raw, t_raw = _timed(raw_encode, tok, texts)
        n_ours, t_ours = _timed(kislurm_build, tok, kb, templates, seq_length, work / f"stream{r}")
        best_raw, best_ours = min(best_raw, t_raw), min(best_ours, t_ours)
        print(f"  run {r}: raw encode_batch {t_raw:.2f} s ({n_raw:,} tokens); kislurm tokenize+pack+write "
              f"{t_ours:.2f} s ({n_ours:,} tokens incl. EOD)")
    n = len(texts)
    print(f"throughput: raw encode_batch {n / best_raw:,.0f} sentences/s; kislurm tokenize+build "
          f"{n / best_ours:,.0f} sentences/s; ratio kislurm/raw = {best_raw / best_ours:.2f} (target >= 0.8)")


def build_time(facts: int, seq_length: int, work: Path) -> None:
    data = DataConfig(general=KnowledgeBaseSpec(1000, 3, 60), knowledge=KnowledgeBaseSpec(facts // 3, 3, 200))
    preset = BUILTIN_PRESETS["cpu-s"].__class__(2, 32, 4, seq_length=seq_length)
    prepared, t_prep = _timed(D.prepare, data, work / "run", seq_length)
    # One cell whose knowledge stream holds every fact about twice: tokens ~ 2 x facts x 3 templates x ~14 / 3.
    tokens = int(facts * 28 / 0.5)
    cell = Cell("bench", 0.5, tokens, 0, preset, data, TrainConfig(), EvalConfig())
    (dataset, stats), t_cell = _timed(D.cell_dataset, prepared, cell)
    _, t_again = _timed(D.prepare, data, work / "run", seq_length)
    (_, _), t_cell_again = _timed(D.cell_dataset, prepared, cell)
    print(f"build for {len(prepared.knowledge.facts):,} knowledge facts: prepare {t_prep:.1f} s "
          f"({stats['knowledge_docs']:,} knowledge docs, {len(prepared.probes.prompt):,} probes); "
          f"cell_dataset {t_cell:.1f} s for {cell.n_samples:,} samples "
          f"(exposures/fact {stats['exposures_per_fact_min']}-{stats['exposures_per_fact_max']}); "
          f"total {t_prep + t_cell:.1f} s")
    print(f"reuse: prepare again {t_again:.1f} s (loads probes), cell_dataset again {t_cell_again:.1f} s (cache hits)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=1_000_000)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-build", action="store_true", help="only the throughput comparison")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import megatron.core  # noqa: F401  (import cost is not data-building cost)

    print(f"cpus: {os.cpu_count()}; facts: {args.facts:,}; seq_length: {args.seq_length}")
    with tempfile.TemporaryDirectory() as tmp:
        throughput(args.facts, args.seq_length, args.repeats, Path(tmp))
    if not args.skip_build:
        with tempfile.TemporaryDirectory() as tmp:
            build_time(args.facts, args.seq_length, Path(tmp))


if __name__ == "__main__":
    main()
