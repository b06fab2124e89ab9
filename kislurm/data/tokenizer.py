"""Tokenizer: a BPE trained offline on the run's own corpus (or a user's tokenizer.json).

`Tokenizer` wraps a `tokenizers.Tokenizer` and is also what megatron-core's GPTDatasetConfig needs (vocab_size, eod,
a distinct pad, unique_identifiers that enter its cache hash). Facts become token ids in kislurm.data.encoding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kislurm.errors import DataError

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
