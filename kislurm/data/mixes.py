"""The data side of issue 17's controls: the neutral stream of `dilution`, the two-phase dataset of `staged`, and
the statistics that show each control holds what it should (counted from megatron-core's own indices).

- fixed_general needs nothing here: the plan sizes the cell (kislurm.plan.grid.Cell: G general samples as at
  data.reference_ratio, K = n - G knowledge samples) and kislurm.data.prepare blends it as any cell; control_stats records G.
  The general stream gets G plus the knowledge stream's remainder K - K' (< M samples, as in every cell).
- dilution: a stream of neutral sentences (kislurm.data.knowledge.neutral_base: the knowledge base's relations, values
  and templates, fresh subjects, random objects, each (subject, relation) once) packed like the knowledge stream into
  documents of exactly seq_length tokens. It holds D >= K documents (D a power of two, so cells share streams) and
  megatron draws K of them in its one epoch, each at most once: no neutral sentence is ever trained twice.
- staged: a general-only GPTDataset of cell.phase1_samples (megatron-core's builder over the general prefix alone),
  then the cell's blend; StagedDataset serves them in that order, so the trainer is unchanged (sample i at step
  i // gbs) and the phase boundary is an evaluation step of the plan (Cell.eval_steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kislurm.data.counts import doc_usage, fact_exposures, gpt_doc_counts, min_mean_max
from kislurm.data.encoding import Sentences, encode_facts, training_sentences
from kislurm.data.folder import PreparedData, publishing_stream, stream_info
from kislurm.data.knowledge import neutral_base
from kislurm.data.streams import cell_knowledge_samples, pack, write_stream
from kislurm.errors import DataError

NEUTRAL_MIN_DOCS = 1024


def neutral_docs(k: int) -> int:
    """Documents of the neutral stream that serves K samples: the next power of two (at least NEUTRAL_MIN_DOCS)."""
    return max(NEUTRAL_MIN_DOCS, 1 << max(k - 1, 0).bit_length())


def neutral_stream(prepared: PreparedData, cell) -> dict:
    """The dilution cell's stream info (as kislurm.data.prepare.knowledge_stream returns it): built once per document count
    under DATA/prep-*/neutral-L<seq>/D<docs> by preparation, read by cells."""
    k = cell_knowledge_samples(cell)
    docs = neutral_docs(k)
    out = prepared.root / f"neutral-L{prepared.seq_length}" / f"D{docs}"
    with publishing_stream(prepared, out, cell, "neutral") as tmp:
        if tmp is not None:
            _build_neutral(prepared, tmp, docs)
    info = stream_info(out)
    return {**info, "facts": 0, "units": 1, "epochs": 1, "k_docs": k, "prefix": str(out / "stream"),
            "neighbour_sharing": {"max": 0.0, "mean_all_pairs": 0.0}}


def _build_neutral(prepared: PreparedData, out: Path, docs: int) -> None:
    tok, L = prepared.tokenizer, prepared.seq_length
    templates = prepared.templates()
    exclude = {x for kb in (prepared.general, prepared.knowledge) for f in kb.facts for x in (f.subject, f.object)}
    mean_len = float(prepared.knowledge_sentences().lengths.mean())
    need = int(docs * L / mean_len * 1.2) + 64
    for attempt in range(6):
        base = neutral_base(prepared.knowledge, need, [prepared.data.seed, docs, attempt], exclude)
        enc = encode_facts(tok, base, templates)
        s = Sentences(*training_sentences(base, enc, tok))
        rng = np.random.default_rng([prepared.data.seed, docs, 0x6E75])
        one = s.first[:-1] + rng.integers(0, 1 << 30, size=s.n_facts) % s.n_train   # one template per sentence
        ids = rng.permutation(one)
        bounds = pack(s.lengths[ids], L, max_docs=docs)
        if len(bounds) - 1 == docs:
            write_stream(out, s, ids[: bounds[-1]], bounds, L, tok,
                          {"kind": "neutral", "neutral_facts": len(base.facts)})
            return
        need *= 2
    raise DataError(f"could not fill {docs} neutral documents; fix: report this (a bug in kislurm.data.mixes)")


class StagedDataset:
    """Phase 1 (general only, `n1` samples of megatron's general GPTDataset), then the blend: item i of the cell.
    Items carry dataset_id (0: general, 1: knowledge) and phase (1 or 2)."""

    def __init__(self, general: Any, blend: Any, n1: int):
        if len(general) < n1:
            raise DataError(f"the general phase has {len(general)} samples, fewer than {n1}; a bug in kislurm.data.mixes")
        self.general, self.blend, self.n1 = general, blend, n1

    def __len__(self) -> int:
        return self.n1 + len(self.blend)

    def __getitem__(self, i: int) -> dict:
        if i < self.n1:
            return {"dataset_id": 0, "phase": 1, **self.general[i]}
        return {"phase": 2, **self.blend[i - self.n1]}


def control_stats(prepared: PreparedData, cell, stats: dict, blend: Any, general: Optional[Any], kinfo: dict) -> dict:
    """kislurm.data.counts.blend_stats of the blend, plus what the control guarantees, counted from megatron's indices.
    Staged: n_samples and the general counts cover both phases; knowledge_share_positions is the mix's."""
    out = {**stats, "control": cell.control}
    gdir = Path(prepared.general_prefix).parent
    g_docs = json.loads((gdir / "info.json").read_text())["docs"] if prepared.general_is_facts else 0
    (g_counts, k_counts), _, _ = doc_usage(blend, cell.mix_samples, prepared.seq_length, [g_docs, kinfo["docs"]])
    if cell.control == "fixed_general":
        out.update(reference_ratio=cell.data.reference_ratio, general_samples_target=cell.general_samples_fixed,
                   realised_ratio=stats["knowledge_samples"] / stats["n_samples"])
    if cell.control == "dilution":
        exp, _ = fact_exposures(Path(kinfo["prefix"]).parent, k_counts, int(kinfo["neutral_facts"]))
        out.update(neutral_sentences_trained=int(exp.sum()), neutral_facts_max_exposures=int(exp.max(initial=0)),
                   neutral_docs=int(kinfo["docs"]), neutral_docs_max_draws=int(k_counts.max(initial=0)))
    if cell.control == "staged":
        out.update(phase1_samples=cell.phase1_samples, phase1_steps=cell.phase1_steps,
                   stage_tokens=cell.data.stage_tokens, n_samples=cell.n_samples, mix_samples=cell.mix_samples,
                   general_samples=stats["general_samples"] + cell.phase1_samples)
        if prepared.general_is_facts:
            n_g = len(prepared.general.facts)
            one = gpt_doc_counts(general, cell.phase1_samples, g_docs)
            exp1, tokens1 = fact_exposures(gdir, one, n_g)
            both, tokens = fact_exposures(gdir, one + g_counts, n_g)
            out.update(min_mean_max(exp1, "phase1_general_exposures_per_fact"), phase1_general_tokens=tokens1,
                       **min_mean_max(both, "general_exposures_per_fact"), general_tokens=tokens,
                       general_facts_exposed=int((both > 0).sum()))
    return out
