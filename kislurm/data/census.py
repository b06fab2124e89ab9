"""The fact census: in how many documents of a raw corpus each fact's subject, object, and both occur.

Matching rule (the one definition every count here uses): a name occurs in a text where its exact string appears
with no letter or digit (`str.isalnum()`) right before or right after it; the ends of the text count as neither.
No case folding, no Unicode normalisation. Every occurrence counts, overlapping and nested ones included ("Africa"
occurs in "South Africa"). A fact may list `subject_aliases` / `object_aliases`: a document holds the subject when it
holds any of the subject's names. A fact is `nested` when one of its subject names occurs (by the same rule) in one
of its object names or the reverse: then `docs_both` says nothing about co-occurrence.

Engine: one Aho-Corasick automaton (ahocorasick-rs) over every distinct name, which reports all matches, overlapping
ones included, in one pass per document whatever the number of names; the word-boundary check runs on its matches
(docs/census.md has the measurement against pyahocorasick and a plain scan: ahocorasick-rs matched 1.7-2.1x faster).

Map-reduce: per shard (kislurm.data.sources), three count vectors over the facts (general then knowledge), published
atomically by `map_shards`; the reduction is an exact integer sum.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from kislurm.data.knowledge import jsonl_triplets
from kislurm.errors import DataError

COUNT_FIELDS = ("docs_subject", "docs_object", "docs_both")
ALIAS_KEYS = ("subject_aliases", "object_aliases")


@dataclass(frozen=True)
class CensusFact:
    """One fact as written in its JSONL line (`fields`, kept for the output rows) and the names it is matched by."""

    fields: dict
    subject_names: tuple[str, ...]
    object_names: tuple[str, ...]

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.fields["subject"].strip(), self.fields["relation"].strip(), self.fields["object"].strip()


def _names(obj: dict, key: str, path: Path, lineno: int) -> tuple[str, ...]:
    aliases = obj.get(f"{key}_aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise DataError(f"{path}:{lineno}: {key}_aliases must be a list of non-empty strings; fix: e.g. "
                        f"\"{key}_aliases\": [\"PRC\"]")
    return tuple(dict.fromkeys([obj[key].strip(), *(a.strip() for a in aliases)]))


def read_facts(path: str | Path) -> list[CensusFact]:
    """The facts of a triplet JSONL file (the format data.general_triplets reads), with optional alias lists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: facts file not found; fix: give a JSONL file of "
                        "{\"subject\", \"relation\", \"object\"} lines")
    facts = [CensusFact(obj, _names(obj, "subject", path, lineno), _names(obj, "object", path, lineno))
             for lineno, obj in jsonl_triplets(path)]
    if not facts:
        raise DataError(f"{path}: no facts; fix: give at least one (subject, relation, object) line")
    return facts


# ----------------------------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------------------------


def bounded(text: str, start: int, end: int) -> bool:
    """The rule's boundary test for the occurrence text[start:end]: no letter or digit right before or after it."""
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())


class NameMatcher:
    """Which of a list of names occur in a text under the rule: one ahocorasick-rs automaton reporting every match,
    overlapping ones included (MatchKind.Standard), in character offsets; the boundary test runs on each match."""

    def __init__(self, names: Sequence[str]):
        import ahocorasick_rs

        self.names = list(names)
        self.automaton = (ahocorasick_rs.AhoCorasick(self.names, matchkind=ahocorasick_rs.MatchKind.Standard)
                          if self.names else None)

    def __getstate__(self) -> list[str]:          # the automaton is rebuilt in a worker, not pickled
        return self.names

    def __setstate__(self, names: list[str]) -> None:
        self.__init__(names)

    def found(self, text: str) -> set[int]:
        """Indices of the names that occur in `text` at least once under the rule."""
        if self.automaton is None:
            return set()
        out: set[int] = set()
        for i, start, end in self.automaton.find_matches_as_indexes(text, overlapping=True):
            if i not in out and bounded(text, start, end):
                out.add(i)
        return out


def occurs(name: str, text: str) -> bool:
    """Whether `name` occurs in `text` under the rule (a plain scan: the reference the tests and docs use)."""
    start = text.find(name)
    while start >= 0:
        if bounded(text, start, start + len(name)):
            return True
        start = text.find(name, start + 1)
    return False


def is_nested(fact: CensusFact) -> bool:
    """One of the fact's subject names occurs in one of its object names, or the reverse (equal names included)."""
    return any(occurs(a, b) or occurs(b, a) for a in fact.subject_names for b in fact.object_names)


@dataclass(frozen=True)
class NameTable:
    """Every distinct name of a list of facts, and for each name the facts that have it as a subject / object name."""

    matcher: NameMatcher
    subject_of: tuple[tuple[int, ...], ...]
    object_of: tuple[tuple[int, ...], ...]
    n_facts: int


def name_table(facts: Sequence[CensusFact]) -> NameTable:
    ids: dict[str, int] = {}
    subj: list[list[int]] = []
    obj: list[list[int]] = []

    def slot(name: str) -> int:
        if name not in ids:
            ids[name] = len(ids)
            subj.append([])
            obj.append([])
        return ids[name]

    for f, fact in enumerate(facts):
        for name in fact.subject_names:
            subj[slot(name)].append(f)
        for name in fact.object_names:
            obj[slot(name)].append(f)
    return NameTable(NameMatcher(list(ids)), tuple(map(tuple, subj)), tuple(map(tuple, obj)), len(facts))


def count_documents(texts: Iterable[str], table: NameTable) -> tuple[np.ndarray, int]:
    """(3, F) int64 counts (documents holding the subject, the object, both) over `texts`, and the document count."""
    counts = np.zeros((3, table.n_facts), dtype=np.int64)
    hits: tuple[list[int], list[int], list[int]] = ([], [], [])
    docs = 0

    def flush() -> None:
        for row, h in enumerate(hits):
            if h:
                counts[row] += np.bincount(np.asarray(h, dtype=np.int64), minlength=table.n_facts)
                h.clear()

    for text in texts:
        docs += 1
        found = table.matcher.found(text)
        if not found:
            continue
        subj = set().union(*(table.subject_of[i] for i in found))
        obj = set().union(*(table.object_of[i] for i in found))
        hits[0].extend(subj)
        hits[1].extend(obj)
        hits[2].extend(subj & obj)
        if len(hits[0]) + len(hits[1]) > 1 << 20:
            flush()
    flush()
    return counts, docs


def census_salt(facts: Sequence[CensusFact], json_key: str) -> tuple[str, ...]:
    """What a shard's counts depend on besides the shard: the names matched (in order) and the text field."""
    h = hashlib.sha256()
    for fact in facts:
        h.update(json.dumps([fact.subject_names, fact.object_names]).encode())
    return "census-v1", h.hexdigest()[:16], json_key


# ----------------------------------------------------------------------------------------------------------------------
# Map over shards, exact reduction
# ----------------------------------------------------------------------------------------------------------------------

SHARD_FILE = "counts.npz"


def census_shard(table: NameTable, json_key: str, shard, out: Path) -> None:
    """One shard's counts into `out` (a private folder that map_shards publishes by one atomic rename)."""
    from kislurm.data.sources import read_documents

    counts, docs = count_documents((d.text for d in read_documents(shard, json_key)), table)
    np.savez(out / SHARD_FILE, counts=counts, docs=np.int64(docs))


def reduce_shards(folders: Sequence[Path], n_facts: int) -> tuple[np.ndarray, int]:
    """The exact sum of the shards' counts (int64) and documents."""
    total = np.zeros((3, n_facts), dtype=np.int64)
    docs = 0
    for folder in folders:
        with np.load(Path(folder) / SHARD_FILE) as z:
            if z["counts"].shape != total.shape:
                raise DataError(f"{folder}: counts for {z['counts'].shape[1]} facts, expected {n_facts}; fix: "
                                "remove that folder and rerun the census")
            total += z["counts"]
            docs += int(z["docs"])
    return total, docs


@dataclass(frozen=True)
class Selection:
    """--select K [--bands ... --per-band N]: the general probes the census chooses."""

    min_docs: int
    bands: tuple[int, ...] = ()
    per_band: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_docs < 1:
            raise DataError(f"--select {self.min_docs}: expected >= 1 documents; fix: e.g. --select 1")
        if list(self.bands) != sorted(set(self.bands)) or any(b < 1 for b in self.bands):
            raise DataError(f"--bands {','.join(map(str, self.bands))}: expected increasing positive edges; "
                            "fix: e.g. --bands 1,10,100")
        if self.per_band is not None and (self.per_band < 1 or not self.bands):
            raise DataError("--per-band needs --bands and a count >= 1; fix: e.g. --bands 1,10,100 --per-band 50")


def band_label(docs: int, edges: Sequence[int]) -> Optional[str]:
    """The band [edges[i], edges[i+1]) that holds `docs` as "lo-hi" ("lo+" for the last), None below the first."""
    if not edges or docs < edges[0]:
        return None
    i = int(np.searchsorted(np.asarray(edges), docs, side="right")) - 1
    return f"{edges[i]}+" if i == len(edges) - 1 else f"{edges[i]}-{edges[i + 1] - 1}"


def select_probes(rows: list[dict], sel: Selection) -> list[dict]:
    """Facts with docs_both >= K that are not nested, optionally stratified into bands (at most per_band each, a
    seeded sample kept in file order)."""
    eligible = [r for r in rows if r["docs_both"] >= sel.min_docs and not r["nested"]]
    if not sel.bands:
        return eligible
    by_band: dict[str, list[int]] = {}
    for i, r in enumerate(eligible):
        label = band_label(r["docs_both"], sel.bands)
        if label is not None:
            by_band.setdefault(label, []).append(i)
    rng = np.random.default_rng(sel.seed)
    keep: list[int] = []
    for label, idx in by_band.items():
        if sel.per_band is not None and len(idx) > sel.per_band:
            idx = sorted(rng.choice(idx, size=sel.per_band, replace=False).tolist())
        keep += idx
    return [{**eligible[i], "band": band_label(eligible[i]["docs_both"], sel.bands)} for i in sorted(keep)]


def pair(fact: CensusFact) -> frozenset:
    return frozenset((fact.triple[0], fact.triple[2]))


def contamination(general: Sequence[CensusFact], knowledge: Sequence[CensusFact], k_rows: list[dict]) -> list[dict]:
    """The knowledge facts that co-occur in the general corpus (docs_both > 0), or share a subject-object pair with a
    general fact in either direction (Beijing is in China / China's capital is Beijing), with the reason."""
    by_pair: dict[frozenset, list[list[str]]] = {}
    for g in general:
        by_pair.setdefault(pair(g), []).append(list(g.triple))
    out = []
    for fact, row in zip(knowledge, k_rows):
        shared = by_pair.get(pair(fact), [])
        if row["docs_both"] > 0 or shared:
            out.append({**row, "cooccurs": row["docs_both"] > 0, "shared_with_general": shared})
    return out


def _rows(facts: Sequence[CensusFact], counts: np.ndarray) -> list[dict]:
    return [{**f.fields, **{k: int(counts[j, i]) for j, k in enumerate(COUNT_FIELDS)}, "nested": is_nested(f)}
            for i, f in enumerate(facts)]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    from kislurm.publish import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_census(inputs: Sequence[str], facts_path: str | Path, out: str | Path,
               knowledge_path: Optional[str | Path] = None, json_key: str = "text", workers: int = 1,
               shard_bytes: Optional[int] = None, selection: Optional[Selection] = None, executor: Any = None,
               progress: Any = None) -> dict:
    """`kislurm census`: count every fact over the corpus shards (resumable: published shards are reused), then
    write OUT/census.jsonl (and knowledge_census.jsonl, contamination.jsonl, general_probes.jsonl when asked) and
    OUT/summary.json last. Returns the summary."""
    from kislurm.data.sources import SHARD_BYTES, expand_inputs, map_shards, plan_shards
    from kislurm.publish import atomic_write_json

    out = Path(out)
    general = read_facts(facts_path)
    knowledge = read_facts(knowledge_path) if knowledge_path is not None else []
    facts = [*general, *knowledge]
    table = name_table(facts)
    shards = plan_shards(expand_inputs(list(inputs)), shard_bytes or SHARD_BYTES)
    work = functools.partial(census_shard, table, json_key)
    folders = map_shards(shards, work, out / "shards", salt=census_salt(facts, json_key),
                         workers=workers, executor=executor, progress=progress)
    counts, docs = reduce_shards(folders, len(facts))
    g_rows, k_rows = _rows(general, counts[:, : len(general)]), _rows(knowledge, counts[:, len(general):])
    _write_jsonl(out / "census.jsonl", g_rows)
    summary: dict[str, Any] = {
        "documents": docs, "shards": len(shards), "json_key": json_key, "facts": len(general),
        "facts_file": str(Path(facts_path).resolve()), "names": len(table.matcher.names),
        "facts_cooccurring": sum(r["docs_both"] > 0 for r in g_rows),
        "facts_nested": sum(r["nested"] for r in g_rows),
        "rule": "exact string, no isalnum() character right before or after, every occurrence, aliases"}
    if knowledge_path is not None:
        bad = contamination(general, knowledge, k_rows)
        _write_jsonl(out / "knowledge_census.jsonl", k_rows)
        _write_jsonl(out / "contamination.jsonl", bad)
        summary.update(knowledge=len(knowledge), knowledge_file=str(Path(knowledge_path).resolve()),
                       contaminated=len(bad), contaminated_share=len(bad) / len(knowledge),
                       knowledge_cooccurring=sum(r["cooccurs"] for r in bad),
                       knowledge_sharing_a_pair=sum(bool(r["shared_with_general"]) for r in bad))
    if selection is not None:
        probes = select_probes(g_rows, selection)
        _write_jsonl(out / "general_probes.jsonl", probes)
        bands: dict[str, int] = {}
        for r in probes:
            bands[r.get("band", "all")] = bands.get(r.get("band", "all"), 0) + 1
        summary.update(selected=len(probes), select_min_docs=selection.min_docs, select_bands=list(selection.bands),
                       select_per_band=selection.per_band, selected_per_band=bands)
    atomic_write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# What `kislurm prepare` checks against a census (data.general_census)
# ----------------------------------------------------------------------------------------------------------------------

CENSUS_FILES = ("summary.json", "census.jsonl", "knowledge_census.jsonl", "contamination.jsonl")


def census_digest(census_dir: str | Path) -> str:
    """Hash of a census folder's outputs (prepared data built against one census is rebuilt for another)."""
    h = hashlib.sha256()
    for name in CENSUS_FILES:
        path = Path(census_dir) / name
        h.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    return h.hexdigest()[:16]


def _census_rows(census_dir: Path, name: str, fix: str) -> list[dict]:
    path = census_dir / name
    if not (census_dir / "summary.json").is_file():
        raise DataError(f"data.general_census: {census_dir} holds no finished census (no summary.json); fix: run "
                        f"`kislurm census CORPUS... --facts GENERAL --knowledge KNOWLEDGE --out {census_dir}`")
    if not path.is_file():
        raise DataError(f"data.general_census: {path} not found; fix: {fix}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _triple(row: dict) -> tuple[str, str, str]:
    return row["subject"].strip(), row["relation"].strip(), row["object"].strip()


def _listing(triples: Sequence[tuple[str, ...]], n: int = 3) -> str:
    shown = "; ".join(" | ".join(t) for t in triples[:n])
    return shown + (f"; ... ({len(triples) - n} more)" if len(triples) > n else "")


def check_knowledge(census_dir: str | Path, general, knowledge, max_share: float) -> None:
    """Refuse (DataError, one line: the count and the first facts) a knowledge base that shares a subject-object
    pair, in either direction, with the general probes, or whose share of facts the census found contaminated
    (co-occurring in the general corpus, or sharing a pair with a general fact of the census) exceeds max_share.
    `general` and `knowledge` are kislurm.data.knowledge.KnowledgeBase objects (the prepared probes' bases)."""
    census_dir = Path(census_dir)
    probes: dict[frozenset, tuple[str, str, str]] = {}
    for f in general.facts:
        probes.setdefault(frozenset((f.subject, f.object)), (f.subject, f.relation, f.object))
    shared = [(f.subject, f.relation, f.object) for f in knowledge.facts
              if frozenset((f.subject, f.object)) in probes]
    if shared:
        raise DataError(f"{len(shared)} knowledge facts share a subject-object pair with the general probes, e.g. "
                        f"{_listing(shared)}; fix: remove them from data.knowledge_triplets (or the probes from "
                        "the general facts): infusing a probed fact measures repetition, not retention")
    rerun = (f"run `kislurm census CORPUS... --facts GENERAL --knowledge <data.knowledge_triplets> "
             f"--out {census_dir}`")
    counted = {_triple(r) for r in _census_rows(census_dir, "knowledge_census.jsonl", rerun)}
    missing = [(f.subject, f.relation, f.object) for f in knowledge.facts
               if (f.subject, f.relation, f.object) not in counted]
    if missing:
        raise DataError(f"data.general_census: {len(missing)} of {len(knowledge.facts)} knowledge facts were not "
                        f"counted by the census in {census_dir}, e.g. {_listing(missing)}; fix: {rerun}")
    bad = {_triple(r) for r in _census_rows(census_dir, "contamination.jsonl", rerun)}
    hit = [(f.subject, f.relation, f.object) for f in knowledge.facts if (f.subject, f.relation, f.object) in bad]
    share = len(hit) / len(knowledge.facts)
    if share > max_share:
        raise DataError(f"{len(hit)} of {len(knowledge.facts)} knowledge facts ({share:.1%}) are already in the "
                        f"general corpus (census {census_dir}/contamination.jsonl), above data.max_contamination "
                        f"= {max_share:g}, e.g. {_listing(hit)}; fix: infuse novel or counterfactual facts "
                        "(docs/census.md), drop the listed ones, or raise data.max_contamination")


def corpus_counts(census_dir: str | Path, general) -> np.ndarray:
    """(F,) int64 docs_both of each general fact (the census row of the same subject, relation, object; -1 where
    the census has none): the corpus frequency that the probes and the store's fact table carry."""
    rows = _census_rows(Path(census_dir), "census.jsonl", "rerun `kislurm census` with --out that folder")
    by_triple = {_triple(r): int(r["docs_both"]) for r in rows}
    return np.array([by_triple.get((f.subject, f.relation, f.object), -1) for f in general.facts], dtype=np.int64)
