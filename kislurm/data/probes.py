"""Probe sets, assembled from encoded facts (kislurm.data.encoding): seeded distractors, save, load and subsets.

A probe asks one fact with one template: the prompt is the sentence up to the object, the candidates are the right
object and k distractor objects of the same relation, tokenized exactly as in training text (one encoding serves
both). ProbeSet itself lives in kislurm.data.knowledge, beside the facts it asks about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kislurm.data.encoding import EncodedFacts, ragged, slices
from kislurm.data.knowledge import KnowledgeBase, ProbeSet, fact_id
from kislurm.errors import DataError


def _distractors(kb: KnowledgeBase, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per fact: its k+1 candidates as indices into its relation's values, in a seeded order (the right object among
    k wrong ones), and the position of the right one. Wrong: not any object the subject truly has for the relation."""
    objects_of: dict[tuple[str, str], list[str]] = {}
    for f in kb.facts:
        objects_of.setdefault((f.subject, f.relation), []).append(f.object)
    by_rel: dict[str, list[int]] = {}
    for i, f in enumerate(kb.facts):
        by_rel.setdefault(f.relation, []).append(i)
    cand = np.zeros((len(kb.facts), k + 1), dtype=np.int64)
    answer = np.zeros(len(kb.facts), dtype=np.int64)
    for rel, idx in by_rel.items():
        values = kb.relation_values[rel]
        pos = {v: j for j, v in enumerate(values)}
        for c0 in range(0, len(idx), 4096):                  # chunks bound the (n, V) key matrix
            chunk = idx[c0: c0 + 4096]
            right = np.array([pos[kb.facts[i].object] for i in chunk])
            keys = rng.random((len(chunk), len(values)))
            keys[np.arange(len(chunk)), right] = np.inf
            for row, i in enumerate(chunk):
                true = objects_of[(kb.facts[i].subject, rel)]
                if len(true) > 1:                            # a subject with several objects for the relation
                    keys[row, [pos[v] for v in true]] = np.inf
                if len(values) - len(true) < k:
                    raise DataError(f"{kb.name} fact {i} ({kb.facts[i].subject}, {rel}): only "
                                    f"{len(values) - len(true)} wrong objects for k={k} distractors; "
                                    "fix: lower data.distractors")
            wrong = np.argpartition(keys, k - 1, axis=1)[:, :k]          # the k smallest keys, then in key order
            wrong = np.take_along_axis(wrong, np.argsort(np.take_along_axis(keys, wrong, axis=1), axis=1), axis=1)
            options = np.concatenate([right[:, None], wrong], axis=1)
            order = np.argsort(rng.random((len(chunk), k + 1)), axis=1)
            cand[chunk] = np.take_along_axis(options, order, axis=1)
            answer[chunk] = np.argmax(order == 0, axis=1)
    return cand, answer


def build_probes(bases: list[tuple[KnowledgeBase, EncodedFacts, int]], k: int, seed: int) -> ProbeSet:
    """Every fact x every template of each (base, encoding, group); distractors seeded per base.

    The k distractors of a fact are drawn once (shared by all its templates, so seen and held-out probes of a fact
    differ only in the template) from its relation's objects minus every object the subject truly has for it.
    Candidate lists are shared by a fact's probes and candidate arrays by equal objects (memory at scale).
    """
    fact_ids: list[str] = []
    group, fact_index, heldout, answer, prompts, cands = [], [], [], [], [], []
    for kb, enc, grp in bases:
        cand_idx, right = _distractors(kb, k, np.random.default_rng([seed, 0x70, grp]))
        base = len(fact_ids)
        fact_ids.extend(fact_id(kb.name, i, f) for i, f in enumerate(kb.facts))
        group.append(np.full(len(kb.facts), grp, dtype=np.int8))
        per_fact = np.diff(enc.slot_start)
        slot_fact = np.repeat(np.arange(len(kb.facts)), per_fact)
        slots = np.arange(len(slot_fact)) if enc.probe is None else np.flatnonzero(enc.probe)
        held = slots - enc.slot_start[slot_fact[slots]] >= enc.n_train[slot_fact[slots]]
        slot_fact = slot_fact[slots]
        fact_index.append(base + slot_fact)
        heldout.append(held)
        answer.append(right[slot_fact])
        all_prompts = slices(enc.prompt_flat, enc.prompt_off)
        prompts.extend(all_prompts[i] for i in slots.tolist())
        tokens = {rel: [enc.object_tokens[v] for v in vals] for rel, vals in kb.relation_values.items()}
        lists = [[tokens[f.relation][j] for j in row] for f, row in zip(kb.facts, cand_idx.tolist())]
        cands.extend(lists[f] for f in slot_fact.tolist())
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return ProbeSet(fact_ids, cat(group, np.int8), cat(fact_index, np.int64), cat(heldout, bool), prompts, cands,
                    cat(answer, np.int64), k + 1)


def save_probes(p: ProbeSet, path: Path) -> None:
    """One .npz: ragged prompts, and candidates as a table of distinct candidate lists over distinct object arrays
    (a fact's probes share one list; equal objects share one array), so huge probe sets stay small."""
    pf, po = ragged(p.prompt)
    arrays: dict[int, int] = {}
    lists: dict[int, int] = {}
    table: list[list[int]] = []
    objects: list[np.ndarray] = []
    probe_list = np.empty(len(p.candidates), dtype=np.int64)
    last, j = None, -1
    for i, cs in enumerate(p.candidates):
        if cs is not last:
            j, last = lists.get(id(cs)), cs
        if j is None:
            j = lists[id(cs)] = len(table)
            row = []
            for c in cs:
                a = arrays.get(id(c))
                if a is None:
                    a = arrays[id(c)] = len(objects)
                    objects.append(c)
                row.append(a)
            table.append(row)
        probe_list[i] = j
    of, oo = ragged(objects)
    np.savez(path, fact_ids=np.array(p.fact_ids), fact_group=p.fact_group, fact_index=p.fact_index,
             heldout=p.heldout, answer=p.answer, n_choices=p.n_choices, pf=pf, po=po, of=of, oo=oo,
             table=np.array(table, dtype=np.int64).reshape(len(table), p.n_choices), probe_list=probe_list,
             **({} if p.fact_frequency is None else {"fact_frequency": p.fact_frequency.astype(np.int64)}))


def load_probes(path: Path) -> ProbeSet:
    z = np.load(path)
    objects = slices(z["of"], z["oo"])
    lists = [[objects[a] for a in row] for row in z["table"].tolist()]
    cands = [lists[j] for j in z["probe_list"].tolist()]
    return ProbeSet(z["fact_ids"].tolist(), z["fact_group"], z["fact_index"], z["heldout"], slices(z["pf"], z["po"]),
                    cands, z["answer"], int(z["n_choices"]),
                    z["fact_frequency"] if "fact_frequency" in z.files else None)


def subset_probes(probes: ProbeSet, keep_fact: np.ndarray) -> ProbeSet:
    """The probes of the facts where keep_fact (F,) is True, with fact indices renumbered (order kept)."""
    new_index = np.cumsum(keep_fact) - 1
    keep_probe = keep_fact[probes.fact_index]
    sel = np.flatnonzero(keep_probe)
    return ProbeSet([fid for fid, k in zip(probes.fact_ids, keep_fact) if k], probes.fact_group[keep_fact],
                    new_index[probes.fact_index[sel]], probes.heldout[sel], [probes.prompt[i] for i in sel],
                    [probes.candidates[i] for i in sel], probes.answer[sel], probes.n_choices,
                    None if probes.fact_frequency is None else probes.fact_frequency[keep_fact])
