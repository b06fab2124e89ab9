"""kislurm.data.sources: globs, shards that cover every line once, the readers of each format, one-line errors, and
the resumable map over shards."""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kislurm.data.sources import (CorpusInputError, Document, Shard, arrow_texts, expand_inputs, map_shards,
                                  plan_shards, read_documents, read_texts)

TEXTS = [f"document {i}: " + "word " * (i % 7) + ("é" if i % 5 == 0 else "") for i in range(60)] + ["", "  "]


def jsonl_bytes(texts, key="text") -> bytes:
    return b"".join(json.dumps({key: t, "id": i}).encode() + b"\n" for i, t in enumerate(texts))


@pytest.fixture()
def corpus(tmp_path) -> Path:
    p = tmp_path / "c.jsonl"
    p.write_bytes(jsonl_bytes(TEXTS))
    return p


def all_docs(paths, shard_bytes=1 << 20, key="text") -> list[Document]:
    return [d for s in plan_shards(paths, shard_bytes) for d in read_documents(s, key)]


@pytest.mark.parametrize("shard_bytes", [1, 7, 64, 97, 1000, 1 << 20])
def test_byte_range_shards_cover_every_line_once(corpus, shard_bytes):
    docs = all_docs([corpus], shard_bytes)
    assert [d.text for d in docs] == TEXTS
    assert [d.line for d in docs] == list(range(1, len(TEXTS) + 1))
    shards = plan_shards([corpus], shard_bytes)
    assert shards[0].start == 0 and shards[-1].end == corpus.stat().st_size
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))


def test_no_trailing_newline_and_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "a"}\n\n   \n{"text": "b"}')
    for n in (1, 3, 100):
        docs = all_docs([p], n)
        assert [(d.text, d.line) for d in docs] == [("a", 1), ("b", 4)]


def test_globs_sorted_and_files_once(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt", "sub/d.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    got = expand_inputs([str(tmp_path / "c.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl"),
                         str(tmp_path / "**/*.jsonl")])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["c.txt", "a.jsonl", "b.jsonl", "sub/d.jsonl"]


def test_every_format_reads_the_same_documents(tmp_path):
    texts = [t for t in TEXTS if t.strip()]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(texts)))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(texts)))
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "c.parquet", row_group_size=7)
    (tmp_path / "d.txt").write_text("first line\nsecond line é\n", encoding="utf-8")
    paths = expand_inputs([str(tmp_path / "*")])
    assert [s.kind for s in plan_shards(paths, 1 << 30)] == ["jsonl.gz", "jsonl.zst", "parquet", "text"]
    per_file = {Path(p).name: [d.text for d in all_docs([p], 100)] for p in paths}
    assert per_file == {"a.jsonl.gz": texts, "b.jsonl.zst": texts, "c.parquet": texts,
                        "d.txt": ["first line\nsecond line é\n"]}
    rows = [d.line for d in all_docs([tmp_path / "c.parquet"], 100)]
    assert rows == list(range(1, len(texts) + 1))
    assert len(plan_shards([tmp_path / "c.parquet"], 1)) == -(-len(texts) // 7)   # one shard per row group


def test_identity_follows_file_range_and_salt(corpus):
    a, b = plan_shards([corpus], 100)[:2]
    assert len({a.identity(), b.identity(), a.identity("tok1"), a.identity("tok2")}) == 4
    assert a.identity("tok1") == plan_shards([corpus], 100)[0].identity("tok1")
    os.utime(corpus, ns=(a.mtime_ns + 10**9, a.mtime_ns + 10**9))
    assert plan_shards([corpus], 100)[0].identity() != a.identity()


BAD = [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "no end\n', "bad.jsonl:2: malformed JSON", "fix: make every line"),
    ("key.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'key.jsonl:2: no key "text" (keys: body)', "--json-key"),
    ("int.jsonl", b'{"text": 3}\n', 'int.jsonl:1: "text" holds a int, not a string', "fix:"),
    ("list.jsonl", b'["text"]\n', "list.jsonl:1: a JSON list, not an object", "fix:"),
    ("utf.jsonl", b'{"text": "a"}\n{"text": "a"}\n{"text": "\xff\xfe"}\n', "utf.jsonl:3: bytes that are not UTF-8",
     "fix: re-encode"),
    ("utf.txt", "é\n\n".encode() + b"\xff\n", "utf.txt:3: bytes that are not UTF-8", "fix: re-encode"),
    ("gz.jsonl.gz", b"not gzip at all", "gz.jsonl.gz: unreadable", "fix: recompress"),
    ("zst.jsonl.zst", b"not zstd at all", "zst.jsonl.zst: unreadable", "fix: recompress"),
    ("bad.parquet", b"PAR1 not really", "bad.parquet:1: not a readable parquet file", "fix: rewrite"),
    ("data.csv", b"a,b\n", "data.csv: unknown corpus format", "fix: name it"),
]


def all_texts(paths, shard_bytes=1 << 20, key="text", chunk_bytes=1 << 20) -> list[str]:
    return [t for s in plan_shards(paths, shard_bytes) for texts in read_texts(s, key, chunk_bytes) for t in texts]


@pytest.mark.parametrize("name,content,where,fix", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_file_line_and_fix(tmp_path, name, content, where, fix):
    (tmp_path / name).write_bytes(content)
    paths = lambda: expand_inputs([str(tmp_path / name)])  # noqa: E731  (refuses an unknown format)
    for shard_bytes in (5, 1 << 20):   # the line number holds whichever shard the bad line falls in
        with pytest.raises(CorpusInputError) as e:
            all_docs(paths(), shard_bytes)
        msg = str(e.value)
        assert "\n" not in msg and where in msg and fix in msg, msg
        assert msg.startswith(str(tmp_path)), msg
        for chunk_bytes in (3, 1 << 20):          # read_texts: the bad line in the first chunk or a later one
            with pytest.raises(CorpusInputError) as bulk:
                all_texts(paths(), shard_bytes, chunk_bytes=chunk_bytes)
            assert str(bulk.value) == msg


GOOD = b'{"text": "one", "id": 1}\n{"id": 2, "text": "t\\u00e9 \xc3\xa9 \\ud83d\\ude00"}\n'
# Lines where pyarrow's JSON reader and json.loads line by line part ways: read_texts must give what
# read_documents gives (the texts, or the same error naming the line), whichever chunk the line falls in.
DIVERGENT = [
    ("two objects on a line", b'{"text": "a"} {"text": "b"}\n', "malformed JSON"),
    ("one object over two lines", b'{"text":\n"a"}\n', "malformed JSON"),
    ("Inf", b'{"text": "a", "x": Inf}\n', "malformed JSON"),
    ("-NaN", b'{"text": "a", "x": [-NaN]}\n', "malformed JSON"),
    ("not UTF-8 outside the text", b'{"text": "a", "x": "\xff"}\n', "not UTF-8"),
    ("not UTF-8 in a key", b'{"text": "a", "\xfe": 1}\n', "not UTF-8"),
    ("byte order mark", b'\xef\xbb\xbf{"text": "a"}\n', "malformed JSON"),
    ("null", b'{"text": null}\n', "holds a NoneType"),
    ("key in some rows only", b'{"body": "a"}\n', 'no key "text"'),
    ("a list", b'["text"]\n', "a JSON list"),
    ("a number", b'{"text": 3}\n', "holds a int"),
    ("Infinity and NaN", b'{"text": "a", "x": [Infinity, -Infinity, NaN]}\n', ["a"]),
    ("a repeated key", b'{"text": "a", "text": "b"}\n', ["b"]),
    ("a lone surrogate", b'{"text": "a\\ud800"}\n', ["a\ud800"]),
    ("blank lines", b'\n  \n{"text": "a"}\n\x0b\n', ["a"]),
    ("CRLF and spaces", b'{"text": "a"}\r\n {"text": "b"} \r\n', ["a", "b"]),
]


@pytest.mark.parametrize("name,line,want", DIVERGENT, ids=[d[0] for d in DIVERGENT])
def test_read_texts_falls_back_to_line_by_line_where_pyarrow_differs(tmp_path, name, line, want):
    p = tmp_path / "c.jsonl"
    p.write_bytes(GOOD * 3 + line + GOOD)
    assert arrow_texts(GOOD * 3, "text") == ["one", "té é 😀"] * 3       # the fast path reads the good lines
    fast = arrow_texts(line, "text")                                      # refuses a bad line, or reads it right
    assert fast is None if isinstance(want, str) else fast in (None, want)
    at = GOOD.count(b"\n") * 3 + 1                                     # the bad line's number
    for shard_bytes in (23, 1 << 20):
        for chunk_bytes in (40, 1 << 20):
            try:
                want_texts = [d.text for d in all_docs([p], shard_bytes)]
            except CorpusInputError as e:
                assert isinstance(want, str) and want in str(e) and f"c.jsonl:{at}:" in str(e), str(e)
                with pytest.raises(CorpusInputError) as bulk:
                    all_texts([p], shard_bytes, chunk_bytes=chunk_bytes)
                assert str(bulk.value) == str(e)
            else:
                assert want_texts == ["one", "té é 😀"] * 3 + want + ["one", "té é 😀"]
                assert all_texts([p], shard_bytes, chunk_bytes=chunk_bytes) == want_texts


def test_missing_inputs_refused(tmp_path):
    for patterns, what in (([str(tmp_path / "*.jsonl")], "matches no file"), ([str(tmp_path / "x.jsonl")],
                           "does not exist"), ([str(tmp_path)], "is a folder"), ([], "no corpus input")):
        with pytest.raises(CorpusInputError, match=what):
            expand_inputs(patterns)


def count_docs(shard: Shard, out: Path, fail_on: str = "") -> None:
    """A work function: writes the shard's document count; raises on the document `fail_on` (a kill stand-in)."""
    texts = [d.text for d in read_documents(shard)]
    if fail_on and fail_on in texts:
        (out / "partial").write_text("half")
        raise RuntimeError("killed")
    (out / "n").write_text(str(len(texts)))


def test_map_shards_publishes_each_shard_once_and_resumes(tmp_path, corpus):
    shards = plan_shards([corpus], 200)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        map_shards(shards, functools.partial(count_docs, fail_on=TEXTS[40]), out, salt=("v1",))
    finished = sorted(p.name for p in out.iterdir())
    assert finished and not any(p.name.startswith(".") for p in out.iterdir())   # nothing half-published
    assert len(finished) < len(shards)
    seen = []
    dirs = map_shards(shards, count_docs, out, salt=("v1",), workers=2, progress=lambda s, d: seen.append(s))
    assert sorted(seen, key=shards.index) == shards
    assert sum(int((d / "n").read_text()) for d in dirs) == len(TEXTS)
    assert [d.name for d in dirs] == [s.identity("v1")[:16] for s in shards]
    assert all(not (d / "partial").exists() for d in dirs)
    before = {d: (d / "n").stat().st_mtime_ns for d in dirs}
    assert map_shards(shards, count_docs, out, salt=("v1",)) == dirs
    assert {d: (d / "n").stat().st_mtime_ns for d in dirs} == before    # a rerun redoes nothing
    assert set(map_shards(shards, count_docs, out, salt=("v2",))).isdisjoint(dirs)   # another salt, other results
