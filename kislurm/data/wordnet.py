"""A real English corpus that nobody on the project wrote: Princeton WordNet 3.0's synsets as documents.

Debian's `wordnet-base` package (WordNet 3.0 licence: use, copy, modify and distribute for any purpose, keeping the
copyright notice; tools/dev installs it as root, beside the test Slurm cluster) ships data.noun/verb/adj/adv. One
synset becomes one document, "lemma, lemma: gloss; "example"", e.g. "Paris, City of Light, French capital, capital of
France: the capital and largest city of France; and international center of culture and commerce". About 117k
documents, 13 MB of JSONL: short documents in which real country, capital and city names occur.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Optional

from kislurm.errors import DataError
from kislurm.publish import publishing

WORDNET_DIR = Path("/usr/share/wordnet")
PARTS = ("noun", "verb", "adj", "adv")
_NAME = re.compile(r"^[A-Z][a-z]+( [A-Z][a-z]+)*$")
LICENCE = "WordNet 3.0 licence (Princeton University; permissive: any use, keep the copyright notice)"
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


def wordnet_installed(root: Path = WORDNET_DIR) -> bool:
    return all((root / f"data.{p}").is_file() for p in PARTS)


def synset_text(line: str) -> Optional[str]:
    """'lemma, lemma: gloss' of one data.* line; None for the licence header lines (they start with spaces)."""
    if line.startswith(" ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    n = int(fields[3], 16)
    lemmas = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4:4 + 2 * n:2]]
    return f"{', '.join(lemmas)}: {gloss.strip()}"


def wordnet_documents(root: Path = WORDNET_DIR) -> Iterator[str]:
    """Every synset's text, nouns, verbs, adjectives then adverbs, in file order."""
    if not wordnet_installed(root):
        raise DataError(f"{root}: WordNet data files not found; fix: apt-get install wordnet-base (tools/dev test "
                        f"does it as root)")
    for part in PARTS:
        with open(root / f"data.{part}", encoding="utf-8") as f:
            for line in f:
                text = synset_text(line)
                if text is not None:
                    yield text


def write_wordnet_jsonl(out: Path, limit: Optional[int] = None, root: Path = WORDNET_DIR) -> int:
    """Write the first `limit` synsets (all: None) as JSONL {"text": ...} to `out`, atomically; return the count."""
    n = 0
    with publishing(Path(out)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in wordnet_documents(root):
            if limit is not None and n >= limit:
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def capital_documents(root: Path = WORDNET_DIR) -> list[tuple[str, dict]]:
    """The synsets that state a capital ('Canberra, ..., capital of Australia: ...'), each with that fact as
    {"subject": city, "relation": "capital_of", "object": country}: real facts that the corpus itself holds."""
    found = []
    for text in wordnet_documents(root):
        lemmas = text.split(":")[0].split(", ")
        countries = [w.removeprefix("capital of ") for w in lemmas if w.startswith("capital of ")]
        if countries and _NAME.match(lemmas[0]) and _NAME.match(countries[0]):
            found.append((text, {"subject": lemmas[0], "relation": "capital_of", "object": countries[0]}))
    return found
