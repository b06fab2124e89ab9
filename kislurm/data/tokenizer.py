"""Tokenizer: a BPE trained offline on the run's own corpus (or a user's tokenizer.json), and fact encoding.

`Tokenizer` wraps a `tokenizers.Tokenizer` and is also what megatron-core's GPTDatasetConfig needs (vocab_size, eod,
a distinct pad, unique_identifiers that enter its cache hash). `encode_facts` turns every (fact, template) of a
base into token ids once, shared by the training text and the probes: a sentence is tokenized as
prompt + object + suffix, so a probe's candidate tokens are exactly the tokens its object has in training text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kislurm.data.knowledge import (DataError, EncodedFacts, KnowledgeBase, TemplateParts, Templates, probeable, ragged,
                                    render, split_template)

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_EOD_NAMES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` with an end-of-document and a distinct pad token (added if the file lacks them)."""

    def __init__(self, tok: HFTokenizer, source: str = "trained"):
        self.tok = tok
        self.source = source
        eod = _find(tok, _EOD_NAMES)
        if eod is None:
            tok.add_special_tokens([EOD_TOKEN])
            eod = tok.token_to_id(EOD_TOKEN)
        pad = _find(tok, _PAD_NAMES)
        if pad is None or pad == eod:
            tok.add_special_tokens([PAD_TOKEN])
            pad = tok.token_to_id(PAD_TOKEN)
        self.eod: int = eod
        self.pad: int = pad
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(tok.to_str().encode()).hexdigest()
        self.unique_identifiers: dict = {"class": "kislurm.Tokenizer", "sha256": self.sha256,
                                         "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens a post-processor would add."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of many texts (parallel in Rust), as int32 arrays."""
        encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.tok.save(str(path))

    @property
    def dtype(self) -> type:
        """Smallest dtype of the indexed datasets (megatron reads it from the .idx)."""
        return np.uint16 if self.vocab_size <= 65536 else np.int32


def _find(tok: HFTokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A user's tokenizer.json (e.g. the one that produced the general corpus)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found; fix: correct data.tokenizer or unset it to train one")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust error is one long line
        raise DataError(f"{path}: not a tokenizers JSON file ({str(e)[:120]}); fix: save it with "
                        "tokenizers' Tokenizer.save") from None
    return Tokenizer(tok, source=str(path))


def _tokenizing(path: Path) -> dict:
    """What decides a tokenizer's ids: its model (vocabulary, merges), normalizer, pre-tokenizer and added tokens."""
    spec = json.loads(HFTokenizer.from_file(str(path)).to_str())
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])
    return {"model": spec.get("model"), "normalizer": spec.get("normalizer"),
            "pre_tokenizer": spec.get("pre_tokenizer"), "added_tokens": added}


def check_base_tokenizer(path: str | None, base: str) -> None:
    """A cell that starts from a base model (init_from) must tokenize as the base did: data.tokenizer must be the
    base's own tokenizer.json (same vocabulary, merges, pre-tokenization and added tokens)."""
    base_file = Path(base) / "tokenizer.json"
    if not base_file.is_file():
        raise DataError(f"{base}: the base has no tokenizer.json; fix: save its fast tokenizer there "
                        "(tokenizer.save_pretrained(folder))")
    if path is None or _tokenizing(Path(path)) != _tokenizing(base_file):
        raise DataError(f"data.tokenizer {path} differs from the base's {base_file}; fix: unset data.tokenizer (the "
                        "base's is then used) or set it to the base's tokenizer.json")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `texts` (the run's corpus, so every name is in vocabulary).

    The byte alphabet is limited to the characters of the corpus, which leaves more of a small vocabulary to merges.
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN, PAD_TOKEN],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


# ----------------------------------------------------------------------------------------------------------------------
# Encoding facts
# ----------------------------------------------------------------------------------------------------------------------


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
