"""The fact census: in how many documents of a raw corpus each fact's subject, object, and both occur.

Matching rule (the one definition every count here uses): a name occurs in a text where its exact string appears
with no letter or digit (`str.isalnum()`) right before or right after it; the ends of the text count as neither.
No case folding, no Unicode normalisation. Every occurrence counts, overlapping and nested ones included ("Africa"
occurs in "South Africa"). A fact may list `subject_aliases` / `object_aliases`: a document holds the subject when it
holds any of the subject's names. A fact is `nested` when one of its subject names occurs (by the same rule) in one
of its object names or the reverse: then `docs_both` says nothing about co-occurrence.

Engine: one Aho-Corasick automaton (pyahocorasick) over every distinct name, which reports all matches, overlapping
ones included, in one pass per document whatever the number of names; the word-boundary check runs on its matches
(docs/census.md has the measurement against ahocorasick-rs and a plain scan).

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
    facts: list[CensusFact] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix: one JSON object per line") from None
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip()
                                                    for k in ("subject", "relation", "object")):
                raise DataError(f"{path}:{lineno}: expected {{\"subject\": str, \"relation\": str, \"object\": str}} "
                                "with non-empty strings; fix: correct or remove the line")
            facts.append(CensusFact(obj, _names(obj, "subject", path, lineno), _names(obj, "object", path, lineno)))
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
    """Which of a list of names occur in a text under the rule: one pyahocorasick automaton, all matches."""

    def __init__(self, names: Sequence[str]):
        import ahocorasick

        self.names = list(names)
        self.automaton = ahocorasick.Automaton()
        for i, name in enumerate(self.names):
            self.automaton.add_word(name, (i, len(name)))
        if self.names:
            self.automaton.make_automaton()

    def __getstate__(self) -> list[str]:          # the automaton is rebuilt in a worker, not pickled
        return self.names

    def __setstate__(self, names: list[str]) -> None:
        self.__init__(names)

    def found(self, text: str) -> set[int]:
        """Indices of the names that occur in `text` at least once under the rule."""
        if not self.names:
            return set()
        out: set[int] = set()
        for end, (i, n) in self.automaton.iter(text):
            if i not in out and bounded(text, end + 1 - n, end + 1):
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


def facts_digest(facts: Sequence[CensusFact]) -> str:
    """Hash of the names a census matches (in order): a shard's result is valid only for the same names."""
    h = hashlib.sha256()
    for fact in facts:
        h.update(json.dumps([fact.subject_names, fact.object_names]).encode())
    return h.hexdigest()[:16]
