"""`kislurm corpus`: raw text (JSONL, parquet, text files) to one megatron-core indexed dataset, PREFIX.bin/.idx.

Each document is encoded with the HF `tokenizers` tokenizer (encode_batch, no special tokens from the post-processor)
and followed by the end-of-document id, as Megatron-LM's `tools/preprocess_data.py --append-eod` does: one sequence per
document, dtype `DType.optimal_dtype(vocab size)`. Documents that encode to no token are skipped and counted.

Shards (kislurm.data.sources) each publish their own small indexed dataset under PREFIX.shards/, so a kill or a time
limit loses only the shards in flight. The merge then streams: the shards' .bin files are concatenated and the .idx
arrays written chunk by chunk, giving the bytes of megatron-core's `IndexedDatasetBuilder.add_index` loop without its
per-document Python lists. Memory is bounded by a shard's index and a chunk, never by the corpus.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import operator
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from kislurm.data.sources import (CorpusInputError, Shard, expand_inputs, map_shards, plan_shards, read_documents,
                                   read_texts, result_dir, runs_in_process)
from kislurm.data.tokenizer import train_bpe
from kislurm.publish import atomic_write_json, publishing

FORMAT_VERSION = 1
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>")
SHARD_BYTES = 64 << 20          # small enough for a progress bar that moves, large enough to amortise a worker's start
BATCH_CHARS = 1 << 20           # characters per encode_batch call, at most
BATCH_DOCS = 1 << 14            # documents per encode_batch call, at most (an Encoding costs memory per document)
JOIN_CHARS = 2048               # documents are encoded several to a string, up to this many characters
JOIN_DOCS = 16                  # and this many documents (a string's cost grows faster than its pieces beyond ~100)
VERIFY_DOCS = 256               # documents of each shard encoded both ways before joined strings are trusted,
VERIFY_CHARS = 1 << 16          # fewer where they are long (the check costs a second encode of them)
MERGE_CHUNK = 1 << 20           # index entries per chunk in the merge (bounded memory: ~8 MB an array)
SAMPLE_CHARS = 8 << 20          # characters a tokenizer is trained on when none is given
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_IDS = operator.attrgetter("ids")


@dataclass(frozen=True)
class CorpusReport:
    """What a build did: counts, the choices it made, and how long it took."""
    prefix: str
    documents: int
    empty: int
    tokens: int
    shards: int
    shards_reused: int
    eod: int
    eod_token: str
    dtype: str
    tokenizer: str
    seconds: float
    heldout: int = 0            # documents set apart (not in the prefix): PREFIX's folder/heldout.npz

    def line(self) -> str:
        held = f"{self.heldout:,} of them held out (heldout.npz beside it); " if self.heldout else ""
        rate = f"{self.documents / max(self.seconds, 1e-9):,.0f} docs/s, {self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s"
        return (f"{self.prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}, end of "
                f"document {self.eod_token!r} = {self.eod}), {self.empty:,} empty documents skipped; {self.shards} "
                f"shards ({self.shards_reused} reused); {held}{self.seconds:.1f} s, {rate}")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and end-of-document
# ----------------------------------------------------------------------------------------------------------------------


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    path = Path(path)
    if not path.is_file():
        raise CorpusInputError(f"{path}: tokenizer file not found; fix: pass --tokenizer with a tokenizers JSON file "
                               f"(tokenizer.json), or leave it out to train one on the corpus")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust error is one long line
        raise CorpusInputError(f"{path}: not a tokenizers JSON file ({str(e)[:120]}); fix: save it with tokenizers' "
                               f"Tokenizer.save (a transformers tokenizer folder holds one as tokenizer.json)") from None


def end_of_document(tok: HFTokenizer, eod: Optional[str], where: str) -> tuple[str, int]:
    """The end-of-document token and id: `eod` if given, else the first of EOD_NAMES the tokenizer holds. A token is
    never added to a user's tokenizer: without one, a one-line refusal naming --eod."""
    if eod is not None:
        i = tok.token_to_id(eod)
        if i is None:
            raise CorpusInputError(f"{where}: the tokenizer has no token {eod!r}; fix: pass --eod with a token it holds "
                                   f"(its end-of-document token)")
        return eod, i
    for name in EOD_NAMES:
        i = tok.token_to_id(name)
        if i is not None:
            return name, i
    raise CorpusInputError(f"{where}: the tokenizer holds none of {', '.join(EOD_NAMES)}; fix: pass --eod TOKEN "
                           f"naming its end-of-document token (kislurm never adds one to your tokenizer)")


def token_dtype(tok: HFTokenizer) -> np.dtype:
    """The dtype megatron-core picks for this vocabulary (DType.optimal_dtype)."""
    from megatron.core.datasets.indexed_dataset import DType
    return np.dtype(DType.optimal_dtype(tok.get_vocab_size(with_added_tokens=True)))


def sample_texts(shards: Sequence[Shard], json_key: str, chars: int = SAMPLE_CHARS) -> Iterator[str]:
    """A deterministic sample for training a tokenizer: the first documents of every shard, an equal share each."""
    share = max(1, chars // max(1, len(shards)))
    for shard in shards:
        taken = 0
        for doc in read_documents(shard, json_key):
            if taken >= share:
                break
            taken += len(doc.text)
            yield doc.text


def trained_tokenizer(prefix: Path, shards: Sequence[Shard], json_key: str, vocab_size: int) -> Path:
    """PREFIX.tokenizer.json: trained on a sample of the corpus, or the one a killed run already trained."""
    path = Path(f"{prefix}.tokenizer.json")
    if not path.is_file():
        tok = train_bpe(sample_texts(shards, json_key), vocab_size)
        with publishing(path) as tmp:
            tok.save(tmp)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> HFTokenizer:
    tok = HFTokenizer.from_file(path)
    tok.no_truncation()     # a tokenizer.json saved with truncation would cut every document (and padding pad it);
    tok.no_padding()        # transformers' tokenizers and preprocess_data.py never apply the file's settings
    return tok


def joins_documents(tok: HFTokenizer, eod: int) -> bool:
    """Whether documents joined by the end-of-document token encode to exactly their own encodings, each followed by
    it: then a batch is encoded as a few long strings, not one Encoding per document (whose Python objects cost
    more than a short document's encoding; docs/corpora.md).

    tokenizers cuts a text at its added tokens before normalizing or pre-tokenizing it; an added token that is not
    normalized and strips nothing leaves the text on both sides as it was, and each piece then goes through the
    pipeline as a document alone would. What breaks that: an end-of-document token that is not such an added token
    (its text would be encoded as text), and a pre-tokenizer that treats the first piece apart (Metaspace with
    prepend_scheme 'first', as Llama's)."""
    added = tok.get_added_tokens_decoder().get(eod)
    if added is None or added.normalized or added.lstrip or added.rstrip or added.single_word:
        return False
    return '"prepend_scheme":"first"' not in json.dumps(json.loads(tok.to_str()).get("pre_tokenizer"),
                                                          separators=(",", ":"))


def text_batches(lists: Iterable[list[str]], chars: int = BATCH_CHARS, max_docs: int = BATCH_DOCS) -> Iterator[list[str]]:
    """The texts of `lists`, in order, regrouped into batches (one encode_batch call each) that end at the first text
    that brings them to `chars` characters or `max_docs` documents. Cut by slices, not text by text."""
    batch: list[str] = []
    size = 0
    for texts in lists:
        cum = list(itertools.accumulate(map(len, texts)))
        start = 0
        while start < len(texts):
            base = cum[start - 1] if start else 0
            full = bisect.bisect_left(cum, chars - size + base, lo=start)       # the text that fills the batch
            end = min(full + 1, start + max_docs - len(batch), len(texts))
            batch += texts[start:end]
            size += cum[end - 1] - base
            start = end
            if size >= chars or len(batch) >= max_docs:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def with_eod(encodings: list, eod: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths) of the non-empty documents of a batch, each followed by `eod`; lengths include the eod. Each
    encoding's ids list is consumed as it is made (a list per document is the only way out of an Encoding)."""
    n = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    flat = np.fromiter(itertools.chain.from_iterable(map(_IDS, encodings)), dtype=dtype, count=int(n.sum()))
    n = n[n > 0]
    return np.insert(flat, np.cumsum(n), eod).astype(dtype, copy=False), (n + 1).astype(np.int32)


def encode_one_by_one(tok: HFTokenizer, texts: list[str], eod: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths) of a batch, each document encoded alone (see with_eod)."""
    return with_eod(tok.encode_batch(texts, add_special_tokens=False), eod, dtype)


def join_cuts(texts: list[str], join_chars: int = JOIN_CHARS, join_docs: int = JOIN_DOCS) -> list[int]:
    """Where the strings of encode_joined start and end: the documents starting in the same `join_chars` window
    share a string, `join_docs` at most."""
    sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    window = (np.cumsum(sizes) - sizes) // join_chars
    bounds = [0, *(np.flatnonzero(np.diff(window)) + 1).tolist(), len(texts)]
    return [*itertools.chain.from_iterable(range(a, b, join_docs) for a, b in zip(bounds[:-1], bounds[1:])),
            len(texts)]


def encode_joined(tok: HFTokenizer, texts: list[str], eod: int, dtype: np.dtype,
                  cuts: Optional[list[int]] = None) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(tokens, lengths) of a batch encoded as strings of documents joined by the end-of-document token (only for a
    tokenizer that joins_documents), cut at `cuts` (default join_cuts). None when the strings hold another number
    of end-of-document ids than documents (a document containing the token's text): the caller encodes that batch
    one by one."""
    eod_text = tok.id_to_token(eod)
    cuts = join_cuts(texts) if cuts is None else cuts
    strings = [eod_text.join(texts[a:b]) + eod_text for a, b in zip(cuts[:-1], cuts[1:])]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)   # no offsets (tokenizers >= 0.20): ~11% less CPU
    encodings = encode(strings, add_special_tokens=False)
    tokens = np.fromiter(itertools.chain.from_iterable(map(_IDS, encodings)), dtype=dtype,
                         count=sum(map(len, encodings)))
    ends = np.flatnonzero(tokens == eod)
    if len(ends) != len(texts):
        return None
    lengths = np.diff(ends, prepend=-1)
    keep = lengths > 1                                   # a document that encodes to nothing: skipped, as alone
    if not keep.all():
        tokens, lengths = tokens[np.repeat(keep, lengths)], lengths[keep]
    return tokens, lengths.astype(np.int32)


def first_documents(texts: list[str]) -> list[str]:
    """The documents a shard checks joined strings on: the first VERIFY_DOCS, or those starting within its first
    VERIFY_CHARS characters, whichever are fewer (one at least)."""
    starts = itertools.accumulate(map(len, texts[:VERIFY_DOCS]), initial=0)
    return texts[:max(1, sum(1 for _, start in zip(texts[:VERIFY_DOCS], starts) if start < VERIFY_CHARS))]


def tokenize_shard(shard: Shard, out: Path, tokenizer: str, eod: int, json_key: str, dtype: str,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> None:
    """A map_shards work function: out/tokens.bin, out/tokens.idx (a megatron prefix) and out/stats.json;
    `on_batch(documents, tokens)` after each batch (a progress bar in this process).

    One batch at a time, read, encoded and written in turn: encode_batch keeps every core busy (Rust threads), and
    Python threads beside it (a reader, a writer) made the whole slower on two cores, not faster (docs/corpora.md).
    Joined strings are used where the tokenizer allows them and the shard's first_documents encode to the same ids
    both ways; otherwise, and for any batch whose count of end-of-document ids is off, one by one."""
    tok = _cached_tokenizer(tokenizer)
    dt = np.dtype(dtype)
    lengths: list[np.ndarray] = []
    empty, verified = 0, False
    joined = joins_documents(tok, eod)
    with open(out / "tokens.bin", "wb") as f:
        for texts in text_batches(read_texts(shard, json_key)):
            if joined and not verified:
                head = first_documents(texts)
                both = encode_joined(tok, head, eod, dt), encode_one_by_one(tok, head, eod, dt)
                joined = both[0] is not None and all(np.array_equal(a, b) for a, b in zip(*both))
                verified = True
            coded = encode_joined(tok, texts, eod, dt) if joined else None
            tokens, n = coded if coded is not None else encode_one_by_one(tok, texts, eod, dt)
            f.write(tokens.tobytes())
            lengths.append(n)
            empty += len(texts) - len(n)
            if on_batch is not None:
                on_batch(len(n), len(tokens))
    seq = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    write_index(out / "tokens.idx", dt, len(seq), len(seq) + 1, lambda: [seq],
                lambda: [np.arange(len(seq) + 1, dtype=np.int64)])
    atomic_write_json(out / "stats.json", {"documents": len(seq), "empty": empty,
                                           "tokens": int(seq.sum(dtype=np.int64)), "joined": joined})


# ----------------------------------------------------------------------------------------------------------------------
# The index, written in chunks
# ----------------------------------------------------------------------------------------------------------------------


def write_index(path: Path, dtype: np.dtype, n_seq: int, n_doc: int, lengths: Callable[[], Iterable[np.ndarray]],
                documents: Callable[[], Iterable[np.ndarray]]) -> None:
    """A megatron-core .idx (the layout of its _IndexWriter) from chunks: `lengths()` yields the int32 sequence
    lengths, `documents()` the int64 document indices (from 0); each is called once per pass, so chunks can be
    read from disk again rather than held."""
    from megatron.core.datasets.indexed_dataset import DType
    itemsize = np.int64(np.dtype(dtype).itemsize)
    with open(path, "wb") as f:
        f.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DType.code_from_dtype(np.dtype(dtype).type)))
        f.write(struct.pack("<Q", n_seq) + struct.pack("<Q", n_doc))
        for chunk in lengths():
            f.write(np.asarray(chunk, dtype=np.int32).tobytes())
        pointer = np.int64(0)
        for chunk in lengths():
            ends = np.cumsum(np.asarray(chunk, dtype=np.int64) * itemsize)
            if len(ends):
                f.write((pointer + np.concatenate(([0], ends[:-1]))).astype(np.int64).tobytes())
                pointer += ends[-1]
        for chunk in documents():
            f.write(np.asarray(chunk, dtype=np.int64).tobytes())


def index_chunks(prefix: str, array: str, start: int, chunk: int) -> Iterator[np.ndarray]:
    """Copies of `chunk` entries of one index array (megatron-core's reader: 'sequence_lengths' or
    'document_indices') from entry `start`; the memory map is closed when the shard is done, so the resident pages
    of a merge are one shard's at most."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset(prefix, mmap=True)
    values = getattr(dataset.index, array)
    for a in range(start, len(values), chunk):
        yield np.array(values[a:a + chunk])
    del values, dataset


def index_counts(prefix: str, dtype: np.dtype) -> tuple[int, int]:
    """(sequences, documents) of a prefix; refuses another dtype or a multimodal index."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    idx = IndexedDataset(prefix, mmap=True).index
    if np.dtype(idx.dtype) != np.dtype(dtype) or idx.sequence_modes is not None:
        raise CorpusInputError(f"{prefix}.idx: dtype {np.dtype(idx.dtype)} (or multimodal) where {np.dtype(dtype)} "
                               f"was expected; fix: build every shard with the same tokenizer")
    return len(idx.sequence_lengths), len(idx.document_indices)


def merge_prefixes(prefixes: Sequence[str], out_prefix: str, dtype: np.dtype, chunk: int = MERGE_CHUNK) -> None:
    """Concatenate indexed datasets of one dtype into out_prefix.bin/.idx: the bytes megatron-core's
    IndexedDatasetBuilder gives with one add_index per prefix, streamed (each file published atomically). A prefix
    whose .bin is empty (a shard that owns no line, or only empty documents) adds nothing, as with add_index."""
    prefixes = [p for p in prefixes if os.path.getsize(f"{p}.bin") > 0]
    counts = [index_counts(p, dtype) for p in prefixes]

    def lengths() -> Iterator[np.ndarray]:
        for p in prefixes:
            yield from index_chunks(p, "sequence_lengths", 0, chunk)

    def documents() -> Iterator[np.ndarray]:
        yield np.zeros(1, np.int64)
        offset = 0
        for p, (n_seq, _) in zip(prefixes, counts):
            for d in index_chunks(p, "document_indices", 1, chunk):
                yield offset + d
            offset += n_seq

    n_seq = sum(c[0] for c in counts)
    n_doc = 1 + sum(c[1] - 1 for c in counts)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    with publishing(Path(f"{out_prefix}.bin")) as tmp, open(tmp, "wb") as f:
        for p in prefixes:
            with open(f"{p}.bin", "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
    with publishing(Path(f"{out_prefix}.idx")) as tmp:
        write_index(tmp, dtype, n_seq, n_doc, lengths, documents)


# ----------------------------------------------------------------------------------------------------------------------
# The whole build
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusPlan:
    """What a build will do before it does it: the shards, where each publishes, and the picklable work function.
    `kislurm submit` on Slurm queues `unfinished()` as array tasks ahead of the preparation job, whose build_corpus
    (same plan, same folders) then finds them published and only merges."""
    prefix: Path
    shards: tuple[Shard, ...]
    work_dir: Path
    salt: tuple[str, ...]
    work: Any
    tokenizer: str
    eod: int
    eod_token: str
    dtype: np.dtype

    def finals(self) -> list[Path]:
        return [result_dir(s, self.work_dir, self.salt) for s in self.shards]

    def unfinished(self) -> list[tuple[Shard, Path]]:
        """(shard, folder) of every shard not yet published."""
        return [(s, f) for s, f in zip(self.shards, self.finals()) if not f.is_dir()]


def plan_corpus(inputs: Sequence[str], out_prefix: str | Path, tokenizer: Optional[str | Path] = None,
                eod: Optional[str] = None, json_key: str = "text", shard_bytes: int = SHARD_BYTES,
                vocab_size: int = 32000) -> CorpusPlan:
    """Check the inputs and the tokenizer (training one if none is given) and lay out the shards; tokenizes nothing."""
    prefix = Path(out_prefix).absolute()
    shards = plan_shards(expand_inputs(inputs), shard_bytes)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tok_path = Path(tokenizer) if tokenizer is not None else trained_tokenizer(prefix, shards, json_key, vocab_size)
    tok = load_hf_tokenizer(tok_path)
    eod_token, eod_id = end_of_document(tok, eod, str(tok_path))
    dtype = token_dtype(tok)
    tok_json = tok.to_str()
    tok_hash = hashlib.sha256(tok_json.encode()).hexdigest()
    work_dir = Path(f"{prefix}.shards")
    work_dir.mkdir(parents=True, exist_ok=True)
    tok_copy = work_dir / f"tokenizer-{tok_hash[:16]}.json"
    if not tok_copy.is_file():
        with publishing(tok_copy) as tmp:
            tmp.write_text(tok_json)
    salt = (f"v{FORMAT_VERSION}", tok_hash, str(eod_id), json_key, dtype.name)
    work = functools.partial(tokenize_shard, tokenizer=str(tok_copy), eod=eod_id, json_key=json_key, dtype=dtype.name)
    return CorpusPlan(prefix, tuple(shards), work_dir, salt, work, str(tok_path), eod_id, eod_token, dtype)


def build_corpus(inputs: Sequence[str], out_prefix: str | Path, tokenizer: Optional[str | Path] = None,
                 eod: Optional[str] = None, json_key: str = "text", workers: int = 1, executor: Any = None,
                 shard_bytes: int = SHARD_BYTES, vocab_size: int = 32000, progress: bool = True,
                 keep_shards: bool = False, heldout: float = 0.0, seed: int = 0) -> CorpusReport:
    """Tokenize `inputs` into out_prefix.bin/.idx; a rerun after a kill redoes only the unfinished shards. With
    `heldout` > 0 the documents kislurm.data.streams.heldout_mask picks (by global document index, with `seed`) are
    left out of the prefix and written to its folder's heldout.npz instead (see hold_out)."""
    from megatron.core.datasets import indexed_dataset  # noqa: F401 (its dtypes and index reader; imports torch)

    t0 = time.perf_counter()        # after that import: ~5 s once per process, which the report's rate would blur
    plan = plan_corpus(inputs, out_prefix, tokenizer, eod, json_key, shard_bytes, vocab_size)
    reused = len(plan.shards) - len(plan.unfinished())
    bar = _Progress(len(plan.shards), progress)
    work = plan.work
    if progress and runs_in_process(len(plan.shards) - reused, workers, executor):
        work = functools.partial(work, on_batch=bar.batch)        # the bar moves within a shard too
    try:
        dirs = map_shards(plan.shards, work, plan.work_dir, salt=plan.salt, workers=workers, executor=executor,
                          progress=bar.update)
    finally:
        bar.close()
    stats = [json.loads((d / "stats.json").read_text()) for d in dirs]
    parts, held = [str(d / "tokens") for d in dirs], 0
    if heldout > 0:
        parts, held = hold_out(parts, [s["documents"] for s in stats], heldout, seed,
                               load_hf_tokenizer(plan.tokenizer), plan.dtype, plan.work_dir / "split",
                               plan.prefix.parent / "heldout.npz")
    merge_prefixes(parts, str(plan.prefix), plan.dtype)
    if not keep_shards:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    return CorpusReport(str(plan.prefix), sum(s["documents"] for s in stats), sum(s["empty"] for s in stats),
                        sum(s["tokens"] for s in stats), len(plan.shards), reused, plan.eod, plan.eod_token,
                        plan.dtype.name, plan.tokenizer, time.perf_counter() - t0, held)


def hold_out(parts: Sequence[str], counts: Sequence[int], share: float, seed: int, tok: HFTokenizer,
             dtype: np.dtype, split_dir: Path, out: Path) -> tuple[list[str], int]:
    """Set the held-out documents apart: each shard prefix that holds one is rewritten without it (megatron-core's
    index layout, one shard in memory at a time), and the held-out documents go to `out` in the layout of
    the synthetic stream's heldout.npz (tokens without their EOD, UTF-8 bytes of their decoded text, global index),
    published before the prefix so a published .idx always has its held-out file. Returns (kept prefixes, held)."""
    from kislurm.data.streams import heldout_mask

    kept, docs, index, start = [], [], [], 0
    split_dir.mkdir(parents=True, exist_ok=True)
    for i, (part, n) in enumerate(zip(parts, counts)):
        held = np.flatnonzero(heldout_mask(n, share, seed, start=start))
        if len(held) == 0:
            kept.append(part)
        else:
            lengths = next(index_chunks(part, "sequence_lengths", 0, max(n, 1))).astype(np.int64)
            tokens = np.fromfile(f"{part}.bin", dtype=dtype)
            ends = np.cumsum(lengths)
            docs += [tokens[e - n_j: e - 1].astype(np.int32) for e, n_j in zip(ends[held], lengths[held])]
            keep = np.ones(n, dtype=bool)
            keep[held] = False
            tokens[np.repeat(keep, lengths)].tofile(split_dir / f"{i}.bin")
            k = int(keep.sum())
            write_index(split_dir / f"{i}.idx", dtype, k, k + 1, lambda: [lengths[keep]],
                        lambda: [np.arange(k + 1, dtype=np.int64)])
            kept.append(str(split_dir / str(i)))
            index.append(held + start)
        start += n
    n_bytes = np.array([len(tok.decode(d.tolist()).encode("utf-8")) for d in docs], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)]).astype(np.int64)
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    with publishing(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, flat=flat, off=off, n_bytes=n_bytes,
                 index=np.concatenate(index) if index else np.zeros(0, np.int64))
    return kept, len(docs)


class _Progress:
    """A tqdm bar over documents, with tokens/s beside it, moved as each shard is done and, for shards tokenized in
    this process, after each batch."""

    def __init__(self, n_shards: int, enabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(unit=" docs", unit_scale=True, disable=not enabled, desc="corpus", dynamic_ncols=True)
        self.n_shards, self.done, self.tokens, self.t0 = n_shards, 0, 0, time.perf_counter()
        self.in_shard = [0, 0]          # documents and tokens of the shard in progress already shown (batch by batch)

    def batch(self, documents: int, tokens: int) -> None:
        self.in_shard[0] += documents
        self.in_shard[1] += tokens
        self._move(documents, tokens)

    def update(self, shard: Shard, folder: Path) -> None:
        stats = json.loads((folder / "stats.json").read_text())
        self.done += 1
        docs, tokens = stats["documents"] - self.in_shard[0], stats["tokens"] - self.in_shard[1]
        self.in_shard = [0, 0]
        self._move(docs, tokens)

    def _move(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"shards {self.done}/{self.n_shards}, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(documents)

    def close(self) -> None:
        self.bar.close()
