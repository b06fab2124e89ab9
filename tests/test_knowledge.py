"""Knowledge bases, templates, importers, the tokenizer and probes (no megatron here: fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, trainers

from kislurm.plan.config import DataConfig, KnowledgeBaseSpec
from kislurm.data.encoding import corpus_texts, encode_facts, training_sentences
from kislurm.data.knowledge import (DataError, Fact, KnowledgeBase, check_templates, read_templates, read_triplets,
                                    render, split_template, synthetic_bases)
from kislurm.data.probes import build_probes, load_probes, save_probes, subset_probes
from kislurm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

SMALL = DataConfig(general=KnowledgeBaseSpec(20, 2, 8), knowledge=KnowledgeBaseSpec(30, 2, 8), vocab_size=300)


@pytest.fixture(scope="module")
def small():
    gen, kb, templates = synthetic_bases(SMALL)
    tok = train_bpe(corpus_texts([gen, kb], templates), SMALL.vocab_size)
    return gen, kb, templates, tok


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "fix:" in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic bases and templates
# ----------------------------------------------------------------------------------------------------------------------


def test_synthetic_sizes_disjoint_names_and_seeded(small):
    gen, kb, templates, _ = small
    assert len(gen.facts) == 20 * 2 and len(kb.facts) == 30 * 2
    assert all(len(v) == 8 for v in [*gen.relation_values.values(), *kb.relation_values.values()])
    names = lambda b: {f.subject for f in b.facts} | {v for vs in b.relation_values.values() for v in vs}
    assert not names(gen) & names(kb)
    assert not set(gen.relation_values) & set(kb.relation_values)
    for b in (gen, kb):
        assert all(f.object in b.relation_values[f.relation] for f in b.facts)
    again = synthetic_bases(SMALL)
    assert again[0] == gen and again[1] == kb and again[2] == templates
    other = synthetic_bases(DataConfig(general=SMALL.general, knowledge=SMALL.knowledge, seed=7))
    assert other[1].facts != kb.facts


def test_synthetic_templates_object_last_and_heldout_disjoint(small):
    gen, kb, templates, _ = small
    for rel in [*gen.relation_values, *kb.relation_values]:
        t = templates[rel]
        assert len(t.train) == SMALL.train_templates and len(t.heldout) == SMALL.heldout_templates
        assert not set(t.train) & set(t.heldout)
        assert all(x.endswith("{object}") for x in t.all)
    with pytest.raises(DataError) as e:
        synthetic_bases(DataConfig(train_templates=10, heldout_templates=5))
    _one_line_error(e)


def test_split_template_cases():
    p = split_template("The capital of {subject} is {object}.")
    assert (p.before_subject, p.after_subject, p.object_prefix, p.suffix) == ("The capital of ", " is", " ", ".")
    p = split_template("{subject}'s code:{object}")
    assert (p.before_subject, p.after_subject, p.object_prefix) == ("", "'s code:", "")
    assert render("{subject} lives in {object}.", Fact("Ana", "city", "Rome")) == "Ana lives in Rome."
    for bad in ("{object} is where {subject} lives", "no placeholders", "{subject} {subject} {object}"):
        with pytest.raises(DataError) as e:
            split_template(bad)
        _one_line_error(e)


# ----------------------------------------------------------------------------------------------------------------------
# Importers
# ----------------------------------------------------------------------------------------------------------------------


def test_read_triplets_jsonl_and_tsv(tmp_path):
    rows = [("Ada", "born_in", "London"), ("Bob", "born_in", "Paris"), ("Ada", "born_in", "London"),
            ("Cy", "works_at", "Acme")]
    jl = tmp_path / "f.jsonl"
    jl.write_text("\n".join(json.dumps(dict(zip(("subject", "relation", "object"), r))) for r in rows) + "\n\n")
    tsv = tmp_path / "f.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    for path in (jl, tsv):
        kb = read_triplets(path, "knowledge")
        assert kb.facts == [Fact(*r) for r in rows[:2] + rows[3:]]   # exact duplicates dropped
        assert kb.relation_values == {"born_in": ["London", "Paris"], "works_at": ["Acme"]}


@pytest.mark.parametrize("name,text,line", [
    ("bad.jsonl", '{"subject": "a", "relation": "r", "object": "o"}\n{"subject": "a", "relation": "r"}\n', 2),
    ("bad.jsonl", '{"subject": "a", "relation": "r", "object": "o"}\n\nnot json\n', 3),
    ("bad.tsv", "a\tr\to\nb\tr\n", 2),
    ("bad.tsv", "a\tr\to\nb\t\to\n", 2),
])
def test_malformed_triplets_name_file_and_line(tmp_path, name, text, line):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_triplets(path, "knowledge")
    assert _one_line_error(e).startswith(f"{path}:{line}:")


def test_empty_or_missing_triplets(tmp_path):
    (tmp_path / "empty.tsv").write_text("\n\n")
    for path in (tmp_path / "empty.tsv", tmp_path / "missing.jsonl"):
        with pytest.raises(DataError) as e:
            read_triplets(path, "knowledge")
        assert str(path) in _one_line_error(e)


def test_templates_file_and_relation_without_templates(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("born_in:\n  train: ['{subject} was born in {object}.']\n"
                    "  heldout: ['{subject} hails from {object}']\n")
    templates = read_templates(path)
    assert templates["born_in"].heldout == ["{subject} hails from {object}"]
    kb = KnowledgeBase("knowledge", [Fact("a", "born_in", "x"), Fact("b", "works_at", "y")],
                       {"born_in": ["x"], "works_at": ["y"]})
    with pytest.raises(DataError) as e:
        check_templates(kb, templates, str(path))
    assert "works_at" in _one_line_error(e)
    path.write_text("born_in:\n  train: ['{object} is the birthplace of {subject}']\n")
    with pytest.raises(DataError) as e:
        read_templates(path)
    assert str(path) in _one_line_error(e)
    path.write_text("born_in: [unclosed\n")
    with pytest.raises(DataError) as e:
        read_templates(path)
    assert "malformed YAML at line 2" in _one_line_error(e)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and encoding
# ----------------------------------------------------------------------------------------------------------------------


def test_tokenizer_specials_roundtrip_and_save(small, tmp_path):
    gen, _, templates, tok = small
    assert tok.eod != tok.pad and tok.vocab_size <= SMALL.vocab_size
    text = render(templates[gen.facts[0].relation].train[0], gen.facts[0])
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert (again.eod, again.pad, again.vocab_size, again.unique_identifiers) == \
        (tok.eod, tok.pad, tok.vocab_size, tok.unique_identifiers)
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path / "nope.json")
    _one_line_error(e)


def test_user_tokenizer_without_pad_gets_one(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["</s>"],
                                                                     show_progress=False))
    hf.save(str(tmp_path / "u.json"))
    tok = load_tokenizer(tmp_path / "u.json")
    assert tok.eod == hf.token_to_id("</s>") and tok.pad == tok.vocab_size - 1 and tok.pad != tok.eod


def test_encoded_sentences_match_whole_text_and_probe_candidates(small):
    gen, kb, templates, tok = small
    for base in (gen, kb):
        enc = encode_facts(tok, base, templates)
        flat, off, fact, first = training_sentences(base, enc, tok)
        assert len(off) - 1 == sum(len(templates[f.relation].train) for f in base.facts)
        for i, f in enumerate(base.facts):
            for j, t in enumerate(templates[f.relation].train):
                ids = flat[off[first[i] + j]: off[first[i] + j + 1]].tolist()
                assert ids == tok.encode(render(t, f)) + [tok.eod]      # byte-level BPE: pieces = whole text
                assert fact[first[i] + j] == i
            assert enc.object_tokens[f.object].tolist() == tok.encode(" " + f.object)


def test_prompts_fall_back_to_whole_encoding_when_pieces_differ(small):
    gen, kb, templates, _ = small
    hf = HFTokenizer(models.BPE())           # no pre-tokenizer: merges cross spaces, so pieces != whole prompts
    hf.train_from_iterator(corpus_texts([kb], templates), trainers.BpeTrainer(vocab_size=400, show_progress=False))
    tok = Tokenizer(hf, source="test")
    enc = encode_facts(tok, kb, templates)
    for i, f in enumerate(kb.facts[:10]):
        for j, t in enumerate(templates[f.relation].all):
            p = split_template(t)
            assert enc.prompt(int(enc.slot_start[i]) + j).tolist() == \
                tok.encode(p.before_subject + f.subject + p.after_subject)


def test_probes_cover_every_fact_and_template(small, tmp_path):
    gen, kb, templates, tok = small
    probes = build_probes([(gen, encode_facts(tok, gen, templates), 0), (kb, encode_facts(tok, kb, templates), 1)],
                          k=3, seed=5)
    per_fact = SMALL.train_templates + SMALL.heldout_templates
    assert len(probes.fact_ids) == len(gen.facts) + len(kb.facts)
    assert len(probes.prompt) == len(probes.fact_ids) * per_fact and probes.n_choices == 4
    assert probes.fact_ids[0] == f"general:0:{gen.facts[0].relation}"
    assert probes.heldout.sum() == len(probes.fact_ids) * SMALL.heldout_templates
    facts = gen.facts + kb.facts
    values = {**gen.relation_values, **kb.relation_values}
    obj_tokens = {v: tok.encode(" " + v) for vs in values.values() for v in vs}
    answers = []
    for p in range(len(probes.prompt)):
        f = facts[probes.fact_index[p]]
        cands = [c.tolist() for c in probes.candidates[p]]
        assert cands[probes.answer[p]] == tok.encode(" " + f.object)
        names = [next(v for v in values[f.relation] if obj_tokens[v] == c) for c in cands]
        assert len(set(names)) == 4 and names.count(f.object) == 1   # distractors: same relation, all wrong
        answers.append(int(probes.answer[p]))
    assert len(set(answers)) > 1                                      # the right answer is not always first
    save_probes(probes, tmp_path / "p.npz")
    back = load_probes(tmp_path / "p.npz")
    assert back.fact_ids == probes.fact_ids and np.array_equal(back.answer, probes.answer)
    assert all(np.array_equal(a, b) for a, b in zip(back.prompt, probes.prompt))
    keep = np.zeros(len(probes.fact_ids), bool)
    keep[[0, 3, 50]] = True
    sub = subset_probes(probes, keep)
    assert sub.fact_ids == [probes.fact_ids[i] for i in (0, 3, 50)] and len(sub.prompt) == 3 * per_fact
    assert [probes.fact_ids[i] for i in np.flatnonzero(keep)[sub.fact_index]] == \
        [probes.fact_ids[i] for i in probes.fact_index[keep[probes.fact_index]]]


def test_tokenizer_corpus_sample_keeps_every_character(small):
    gen, kb, templates, _ = small
    full = list(corpus_texts([gen, kb], templates))
    sample = list(corpus_texts([gen, kb], templates, max_sentences=50, seed=1))
    assert len(sample) == 51 and set(sample[1:]) <= set(full)
    assert set("".join(full)) <= set(sample[0]) | {" "}
    assert sample == list(corpus_texts([gen, kb], templates, max_sentences=50, seed=1))
    tok = train_bpe(iter(sample), 300)
    for text in full[::7]:
        assert tok.decode(tok.encode(text)) == text


def test_training_templates_may_put_the_object_anywhere(small, tmp_path):
    _, kb, _, _ = small
    rel = next(iter(kb.relation_values))
    path = tmp_path / "t.yaml"
    path.write_text(f"{rel}:\n  train: ['{{object}} is the capital of {{subject}}.', 'In {{subject}}, {{object}} rules',"
                    " '{subject} is ruled from {object}.']\n  heldout: ['{subject} answers to {object}']\n")
    templates = read_templates(path)
    facts = [f for f in kb.facts if f.relation == rel]
    one = KnowledgeBase("knowledge", facts, {rel: kb.relation_values[rel]})
    tok = train_bpe(corpus_texts([one], templates), 300)
    enc = encode_facts(tok, one, templates)
    flat, off, _, first = training_sentences(one, enc, tok)
    for i, f in enumerate(facts):                  # every training sentence is the whole text, tokenized whole
        for j, t in enumerate(templates[rel].train):
            assert flat[off[first[i] + j]: off[first[i] + j + 1]].tolist() == tok.encode(render(t, f)) + [tok.eod]
    assert render(templates[rel].train[0], facts[0]) == f"{facts[0].object} is the capital of {facts[0].subject}."
    probes = build_probes([(one, enc, 1)], k=3, seed=0)
    assert len(probes.prompt) == 2 * len(facts)    # object-last templates only: one seen, one held out
    assert int(probes.heldout.sum()) == len(facts)
    seen = np.flatnonzero(~probes.heldout)[0]
    assert tok.decode(probes.prompt[seen]) == f"{facts[0].subject} is ruled from"
    assert probes.candidates[seen][probes.answer[seen]].tolist() == tok.encode(" " + facts[0].object)


def test_templates_that_cannot_be_probed_are_refused_naming_relation_and_text(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("capital:\n  train: ['{subject} has the capital {object}']\n"
                    "  heldout: ['{object} is the capital of {subject}']\n")
    with pytest.raises(DataError) as e:
        read_templates(path)
    msg = _one_line_error(e)
    assert "'capital'" in msg and "{object} is the capital of {subject}" in msg and str(path) in msg
    path.write_text("capital:\n  train: ['{object} is the capital of {subject}']\n")
    with pytest.raises(DataError) as e:
        read_templates(path)
    msg = _one_line_error(e)
    assert "'capital'" in msg and "{object} is the capital of {subject}" in msg
