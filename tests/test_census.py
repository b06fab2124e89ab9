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


# ----------------------------------------------------------------------------------------------------------------------
# The command: shards, resume, selection, contamination
# ----------------------------------------------------------------------------------------------------------------------

KNOWLEDGE = [
    {"subject": "Beijing", "relation": "in_country", "object": "China"},       # inverse of a general fact's pair
    {"subject": "Capetown", "relation": "in_country", "object": "Narnia"},     # never co-occurs, shares nothing
    {"subject": "C-3PO", "relation": "built_by", "object": "R2-D2"},           # co-occurs and shares the pair
    {"subject": "Zürich", "relation": "lake", "object": "Zürichsees"},         # never in the corpus: clean
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, facts_file) -> dict:
    """A 200-document JSONL corpus (the DOCS cycled, with noise), its facts and knowledge files, one reference
    census (1 shard, in this process) and the brute-force counts."""
    root = tmp_path_factory.mktemp("census")
    docs = [f"{DOCS[i % len(DOCS)]} #{i} {'Africa' if i % 7 == 0 else 'x'}" for i in range(200)]
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    kpath = root / "knowledge.jsonl"
    kpath.write_text("".join(json.dumps(f) + "\n" for f in KNOWLEDGE))
    from kislurm.data.census import Selection, run_census

    ref = run_census([str(path)], facts_file, root / "one", kpath, selection=Selection(1, (1, 10, 100), 1))
    return {"root": root, "path": path, "docs": docs, "knowledge": kpath, "summary": ref}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_shard_and_four_shards_in_a_pool_give_identical_counts(corpus, facts_file):
    from kislurm.data.census import run_census

    facts = read_facts(facts_file)
    one = read_jsonl(corpus["root"] / "one" / "census.jsonl")
    assert corpus["summary"]["shards"] == 1 and corpus["summary"]["documents"] == 200
    expected = brute_counts(corpus["docs"], facts)
    assert [[r[k] for r in one] for k in ("docs_subject", "docs_object", "docs_both")] == expected.tolist()
    size = corpus["path"].stat().st_size
    four = run_census([str(corpus["path"])], facts_file, corpus["root"] / "four", corpus["knowledge"], workers=2,
                      shard_bytes=-(-size // 4))
    assert four["shards"] == 4 and four["documents"] == 200
    assert read_jsonl(corpus["root"] / "four" / "census.jsonl") == one
    assert (read_jsonl(corpus["root"] / "four" / "contamination.jsonl")
            == read_jsonl(corpus["root"] / "one" / "contamination.jsonl"))


DYING = """
import os, sys, functools
from pathlib import Path
from kislurm.data.census import census_salt, census_shard, name_table, read_facts
from kislurm.data.sources import expand_inputs, map_shards, plan_shards

facts_path, knowledge_path, corpus, out, shard_bytes = *sys.argv[1:4], Path(sys.argv[4]), int(sys.argv[5])
facts = read_facts(facts_path) + read_facts(knowledge_path)     # the facts run_census matches: general, knowledge
shards = plan_shards(expand_inputs([corpus]), shard_bytes)

def dying(table, shard, tmp):
    census_shard(table, "text", shard, tmp)
    if shard == shards[2]:
        os._exit(9)     # killed after writing, before the publish: the third shard is lost, the first two are kept

map_shards(shards, functools.partial(dying, name_table(facts)), out / "shards", salt=census_salt(facts, "text"))
"""


def test_resume_after_a_killed_shard_reuses_the_published_ones(corpus, facts_file, tmp_path):
    import subprocess
    import sys

    from kislurm.data.census import run_census

    size = corpus["path"].stat().st_size
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    proc = subprocess.run([sys.executable, str(script), str(facts_file), str(corpus["knowledge"]),
                           str(corpus["path"]), str(tmp_path / "run"), str(-(-size // 4))],
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    published = sorted(p for p in (tmp_path / "run" / "shards").iterdir() if not p.name.startswith("."))
    assert len(published) == 2 and list((tmp_path / "run" / "shards").glob(".*.tmp"))   # the killed shard's tmp
    before = {p.name: (p / "counts.npz").stat().st_mtime_ns for p in published}
    seen: list = []
    s = run_census([str(corpus["path"])], facts_file, tmp_path / "run", corpus["knowledge"],
                   shard_bytes=-(-size // 4), progress=lambda shard, folder: seen.append(folder.name))
    assert s["shards"] == 4 and s["documents"] == 200
    assert {p.name: (p / "counts.npz").stat().st_mtime_ns for p in published} == before   # reused, not recounted
    assert set(seen[:2]) == set(before) and len(seen) == 4                                 # 2 reused, 2 counted
    assert not list((tmp_path / "run" / "shards").glob(".*.tmp"))                          # the dead one's tmp removed
    assert read_jsonl(tmp_path / "run" / "census.jsonl") == read_jsonl(corpus["root"] / "one" / "census.jsonl")


def test_contamination_lists_cooccurring_and_shared_pair_facts(corpus):
    rows = read_jsonl(corpus["root"] / "one" / "contamination.jsonl")
    assert [(r["subject"], r["cooccurs"], r["shared_with_general"]) for r in rows] == [
        ("Beijing", False, [["China", "capital", "Beijing"]]),
        ("C-3PO", True, [["R2-D2", "friend", "C-3PO"]]),
    ]
    assert corpus["summary"]["contaminated_share"] == 0.5


def test_select_with_bands_keeps_frequent_unnested_facts_per_band(corpus):
    rows = {r["subject"]: r for r in read_jsonl(corpus["root"] / "one" / "census.jsonl")}
    probes = read_jsonl(corpus["root"] / "one" / "general_probes.jsonl")
    eligible = {s for s, r in rows.items() if r["docs_both"] >= 1 and not r["nested"]}
    assert {p["subject"] for p in probes} <= eligible and "Singapore" not in {p["subject"] for p in probes}
    bands = [p["band"] for p in probes]
    assert len(bands) == len(set(bands)) == len({("1-9" if r["docs_both"] < 10 else "10-99" if r["docs_both"] < 100
                                                   else "100+") for s, r in rows.items() if s in eligible})
    for p in probes:
        lo = int(p["band"].rstrip("+").split("-")[0])
        assert p["docs_both"] >= lo and (p["band"].endswith("+") or p["docs_both"] <= int(p["band"].split("-")[1]))


def test_cli_census_writes_its_files_and_refuses_bad_bands(corpus, facts_file, tmp_path):
    from click.testing import CliRunner

    from kislurm.cli import main

    res = CliRunner().invoke(main, ["census", str(corpus["path"]), "--facts", str(facts_file), "--out",
                                    str(tmp_path / "c"), "--select", "1", "--bands", "1,10", "--per-band", "2"])
    assert res.exit_code == 0, res.output
    assert "200 documents in 1 shards" in res.output
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"census.jsonl", "general_probes.jsonl", "summary.json"}
    bad = CliRunner().invoke(main, ["census", str(corpus["path"]), "--facts", str(facts_file), "--out",
                                    str(tmp_path / "d"), "--select", "1", "--bands", "10,1"])
    assert bad.exit_code == 2 and "fix:" in bad.output


# ----------------------------------------------------------------------------------------------------------------------
# kislurm prepare against a census: the two refusals, the warning without one
# ----------------------------------------------------------------------------------------------------------------------

GENERAL_REAL = [("China", "capital", "Beijing"), ("France", "capital", "Paris"), ("Peru", "capital", "Lima"),
                ("Chile", "capital", "Santiago")]
CITY_DOCS = ["Beijing is the capital of China.", "Lyon, a city in France, and Paris.", "Cusco lies in the Andes.",
             "Lima, Peru: a coastal capital.", "Bergen and Oslo are Norwegian."]
TEMPLATES = ("capital:\n  train: ['The capital of {subject} is {object}']\n  heldout: []\n"
             "in_country:\n  train: ['{subject} is in {object}']\n  heldout: []\n")


def _triplets(path: Path, triples) -> str:
    path.write_text("".join(json.dumps(dict(zip(("subject", "relation", "object"), t))) + "\n" for t in triples))
    return str(path)


def _census_config(tmp_path: Path, knowledge, max_contamination: float = 0.05):
    from kislurm.data.census import run_census
    from kislurm.plan.config import DataConfig

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in CITY_DOCS))
    g, k = _triplets(tmp_path / "g.jsonl", GENERAL_REAL), _triplets(tmp_path / "k.jsonl", knowledge)
    run_census([str(corpus)], g, tmp_path / "census", k)
    (tmp_path / "t.yaml").write_text(TEMPLATES)
    return DataConfig(source="triplets", general_triplets=g, knowledge_triplets=k, templates_file=str(tmp_path / "t.yaml"),
                      distractors=1, general_census=str(tmp_path / "census"), max_contamination=max_contamination)


def test_prepare_refuses_a_pair_shared_with_the_general_probes(tmp_path):
    from kislurm.data import prepare as D
    from kislurm.errors import DataError

    cfg = _census_config(tmp_path, [("Beijing", "in_country", "China"), ("Cusco", "in_country", "Peru"),
                                    ("Bergen", "in_country", "Norway")], max_contamination=1.0)
    with pytest.raises(DataError) as e:
        D.prepare(cfg, tmp_path / "data", 16)
    msg = str(e.value)
    assert msg.startswith("1 knowledge facts share a subject-object pair") and "Beijing | in_country | China" in msg
    assert "\n" not in msg and not list((tmp_path / "data").glob("prep-*"))


def test_prepare_refuses_a_contaminated_knowledge_base_above_the_threshold(tmp_path):
    from kislurm.data import prepare as D
    from kislurm.data.census import check_knowledge
    from kislurm.data.knowledge import read_triplets
    from kislurm.errors import DataError

    knowledge = [("Lyon", "in_country", "France"), ("Cusco", "in_country", "Peru"), ("Bergen", "in_country", "Norway")]
    cfg = _census_config(tmp_path, knowledge)
    with pytest.raises(DataError) as e:
        D.prepare(cfg, tmp_path / "data", 16)
    msg = str(e.value)        # Lyon and France co-occur in one document: 1 of 3 is above 5%
    assert msg.startswith("1 of 3 knowledge facts (33.3%) are already in the general corpus")
    assert "Lyon | in_country | France" in msg and "max_contamination = 0.05" in msg and "\n" not in msg
    gen, kb = read_triplets(cfg.general_triplets, "general"), read_triplets(cfg.knowledge_triplets, "knowledge")
    check_knowledge(cfg.general_census, gen, kb, 0.34)                          # at or under the threshold: accepted
    other = read_triplets(_triplets(tmp_path / "k2.jsonl", [*knowledge, ("Kyoto", "in_country", "Japan")]), "knowledge")
    with pytest.raises(DataError, match=r"1 of 4 knowledge facts were not counted by the census.*Kyoto"):
        check_knowledge(cfg.general_census, gen, other, 1.0)                   # a census of another knowledge base


def test_prepared_probes_carry_each_general_facts_corpus_count(tmp_path):
    from kislurm.data import prepare as D

    cfg = _census_config(tmp_path, [("Cusco", "in_country", "Peru"), ("Bergen", "in_country", "Norway")])
    probes = D.prepare(cfg, tmp_path / "data", 16).probes
    general = probes.fact_group == 0
    counts = [r["docs_both"] for r in read_jsonl(tmp_path / "census" / "census.jsonl")]
    assert probes.fact_frequency[general].tolist() == counts == [1, 1, 1, 0]
    assert (probes.fact_frequency[~general] == -1).all()


def test_prepare_warns_once_without_a_census_on_real_facts():
    from kislurm.data.prepare import CensusWarning, warn_without_census
    from kislurm.plan.config import DataConfig

    with pytest.warns(CensusWarning, match="data.general_census is not set") as rec:
        warn_without_census(DataConfig(source="triplets", general_triplets="g", knowledge_triplets="k",
                                       templates_file="t"))
    assert len(rec) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_without_census(DataConfig())                                   # synthetic facts: nothing to check
