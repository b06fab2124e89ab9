#!/usr/bin/env python
"""Write the project's real English corpus (WordNet 3.0 synsets from Debian's wordnet-base) as JSONL.

    python tools/real_corpus.py OUT.jsonl [--limit N]

One {"text": ...} line per synset; see kislurm/data/wordnet.py for the format and the licence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kislurm.data.wordnet import write_wordnet_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="only the first N synsets")
    args = ap.parse_args()
    n = write_wordnet_jsonl(args.out, args.limit)
    print(f"{args.out}: {n} documents, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
