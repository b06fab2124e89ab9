"""Raw corpora in: paths and globs, shards (byte ranges, compressed files, parquet row groups), documents, and a
resumable map over shards. Shared by `kislurm corpus` and `kislurm census`; it knows nothing of tokenizers or facts.

A shard of an uncompressed JSONL file is a byte range [start, end) and owns exactly the lines that START in it, so the
shards of a file cover each line once whatever their size. A compressed file is one shard; a parquet file is split at
row groups; a plain-text file is one document. Each shard's result is a folder named by the shard's identity (path,
size, mtime, range and the caller's salt, e.g. a tokenizer's hash), published by one atomic rename: a rerun skips the
shards already published, so a kill or a Slurm time limit loses only the shards in flight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from kislurm.errors import DataError
from kislurm.publish import publish

SHARD_BYTES = 256 << 20
KINDS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
             ".jsonl.gz": "jsonl.gz", ".json.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
             ".jsonl.zst": "jsonl.zst", ".json.zst": "jsonl.zst", ".ndjson.zst": "jsonl.zst",
             ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
_COUNT_CHUNK = 16 << 20
CHUNK_BYTES = 1 << 20          # JSONL bytes per chunk read_texts parses at once (pyarrow) and yields as one list
# A number pyarrow's JSON parser (RapidJSON) accepts and Python's json refuses: Inf or -Inf (both take NaN, Infinity
# and -Infinity; -NaN is looked for apart). A chunk that may hold one is parsed line by line, to be refused as before.
_INF = re.compile(rb"Inf[\s,\]}]")


class CorpusInputError(DataError):
    """A corpus input that cannot be read; one line: 'FILE:LINE: problem; fix: ...'."""


@dataclass(frozen=True)
class Shard:
    """A unit of work: a whole file or a part of one (byte range for uncompressed JSONL, row groups for parquet)."""
    path: str          # absolute
    kind: str          # one of KINDS
    start: int         # jsonl: byte offset; parquet: first row group; otherwise 0
    end: int           # jsonl: byte offset (exclusive); parquet: row group (exclusive); otherwise -1 (whole file)
    size: int          # file size and mtime_ns: a changed file is a new shard
    mtime_ns: int

    def identity(self, *salt: str) -> str:
        """sha256 hex of what makes the shard's result: its file's identity, its range and the caller's salt."""
        key = [self.path, self.size, self.mtime_ns, self.start, self.end, *salt]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()


@dataclass(frozen=True)
class Document:
    """One record of a corpus: a JSON line's value, a parquet row's value, or a whole text file."""
    text: str
    path: str
    line: int          # 1-based line (jsonl), row (parquet) or 1 (text)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and shards
# ----------------------------------------------------------------------------------------------------------------------


def kind_of(path: Path) -> str:
    """The reader a file needs, from its name; refuses names it cannot tell."""
    name = path.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    raise CorpusInputError(f"{path}: unknown corpus format; fix: name it *.jsonl, *.jsonl.gz, *.jsonl.zst, *.parquet "
                           f"or *.txt (one document per .txt file)")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths and globs, in the order given, each glob sorted, each file once."""
    if not patterns:
        raise CorpusInputError("no corpus input given; fix: name JSONL/parquet/text files or globs such as 'data/*.jsonl'")
    out: dict[Path, None] = {}
    for pattern in patterns:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        files = [Path(m).resolve() for m in matches if Path(m).is_file()]
        if not files:
            what = "matches no file" if glob.has_magic(pattern) else (
                "is a folder" if Path(pattern).is_dir() else "does not exist")
            raise CorpusInputError(f"{pattern}: {what}; fix: name existing files or a glob such as '{pattern.rstrip('/')}"
                                   f"/*.jsonl' (quote it so that the shell does not expand it)")
        for f in files:
            kind_of(f)
            out.setdefault(f, None)
    return list(out)


def plan_shards(paths: Sequence[Path], shard_bytes: int = SHARD_BYTES) -> list[Shard]:
    """Shards of the files in order: byte ranges of about `shard_bytes` for uncompressed JSONL, groups of row groups
    for parquet, one shard per compressed or text file. Deterministic for the same files."""
    if shard_bytes < 1:
        raise CorpusInputError(f"shard size {shard_bytes} bytes; fix: give a positive shard size")
    shards: list[Shard] = []
    for path in paths:
        path = Path(path).resolve()
        kind = kind_of(path)
        st = path.stat()
        make = lambda start, end: Shard(str(path), kind, start, end, st.st_size, st.st_mtime_ns)  # noqa: E731
        if kind == "jsonl":
            starts = range(0, max(st.st_size, 1), shard_bytes)
            shards += [make(s, min(s + shard_bytes, st.st_size)) for s in starts]
        elif kind == "parquet":
            shards += [make(a, b) for a, b in _row_group_ranges(path, shard_bytes)]
        else:
            shards.append(make(0, -1))
    return shards


def _row_group_ranges(path: Path, shard_bytes: int) -> list[tuple[int, int]]:
    """[first, end) row-group ranges of about `shard_bytes` (uncompressed) each; at least one per file."""
    meta = _parquet_file(path).metadata
    ranges, first, acc = [], 0, 0
    for i in range(meta.num_row_groups):
        acc += meta.row_group(i).total_byte_size
        if acc >= shard_bytes:
            ranges.append((first, i + 1))
            first, acc = i + 1, 0
    if first < meta.num_row_groups or not ranges:
        ranges.append((first, meta.num_row_groups))
    return ranges


def _parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged or non-parquet files
        raise CorpusInputError(f"{path}:1: not a readable parquet file ({_first_line(e)}); fix: rewrite it with "
                               f"pyarrow/pandas, or name JSONL files instead") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------------------------


def read_documents(shard: Shard, json_key: str = "text") -> Iterator[Document]:
    """The shard's documents in order. A malformed JSON line, a missing key, a value that is not a string, bytes that
    are not UTF-8 or an unreadable parquet file raise CorpusInputError naming the file, the line and the fix."""
    if shard.kind == "jsonl":
        yield from _jsonl_range(shard, json_key)
    elif shard.kind in ("jsonl.gz", "jsonl.zst"):
        with _open_compressed(shard) as f:
            yield from _jsonl_lines(f, shard.path, json_key, first_line=1)
    elif shard.kind == "parquet":
        for first, texts in _parquet_texts(shard, json_key):
            yield from (Document(t, shard.path, first + k) for k, t in enumerate(texts))
    elif shard.kind == "text":
        yield _text_file(shard.path)
    else:
        raise CorpusInputError(f"{shard.path}: unknown shard kind {shard.kind!r}; fix: use one of {', '.join(KINDS)}")


def read_texts(shard: Shard, json_key: str = "text", chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[str]]:
    """The texts read_documents yields, in lists (about `chunk_bytes` of JSONL, or a parquet row group) and without a
    Python object per document: the bulk path of `kislurm corpus`, where per-document Python costs throughput.

    JSON lines are parsed by pyarrow's C++ reader a chunk at a time wherever it is sure to give what json.loads gives
    line by line (arrow_texts); any other chunk is parsed line by line, so a bad line gets the same one-line error,
    naming it, as with read_documents."""
    if shard.kind == "jsonl":
        with open(shard.path, "rb") as f:
            pos = _first_line_start(f, shard.start)
            if pos < shard.end:
                yield from _chunk_texts(_line_chunks(f, shard.end - pos, chunk_bytes), shard.path, json_key,
                                        functools.partial(line_at, shard.path, pos))
    elif shard.kind in ("jsonl.gz", "jsonl.zst"):
        with _open_compressed(shard) as f, _stream_errors(shard.path):
            yield from _chunk_texts(_line_chunks(f, None, chunk_bytes), shard.path, json_key, lambda: 1)
    elif shard.kind == "parquet":
        yield from (texts for _, texts in _parquet_texts(shard, json_key))
    else:
        yield [d.text for d in read_documents(shard, json_key)]


def _first_line_start(f: io.BufferedReader, start: int) -> int:
    """Offset of the first line that starts at or after `start` (the line that holds start-1 belongs to the shard
    before), with `f` positioned there."""
    if start > 0:
        f.seek(start - 1)
        f.readline()
    return f.tell()


def _line_chunks(f: Any, left: Optional[int], size: int) -> Iterator[bytes]:
    """Whole lines of `f` from its position in chunks of about `size` bytes (a longer line is one chunk); with `left`,
    only the lines that start within the next `left` bytes, the last one read to its end."""
    carry = b""
    while left is None or left > 0:
        block = f.read(size if left is None else min(size, left))
        if not block:
            break
        if left is not None:
            left -= len(block)
            if left == 0 and not block.endswith(b"\n"):
                block += f.readline()
        data = carry + block if carry else block
        cut = len(data) if left == 0 else data.rfind(b"\n") + 1
        if cut:
            yield data[:cut]
        carry = data[cut:]
    if carry:
        yield carry


def _chunk_texts(chunks: Iterator[bytes], path: str, json_key: str,
                 first_line: Callable[[], int]) -> Iterator[list[str]]:
    """Texts of each chunk of JSON lines: pyarrow's where arrow_texts vouches for them, else json.loads line by line
    (first_line() is the chunk stream's first line number, asked only then: a byte-range shard counts it)."""
    before = 0
    for chunk in chunks:
        texts = arrow_texts(chunk, json_key)
        if texts is None:
            lines = io.BytesIO(chunk)
            texts = [d.text for d in _jsonl_lines(lines, path, json_key, first_line=first_line() + before)]
        yield texts
        before += chunk.count(b"\n")


def arrow_texts(chunk: bytes, json_key: str) -> Optional[list[str]]:
    """The `json_key` strings of a chunk of JSON lines, read by pyarrow's C++ JSON reader; None unless they are
    surely what json.loads gives line by line. pyarrow parses a chunk as a stream of values (two objects on one
    line, or one over two lines, pass), so every line must start with '{' and end with '}' and the rows must be as
    many as the lines: a value cannot then span lines ('}' then '{' is never inside one) and each line holds one. It
    also accepts Inf, -NaN and bytes that are not UTF-8 outside the text, and reads a missing key or null as null."""
    if not chunk:
        return []
    n = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    joints = chunk.count(b"}\n{") + (chunk.count(b"}\r\n{") if b"\r" in chunk else 0)   # '}' ends, '{' starts a line
    if (joints != n - 1 or not chunk.startswith(b"{") or not chunk.endswith((b"}\n", b"}\r\n", b"}"))
            or b"-NaN" in chunk or (b"Inf" in chunk and _INF.search(chunk))):
        return None
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return None
    import pyarrow as pa
    import pyarrow.json as pj
    parse = pj.ParseOptions(explicit_schema=pa.schema([(json_key, pa.string())]), unexpected_field_behavior="ignore")
    try:
        table = pj.read_json(pa.BufferReader(chunk), parse_options=parse,
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(chunk) + 1))
    except (pa.ArrowException, ValueError):   # ArrowInvalid: malformed, a non-object line, a key of another type
        return None
    column = table.column(json_key)
    if table.num_rows != n or column.null_count:
        return None
    return column.to_pylist()


def _jsonl_range(shard: Shard, json_key: str) -> Iterator[Document]:
    """The lines that start in [start, end): for start > 0, skip to the byte after the first newline at or after
    start-1 (the line that holds start-1 belongs to the shard before)."""
    with open(shard.path, "rb") as f:
        pos = _first_line_start(f, shard.start)
        if pos >= shard.end:
            return
        lines = _lines_until(f, pos, shard.end)
        yield from _jsonl_lines(lines, shard.path, json_key, first_line=None, first_offset=pos)


def _lines_until(f: io.BufferedReader, pos: int, end: int) -> Iterator[bytes]:
    """Lines of `f` from `pos` while they start before `end`."""
    while pos < end:
        line = f.readline()
        if not line:
            return
        yield line
        pos += len(line)


def _open_compressed(shard: Shard) -> Any:
    if shard.kind == "jsonl.gz":
        return gzip.open(shard.path, "rb")
    import zstandard
    raw = open(shard.path, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


def _jsonl_lines(lines: Any, path: str, json_key: str, first_line: Optional[int],
                 first_offset: int = 0) -> Iterator[Document]:
    """Documents of JSON lines. first_line None: a byte-range shard does not know how many lines come before it, so
    they are counted in the file (once per shard: a fast scan of the bytes before it)."""
    base = first_line if first_line is not None else line_at(path, first_offset)
    with _stream_errors(path):
        for k, raw in enumerate(lines):
            if raw.isspace():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))   # decoded here: json.loads(bytes) would guess the encoding
            except UnicodeDecodeError as e:
                raise CorpusInputError(f"{path}:{base + k}: bytes that are not UTF-8 ({e.reason} at byte "
                                       f"{e.start} of the line); fix: re-encode the file as UTF-8") from None
            except ValueError as e:
                raise CorpusInputError(f"{path}:{base + k}: malformed JSON ({_first_line(e)}); fix: make every line "
                                       f"one JSON object, e.g. {{\"{json_key}\": \"...\"}}") from None
            text = rec.get(json_key) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise CorpusInputError(f"{path}:{base + k}: {_missing(rec, json_key)}")
            yield Document(text, path, base + k)


@contextlib.contextmanager
def _stream_errors(path: str) -> Iterator[None]:
    """A damaged gzip/zstd stream as one line (BadGzipFile is an OSError, EOFError a truncated one; zstd raises
    ZstdError)."""
    try:
        yield
    except (OSError, EOFError) as e:
        raise CorpusInputError(f"{path}: unreadable ({_first_line(e)}); fix: recompress the file or name it "
                               f"uncompressed") from None
    except CorpusInputError:
        raise
    except Exception as e:
        if type(e).__name__ != "ZstdError":
            raise
        raise CorpusInputError(f"{path}: unreadable zstd stream ({_first_line(e)}); fix: recompress the file "
                               f"with zstd, or name it uncompressed") from None


def _missing(rec: Any, json_key: str) -> str:
    """Why a JSON record has no text under `json_key`, and the fix."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object; fix: make every line an object with a \"{json_key}\" key"
    if json_key not in rec:
        keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
        return f"no key \"{json_key}\" (keys: {keys}); fix: pass --json-key with the key that holds the text"
    return (f"\"{json_key}\" holds a {type(rec[json_key]).__name__}, not a string; fix: store the text as a string, "
            f"or pass --json-key with the key that holds it")


def line_at(path: str, offset: int) -> int:
    """1-based line number of the byte at `offset` of an uncompressed file (counts newlines before it)."""
    n = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            chunk = f.read(min(_COUNT_CHUNK, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n + 1


def _parquet_texts(shard: Shard, json_key: str) -> Iterator[tuple[int, list[str]]]:
    """(first row number, texts) of each row group of the shard; a value that is not a string is refused naming its
    row."""
    pf = _parquet_file(Path(shard.path))
    if json_key not in pf.schema_arrow.names:
        raise CorpusInputError(f"{shard.path}:1: no column \"{json_key}\" (columns: "
                               f"{', '.join(pf.schema_arrow.names[:8])}); fix: pass --json-key with the text column")
    row = sum(pf.metadata.row_group(i).num_rows for i in range(shard.start))
    for g in range(shard.start, shard.end):
        try:
            col = pf.read_row_group(g, columns=[json_key]).column(0)
        except Exception as e:
            raise CorpusInputError(f"{shard.path}:{row + 1}: row group {g} is unreadable ({_first_line(e)}); fix: "
                                   f"rewrite the file with pyarrow/pandas") from None
        texts = col.to_pylist()
        if col.null_count or not _is_string(col.type):
            for k, text in enumerate(texts):
                if not isinstance(text, str):
                    raise CorpusInputError(f"{shard.path}:{row + k + 1}: column \"{json_key}\" holds "
                                           f"{type(text).__name__}, not a string; fix: store the text as strings, or "
                                           f"pass --json-key with the text column")
        yield row + 1, texts
        row += len(col)


def _is_string(t: Any) -> bool:
    import pyarrow as pa
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _text_file(path: str) -> Document:
    raw = Path(path).read_bytes()
    try:
        return Document(raw.decode("utf-8"), path, 1)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise CorpusInputError(f"{path}:{line}: bytes that are not UTF-8 ({e.reason}); fix: re-encode the file as "
                               f"UTF-8") from None


# ----------------------------------------------------------------------------------------------------------------------
# A resumable map over shards
# ----------------------------------------------------------------------------------------------------------------------

_HOST = socket.gethostname().replace(".", "_").replace("-", "_")


def result_dir(shard: Shard, out_dir: Path, salt: tuple[str, ...] = ()) -> Path:
    """Where a shard's published result lives: out_dir/<identity[:16]>."""
    return Path(out_dir) / shard.identity(*salt)[:16]


def run_shard(work: Callable[[Shard, Path], None], shard: Shard, final: Path) -> Path:
    """Run `work` into a private temporary folder next to `final`, then publish it by one atomic rename (if another
    writer published it first, that copy is kept). On an error the temporary folder is removed."""
    final = Path(final)
    if final.is_dir():
        return final
    tmp = final.parent / f".{final.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        work(shard, tmp)
        try:
            publish(tmp, final, replace=False)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def remove_abandoned(out_dir: Path) -> None:
    """Remove temporary folders whose writer ran on this machine and is gone (a kill); others' are never touched."""
    for tmp in Path(out_dir).glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 4)
        if len(parts) != 5 or parts[1] != _HOST or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def map_shards(shards: Sequence[Shard], work: Callable[[Shard, Path], None], out_dir: Path,
               salt: tuple[str, ...] = (), workers: int = 1, executor: Any = None,
               progress: Optional[Callable[[Shard, Path], None]] = None) -> list[Path]:
    """Run `work(shard, folder)` for every shard not yet published under out_dir; return the result folders in shard
    order. Locally: in this process (workers=1) or a spawn process pool; with a submitit executor: one array task
    per unfinished shard. `progress(shard, folder)` is called in this process as each shard is done (finished ones
    first). `work` must be picklable (a module-level function or a functools.partial of one)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out_dir)
    finals = [result_dir(s, out_dir, salt) for s in shards]
    todo = [i for i, f in enumerate(finals) if not f.is_dir()]
    for i in sorted(set(range(len(finals))) - set(todo)):
        if progress:
            progress(shards[i], finals[i])
    done = lambda i: progress(shards[i], finals[i]) if progress else None  # noqa: E731
    if executor is not None:
        _run_submitit(executor, work, shards, finals, todo, done)
    elif runs_in_process(len(todo), workers, executor):
        for i in todo:
            run_shard(work, shards[i], finals[i])
            done(i)
    else:
        _run_pool(workers, work, shards, finals, todo, done)
    return finals


def runs_in_process(todo: int, workers: int = 1, executor: Any = None) -> bool:
    """Whether map_shards runs `todo` unfinished shards in the calling process (so a callback there can follow them
    batch by batch), rather than in a process pool or as Slurm array tasks."""
    return executor is None and (workers <= 1 or todo <= 1)


def _run_pool(workers: int, work: Callable, shards: Sequence[Shard], finals: list[Path], todo: list[int],
              done: Callable[[int], None]) -> None:
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx)
    try:
        futures = {pool.submit(run_shard, work, shards[i], finals[i]): i for i in todo}
        for fut in concurrent.futures.as_completed(futures):
            fut.result()
            done(futures[fut])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_submitit(executor: Any, work: Callable, shards: Sequence[Shard], finals: list[Path], todo: list[int],
                  done: Callable[[int], None]) -> None:
    """One array task per unfinished shard; waits for them in order and re-raises the first failure."""
    if not todo:
        return
    with executor.batch():
        jobs = [(i, executor.submit(run_shard, work, shards[i], finals[i])) for i in todo]
    for i, job in jobs:
        job.result()
        done(i)


def slurm_shard_executor(folder: Path, partition: Optional[str] = None, cpus: int = 2, time_min: int = 60) -> Any:
    """A submitit Slurm executor for map_shards: one array task per unfinished shard, `cpus` CPUs each, its logs in
    folder/<job id>. Shared by the shard-parallel commands (`kislurm census`, `kislurm corpus`) so that their
    --cluster slurm --partition --cpus --time flags mean the same."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
    params: dict[str, Any] = {"timeout_min": time_min, "cpus_per_task": cpus, "nodes": 1, "tasks_per_node": 1}
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor
