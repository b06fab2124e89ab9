"""Knowledge bases, templates and probes: the facts a run trains on and measures retention with.

A knowledge base is a list of (subject, relation, object) facts plus the possible objects of each relation. It is
either generated (seeded, fictional syllable-built names that no pretrained model could know; the general and the
domain base draw from one name pool, so their names are disjoint) or imported from a JSONL/TSV triplet file with a
YAML file of relation templates. A template turns a fact into a sentence; training templates appear in the training
text (the object anywhere), held-out ones only in probes. Probes need the object last: held-out templates and the
training templates probed as seen ones end with it. A probe asks one fact with one template: the prompt is
the sentence up to the object, the candidates are the right object and k distractor objects of the same relation.

Token ids are not computed here: kislurm.data.encoding encodes facts once, for training text and probes alike, and
kislurm.data.probes assembles probe sets from that encoding.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from kislurm.errors import DataError  # noqa: F401 (re-exported)
from kislurm.plan.loader import read_yaml


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triplet."""

    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class KnowledgeBase:
    """A named list of facts plus the possible objects of each relation (distractors come from here)."""

    name: str
    facts: list[Fact]
    relation_values: dict[str, list[str]]


@dataclass(frozen=True)
class ProbeSet:
    """Every (fact, template) probe, tokenized, ready for batched multiple-choice scoring."""

    fact_ids: list[str]
    """(F,) stable fact ids, e.g. "general:17:city"."""
    fact_group: np.ndarray
    """(F,) int8: 0 = general fact, 1 = infused fact."""
    fact_index: np.ndarray
    """(P,) int64: the fact each probe asks about (index into fact_ids)."""
    heldout: np.ndarray
    """(P,) bool: the probe's template was never trained on."""
    prompt: list[np.ndarray]
    """(P,) int32 token ids of the prompt (the template up to the object)."""
    candidates: list[list[np.ndarray]]
    """(P, k+1) int32 token ids of each candidate object, as it appears right after the prompt in training text."""
    answer: np.ndarray
    """(P,) int64: index of the correct candidate."""
    n_choices: int
    """k + 1."""
    fact_frequency: Optional[np.ndarray] = None
    """(F,) int64 corpus count of each fact where a census gave one (general facts: the documents holding subject
    and object, kislurm.data.census; -1: not counted), else None."""


@dataclass(frozen=True)
class HeldoutDocs:
    """Documents of the general stream that no cell trains on (kislurm.data.prepare.heldout_documents), scored by
    kislurm.retention.evaluate.heldout_loss: each is predicted after `context` (the EOD that precedes a document in
    training), its own EOD left out."""

    tokens: list[np.ndarray]
    """(D,) int32 token ids of each document."""
    n_bytes: np.ndarray
    """(D,) int64 UTF-8 bytes of each document's text."""
    context: int


@dataclass(frozen=True)
class RelationTemplates:
    """Sentence templates of one relation, each with one `{subject}` and one `{object}`. Training templates may put
    the object anywhere; those with the object last (punctuation may follow) are also probed as seen templates.
    Held-out templates exist only to be probed, so they must end with the object."""

    train: list[str]
    heldout: list[str]

    @property
    def all(self) -> list[str]:
        return [*self.train, *self.heldout]


Templates = dict[str, RelationTemplates]


def fact_id(kb_name: str, index: int, fact: Fact) -> str:
    """Stable id of fact `index` of a base: identical in every cell of a run (the aggregator joins on it)."""
    return f"{kb_name}:{index}:{fact.relation}"


# ----------------------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------------------

_OBJECT_LAST = re.compile(r"\{object\}([\s.!?;,]*)$")


@dataclass(frozen=True)
class TemplateParts:
    """A template split where the tokenizer sees it: prompt text, the text glued before the object, a suffix."""

    before_subject: str
    after_subject: str   # text between the subject and the object, without the space that precedes the object
    object_prefix: str   # "" or " ": the whitespace that precedes the object in training text
    suffix: str          # punctuation after the object ("" for most templates)


@functools.lru_cache(maxsize=4096)
def split_template(template: str, where: str = "template") -> TemplateParts:
    """Check a template (one `{subject}`, one `{object}` at the end) and cut it into its parts."""
    if template.count("{subject}") != 1 or template.count("{object}") != 1:
        raise DataError(f"{where}: template '{template}' needs exactly one {{subject}} and one {{object}}; "
                        "fix: write e.g. 'The capital of {subject} is {object}'")
    m = _OBJECT_LAST.search(template)
    if m is None:
        raise DataError(f"{where}: template '{template}' does not end with {{object}}; fix: put the object last "
                        "(only punctuation may follow), e.g. '{subject} was born in {object}.'")
    before, after = template[: m.start()].split("{subject}")
    stripped = after.rstrip()
    prefix = " " if len(stripped) < len(after) else ""
    return TemplateParts(before, stripped, prefix, m.group(1).rstrip())


def probeable(template: str) -> bool:
    """A probe asks for the object after a prompt, so only a template that ends with `{object}` can be probed."""
    return _OBJECT_LAST.search(template) is not None


def render(template: str, fact: Fact) -> str:
    """The training sentence of a fact under a template (what the tokenizer is trained on)."""
    if not probeable(template):
        return template.replace("{subject}", fact.subject).replace("{object}", fact.object)
    p = split_template(template)
    return f"{p.before_subject}{fact.subject}{p.after_subject}{p.object_prefix}{fact.object}{p.suffix}"


def check_relation_templates(rel: str, t: RelationTemplates, where: str) -> None:
    """One `{subject}` and one `{object}` per template; held-out templates and at least one template per relation
    must be probeable (object last), or the relation's facts could not be measured."""
    for text in t.all:
        if text.count("{subject}") != 1 or text.count("{object}") != 1:
            raise DataError(f"{where}: relation '{rel}': template '{text}' needs exactly one {{subject}} and one "
                            "{object}; fix: write e.g. 'The capital of {subject} is {object}'")
    for text in t.heldout:
        if not probeable(text):
            raise DataError(f"{where}: relation '{rel}': held-out template '{text}' cannot be probed (a probe "
                            "needs {object} last); fix: put the object last (only punctuation may follow), e.g. "
                            "'{subject} was born in {object}.', or make it a training template")
    if t.all and not any(probeable(text) for text in t.all):
        raise DataError(f"{where}: relation '{rel}': no template ends with {{object}} (e.g. '{t.all[0]}'), so its "
                        "facts cannot be probed; fix: add a template with the object last, e.g. "
                        "'{subject} was born in {object}.'")


def check_templates(kb: KnowledgeBase, templates: Templates, where: str) -> None:
    """Every relation of the base has a training template and every template is usable."""
    for rel in kb.relation_values:
        t = templates.get(rel)
        if t is None or not t.train:
            raise DataError(f"{where}: relation '{rel}' (used by the {kb.name} facts) has no training templates; "
                            f"fix: add '{rel}: {{train: [...], heldout: [...]}}' to the templates file")
        check_relation_templates(rel, t, where)


def read_templates(path: str | Path) -> Templates:
    """Read a YAML file of relation -> {train: [...], heldout: [...]} templates."""
    path = Path(path)
    raw = read_yaml(path, DataError, "templates file", "correct data.templates_file")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a mapping relation -> {{train: [...], heldout: [...]}}; fix: see docs")
    out: Templates = {}
    for rel, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) - {"train", "heldout"}:
            raise DataError(f"{path}: relation '{rel}' must map to {{train: [...], heldout: [...]}}; "
                            f"got {spec!r}; fix: use exactly those two keys")
        train, heldout = spec.get("train") or [], spec.get("heldout") or []
        if not all(isinstance(t, str) for t in [*train, *heldout]):
            raise DataError(f"{path}: relation '{rel}': templates must be strings; fix: quote each template")
        out[str(rel)] = RelationTemplates(list(train), list(heldout))
        check_relation_templates(str(rel), out[str(rel)], str(path))
    return out


# Frames for synthetic relations; `{rel}` is the relation's fictional noun. The object is always last.
_FRAMES = [
    "The {rel} of {subject} is {object}",
    "{subject} has the {rel} {object}",
    "{subject}'s {rel} is {object}",
    "As for {subject}, its {rel} is {object}",
    "We know that the {rel} of {subject} is {object}",
    "For {subject}, the recorded {rel} is {object}",
    "{subject} is known for the {rel} {object}",
    "Everyone agrees that {subject} holds the {rel} {object}",
    "In the records, {subject} lists its {rel} as {object}",
    "Q: what is the {rel} of {subject}? A: {object}",
    "It is said that {subject} bears the {rel} {object}",
    "Ask anyone about the {rel} of {subject} and they say {object}",
]


def synthetic_templates(relations: list[str], nouns: dict[str, str], n_train: int, n_heldout: int,
                        rng: np.random.Generator) -> Templates:
    """Per relation, a seeded choice of distinct frames: the first n_train train, the next n_heldout are held out."""
    if n_train + n_heldout > len(_FRAMES):
        raise DataError(f"data.train_templates + data.heldout_templates = {n_train + n_heldout} exceeds the "
                        f"{len(_FRAMES)} synthetic frames; fix: use at most {len(_FRAMES)} in total")
    out: Templates = {}
    for rel in relations:
        order = rng.permutation(len(_FRAMES))
        texts = [_FRAMES[i].replace("{rel}", nouns[rel]) for i in order[: n_train + n_heldout]]
        out[rel] = RelationTemplates(texts[:n_train], texts[n_train:])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic knowledge bases
# ----------------------------------------------------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "st", "th", "sh", "ch", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "x", "th"]
_SYLLABLES = np.array([o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS])


class NamePool:
    """Seeded fictional names, unique across everything drawn from one pool (so general and domain are disjoint)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.used: set[str] = set()

    def draw(self, n: int, syllables: tuple[int, int], words: int = 1) -> list[str]:
        """n new capitalised names of `words` words, each of syllables[0]..syllables[1] syllables."""
        out: list[str] = []
        while len(out) < n:
            want = int((n - len(out)) * 1.2) + 8
            parts = []
            for _ in range(words):
                count = self.rng.integers(syllables[0], syllables[1] + 1, size=want)
                picks = self.rng.integers(0, len(_SYLLABLES), size=(want, syllables[1]))
                sy = _SYLLABLES[picks]
                parts.append(["".join(row[:c]).capitalize() for row, c in zip(sy.tolist(), count.tolist())])
            for name in (" ".join(ws) for ws in zip(*parts)):
                if name not in self.used and len(out) < n:
                    self.used.add(name)
                    out.append(name)
        return out


def synthetic_base(name: str, entities: int, relations: int, values_per_relation: int, pool: NamePool,
                   style: dict) -> tuple[KnowledgeBase, dict[str, str]]:
    """A base of `entities` subjects x `relations` relations; each object drawn uniformly from its relation's values.

    Returns the base and each relation's noun (the word templates use). Facts are ordered entity-major.
    """
    nouns = pool.draw(relations, (2, 2))
    rel_names = [f"{name}_{n.lower()}" for n in nouns]
    subjects = pool.draw(entities, style["subject_syllables"], style["subject_words"])
    values = {rel: pool.draw(values_per_relation, style["value_syllables"]) for rel in rel_names}
    choice = pool.rng.integers(0, values_per_relation, size=(entities, relations))
    facts = [Fact(s, rel, values[rel][choice[i, j]])
             for i, s in enumerate(subjects) for j, rel in enumerate(rel_names)]
    return KnowledgeBase(name, facts, values), {rel: n.lower() for rel, n in zip(rel_names, nouns)}


# Short names keep a fact sentence near 13 tokens at the default 512-token vocabulary (two fit a 32-token sample).
GENERAL_STYLE = {"subject_syllables": (1, 2), "subject_words": 2, "value_syllables": (1, 2)}
DOMAIN_STYLE = {"subject_syllables": (2, 3), "subject_words": 1, "value_syllables": (1, 2)}


def synthetic_bases(data, general: bool = True) -> tuple[Optional[KnowledgeBase], KnowledgeBase, Templates]:
    """The run's general and knowledge bases and their templates, all from `data.seed` (a DataConfig)."""
    rng = np.random.default_rng([data.seed, 0x6B62])
    pool = NamePool(rng)
    gen_kb, nouns = None, {}
    if general:
        g = data.general
        gen_kb, nouns = synthetic_base("general", g.entities, g.relations, g.values_per_relation, pool,
                                       GENERAL_STYLE)
    k = data.knowledge
    kb, knouns = synthetic_base("knowledge", k.entities, k.relations, k.values_per_relation, pool, DOMAIN_STYLE)
    nouns.update(knouns)
    templates = synthetic_templates(list(nouns), nouns, data.train_templates, data.heldout_templates, rng)
    return gen_kb, kb, templates


def neutral_base(kb: KnowledgeBase, n_facts: int, seed: Any, exclude: set[str]) -> KnowledgeBase:
    """Neutral text for the dilution control (issue 17): n_facts sentences' worth of (subject, relation, object)
    with fresh subjects (the domain style, none of `exclude`), each subject once per relation of `kb` with an
    object drawn at random from that relation's values: nothing in it repeats, so it holds no consistent fact."""
    rels = list(kb.relation_values)
    pool = NamePool(np.random.default_rng([*np.atleast_1d(seed).tolist(), 0x6E74]))
    pool.used.update(exclude)
    subjects = pool.draw(-(-n_facts // len(rels)), DOMAIN_STYLE["subject_syllables"], DOMAIN_STYLE["subject_words"])
    choice = pool.rng.integers(0, 1 << 30, size=(len(subjects), len(rels)))
    facts = [Fact(subj, rel, kb.relation_values[rel][choice[i, j] % len(kb.relation_values[rel])])
             for i, subj in enumerate(subjects) for j, rel in enumerate(rels)]
    return KnowledgeBase("neutral", facts[:n_facts], kb.relation_values)


# ----------------------------------------------------------------------------------------------------------------------
# Imported triplets
# ----------------------------------------------------------------------------------------------------------------------


def _triplet_rows(path: Path) -> Iterator[tuple[int, tuple[str, str, str]]]:
    """(line number, (subject, relation, object)) of a JSONL or TSV file; raises DataError naming file:line."""
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for lineno, obj in jsonl_triplets(path):
            yield lineno, (obj["subject"].strip(), obj["relation"].strip(), obj["object"].strip())
        return
    with path.open(newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 3 or not all(c.strip() for c in row):
                raise DataError(f"{path}:{lineno}: expected 3 non-empty tab-separated columns (subject, relation, "
                                f"object), got {len(row)}; fix: correct or remove the line")
            yield lineno, (row[0].strip(), row[1].strip(), row[2].strip())


def jsonl_triplets(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every line of a triplet JSONL file, each checked to hold non-empty string subject,
    relation and object (other keys, such as a census's alias lists, pass through); DataError names file:line."""
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
            yield lineno, obj


def read_triplets(path: str | Path, name: str) -> KnowledgeBase:
    """Import facts from a JSONL ({"subject","relation","object"} per line) or TSV (3 columns) file.

    Exact duplicate lines are dropped; a relation's possible objects are every object it has in the file
    (in first-seen order), so distractors are real objects of the same relation.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: triplet file not found; fix: correct the path in the config")
    seen: set[tuple[str, str, str]] = set()
    facts: list[Fact] = []
    values: dict[str, dict[str, None]] = {}
    for _, (s, r, o) in _triplet_rows(path):
        if (s, r, o) in seen:
            continue
        seen.add((s, r, o))
        facts.append(Fact(s, r, o))
        values.setdefault(r, {})[o] = None
    if not facts:
        raise DataError(f"{path}: no facts; fix: give at least one (subject, relation, object) line")
    return KnowledgeBase(name, facts, {r: list(v) for r, v in values.items()})


def check_distractors(kb: KnowledgeBase, k: int, where: str) -> None:
    """Every relation needs k wrong objects besides the right one."""
    for rel, vals in kb.relation_values.items():
        if len(vals) < k + 1:
            raise DataError(f"{where}: relation '{rel}' has {len(vals)} distinct objects but probes need "
                            f"k+1 = {k + 1}; fix: lower data.distractors or add facts with other objects")


def save_base(kb: KnowledgeBase, path: Path) -> None:
    """JSON of a base (written by the caller atomically)."""
    path.write_text(json.dumps({"name": kb.name, "facts": [[f.subject, f.relation, f.object] for f in kb.facts],
                                "relation_values": kb.relation_values}))


def load_base(path: Path) -> KnowledgeBase:
    d = json.loads(path.read_text())
    return KnowledgeBase(d["name"], [Fact(*f) for f in d["facts"]], d["relation_values"])


def save_templates(templates: Templates, path: Path) -> None:
    """JSON of every relation's templates (written by the caller atomically)."""
    path.write_text(json.dumps({r: dataclasses.asdict(t) for r, t in templates.items()}))


def load_templates(path: Path) -> Templates:
    raw = json.loads(Path(path).read_text())
    return {r: RelationTemplates(t["train"], t["heldout"]) for r, t in raw.items()}
