"""Fact encoding, one way: templates -> sentences -> token ids -> ragged arrays, for training text and probes alike.

`encode_facts` turns every (fact, template) slot of a base into token ids once, shared by the training text and the
probes: a sentence is tokenized as prompt + object + suffix, so a probe's candidate tokens are exactly the tokens its
object has in training text. `training_sentences` assembles the training sentences (EOD after each) from that
encoding, `corpus_texts` renders every sentence as text for the tokenizer's training, and `ragged`/`ragged_rows`/
`slices` are the ragged-array primitives all of it (and the streams and probes built on it) use. Upstream:
kislurm.data.knowledge (facts, templates) and kislurm.data.tokenizer; downstream: probes, streams, prepare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from kislurm.data.knowledge import KnowledgeBase, TemplateParts, Templates, probeable, render, split_template
from kislurm.data.tokenizer import Tokenizer
from kislurm.errors import DataError

# ----------------------------------------------------------------------------------------------------------------------
# Ragged arrays
# ----------------------------------------------------------------------------------------------------------------------


def ragged(arrays) -> tuple[np.ndarray, np.ndarray]:
    """(flat, offsets) of a list of 1-D int arrays."""
    lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    off = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    flat = np.concatenate(arrays).astype(np.int32) if len(arrays) else np.zeros(0, np.int32)
    return flat, off


def ragged_rows(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise concatenation: row i = concat over parts of flat[off[ids[i]]:off[ids[i]+1]]; vectorised."""
    n = len(parts[0][2])
    lens = [off[ids + 1] - off[ids] for _, off, ids in parts]
    total = np.sum(lens, axis=0)
    out_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(total, out=out_off[1:])
    out = np.empty(int(out_off[-1]), dtype=np.int32)
    start = out_off[:-1].copy()
    for (flat, off, ids), ln in zip(parts, lens):
        count = int(ln.sum())
        if count:
            rows = np.repeat(np.arange(n), ln)
            within = np.arange(count) - np.repeat(np.cumsum(ln) - ln, ln)
            out[start[rows] + within] = flat[off[ids][rows] + within]
        start += ln
    return out, out_off


def slices(flat: np.ndarray, off: np.ndarray) -> list[np.ndarray]:
    """Views flat[off[i]:off[i+1]] (much faster than np.split for millions of pieces)."""
    return [flat[a:b] for a, b in zip(off[:-1].tolist(), off[1:].tolist())]


# ----------------------------------------------------------------------------------------------------------------------
# Encoded facts and training sentences
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedFacts:
    """Token ids of every (fact, template) slot of one base, as ragged arrays (see encode_facts).

    Slots are fact-major: the slots of fact f are slot_start[f] .. slot_start[f+1], training templates first.
    A training sentence is prompt(slot) + object(fact) + suffix(slot) + [eod]; a probe is prompt + candidates.
    """

    prompt_flat: np.ndarray     # int32
    prompt_off: np.ndarray      # (S+1,) int64
    suffix_flat: np.ndarray     # int32
    suffix_off: np.ndarray      # (S+1,) int64
    slot_start: np.ndarray      # (F+1,) int64
    n_train: np.ndarray         # (F,) int64: training templates of each fact's relation
    object_tokens: dict[str, np.ndarray]   # every object string of the base (right objects and distractors)
    probe: Optional[np.ndarray] = None     # (S,) bool: the slot's template ends with the object (None: every slot).
    # A slot that cannot be probed (a training template with the object elsewhere) holds its whole training
    # sentence as its prompt, with an empty object and suffix.

    def prompt(self, slot: int) -> np.ndarray:
        return self.prompt_flat[self.prompt_off[slot]: self.prompt_off[slot + 1]]


@dataclass(frozen=True)
class Sentences:
    """Every training sentence of a base, tokenized (EOD included), fact-major."""

    flat: np.ndarray     # int32 tokens of every training sentence (EOD included)
    off: np.ndarray      # (S+1,)
    fact: np.ndarray     # (S,) fact of each sentence
    first: np.ndarray    # (F+1,) first sentence of each fact; its training templates follow

    @classmethod
    def load(cls, path: Path) -> "Sentences":
        z = np.load(path)
        return cls(z["flat"], z["off"], z["fact"], z["first"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.off)

    @property
    def n_train(self) -> np.ndarray:
        return np.diff(self.first)

    @property
    def n_facts(self) -> int:
        return len(self.first) - 1


class _Pieces:
    """Distinct strings, each tokenized once (batched)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def id(self, text: str) -> int:
        i = self.index.get(text)
        if i is None:
            i = self.index[text] = len(self.index)
        return i

    def encode(self, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
        return ragged(tokenizer.encode_batch(list(self.index)))


def encode_facts(tokenizer: Tokenizer, kb: KnowledgeBase, templates: Templates, check: int = 256) -> EncodedFacts:
    """Token ids of every (fact, template) slot of `kb` (fact-major; training templates first).

    The prompt is tokenized from pieces (text before the subject, the subject, text up to the object), each distinct
    piece once, which is exact for pre-tokenizers that split at spaces (our byte-level BPE). `check` sampled prompts
    are compared with whole-string encoding; if any differs (some user tokenizers), every prompt is encoded whole.
    """
    parts = {t: split_template(t) if probeable(t) else _WHOLE for rel in kb.relation_values
             for t in templates[rel].all}
    rel_tpls = {rel: templates[rel].all for rel in kb.relation_values}
    counts = np.fromiter((len(rel_tpls[f.relation]) for f in kb.facts), dtype=np.int64, count=len(kb.facts))
    slot_start = np.zeros(len(kb.facts) + 1, dtype=np.int64)
    np.cumsum(counts, out=slot_start[1:])
    n_train = np.fromiter((len(templates[f.relation].train) for f in kb.facts), dtype=np.int64, count=len(kb.facts))

    # Piece ids per template (text before the subject, whitespace glued to the subject, text after, suffix) and
    # per (subject, whitespace); slots then only gather them.
    pieces = _Pieces()
    tpl_ids = {t: i for i, t in enumerate(parts)}
    heads = [p.before_subject.rstrip() for p in parts.values()]
    glue = [p.before_subject[len(h):] for p, h in zip(parts.values(), heads)]
    glue_id = {g: i for i, g in enumerate(dict.fromkeys(glue))}
    t_pre = np.array([pieces.id(h) for h in heads], dtype=np.int64)
    t_post = np.array([pieces.id(p.after_subject) for p in parts.values()], dtype=np.int64)
    t_suffix = np.array([pieces.id(p.suffix) for p in parts.values()], dtype=np.int64)
    t_glue = np.array([glue_id[g] for g in glue], dtype=np.int64)
    subj = np.array([[pieces.id(g + f.subject) for g in glue_id] for f in kb.facts], dtype=np.int64)
    rel_ids = {rel: [tpl_ids[t] for t in tpls] for rel, tpls in rel_tpls.items()}
    slot_tpl = np.fromiter((i for f in kb.facts for i in rel_ids[f.relation]), dtype=np.int64,
                           count=int(slot_start[-1]))
    slot_fact = np.repeat(np.arange(len(kb.facts)), counts)
    ids = [t_pre[slot_tpl], subj[slot_fact, t_glue[slot_tpl]], t_post[slot_tpl], t_suffix[slot_tpl]]
    probe_parts = {t: p for t, p in parts.items() if p is not _WHOLE}
    objects = {o: pieces.id(parts_prefix + o) for o, parts_prefix in _object_strings(kb, probe_parts, rel_tpls)}
    flat, off = pieces.encode(tokenizer)
    prompt_flat, prompt_off = ragged_rows([(flat, off, ids[0]), (flat, off, ids[1]), (flat, off, ids[2])])
    suffix_flat, suffix_off = ragged_rows([(flat, off, ids[3])])
    object_tokens = {o: flat[off[i]: off[i + 1]].copy() for o, i in objects.items()}
    enc = EncodedFacts(prompt_flat, prompt_off, suffix_flat, suffix_off, slot_start, n_train, object_tokens)
    if not _prompts_agree(tokenizer, kb, rel_tpls, enc, parts, check):
        texts = [f"{parts[t].before_subject}{f.subject}{parts[t].after_subject}"
                 for f in kb.facts for t in rel_tpls[f.relation]]
        prompt_flat, prompt_off = ragged(tokenizer.encode_batch(texts))
    probe = np.fromiter((parts[t] is not _WHOLE for f in kb.facts for t in rel_tpls[f.relation]), dtype=bool,
                        count=int(slot_start[-1]))
    if not probe.all():
        prompt_flat, prompt_off = _whole_sentences(tokenizer, kb, rel_tpls, probe, prompt_flat, prompt_off)
    return EncodedFacts(prompt_flat, prompt_off, suffix_flat, suffix_off, slot_start, n_train, object_tokens,
                        None if probe.all() else probe)


_WHOLE = TemplateParts("", "", "", "")   # a training template with the object not last: encoded as a whole sentence


def _with_empty_row(flat: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    return flat, np.append(off, off[-1]), len(off) - 1


def _whole_sentences(tokenizer: Tokenizer, kb: KnowledgeBase, rel_tpls: dict, probe: np.ndarray,
                     prompt_flat: np.ndarray, prompt_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prompts where every slot that cannot be probed holds its whole training sentence (tokenized whole)."""
    texts = [render(t, f) for f in kb.facts for t in rel_tpls[f.relation] if not probeable(t)]
    w_flat, w_off = ragged(tokenizer.encode_batch(texts))
    p_flat, p_off, p_empty = _with_empty_row(prompt_flat, prompt_off)
    w_flat, w_off, w_empty = _with_empty_row(w_flat, w_off)
    slots = np.arange(len(probe))
    whole_row = np.cumsum(~probe) - 1
    return ragged_rows([(p_flat, p_off, np.where(probe, slots, p_empty)),
                        (w_flat, w_off, np.where(probe, w_empty, whole_row))])


def _object_strings(kb: KnowledgeBase, parts: dict, rel_tpls: dict) -> list[tuple[str, str]]:
    """(object, whitespace before it) for every value of every relation; one prefix per base is required."""
    prefixes = {parts[t].object_prefix for tpls in rel_tpls.values() for t in tpls if t in parts}
    if len(prefixes) != 1:
        raise DataError(f"{kb.name} templates: some put a space before {{object}} and some do not; fix: write "
                        "every template with the same spacing before {object} (candidates are tokenized once)")
    prefix = prefixes.pop()
    return [(o, prefix) for vals in kb.relation_values.values() for o in vals]


def _prompts_agree(tokenizer: Tokenizer, kb: KnowledgeBase, rel_tpls: dict, enc: EncodedFacts, parts: dict,
                   check: int) -> bool:
    rng = np.random.default_rng(0)
    n_slots = len(enc.prompt_off) - 1
    slots = np.unique(np.concatenate([np.arange(min(n_slots, check)), rng.integers(0, n_slots, size=check)]))
    fact_of = np.searchsorted(enc.slot_start, slots, side="right") - 1
    texts, checked = [], []
    for s, fi in zip(slots.tolist(), fact_of.tolist()):
        f = kb.facts[fi]
        t = rel_tpls[f.relation][s - int(enc.slot_start[fi])]
        if parts[t] is not _WHOLE:
            texts.append(f"{parts[t].before_subject}{f.subject}{parts[t].after_subject}")
            checked.append(s)
    slots = checked
    whole = tokenizer.encode_batch(texts)
    return all(np.array_equal(w, enc.prompt(s)) for w, s in zip(whole, slots))


def training_sentences(kb: KnowledgeBase, enc: EncodedFacts, tok: Tokenizer
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of every (fact, training template) sentence, prompt + object + suffix + EOD, fact-major.

    Returns (flat, offsets, fact of each sentence, first sentence of each fact (F+1,)).
    """
    fact_of_slot = np.repeat(np.arange(len(kb.facts)), np.diff(enc.slot_start))
    within = np.arange(len(fact_of_slot)) - enc.slot_start[fact_of_slot]
    train = np.flatnonzero(within < enc.n_train[fact_of_slot])
    objects = list(enc.object_tokens)
    obj_flat, obj_off, no_object = _with_empty_row(*ragged([enc.object_tokens[o] for o in objects]))
    obj_id = {o: i for i, o in enumerate(objects)}
    fact_obj = np.fromiter((obj_id[f.object] for f in kb.facts), dtype=np.int64, count=len(kb.facts))
    train_obj = fact_obj[fact_of_slot[train]]
    if enc.probe is not None:   # whole sentences sit in the prompt of slots that cannot be probed
        train_obj = np.where(enc.probe[train], train_obj, no_object)
    eod_flat, eod_off = np.array([tok.eod], np.int32), np.array([0, 1], np.int64)
    flat, off = ragged_rows([(enc.prompt_flat, enc.prompt_off, train),
                             (obj_flat, obj_off, train_obj),
                             (enc.suffix_flat, enc.suffix_off, train),
                             (eod_flat, eod_off, np.zeros(len(train), np.int64))])
    first = np.zeros(len(kb.facts) + 1, dtype=np.int64)
    np.cumsum(enc.n_train, out=first[1:])
    return flat, off, fact_of_slot[train].astype(np.int32), first


def corpus_texts(kbs: Sequence[KnowledgeBase], templates: Templates, max_sentences: int | None = None,
                 seed: int = 0) -> Iterable[str]:
    """Every sentence of every fact under every template (training and held-out): the tokenizer's corpus.

    Above max_sentences, a seeded uniform sample of them plus one line holding every character of the corpus: BPE
    merges are frequency statistics a sample estimates well, and the full alphabet keeps every sentence
    in-vocabulary (training on millions of sentences would take minutes).
    """
    total = sum(len(templates[f.relation].all) for kb in kbs for f in kb.facts)
    keep = None
    if max_sentences is not None and total > max_sentences:
        keep = np.zeros(total, dtype=bool)
        keep[np.random.default_rng([seed, 0x7E]).choice(total, size=max_sentences, replace=False)] = True
        chars: set[str] = set()
        for kb in kbs:
            for f in kb.facts:
                chars.update(f.subject, f.object)
        for t in templates.values():
            for text in t.all:
                chars.update(text.replace("{subject}", "").replace("{object}", ""))
        yield "".join(sorted(chars))
    i = 0
    for kb in kbs:
        for f in kb.facts:
            for t in templates[f.relation].all:
                if keep is None or keep[i]:
                    yield render(t, f)
                i += 1
