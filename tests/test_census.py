"""The fact census: the matching rule against a brute-force scan, sharding, resume, selection and contamination."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kislurm.data.census import CensusFact, count_documents, is_nested, name_table, read_facts

DOCS = [
    "South Africa is in Africa.",                     # nested: Africa twice, once inside South Africa
    "Capetown's country: South Africa",
    "SouthAfrica and Africans are not Africa",       # no boundary before/after: only the last Africa counts
    "The PRC's capital, Beijing, hosts 2008-era U.S. visitors.",
    "Beijing2008 is no match; (Beijing) is.",
    "Singapore, Singapore: one name twice",
    "singapore is lower case and does not count",
    "R2-D2 met C-3PO; R2-D22 is no match",
    "Zürich liegt in der Schweiz; Zürichsee nicht.",
    "",
    "U.S.A. and U.S. differ: U.S.",
    "ÀAfrica Africaé _Africa_ -Africa-",              # letters with accents are letters; _ and - are not
]

FACTS = [
    {"subject": "South Africa", "relation": "continent", "object": "Africa"},
    {"subject": "China", "relation": "capital", "object": "Beijing", "subject_aliases": ["PRC", "People's Republic"]},
    {"subject": "Singapore", "relation": "capital", "object": "Singapore"},
    {"subject": "R2-D2", "relation": "friend", "object": "C-3PO"},
    {"subject": "Zürich", "relation": "country", "object": "Schweiz", "object_aliases": ["Switzerland"]},
    {"subject": "U.S.", "relation": "member", "object": "U.S.A.", "extra": 7},
    {"subject": "Capetown", "relation": "country", "object": "South Africa"},
]


def brute_occurs(name: str, text: str) -> bool:
    """Every start position, the rule spelled out: the exact string, no isalnum() character right beside it."""
    for i in range(len(text) - len(name) + 1):
        if text[i: i + len(name)] == name:
            before = text[i - 1] if i > 0 else ""
            after = text[i + len(name)] if i + len(name) < len(text) else ""
            if not (before.isalnum() or after.isalnum()):
                return True
    return False


def brute_counts(docs: list[str], facts: list[CensusFact]) -> np.ndarray:
    out = np.zeros((3, len(facts)), dtype=np.int64)
    for doc in docs:
        for f, fact in enumerate(facts):
            s = any(brute_occurs(n, doc) for n in fact.subject_names)
            o = any(brute_occurs(n, doc) for n in fact.object_names)
            out[:, f] += [s, o, s and o]
    return out


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def test_counts_equal_a_brute_force_scan_under_the_rule(facts_file):
    facts = read_facts(facts_file)
    counts, docs = count_documents(DOCS, name_table(facts))
    assert docs == len(DOCS)
    np.testing.assert_array_equal(counts, brute_counts(DOCS, facts))
    # the cases the rule exists for, spelled out
    africa = counts[:, 0]
    assert africa.tolist() == [2, 4, 2]       # "Africa" inside "South Africa" counts; "SouthAfrica"/"Africans" don't
    assert counts[2, 1] == 1                  # PRC (an alias) and Beijing; "Beijing2008" is no match
    assert counts[:, 2].tolist() == [1, 1, 1]  # lower-case "singapore" does not count
    assert counts[2, 3] == 1 and counts[2, 4] == 1 and counts[2, 5] == 1


def test_nested_marks_names_inside_each_other(facts_file):
    nested = [is_nested(f) for f in read_facts(facts_file)]
    assert nested == [True, False, True, False, False, False, False]   # "U.S." is not in "U.S.A." (a letter follows)
