"""Streams of whole fact sentences: pass units, their plan per cell, and the megatron indexed datasets they become.

Knowledge streams follow the knowledge base, not the token budget. A pass unit is one pass over facts [0, F): every
fact once, in a seeded order of its own, fact f using its training template (j + f) mod T_f in unit j, packed
greedily (whole sentences, EOD after each) into documents of exactly seq_length tokens. A stream is u such units
written one after another (so one megatron epoch of the stream is u exposures of every fact); megatron-core's
GPTDataset repeats it for as many epochs as the cell needs. A cell draws exactly M whole epochs (K' = M x D
documents), so every fact of the stream gets exactly M x u exposures: the exposures never depend on megatron's
partial last epoch, and facts meet different neighbours in each of the u units.

The cell's choice (pure arithmetic on the packing, no megatron):
- fixed_exposures: u = the largest divisor of E not above PASS_UNITS, M = E / u; F = the longest prefix of the base
  whose u units fit K // M documents; the units' documents are split (the ones holding most sentences first) until
  there are exactly D = K // M of them.
- fixed_facts: F = every fact; for each u <= PASS_UNITS whose units fit, M = K // D_u and D = K // M; the u chosen
  loses the fewest samples to the remainder and to split documents, with a small premium on more units (less
  neighbour sharing). A cell that holds less than one pass gets the first K documents of unit 0 (0 or 1 exposure
  each).
In both, K' = M x D <= K with K - K' < M (the remainder goes to the general stream; M is at most K / D_1, so the
realised share is below r by less than 1 / D_1, one over the documents of one pass). Streams are named by what they
hold (facts, units, documents), so cells that need the same one share it; each holds at most PASS_UNITS passes of its
facts, whatever the token budget.

Writing (`write_stream`): whole sentences, EOD after each, padded to exactly seq_length tokens per document. The
general stream built from facts is one pass over every (fact, training template) (`every_template_ids`), less the
documents `heldout_mask` holds out (the same mask a general_corpus build uses, kislurm.data.corpus).
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from kislurm.data.encoding import Sentences, ragged, ragged_rows
from kislurm.data.tokenizer import Tokenizer
from kislurm.errors import DataError

PASS_UNITS = 64   # at most this many distinct pass units per knowledge stream (see neighbour_sharing)
CHUNK_DOCS = 1 << 17   # write_stream pads and writes this many documents at a time (bounded memory)
SHARING_WEIGHT = 0.1   # fixed_facts: one unit instead of many is worth about 10% of the samples in split documents


@dataclass(frozen=True)
class StreamPlan:
    """What a cell's knowledge stream holds and how often the cell draws it."""

    facts: int           # F: facts [0, F) of the base, each once per unit
    units: int           # u distinct pass units
    docs: int            # D: documents of the stream (after splits); one epoch
    epochs: int          # M: whole epochs the cell draws
    partial: bool        # less than one pass: the first D documents of unit 0

    @property
    def k_docs(self) -> int:
        """K' = M x D: the cell's knowledge samples."""
        return self.epochs * self.docs

    @property
    def exposures(self) -> Optional[int]:
        """Exposures of every fact of the stream (None for a partial pass: 0 or 1)."""
        return None if self.partial else self.epochs * self.units

    @property
    def name(self) -> str:
        if self.partial:
            return f"pass0-F{self.facts}-D{self.docs}"
        return f"units-F{self.facts}-U{self.units}-D{self.docs}"


def _passes(s: Sentences, facts: int, passes: int, seed: int, tag: int) -> np.ndarray:
    """Sentence ids of `passes` passes over facts [0, facts): a fresh seeded order each pass; at pass p fact f
    uses its training template (p + f) mod T_f, so its exposures cycle through its templates evenly."""
    rng = np.random.default_rng([seed, tag, facts])
    order = rng.permuted(np.tile(np.arange(facts, dtype=np.int64), (passes, 1)), axis=1)
    n_train = s.n_train[order]
    ids = s.first[order] + (np.arange(passes)[:, None] + order) % n_train
    return ids.ravel()


def every_template_ids(s: Sentences, seed: int) -> np.ndarray:
    """Sentence ids of the general stream's one pass unit: every (fact, training template) once; pass p holds, in a
    fresh seeded order, the facts with more than p training templates (each with its template (p + f) mod T_f)."""
    n_facts, t_max = s.n_facts, int(s.n_train.max())
    ids = _passes(s, n_facts, t_max, seed, 1).reshape(t_max, n_facts)
    fact = np.searchsorted(s.first, ids, side="right") - 1
    return ids[np.arange(t_max)[:, None] < s.n_train[fact]]


def unit_ids(s: Sentences, facts: int, unit: int, seed: int) -> np.ndarray:
    """Sentence ids of pass unit `unit` over facts [0, facts): its own seeded order (the same in every stream that
    holds it), fact f with its training template (unit + f) mod T_f."""
    order = np.random.default_rng([seed, 4, facts, unit]).permutation(facts).astype(np.int64)
    return s.first[order] + (unit + order) % s.n_train[order]


def pack(lengths: np.ndarray, seq_length: int, max_docs: Optional[int] = None) -> np.ndarray:
    """Greedy packing: document boundaries (positions into the sentence sequence) of whole sentences <= seq_length."""
    cum = [0, *np.cumsum(lengths).tolist()]
    n, a, bounds = len(lengths), 0, [0]
    while a < n and (max_docs is None or len(bounds) <= max_docs):
        b = bisect.bisect_right(cum, cum[a] + seq_length, lo=a) - 1
        if b == a:
            raise DataError(f"a fact sentence has {int(lengths[a])} tokens (EOD included), more than seq_length "
                            f"{seq_length}; fix: use a longer seq_length, shorter names/templates or a bigger vocab")
        bounds.append(b)
        a = b
    return np.asarray(bounds, dtype=np.int64)


def split_to(bounds: np.ndarray, docs: int) -> np.ndarray:
    """Split the documents holding the most sentences until there are exactly `docs` of them."""
    heap = [(-(int(e) - int(b)), int(b), int(e)) for b, e in zip(bounds[:-1], bounds[1:])]
    heapq.heapify(heap)
    while len(heap) < docs:
        size, b, e = heapq.heappop(heap)
        if -size < 2:
            raise DataError(f"only {bounds[-1]} knowledge sentences for {docs} samples; fix: lower the ratio or "
                            "token budget, or raise data.exposures_per_fact")
        m = b + (e - b) // 2
        heapq.heappush(heap, (-(m - b), b, m))
        heapq.heappush(heap, (-(e - m), m, e))
    return np.array([0, *sorted(e for _, _, e in heap)], dtype=np.int64)


def pack_units(s: Sentences, facts: int, units: int, seq_length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sentence ids and document bounds of `units` pass units, each packed on its own (no document spans two
    units, so each unit is exactly one exposure of every fact)."""
    ids, bounds, start = [], [np.zeros(1, np.int64)], 0
    for j in range(units):
        u = unit_ids(s, facts, j, seed)
        b = pack(s.lengths[u], seq_length)
        ids.append(u)
        bounds.append(b[1:] + start)
        start += len(u)
    return np.concatenate(ids), np.concatenate(bounds)


def exposure_tokens(s: Sentences, exposures: int) -> np.ndarray:
    """Tokens of `exposures` sentences of each fact, templates cycling as in unit_ids (fact f, unit p: (p+f) mod T)."""
    n_facts = s.n_facts
    f = np.arange(n_facts)
    t, lens = s.n_train, s.lengths
    full = np.add.reduceat(lens, s.first[:-1]) if n_facts else np.zeros(0)
    total = (exposures // t) * full
    rest = exposures % t
    for p in range(int(rest.max(initial=0))):
        m = p < rest
        total[m] += lens[s.first[:-1][m] + (p + f[m]) % t[m]]
    return total.astype(np.float64)


def units_for(exposures: int, limit: int = PASS_UNITS) -> int:
    """The largest divisor of `exposures` not above `limit`: the distinct units a fixed_exposures stream cycles."""
    return max(d for d in range(1, min(exposures, limit) + 1) if exposures % d == 0)


# ----------------------------------------------------------------------------------------------------------------------
# Per-cell plans
# ----------------------------------------------------------------------------------------------------------------------


def cell_knowledge_samples(cell) -> int:
    """K of a cell (kislurm.plan.grid.Cell.knowledge_samples, the plan's one share rule: round(r x n) of its mixed
    samples, or, fixed_general, every sample beyond the fixed general ones), once its ratio and samples are checked."""
    if not 0.0 < cell.ratio < 1.0:
        raise DataError(f"ratio {cell.ratio}: expected a value strictly between 0 and 1; fix: e.g. 0.1 for 10%")
    if cell.mix_samples < 2:
        raise DataError(f"n_samples {cell.mix_samples}: a mix needs >= 2 samples; fix: raise the token budget")
    return cell.knowledge_samples


def plan_fixed_exposures(s: Sentences, k_docs: int, seq_length: int, seed: int, exposures: int,
                         ratio: float) -> StreamPlan:
    """The most facts (a prefix of the base) whose u units, drawn M = E / u times, fit k_docs samples."""
    n_facts, u = s.n_facts, units_for(exposures)
    m = exposures // u
    per_epoch = k_docs // m
    if per_epoch < 1:
        raise DataError(f"ratio {ratio}: {k_docs} knowledge samples cannot hold one fact at exposures_per_fact="
                        f"{exposures}; fix: raise the ratio or token budget, or lower data.exposures_per_fact")
    docs_of = lambda facts: len(pack_units(s, facts, u, seq_length, seed)[1]) - 1

    cost = np.zeros(n_facts + 1)   # tokens of each fact's u unit sentences (independent of the orders)
    np.cumsum(exposure_tokens(s, u), out=cost[1:])
    hi = min(n_facts, int(np.searchsorted(cost, per_epoch * seq_length, side="right")) - 1)  # more cannot fit
    # Every document of a unit but its last holds at least L - maxlen + 1 tokens: this many facts surely fit.
    sure = max(per_epoch - u, 0) * (seq_length - int(s.lengths.max()) + 1)
    lo = min(hi, max(0, int(np.searchsorted(cost, sure, side="right")) - 1))
    if lo > 0 and docs_of(lo) > per_epoch:
        lo = 0
    while hi > lo:                               # largest feasible prefix (feasibility is checked by packing)
        mid = (lo + hi + 1) // 2
        if docs_of(mid) <= per_epoch:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        need = math.ceil(cost[1] / seq_length) * m
        raise DataError(f"ratio {ratio}: {k_docs} knowledge samples cannot hold one fact at exposures_per_fact="
                        f"{exposures} (needs about {need}); fix: raise the ratio or token budget, or lower "
                        "data.exposures_per_fact")
    packed = docs_of(lo)
    one_fact = math.ceil((cost[-1] / n_facts) / max(seq_length - int(s.lengths.max()) + 1, 1)) + u
    if lo == n_facts and per_epoch - packed > one_fact:
        need = int(n_facts * per_epoch / max(packed, 1))
        raise DataError(f"ratio {ratio}: the knowledge base has {n_facts} facts but {k_docs} samples at "
                        f"exposures_per_fact={exposures} need about {need}; fix: raise data.knowledge.entities "
                        "(or add triplets), raise exposures_per_fact, or lower the ratio")
    if per_epoch > lo * u:
        raise DataError(f"ratio {ratio}: only {lo * u} knowledge sentences for {per_epoch} samples per epoch; fix: "
                        "lower the ratio or token budget, or raise data.exposures_per_fact")
    return StreamPlan(lo, u, per_epoch, m, False)


def plan_fixed_facts(s: Sentences, k_docs: int, seq_length: int, seed: int) -> StreamPlan:
    """Every fact, u units drawn M whole times: the (u, M) that loses the fewest samples to the remainder (which goes
    to the general stream) and to split documents, plus SHARING_WEIGHT / u (more distinct units share less)."""
    n_facts = s.n_facts
    _, bounds = pack_units(s, n_facts, PASS_UNITS, seq_length, seed)
    unit_end = np.searchsorted(bounds, np.arange(1, PASS_UNITS + 1) * n_facts)   # docs of the first u units
    docs_u = {u: int(unit_end[u - 1]) for u in range(1, PASS_UNITS + 1)}
    if k_docs < docs_u[1]:
        return StreamPlan(n_facts, 1, k_docs, 1, True)
    best: Optional[tuple[float, int, int]] = None
    for u in (u for u in docs_u if docs_u[u] <= k_docs):
        m = k_docs // docs_u[u]
        d = k_docs // m
        if d > u * n_facts:
            continue                              # cannot split into that many documents
        lost = 4 * (k_docs - m * d) + m * (d - docs_u[u])   # samples to the general stream (x4), split documents
        score = lost / k_docs + SHARING_WEIGHT / u
        if best is None or score < best[0]:
            best = (score, u, m)
    if best is None:
        raise DataError(f"only {n_facts * PASS_UNITS} knowledge sentences for {k_docs} samples; fix: lower the "
                        "ratio or token budget")
    _, u, m = best
    return StreamPlan(n_facts, u, k_docs // m, m, False)


def stream_layout(s: Sentences, plan: StreamPlan, seq_length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sentence ids and document bounds of the plan's stream (exactly plan.docs documents)."""
    if plan.partial:
        ids = unit_ids(s, plan.facts, 0, seed)
        bounds = pack(s.lengths[ids], seq_length, max_docs=plan.docs)
        return ids[: bounds[-1]], bounds
    ids, bounds = pack_units(s, plan.facts, plan.units, seq_length, seed)
    return ids, split_to(bounds, plan.docs)


# ----------------------------------------------------------------------------------------------------------------------
# Neighbour sharing
# ----------------------------------------------------------------------------------------------------------------------


def neighbour_sharing(fact: np.ndarray, bounds: np.ndarray, passes: int, anchors: int = 1000,
                      seed: int = 0) -> dict:
    """How often two facts share a document, relative to their exposures, over one epoch of a stream.

    fact: the fact of each sentence of the stream; bounds: its documents; passes: exposures of every fact per epoch
    (the units). Every epoch repeats the same documents, so a pair that shares c documents of the epoch shares
    c / passes of its exposures whatever the number of epochs. Counted for every pair with at least one of up to
    `anchors` seeded facts (all facts when there are fewer): the largest fraction, the mean over pairs that share at
    all, and the mean over all pairs (about sentences per document / facts).
    """
    n_facts = int(fact.max()) + 1 if len(fact) else 0
    if n_facts < 2:
        return {"max": 0.0, "mean_sharing_pairs": 0.0, "mean_all_pairs": 0.0, "anchors": n_facts, "passes": passes}
    pick = np.arange(n_facts) if n_facts <= anchors else np.sort(
        np.random.default_rng(seed).choice(n_facts, size=anchors, replace=False))
    is_anchor = np.zeros(n_facts, bool)
    is_anchor[pick] = True
    doc = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    a_pos = np.flatnonzero(is_anchor[fact])
    # every (anchor sentence, other sentence in the same document) pair, as anchor * F + other
    starts, ends = bounds[doc[a_pos]], bounds[doc[a_pos] + 1]
    sizes = ends - starts
    rows = np.repeat(np.arange(len(a_pos)), sizes)
    other = starts[rows] + (np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    keep = other != a_pos[rows]
    key = fact[a_pos[rows][keep]].astype(np.int64) * n_facts + fact[other[keep]]
    _, counts = np.unique(key, return_counts=True)
    total_pairs = len(pick) * (n_facts - 1)
    return {"max": float(counts.max(initial=0)) / passes, "mean_sharing_pairs": float(counts.mean()) / passes
            if len(counts) else 0.0, "mean_all_pairs": float(counts.sum()) / passes / total_pairs,
            "anchors": int(len(pick)), "passes": int(passes)}


# ----------------------------------------------------------------------------------------------------------------------
# Writing streams: whole sentences packed into documents of exactly seq_length tokens
# ----------------------------------------------------------------------------------------------------------------------


def write_stream(out: Path, s: Sentences, ids: np.ndarray, bounds: np.ndarray, seq_length: int,
                 tok: Tokenizer, info: dict) -> None:
    """stream.bin/.idx (megatron IndexedDatasetBuilder; one sequence per packed document, added in chunks: GPTDataset
    samples sequences, not the .idx's document groups), stream.npz (the fact of each packed sentence, document
    boundaries, non-pad tokens per document) and info.json."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(out / "stream")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=tok.dtype)
    doc_tokens = np.zeros(len(bounds) - 1, dtype=np.int32)
    for c0 in range(0, len(bounds) - 1, CHUNK_DOCS):
        cb = bounds[c0: c0 + CHUNK_DOCS + 1]
        flat, off = ragged_rows([(s.flat, s.off, ids[cb[0]: cb[-1]])])
        starts = off[cb - cb[0]]
        per_doc = np.diff(starts)
        doc_tokens[c0: c0 + len(per_doc)] = per_doc
        rows = np.repeat(np.arange(len(per_doc)), per_doc)
        block = np.full((len(per_doc), seq_length), tok.pad, dtype=tok.dtype)
        block[rows, np.arange(len(flat)) - starts[:-1][rows]] = flat
        builder.add_document(block.ravel(), [seq_length] * len(per_doc))
    builder.finalize(prefix + ".idx")
    np.savez(out / "stream.npz", fact=s.fact[ids[: bounds[-1]]], bounds=bounds, doc_tokens=doc_tokens)
    (out / "info.json").write_text(json.dumps({**info, "docs": len(bounds) - 1, "sentences": int(bounds[-1]),
                                               "tokens": int(doc_tokens.sum()), "seq_length": seq_length}))


def heldout_mask(n: int, share: float, seed: int, start: int = 0) -> np.ndarray:
    """(n,) bool: document start + i is held out when a hash of (seed, start + i) (splitmix64) falls below `share`:
    spread over the whole stream, not a contiguous tail, and the same set for every cell and every seq_length (a
    general_corpus build asks shard by shard, `start` being the shard's first global document index)."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + n, dtype=np.uint64)
        z += np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def write_heldout(path: Path, s: Sentences, held: np.ndarray, tok: Tokenizer) -> None:
    """The held-out documents' tokens (their EOD dropped: it is not scored) and UTF-8 bytes (for bits per byte)."""
    docs = [s.flat[s.off[i]: s.off[i + 1] - 1] for i in held.tolist()]
    n_bytes = np.array([len(tok.decode(d.tolist()).encode("utf-8")) for d in docs], dtype=np.int64)
    flat, off = ragged(docs) if docs else (np.zeros(0, np.int32), np.zeros(1, np.int64))
    np.savez(path, flat=flat, off=off, n_bytes=n_bytes, index=held.astype(np.int64))
