"""Prepared data: knowledge bases, tokenizer, probes and megatron-core indexed datasets, mixed per cell.

`prepare` builds what every cell of a run shares, once, under RUN/data: the bases, the tokenizer, the probes and the
general stream; `prepare_run` (`kislurm prepare`) adds every cell's knowledge stream and blend check, as the shared
data's one writer. A cell reads it (`load_prepared`), and `cell_dataset` mixes the two streams at the cell's ratio
with megatron-core's BlendedMegatronDatasetBuilder over GPTDataset.

Exactness (measured with megatron-core 0.16.1): whole fact sentences, each followed by EOD, are packed greedily
into documents of exactly seq_length tokens and padded with a distinct pad id (loss_mask 0 there). With
add_extra_token_to_sequence=False one sample is one document, so no fact is ever cut. A cell's knowledge stream
holds a few pass units over its facts (kislurm.data.streams): it follows the knowledge base, not the token budget, and
megatron's GPTDataset repeats it for the cell's K' = M x D samples, M whole epochs (K' <= K = round(r * n) and
K - K' < M; mid_level_dataset_surplus=0 and blend weights chosen so megatron draws exactly K'). Every fact of the
stream is therefore trained exactly M x units times; exposures are nevertheless counted from megatron's own indices
and recorded.

Loss mask: eod_mask_loss=True. Without it megatron-core 0.16 caches the loss mask of the first sample it serves
after zeroing that sample's padding in place, so every later sample loses the loss at those positions
(Megatron-LM issue 1711, fix pending in PR 6981); with it masks are recomputed per sample. The only loss it drops is
the target right after an EOD: the first token of the next (randomly ordered) fact sentence.

Policies. fixed_facts: one knowledge base, every fact in the stream; exposures grow with r (in steps of the
units, or of one pass below one epoch) and never differ between facts by more than one. fixed_exposures: the
infused facts are the longest prefix of the base (in base order) whose units fit K samples at exactly
exposures_per_fact each. The base (and its fingerprint) does not depend on the policy or exposures_per_fact.
Probes: `prepared.probes` covers every general fact then every knowledge fact, ids "base:index:relation". A cell's
probes (`cell_probes`) are all general facts plus its infused facts; under fixed_exposures that is a prefix of the
knowledge facts, so the general block is identical in every cell and infused ids agree wherever they overlap.

Concurrency: shared data has one writer, preparation (`prepare_run`), publishing whole folders atomically
(kislurm.data.folder); cells read (`load_prepared`) and never build shared data. Each cell's megatron index cache is
a folder of its own (DATA/prep-*/cache/cell-ID, one writer: the cell's rank 0), listed in a manifest once complete,
so a crash never leaves a half-written cache that looks valid.

The data flows one way: knowledge (facts, templates) -> tokenizer -> encoding (token ids, ragged arrays) -> probes
and streams (packing, writing) -> folder (the published folder) -> counts (statistics from megatron's indices) ->
mixes (the controls) -> prepare (building the run's data, and each cell's blend).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from kislurm.data.census import census_digest, check_knowledge, corpus_counts
from kislurm.data.counts import blend_stats, doc_usage, fact_exposures
from kislurm.data.encoding import Sentences, corpus_texts, encode_facts, training_sentences
from kislurm.data.folder import HOST, PreparedData, locked, publish_folder, publishing_stream, stream_info
from kislurm.data.knowledge import (DataError, HeldoutDocs, KnowledgeBase, ProbeSet, Templates, check_distractors,
                                    check_templates, load_base, read_templates, read_triplets, save_base,
                                    save_templates, synthetic_bases)
from kislurm.data.mixes import StagedDataset, control_stats, neutral_stream
from kislurm.data.probes import build_probes, load_probes, save_probes, subset_probes
from kislurm.data.streams import (StreamPlan, cell_knowledge_samples, every_template_ids, heldout_mask,
                                  neighbour_sharing, pack, plan_fixed_exposures, plan_fixed_facts, stream_layout,
                                  write_heldout, write_stream)
from kislurm.data.tokenizer import check_base_tokenizer, load_tokenizer, train_bpe
from kislurm.plan.config import DataConfig
from kislurm.plan.loader import config_to_dict
from kislurm.publish import publishing

FORMAT_VERSION = 1
TOKENIZER_SENTENCES = 100_000   # the BPE is trained on at most this many corpus sentences (a seeded sample)
_CENSUS_DEFAULTS = {"general_census": None, "max_contamination": 0.05, "heldout_general": 0.0}
"""Issue 25's fields enter the fingerprint only when set, so data prepared before them keeps its folder."""
_NOT_BASE = ("policy", "exposures_per_fact", "mix", "schedule", "reference_ratio", "stage_tokens")
"""Data fields that change the streams a cell draws (or, for the controls, how it draws them), not the base."""


# ----------------------------------------------------------------------------------------------------------------------
# The fingerprint that names a prepared folder
# ----------------------------------------------------------------------------------------------------------------------


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(data: DataConfig) -> str:
    """Hash of everything that changes the prepared data: the data config and the contents of its input files."""
    inputs: dict[str, Any] = {}
    for key in ("knowledge_triplets", "general_triplets", "templates_file", "tokenizer", "general_probes"):
        path = getattr(data, key)
        if path is not None:
            if not Path(path).is_file():
                raise DataError(f"data.{key}: file not found: {path}; fix: correct the path or unset it")
            inputs[key] = _sha256_file(path)
    if data.general_prefix is not None:
        _check_prefix(data.general_prefix)
        st = os.stat(data.general_prefix + ".idx")
        inputs["general_prefix"] = [st.st_size, st.st_mtime_ns]
    if data.general_census is not None:
        inputs["general_census"] = census_digest(data.general_census)
    blob = json.dumps({"format": FORMAT_VERSION, "data": _base_config(data), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _base_config(data: DataConfig) -> dict:
    """The data config without the fields that only choose a cell's knowledge stream (one base serves both
    policies and every exposures_per_fact; the streams are named by what they hold)."""
    return {k: v for k, v in config_to_dict(data).items()
            if k not in _NOT_BASE and not (k in _CENSUS_DEFAULTS and v == _CENSUS_DEFAULTS[k])}


def _check_prefix(prefix: str) -> None:
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"data.general_prefix: {prefix}{ext} not found; fix: give the prefix of an existing "
                            "megatron indexed dataset (the path without .bin/.idx)")


# ----------------------------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------------------------


def corpora_dir(data_dir: Path) -> Path:
    """OUTPUT_ROOT/corpora (a run's data folder is OUTPUT_ROOT/NAME/data): built general corpora, shared by every
    experiment under the same output root."""
    return Path(data_dir).absolute().parent.parent / "corpora"


def general_corpus_prefix(data: DataConfig, data_dir: Path) -> Path:
    """Where data.general_corpus is built: named by a fingerprint of its files (path, size, mtime), its JSON key
    and the tokenizer's content, so the same corpus and tokenizer map to the same prefix in any experiment."""
    from kislurm.data.sources import expand_inputs

    corpus = data.general_corpus
    files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in expand_inputs(list(corpus.files))]
    key = {"files": files, "json_key": corpus.json_key, "tokenizer": _sha256_file(data.tokenizer)}
    if data.heldout_general > 0:        # only when set, so a corpus built before keeps its folder
        key["heldout"] = [data.heldout_general, data.seed]
    blob = json.dumps(key)
    return corpora_dir(data_dir) / hashlib.sha256(blob.encode()).hexdigest()[:16] / "general"


def general_corpus_plan(data: DataConfig, data_dir: Path):
    """The shard plan (kislurm.data.corpus.CorpusPlan) of data.general_corpus while its prefix is not published, else
    None: what `kislurm submit` queues on Slurm as array tasks ahead of the preparation job."""
    if data.general_corpus is None:
        return None
    prefix = general_corpus_prefix(data, data_dir)
    if Path(f"{prefix}.idx").is_file():
        return None
    from kislurm.data.corpus import plan_corpus

    return plan_corpus(list(data.general_corpus.files), prefix, tokenizer=data.tokenizer,
                       json_key=data.general_corpus.json_key)


def with_general_corpus(data: DataConfig, data_dir: Path, build: bool) -> DataConfig:
    """The data config with data.general_corpus replaced by the general_prefix it is built into (built here when
    `build` and not yet published; otherwise a one-line error naming `kislurm prepare`)."""
    if data.general_corpus is None:
        return data
    prefix = general_corpus_prefix(data, data_dir)
    if not Path(f"{prefix}.idx").is_file():
        if not build:
            raise DataError(f"{prefix}.idx: data.general_corpus is not built yet; fix: run `kislurm prepare CONFIG`")
        from kislurm.data.corpus import build_corpus

        build_corpus(list(data.general_corpus.files), prefix, tokenizer=data.tokenizer,
                     json_key=data.general_corpus.json_key, progress=False, heldout=data.heldout_general,
                     seed=data.seed)
    # heldout_general now lives in the prefix (its fingerprint, and heldout.npz beside it: heldout_documents)
    return dataclasses.replace(data, general_corpus=None, general_prefix=str(prefix), heldout_general=0.0)


def prepare(data: DataConfig, data_dir: Path, seq_length: int) -> PreparedData:
    """Build (or reuse) everything a run's cells share: idempotent, process-safe, atomic.

    Layout: DATA/prep-<fingerprint>/{manifest.json, tokenizer.json, *.json, probes.npz, *_sentences.npz,
    general-L<seq>/stream.{bin,idx,npz}, knowledge-L<seq>/units-F<facts>-U<units>-D<docs>/..., cache/}.
    """
    data_dir = Path(data_dir)
    if seq_length < 2:
        raise DataError(f"seq_length {seq_length}: expected >= 2; fix: use the model's seq_length")
    data = with_general_corpus(data, data_dir, build=True)
    if data.general_prefix is not None and data.tokenizer is None:
        raise DataError("data.general_prefix needs data.tokenizer: the tokenizer.json that tokenized that corpus; "
                        "fix: set data.tokenizer")
    root = data_dir / f"prep-{fingerprint(data)}"
    gen_dir = root / f"general-L{seq_length}"
    need_general = data.general_prefix is None
    if not (root / "manifest.json").is_file() or (need_general and not gen_dir.is_dir()):
        with locked(data_dir):
            if not (root / "manifest.json").is_file():
                with publish_folder(root, data_dir) as tmp:
                    _build_base(data, tmp)
            if need_general and not gen_dir.is_dir():
                with publish_folder(gen_dir, data_dir) as tmp:
                    _build_general_stream(root, tmp, seq_length)
    return _load(root, data, seq_length)


def load_prepared(data: DataConfig, data_dir: Path, seq_length: int) -> PreparedData:
    """What a cell reads: the prepared data, never built here. Anything missing is a one-line error naming
    `kislurm prepare`; the cell's knowledge stream is checked too when the cell asks for it."""
    data = with_general_corpus(data, data_dir, build=False)
    root = Path(data_dir) / f"prep-{fingerprint(data)}"
    missing = [p for p in (root / "manifest.json", root / f"general-L{seq_length}" / "info.json")
               if not p.is_file() and not (data.general_prefix is not None and "general-L" in str(p))]
    if missing:
        raise DataError(f"{missing[0]}: the run's data is not prepared; fix: run `kislurm prepare CONFIG` "
                        "(the same config and --set options) before the cells")
    return dataclasses.replace(_load(root, data, seq_length), readonly=True)


def _bases(data: DataConfig) -> tuple[KnowledgeBase, KnowledgeBase, Templates]:
    """General and knowledge bases plus templates for every relation, from the config's sources."""
    templates: Templates = {}
    if data.source == "synthetic":
        gen, kb, templates = synthetic_bases(data, general=data.general_prefix is None)
    else:
        gen, kb = None, read_triplets(data.knowledge_triplets, "knowledge")
    if data.templates_file is not None:
        templates = {**templates, **read_templates(data.templates_file)}
    if data.general_prefix is not None:
        gen = read_triplets(data.general_probes, "general")
    elif gen is None:
        gen = read_triplets(data.general_triplets, "general")
    if data.general_census is not None:
        check_knowledge(data.general_census, gen, kb, data.max_contamination)
    where = data.templates_file or "synthetic templates"
    for base in (gen, kb):
        check_templates(base, templates, str(where))
        check_distractors(base, data.distractors, f"{base.name} facts")
    return gen, kb, templates


def _build_base(data: DataConfig, out: Path) -> None:
    gen, kb, templates = _bases(data)
    tok = load_tokenizer(data.tokenizer) if data.tokenizer else train_bpe(
        corpus_texts([gen, kb], templates, max_sentences=TOKENIZER_SENTENCES, seed=data.seed), data.vocab_size)
    enc_g, enc_k = encode_facts(tok, gen, templates), encode_facts(tok, kb, templates)
    probes = build_probes([(gen, enc_g, 0), (kb, enc_k, 1)], data.distractors, data.seed)
    if data.general_census is not None:     # each general fact's corpus count; knowledge facts: -1 (not counted)
        counts = np.concatenate([corpus_counts(data.general_census, gen), np.full(len(kb.facts), -1, np.int64)])
        probes = dataclasses.replace(probes, fact_frequency=counts)
    tok.save(out / "tokenizer.json")
    save_base(gen, out / "general.json")
    save_base(kb, out / "knowledge.json")
    save_templates(templates, out / "templates.json")
    save_probes(probes, out / "probes.npz")
    for name, base, enc in (("general", gen, enc_g), ("knowledge", kb, enc_k)):
        flat, off, fact, first = training_sentences(base, enc, tok)
        np.savez(out / f"{name}_sentences.npz", flat=flat, off=off, fact=fact, first=first)
    manifest = {"format": FORMAT_VERSION, "data": _base_config(data), "vocab_size": tok.vocab_size,
                "tokenizer": tok.source, "general_facts": len(gen.facts), "knowledge_facts": len(kb.facts),
                "probes": len(probes.prompt), "n_choices": probes.n_choices}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _load(root: Path, data: DataConfig, seq_length: int) -> PreparedData:
    tok = load_tokenizer(root / "tokenizer.json")
    manifest = json.loads((root / "manifest.json").read_text())
    if data.general_prefix is not None:
        _check_prefix(data.general_prefix)
        general_prefix, is_facts = data.general_prefix, False
    else:
        general_prefix, is_facts = str(root / f"general-L{seq_length}" / "stream"), True
    return PreparedData(root, tok, load_probes(root / "probes.npz"), load_base(root / "general.json"),
                        load_base(root / "knowledge.json"), data, seq_length, general_prefix, is_facts, manifest)


# ----------------------------------------------------------------------------------------------------------------------
# Streams: the general stream, its held-out documents, each cell's knowledge stream
# ----------------------------------------------------------------------------------------------------------------------


def _build_general_stream(root: Path, out: Path, seq_length: int) -> None:
    """One pass unit: every (general fact, training template) once; megatron repeats it for as many epochs as a
    cell needs (the last epoch partially, so general exposures spread by one pass; they are counted per cell)."""
    s = Sentences.load(root / "general_sentences.npz")
    data_seed = json.loads((root / "manifest.json").read_text())["data"]["seed"]
    ids = every_template_ids(s, data_seed)
    tok = load_tokenizer(root / "tokenizer.json")
    share = float(json.loads((root / "manifest.json").read_text())["data"].get("heldout_general", 0.0))
    if share > 0:       # documents no cell trains on: out of the stream, into heldout.npz
        held = heldout_mask(len(s.fact), share, data_seed)
        ids = ids[~held[ids]]
        write_heldout(out / "heldout.npz", s, np.flatnonzero(held), tok)
    bounds = pack(s.lengths[ids], seq_length)
    write_stream(out, s, ids, bounds, seq_length, tok, {"kind": "general", "heldout_general": share})


def heldout_documents(prepared: PreparedData) -> Optional[HeldoutDocs]:
    """The general stream's held-out documents (data.heldout_general > 0), or None: beside the stream kislurm built
    from facts, or beside the data.general_corpus prefix under OUTPUT_ROOT/corpora/ (a user's general_prefix folder
    is never looked into)."""
    path = Path(prepared.general_prefix).parent / "heldout.npz"
    built = prepared.general_is_facts or path.parent.parent == corpora_dir(prepared.root.parent)
    if not built or not path.is_file():
        return None
    z = np.load(path)
    docs = [z["flat"][a:b] for a, b in zip(z["off"][:-1].tolist(), z["off"][1:].tolist())]
    return HeldoutDocs(docs, z["n_bytes"], prepared.tokenizer.eod)


def knowledge_plan(prepared: PreparedData, cell) -> StreamPlan:
    """The cell's knowledge stream plan (facts, units, documents, epochs), decided once by preparation and kept in
    knowledge-L<seq>/plans/ (a few bytes per distinct K), so a cell reads it instead of repacking the base."""
    data, L = prepared.data, prepared.seq_length
    k_docs = cell_knowledge_samples(cell)
    name = f"{data.policy}-K{k_docs}" + (f"-E{data.exposures_per_fact}" if data.policy == "fixed_exposures" else "")
    path = prepared.root / f"knowledge-L{L}" / "plans" / f"{name}.json"
    if path.is_file():
        return StreamPlan(**json.loads(path.read_text()))
    if prepared.readonly:
        raise DataError(f"{path}: cell {cell.name}'s knowledge plan is not prepared; fix: run `kislurm prepare "
                        "CONFIG` (the same config and --set options) before the cells")
    s = prepared.knowledge_sentences()
    if data.policy == "fixed_facts":
        plan = plan_fixed_facts(s, k_docs, L, data.seed)
    else:
        plan = plan_fixed_exposures(s, k_docs, L, data.seed, data.exposures_per_fact, cell.ratio)
    path.parent.mkdir(parents=True, exist_ok=True)
    with publishing(path, path.parent / f".{path.name}.{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}") as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(plan)))  # every writer writes the same plan (same base, arithmetic)
    return plan


def knowledge_stream(prepared: PreparedData, cell) -> dict:
    """Build (or reuse) the cell's knowledge stream: u pass units over its facts in D documents, which the cell
    draws M whole times (K' = M x D samples). Returns the stream's info plus the cell's 'epochs', 'k_docs' and
    'prefix'. Streams are shared by every cell that needs the same facts, units and documents."""
    if cell.control == "dilution":
        return neutral_stream(prepared, cell)
    plan = knowledge_plan(prepared, cell)
    out = prepared.root / f"knowledge-L{prepared.seq_length}" / plan.name

    with publishing_stream(prepared, out, cell, "knowledge") as tmp:
        if tmp is not None:
            s = prepared.knowledge_sentences()
            ids, bounds = stream_layout(s, plan, prepared.seq_length, prepared.data.seed)
            sharing = neighbour_sharing(s.fact[ids], bounds, plan.units, seed=prepared.data.seed)
            write_stream(tmp, s, ids, bounds, prepared.seq_length, prepared.tokenizer,
                         {"kind": "knowledge", "facts": plan.facts, "units": plan.units,
                          "partial_pass": plan.partial, "neighbour_sharing": sharing})
    info = stream_info(out)
    return {**info, "epochs": plan.epochs, "k_docs": plan.k_docs, "prefix": str(out / "stream")}


# ----------------------------------------------------------------------------------------------------------------------
# Preparing a run (`kislurm prepare`)
# ----------------------------------------------------------------------------------------------------------------------


def prepare_run(cfg, cells: Optional[list] = None, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Build everything a run's cells read, as the one writer of the run's shared data: tokenizer, bases, probes and
    general stream per seq_length, every cell's knowledge stream, and a check of every cell's blend (megatron's
    own arithmetic gives exactly the planned samples). Idempotent: what is published is reused. `progress(1)` after
    each cell. Returns a JSON-able summary: what was built, bytes written, seconds. On a cluster this is the body of
    one CPU preparation job that the cell arrays wait on."""
    from kislurm.paths import RunPaths
    from kislurm.plan.grid import expand, run_dir

    t0 = time.perf_counter()
    cells = expand(cfg) if cells is None else cells
    for base in sorted({c.model.init_from for c in cells if c.model.init_from is not None}):
        check_base_tokenizer(cfg.data.tokenizer, base)  # before anything is built
    data_dir = RunPaths(run_dir(cfg)).data
    warn_without_census(cfg.data)
    log = data_dir / "builds.log"
    seen = len(log.read_text().splitlines()) if log.is_file() else 0
    size = _tree_bytes(data_dir)
    streams: set[str] = set()
    blends: set[tuple[int, int]] = set()
    for seq in sorted({c.model.seq_length for c in cells}):
        prepared = prepare(cfg.data, data_dir, seq)
        for cell in (c for c in cells if c.model.seq_length == seq):
            info = knowledge_stream(prepared, cell)
            streams.add(info["prefix"])
            if (cell.mix_samples, info["k_docs"]) not in blends:
                blend_weights(cell.mix_samples, info["k_docs"])
                blends.add((cell.mix_samples, info["k_docs"]))
            if progress is not None:
                progress(1)
    built = log.read_text().splitlines()[seen:] if log.is_file() else []
    return {"data": str(data_dir), "cells": len(cells), "streams": len(streams),
            "built": [line.split()[0] for line in built], "bytes_written": max(0, _tree_bytes(data_dir) - size),
            "seconds": round(time.perf_counter() - t0, 2)}


def warn_without_census(data: DataConfig) -> None:
    """Real facts without a census: nothing shows the general probes are in the corpus, nor the knowledge absent."""
    if data.general_census is None and (data.source == "triplets" or data.general_prefix is not None):
        warnings.warn("data.general_census is not set: nothing checks that the general probes occur in the general "
                      "corpus nor that the knowledge facts are absent from it; fix: run `kislurm census` and set "
                      "data.general_census (docs/census.md)", CensusWarning, stacklevel=2)


class CensusWarning(UserWarning):
    """Real facts prepared without a census (shown once per `kislurm prepare`)."""


def is_prepared(cfg, cells: list) -> bool:
    """Whether everything these cells read is already published (then a cluster submission needs no preparation
    job and its arrays no dependency). Reads what a cell would read; builds nothing."""
    from kislurm.paths import RunPaths
    from kislurm.plan.grid import run_dir

    data_dir = RunPaths(run_dir(cfg)).data
    try:
        for seq in sorted({c.model.seq_length for c in cells}):
            prepared = load_prepared(cfg.data, data_dir, seq)
            for cell in (c for c in cells if c.model.seq_length == seq):
                knowledge_stream(prepared, cell)
    except DataError:
        return False
    return True


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def cell_probes(prepared: PreparedData, cell) -> ProbeSet:
    """The cell's probes: every general fact, then its infused facts (all of them under fixed_facts; under
    fixed_exposures the prefix it infuses). Fact ids are those of prepared.probes."""
    if prepared.data.policy == "fixed_facts":
        return prepared.probes
    facts = knowledge_stream(prepared, cell)["facts"]
    group = prepared.probes.fact_group
    keep = (group == 0) | (np.cumsum(group == 1) <= facts)
    return subset_probes(prepared.probes, keep)


# ----------------------------------------------------------------------------------------------------------------------
# The cell's blend (megatron-core)
# ----------------------------------------------------------------------------------------------------------------------


def blend_weights(n: int, k: int) -> list[float]:
    """Weights for which megatron's blend draws exactly k knowledge samples in its first n (and no more after).

    Megatron sizes each stream ceil(n * w_i) after normalising, and float rounding can push a size one over; the
    knowledge weight is nudged down until megatron's own arithmetic (normalize, ceil, build_blending_indices) gives
    a knowledge stream of exactly k samples, all of them inside the first n (the general side may get one spare).
    """
    from megatron.core.datasets import helpers
    from megatron.core.datasets.utils import normalize

    for j in range(64):
        weights = [float(n - k), k * (1.0 - j * 1e-15 * n)]
        w = normalize(weights)
        sizes = [math.ceil(n * x) for x in w]
        if sizes[1] != k:
            continue
        size = sum(sizes)
        index, sample = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(index, sample, normalize(w), 2, size, False)
        if int(index[:n].sum()) == k == int(index.sum()):
            return weights
    raise DataError(f"no blend weights give exactly {k} of {n} knowledge samples; "
                    "fix: change the token budget slightly")


@contextlib.contextmanager
def _megatron_builder_context(cache: Path) -> Iterator[None]:
    """What megatron's builder needs with a cache path: a process group (a one-process gloo group, only if the caller
    has none, destroyed afterwards) and, on rank 0 (the cache's only writer: the cache is the cell's own), incomplete
    cache files cleared first and the complete ones listed after."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if dist.get_rank() != 0:
            yield
            return
        listing = cache / "complete.json"
        cache.mkdir(parents=True, exist_ok=True)
        done = set(json.loads(listing.read_text())) if listing.is_file() else set()
        for f in cache.iterdir():
            if f.name not in done and f.name != listing.name:
                f.unlink()     # left by a crashed build of this cell: megatron would take it for a complete cache
        yield
        names = sorted(f.name for f in cache.iterdir() if f.name != listing.name)
        with publishing(listing, cache / f".complete.{uuid.uuid4().hex[:8]}") as tmp:
            tmp.write_text(json.dumps(names))
    finally:
        if own:
            dist.destroy_process_group()


def cell_dataset(prepared: PreparedData, cell) -> tuple[Any, dict]:
    """The cell's blended GPT dataset (exactly cell.n_samples samples; sample i is trained at step i // gbs) and its
    realised statistics, counted from megatron's own indices. Staged cells (kislurm.data.mixes.StagedDataset): a
    general-only GPTDataset of cell.phase1_samples, then the blend of cell.mix_samples.

    All ranks of a cell's process group call this together (megatron builds on rank 0 first).
    """
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if cell.model.seq_length != prepared.seq_length:
        raise DataError(f"cell {cell.name}: seq_length {cell.model.seq_length} but the data was prepared for "
                        f"{prepared.seq_length}; fix: call prepare() with the cell's seq_length")
    n = cell.mix_samples
    kinfo = knowledge_stream(prepared, cell)
    weights = blend_weights(n, kinfo["k_docs"])
    config = GPTDatasetConfig(
        random_seed=int(cell.seed), sequence_length=prepared.seq_length,
        blend=([prepared.general_prefix, kinfo["prefix"]], weights), split="1,0,0",
        path_to_cache=str(prepared.cell_cache(cell)), tokenizer=prepared.tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=True, create_attention_mask=False,
        add_extra_token_to_sequence=False, mid_level_dataset_surplus=0.0)
    if dist.is_initialized():
        dist.barrier()   # every rank has its stream before rank 0 builds (the others load after megatron's barrier)
    with _megatron_builder_context(prepared.cell_cache(cell)):
        dataset = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, config).build()[0]
        general = None
        if cell.phase1_samples:
            one = dataclasses.replace(config, blend=([prepared.general_prefix], None))
            general = BlendedMegatronDatasetBuilder(GPTDataset, [cell.phase1_samples, 0, 0], lambda: True,
                                                    one).build()[0]
    stats = blend_stats(prepared, dataset, n, cell.ratio, kinfo, weights)
    if cell.control == "infusion":
        return dataset, stats
    stats = control_stats(prepared, cell, stats, dataset, general, kinfo)
    return (dataset if general is None else StagedDataset(general, dataset, cell.phase1_samples)), stats


def fact_frequency(prepared: PreparedData, cell, dataset, probes: ProbeSet) -> tuple[Optional[np.ndarray], str]:
    """(F,) int64 frequency of each probed fact and its unit, for the store's fact table (-1: none): the census's
    document counts when the data has a census ("corpus_documents"); otherwise, for an infusion cell on a synthetic
    general stream, the times this cell trains on each general fact ("general_exposures", counted from megatron's
    indices, as blend_stats does); otherwise (None, "")."""
    if probes.fact_frequency is not None:
        return probes.fact_frequency, "corpus_documents"
    if not prepared.general_is_facts or cell.control != "infusion":
        return None, ""
    gdir = Path(prepared.general_prefix).parent
    g_docs = json.loads((gdir / "info.json").read_text())["docs"]
    kinfo = knowledge_stream(prepared, cell)
    (g_counts, _), _, _ = doc_usage(dataset, cell.mix_samples, prepared.seq_length, [g_docs, kinfo["docs"]])
    exposures, _ = fact_exposures(gdir, g_counts, len(prepared.general.facts))
    out = np.full(len(probes.fact_ids), -1, dtype=np.int64)
    out[probes.fact_group == 0] = exposures      # the general facts come first, in base order, in every cell
    return out, "general_exposures"
