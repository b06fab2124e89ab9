"""`kislurm corpus` on a slice of a real English corpus (WordNet 3.0, Debian wordnet-base): token-for-token against
a direct `tokenizers` encode plus end-of-document, independent of shards and workers, megatron-core's add_index bytes,
a kill then a resume, and every bad input as one line with nothing published."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from kislurm.cli import main
from kislurm.data.corpus import build_corpus, merge_prefixes, text_batches
from kislurm.data.tokenizer import train_bpe
from kislurm.data.wordnet import capital_documents, wordnet_installed, write_wordnet_jsonl

DOCS = 4000


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """A WordNet slice as JSONL (plus an empty document), and a BPE trained on it saved as tokenizer.json."""
    if not wordnet_installed():
        if os.environ.get("CI") == "true" or os.environ.get("KISLURM_REQUIRE_SLURM") == "1":
            pytest.fail("WordNet is not installed; fix: tools/dev test installs it (apt-get install wordnet-base)")
        pytest.skip("WordNet not installed (apt-get install wordnet-base; tools/dev test does it as root)")
    d = tmp_path_factory.mktemp("real")
    write_wordnet_jsonl(d / "wn.jsonl", limit=DOCS)
    lines = (d / "wn.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(17, json.dumps({"text": ""}) + "\n")
    (d / "wn.jsonl").write_text("".join(lines), encoding="utf-8")
    texts = [json.loads(x)["text"] for x in lines]
    tok = train_bpe(texts, 600)
    tok.save(d / "tokenizer.json")
    one = build_corpus([str(d / "wn.jsonl")], d / "one" / "wn", tokenizer=d / "tokenizer.json", progress=False)
    return {"dir": d, "texts": texts, "tok": HFTokenizer.from_file(str(d / "tokenizer.json")), "one": one,
            "jsonl": d / "wn.jsonl"}


def files(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_tokens_match_a_direct_encode_plus_eod(real):
    rep, tok = real["one"], real["tok"]
    ds = IndexedDataset(rep.prefix)
    want = [tok.encode(t, add_special_tokens=False).ids for t in real["texts"]]
    want = [w + [rep.eod] for w in want if w]
    assert rep.eod == tok.token_to_id("<|endoftext|>") and rep.dtype == "uint16"
    assert (rep.documents, rep.empty) == (DOCS, 1) and len(ds) == DOCS
    assert all(ds[i].tolist() == w for i, w in enumerate(want))
    assert rep.tokens == sum(map(len, want))


def test_no_special_tokens_from_the_post_processor(real, tmp_path):
    tok = HFTokenizer.from_file(str(real["dir"] / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<|pad|> $A", special_tokens=[
        ("<|pad|>", tok.token_to_id("<|pad|>"))])
    assert tok.encode("a cat").ids[0] == tok.token_to_id("<|pad|>")
    tok.save(str(tmp_path / "bos.json"))
    rep = build_corpus([str(real["jsonl"])], tmp_path / "bos", tokenizer=tmp_path / "bos.json", progress=False)
    assert files(rep.prefix) == files(real["one"].prefix)


def test_shards_workers_and_formats_give_identical_bytes(real, tmp_path):
    src = real["jsonl"]
    size = src.stat().st_size
    (tmp_path / "wn.jsonl.gz").write_bytes(gzip.compress(src.read_bytes()))
    pq.write_table(pa.table({"text": real["texts"]}), tmp_path / "wn.parquet", row_group_size=500)
    four = build_corpus([str(src)], tmp_path / "four", tokenizer=real["dir"] / "tokenizer.json",
                        shard_bytes=size // 4 + 1, workers=2, progress=False)
    assert four.shards == 4
    gz = build_corpus([str(tmp_path / "wn.jsonl.gz")], tmp_path / "gz", tokenizer=real["dir"] / "tokenizer.json",
                      progress=False)
    parquet = build_corpus([str(tmp_path / "wn.parquet")], tmp_path / "pq", tokenizer=real["dir"] / "tokenizer.json",
                           shard_bytes=1, progress=False)
    assert parquet.shards == -(-len(real["texts"]) // 500)
    reference = files(real["one"].prefix)
    assert files(four.prefix) == reference and files(gz.prefix) == reference and files(parquet.prefix) == reference
    assert not Path(f"{four.prefix}.shards").exists()     # only PREFIX.bin and PREFIX.idx remain


def test_shards_that_own_no_line_add_nothing(real, tmp_path):
    lines = real["jsonl"].read_text(encoding="utf-8").splitlines(keepends=True)[:30]
    lines.insert(5, json.dumps({"text": "long " * 200}) + "\n")        # spans many 64-byte shards
    (tmp_path / "s.jsonl").write_text("".join(lines), encoding="utf-8")
    tok = real["dir"] / "tokenizer.json"
    many = build_corpus([str(tmp_path / "s.jsonl")], tmp_path / "many", tokenizer=tok, shard_bytes=64, progress=False)
    one = build_corpus([str(tmp_path / "s.jsonl")], tmp_path / "one", tokenizer=tok, progress=False)
    assert many.shards > len(lines) and (many.documents, many.empty) == (one.documents, 1)
    assert files(many.prefix) == files(one.prefix)


def test_streaming_merge_is_byte_identical_to_add_index(real, tmp_path):
    src = real["jsonl"]
    build_corpus([str(src)], tmp_path / "k", tokenizer=real["dir"] / "tokenizer.json",
                 shard_bytes=src.stat().st_size // 5 + 1, keep_shards=True, progress=False)
    prefixes = sorted(str(p.with_suffix("")) for p in Path(f"{tmp_path / 'k'}.shards").glob("*/tokens.idx"))
    assert len(prefixes) == 5
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(str(tmp_path / "mc.idx"))
    merge_prefixes(prefixes, str(tmp_path / "ours"), np.dtype(np.uint16), chunk=7)   # many chunks per shard
    assert files(tmp_path / "ours") == files(tmp_path / "mc")


def test_kill_in_a_shard_then_rerun_redoes_only_unfinished_shards(real, tmp_path):
    src, tok = real["jsonl"], real["dir"] / "tokenizer.json"
    big = tmp_path / "big.jsonl"
    big.write_bytes(src.read_bytes() * 6)
    shard_bytes = big.stat().st_size // 12 + 1
    prefix = tmp_path / "killed"
    code = (f"from kislurm.data.corpus import build_corpus; build_corpus([{str(big)!r}], {str(prefix)!r}, "
            f"tokenizer={str(tok)!r}, shard_bytes={shard_bytes}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards_dir = Path(f"{prefix}.shards")
    try:
        while proc.poll() is None and not any(len(p.name) == 16 for p in _dirs(shards_dir)):
            time.sleep(0.005)   # polling for the first published shard, not waiting for an outcome
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    published = {p.name for p in _dirs(shards_dir) if len(p.name) == 16}
    assert published and not Path(f"{prefix}.idx").exists()
    rep = build_corpus([str(big)], prefix, tokenizer=tok, shard_bytes=shard_bytes, keep_shards=True, progress=False)
    assert rep.shards == 12 and 1 <= rep.shards_reused == len(published) < 12
    assert not [p for p in shards_dir.iterdir() if p.name.endswith(".tmp")]   # the killed shard's folder is gone
    fresh = build_corpus([str(big)], tmp_path / "fresh", tokenizer=tok, progress=False)
    assert files(prefix) == files(fresh.prefix)


def _dirs(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def test_trains_a_tokenizer_when_none_is_given(real, tmp_path):
    rep = build_corpus([str(real["jsonl"])], tmp_path / "t", vocab_size=400, progress=False)
    tok = HFTokenizer.from_file(f"{tmp_path / 't'}.tokenizer.json")
    assert rep.tokenizer == f"{tmp_path / 't'}.tokenizer.json" and rep.eod == tok.token_to_id("<|endoftext|>")
    ds = IndexedDataset(rep.prefix)   # kept: its items are views of its memory map
    assert ds[5].tolist() == tok.encode(real["texts"][5]).ids + [rep.eod]


def _bad_parquet(p: Path) -> None:
    p.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")


BAD = [
    ("malformed", "c.jsonl", b'{"text": "a cat"}\n{"text": "a dog\n', [], "c.jsonl:2: malformed JSON"),
    ("missing key", "c.jsonl", b'{"text": "a"}\n{"body": "b"}\n', [], 'c.jsonl:2: no key "text"'),
    ("not utf-8", "c.jsonl", b'{"text": "a"}\n{"text": "b \xff"}\n', [], "c.jsonl:2: bytes that are not UTF-8"),
    ("no eod in tokenizer", "c.jsonl", b'{"text": "a"}\n', ["NOEOD"], "holds none of <|endoftext|>"),
    ("unknown --eod", "c.jsonl", b'{"text": "a"}\n', ["--eod", "<eos>"], "has no token '<eos>'"),
    ("unreadable parquet", "c.parquet", None, [], "c.parquet:1: not a readable parquet file"),
]


@pytest.mark.parametrize("name,file,content,extra,where", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_nothing_published(real, tmp_path, name, file, content, extra, where):
    src = tmp_path / file
    _bad_parquet(src) if content is None else src.write_bytes(content)
    tok = str(real["dir"] / "tokenizer.json")
    if extra == ["NOEOD"]:
        data = json.loads(Path(tok).read_text())
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|endoftext|>"]
        data["model"]["vocab"].pop("<|endoftext|>")
        tok, extra = str(tmp_path / "noeod.json"), []
        Path(tok).write_text(json.dumps(data))
    out = CliRunner().invoke(main, ["corpus", str(src), "--out", str(tmp_path / "o" / "p"), "--tokenizer", tok,
                                    *extra])
    errors = [line for line in out.output.splitlines() if "error" in line]     # the progress bar shares stderr
    assert out.exit_code == 2 and len(errors) == 1, out.output
    assert where in errors[0] and "fix:" in errors[0], errors[0]
    assert not list((tmp_path / "o").glob("p.bin")) and not list((tmp_path / "o").glob("p.idx"))


def test_config_route_builds_once_per_content_and_is_the_general_stream(real, tmp_path):
    """data.general_corpus: `kislurm prepare` builds the corpus under OUTPUT_ROOT/corpora/<fingerprint>/ and uses it
    as general_prefix; a second experiment on the same files and tokenizer reuses it."""
    import dataclasses

    from kislurm.data import prepare as D
    from kislurm.plan.config import DataConfig, GeneralCorpus, KnowledgeBaseSpec

    stated = capital_documents()[:12]
    src = tmp_path / "wn.jsonl"
    src.write_bytes(real["jsonl"].read_bytes() + "".join(json.dumps({"text": t}) + "\n" for t, _ in stated).encode())
    probes = tmp_path / "capitals.jsonl"
    probes.write_text("".join(json.dumps(f) + "\n" for _, f in stated))
    templates = tmp_path / "t.yaml"
    templates.write_text("capital_of: {train: ['{subject} is the capital of {object}'], heldout: []}\n")
    cfg = DataConfig(general=KnowledgeBaseSpec(30, 2, 8), knowledge=KnowledgeBaseSpec(20, 2, 8),
                     tokenizer=str(real["dir"] / "tokenizer.json"), general_probes=str(probes),
                     templates_file=str(templates), general_corpus=GeneralCorpus([str(tmp_path / "wn.*")]))
    with pytest.raises(D.DataError, match="kislurm prepare"):
        D.load_prepared(cfg, tmp_path / "out" / "one" / "data", 64)
    first = D.prepare(cfg, tmp_path / "out" / "one" / "data", 64)
    prefix = Path(first.general_prefix)
    assert prefix.parent.parent == tmp_path / "out" / "corpora" and prefix.name == "general"
    direct = build_corpus([str(src)], tmp_path / "direct", tokenizer=real["dir"] / "tokenizer.json", progress=False)
    assert files(prefix) == files(direct.prefix)
    built = Path(f"{prefix}.bin").stat().st_mtime_ns
    other = D.prepare(dataclasses.replace(cfg, seed=7), tmp_path / "out" / "two" / "data", 64)
    assert other.general_prefix == first.general_prefix and Path(f"{prefix}.bin").stat().st_mtime_ns == built
    assert D.load_prepared(cfg, tmp_path / "out" / "one" / "data", 64).general_prefix == str(prefix)
    assert int((first.probes.fact_group == 0).sum()) == 12     # the general probes: capitals the corpus states


def test_held_out_documents_follow_the_global_index_whatever_the_shards(real, tmp_path):
    """build_corpus(heldout=...): the prefix is the whole build less the documents heldout_mask picks by global
    index, and heldout.npz holds them without their EOD; 1 shard and 5 shards give the same bytes."""
    from kislurm.data.streams import heldout_mask

    src, tok_path = real["jsonl"], real["dir"] / "tokenizer.json"
    one = build_corpus([str(src)], tmp_path / "a" / "wn", tokenizer=tok_path, progress=False, heldout=0.1, seed=3)
    five = build_corpus([str(src)], tmp_path / "b" / "wn", tokenizer=tok_path, progress=False, heldout=0.1, seed=3,
                        shard_bytes=src.stat().st_size // 5 + 1)
    assert five.shards == 5 and files(one.prefix) == files(five.prefix)
    a, b = np.load(tmp_path / "a" / "heldout.npz"), np.load(tmp_path / "b" / "heldout.npz")
    assert all(np.array_equal(a[k], b[k]) for k in ("flat", "off", "n_bytes", "index"))
    whole = IndexedDataset(real["one"].prefix)
    held = heldout_mask(len(whole), 0.1, 3)
    assert one.heldout == held.sum() > 0 and a["index"].tolist() == np.flatnonzero(held).tolist()
    ds = IndexedDataset(one.prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [whole[i].tolist() for i in np.flatnonzero(~held)]
    docs = [a["flat"][x:y].tolist() for x, y in zip(a["off"][:-1], a["off"][1:])]
    assert docs == [whole[i][:-1].tolist() for i in np.flatnonzero(held)]
    assert a["n_bytes"].tolist() == [len(real["tok"].decode(d).encode()) for d in docs]


def test_text_batches_regroup_lists_at_chars_or_documents():
    lists = [["ab", "c"], [], ["defg", "h", "ij", "k"], ["lmnopq"]]
    assert list(text_batches(lists, chars=4, max_docs=3)) == [["ab", "c", "defg"], ["h", "ij", "k"], ["lmnopq"]]
    assert list(text_batches(lists, chars=100, max_docs=2)) == [["ab", "c"], ["defg", "h"], ["ij", "k"], ["lmnopq"]]
    assert list(text_batches([[], []])) == []


def test_join_cuts_share_a_string_within_a_window_and_a_count():
    from kislurm.data.corpus import join_cuts

    texts = ["x" * 5, "y" * 3, "z" * 9, "w", "v", "u", "t", "s"]    # starting at 0, 5, 8, 17, 18, 19, 20, 21
    assert join_cuts(texts, join_chars=10, join_docs=16) == [0, 3, 6, 8]
    assert join_cuts(texts, join_chars=10, join_docs=2) == [0, 2, 3, 5, 6, 8]
    assert join_cuts(texts, join_chars=1, join_docs=16) == list(range(9))
    assert join_cuts([], join_chars=10) == [0]


def one_by_one(tok: HFTokenizer, texts: list[str], eod: int) -> list[list[int]]:
    """Each document encoded alone, followed by `eod`; documents that encode to nothing left out."""
    return [ids + [eod] for ids in (e.ids for e in tok.encode_batch(texts, add_special_tokens=False)) if ids]


def test_documents_joined_into_strings_encode_as_one_by_one(real, tmp_path):
    """Short documents are encoded several to a string, joined by the end-of-document token, where the tokenizer
    makes that exact; a batch with the token's text inside a document, a tokenizer that would change, and one
    whose first documents disagree fall back to one by one. Each case is checked against a direct encode."""
    from tokenizers import models, pre_tokenizers, trainers

    from kislurm.data import corpus

    texts = real["texts"][:300]
    eod = real["tok"].token_to_id("<|endoftext|>")
    assert corpus.joins_documents(real["tok"], eod)
    # a document holding the token's text is one document (the text encodes to the id inside it), not two; it
    # comes after the documents encoded both ways, so the count of end-of-document ids alone must catch it
    src = tmp_path / "literal.jsonl"
    docs = [*texts[:corpus.VERIFY_DOCS + 20], "a cat<|endoftext|>a dog", *texts[corpus.VERIFY_DOCS + 20:]]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    rep = build_corpus([str(src)], tmp_path / "literal", tokenizer=real["dir"] / "tokenizer.json", progress=False)
    ds = IndexedDataset(rep.prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == one_by_one(real["tok"], docs, eod)
    # Llama's pre-tokenizer marks only a text's first word: joined strings would differ, so they are not used
    llama = HFTokenizer(models.BPE())
    llama.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    llama.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], show_progress=False))
    llama.save(str(tmp_path / "llama.json"))
    end = llama.token_to_id("</s>")
    assert not corpus.joins_documents(llama, end)
    joined, _ = corpus.encode_joined(llama, texts, end, np.dtype(np.uint16))
    want = one_by_one(llama, texts, end)
    assert joined.tolist() != sum(want, []), "the rule would pass a tokenizer whose joined strings change the ids"
    src = tmp_path / "wn.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    rep = build_corpus([str(src)], tmp_path / "llama", tokenizer=tmp_path / "llama.json", progress=False)
    ds = IndexedDataset(rep.prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == want
    # ... and were the rule wrong, each shard's first documents, encoded both ways, would catch it
    corpus_joins = corpus.joins_documents
    try:
        corpus.joins_documents = lambda tok, eod: True
        again = build_corpus([str(src)], tmp_path / "guard", tokenizer=tmp_path / "llama.json", progress=False,
                             keep_shards=True)
    finally:
        corpus.joins_documents = corpus_joins
    assert files(again.prefix) == files(rep.prefix)
    assert [json.loads(p.read_text())["joined"] for p in Path(f"{again.prefix}.shards").glob("*/stats.json")] == [False]
    # an end-of-document token that strips the space after it would eat the next document's first space
    spec = json.loads(real["tok"].to_str())
    next(t for t in spec["added_tokens"] if t["id"] == eod)["rstrip"] = True
    stripping = HFTokenizer.from_str(json.dumps(spec))
    assert not corpus.joins_documents(stripping, eod)
    assert corpus.encode_joined(stripping, ["a cat", " a dog"], eod, np.dtype(np.uint16))[0].tolist() != \
        sum(one_by_one(stripping, ["a cat", " a dog"], eod), [])


def test_a_tokenizer_saved_with_truncation_or_padding_encodes_whole_documents(real, tmp_path):
    """tokenizer.json can carry truncation and padding; transformers and preprocess_data.py ignore them, and so
    does kislurm: no document is cut or padded."""
    tok = HFTokenizer.from_file(str(real["dir"] / "tokenizer.json"))
    tok.enable_truncation(4)
    tok.enable_padding(length=64, pad_id=tok.token_to_id("<|pad|>"), pad_token="<|pad|>")
    tok.save(str(tmp_path / "cut.json"))
    rep = build_corpus([str(real["jsonl"])], tmp_path / "cut", tokenizer=tmp_path / "cut.json", progress=False)
    assert files(rep.prefix) == files(real["one"].prefix)
