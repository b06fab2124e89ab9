"""The retention store: one versioned HDF5 file per cell, written copy-on-write so it is never seen half-written.

Design: copy-on-write, not SWMR. The writer keeps the cell's whole record in memory (a few MB at most) and publishes
every change (open, append, truncate_after, update_meta, mark_complete) as a complete new file: written to a temporary
name in the same folder, fsync'ed, then os.replace'd over `retention.h5` (and the folder fsync'ed). Why:
  * Atomicity: rename is atomic, so a reader, or a writer resuming after SIGKILL at any moment, finds the previous
    or the new version, never a partial append. An append touches six datasets; SWMR only keeps each dataset's
    metadata coherent, so a reader could still see `step` grown and `probe_correct` not, unless every reader also
    honoured a separate commit counter.
  * Readers need nothing special: a plain h5py/xarray open sees a normal, closed HDF5 file. SWMR needs readers to
    open with swmr=True, forbids the writer to add or change attributes (update_meta, mark_complete), and a killed
    SWMR writer leaves the superblock marked "open for writing" until someone runs h5clear.
  * Filesystems: SWMR requires POSIX write() ordering, which HDF5 documents as not given on NFS (and HDF5's file
    locks fail on some Lustre/GPFS mounts). Copy-on-write needs only an atomic rename within a folder, which
    NFS, Lustre and GPFS all provide. Readers open without file locks; a reader holding the old file keeps a
    consistent snapshot (POSIX keeps unlinked open files), and a reader that loses it mid-read (NFS ESTALE) retries.
  * Cost: O(file size) per append: ~20 ms at 100 steps x 1,000 probes (~120 KB), ~3x an in-place h5py append
    (tools/bench_store.py), against an evaluation that takes seconds to minutes. Files stay compact (no holes).
Two writers on one cell are detected (the file changed since this writer published it) and refused.

Layout (SCHEMA_VERSION 1; HDF5 format bounds v110, readable by HDF5 >= 1.10 and so by netCDF-4/h5netcdf):
  /  attrs  kislurm_record  one JSON blob (schema, version, status, metric names, meta, and a copy of the step,
            tokens and train_loss series: a few KB) so that read_cell(matrix=False) reads one attribute and one
            dataset (metrics), ~25% faster than four dataset reads; plus every meta key as its own attribute
            (dicts as JSON text) and status/complete, for people and tools.
  step (S,) int64 [dimension scale "step"], tokens (S,) int64, train_loss (S,) float64,
  metrics (S, M) float64 (attr `names`) with scale metric (M,), all chunked with an unlimited step axis;
  probe_correct / probe_exact (S, P) uint8 0/1, chunked and gzip-compressed, scales step and probe (P,);
  fact (F,) fact ids [scale "fact"], fact_group (F,) int8, probe_fact_index (P,) int64, probe_heldout (P,) uint8;
  optionally fact_frequency (F,) int64 (corpus documents or exposures per fact, unit in meta fact_frequency_unit).
  User block (ignored by HDF5): the digest aggregation reads (kislurm.retention.digest), the file's size and a checksum.
  Files written before the digest existed have none and are read through their datasets.

Why one long module: the schema, its one writer and its readers change together; a layout change is one file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
from h5py import h5a, h5d, h5f, h5p, h5s

from kislurm import __version__
from kislurm.retention import digest
from kislurm.retention.digest import StoreDigest, narrow_index
from kislurm.publish import publishing
from kislurm.errors import StoreError  # noqa: F401 (re-exported)

SCHEMA_NAME = "kislurm.retention"
SCHEMA_VERSION = 1
RECORD_ATTR = "kislurm_record"
LIBVER = ("v110", "v110")
REQUIRED_META = ("cell_id", "name", "size", "ratio", "tokens", "seed", "config", "params_total",
                 "params_non_embedding", "n_choices", "data_stats")
STORE_META = ("schema_version", "kislurm_version", "git_commit", "created", "writers")
MAX_WRITERS = 20          # resume sessions remembered in meta["writers"]
READ_RETRIES = 3          # a file replaced under a reader (NFS ESTALE) is read again
MEANING = {"probe_correct": "multiple choice answered correctly", "probe_exact": "greedy generation matched exactly"}


class _Unreadable(StoreError):
    """The bytes could not be read as a store: damaged, or replaced by its writer while being read (retried)."""


@dataclass(frozen=True)
class CellRecord:
    """One cell's store as read. The probe fields are None when read with matrix=False (the fast path)."""

    path: Path
    meta: dict
    complete: bool
    step: np.ndarray
    tokens: np.ndarray
    train_loss: np.ndarray
    metrics: dict[str, np.ndarray]
    probe_correct: np.ndarray | None
    probe_exact: np.ndarray | None
    fact_ids: list[str] | None
    fact_group: np.ndarray | None
    probe_fact_index: np.ndarray | None
    probe_heldout: np.ndarray | None
    fact_frequency: np.ndarray | None = None   # (F,) int64, where the cell recorded one (meta: fact_frequency_unit)


@dataclass(frozen=True)
class _Probes:
    fact_ids: tuple[str, ...]
    fact_group: np.ndarray        # (F,) int8
    probe_fact_index: np.ndarray  # (P,) int64
    probe_heldout: np.ndarray     # (P,) bool
    fact_frequency: np.ndarray | None = None   # (F,) int64 corpus documents or exposures per fact (-1: none)


@dataclass(frozen=True)
class _State:
    """Everything a store file holds; the file is a pure function of it."""

    meta: dict
    complete: bool
    probes: _Probes
    metric_names: tuple[str, ...]
    has_exact: bool
    step: np.ndarray              # (S,) int64
    tokens: np.ndarray            # (S,) int64
    train_loss: np.ndarray        # (S,) float64
    metrics: np.ndarray           # (S, M) float64
    correct: np.ndarray           # (S, P) uint8
    exact: np.ndarray | None      # (S, P) uint8


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The kislurm source tree's commit, or None when unknown (not a checkout, no git): never an error."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def _numpy_to_json(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()  # numpy scalars and arrays (data statistics often hold them) become plain JSON
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _check_json(values: dict, what: str) -> dict:
    try:
        return json.loads(json.dumps(values, allow_nan=True, default=_numpy_to_json))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-able ({_one_line(exc)}); fix: pass plain numbers, strings, "
                         "lists and dicts") from None


def _probes(fact_ids, fact_group, probe_fact_index, probe_heldout, fact_frequency=None) -> _Probes:
    ids = tuple(str(x) for x in fact_ids)
    group = np.asarray(fact_group).astype(np.int8).reshape(-1)
    index = np.asarray(probe_fact_index).astype(np.int64).reshape(-1)
    heldout = np.asarray(probe_heldout).astype(bool).reshape(-1)
    if len(group) != len(ids) or len(heldout) != len(index):
        raise ValueError(f"probe metadata shapes disagree: {len(ids)} fact_ids, {len(group)} fact_group, "
                         f"{len(index)} probe_fact_index, {len(heldout)} probe_heldout; "
                         "fix: pass the ProbeSet's arrays")
    if len(index) and (index.min() < 0 or index.max() >= len(ids)):
        raise ValueError("probe_fact_index points outside fact_ids; fix: pass the ProbeSet's fact_index")
    freq = None if fact_frequency is None else np.asarray(fact_frequency).astype(np.int64).reshape(-1)
    if freq is not None and len(freq) != len(ids):
        raise ValueError(f"fact_frequency has {len(freq)} values for {len(ids)} facts; fix: one value per fact")
    return _Probes(ids, group, index, heldout, freq)


def _same_probes(a: _Probes, b: _Probes) -> bool:
    return (a.fact_ids == b.fact_ids and np.array_equal(a.fact_group, b.fact_group)
            and np.array_equal(a.probe_fact_index, b.probe_fact_index)
            and np.array_equal(a.probe_heldout, b.probe_heldout))


def _as_bits(values, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{what} has shape {arr.shape}, the store has {n} probes; fix: pass one value per probe")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{what} holds values other than 0/1; fix: pass a bool array")
    return arr.astype(np.uint8)


def _record_json(state: _State) -> dict:
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "complete": state.complete,
            "status": "complete" if state.complete else "running", "n_steps": int(len(state.step)),
            "metric_names": list(state.metric_names), "probe_exact": state.has_exact,
            "n_probes": int(len(state.probes.probe_fact_index)), "n_facts": len(state.probes.fact_ids),
            "fact_frequency": state.probes.fact_frequency is not None,
            "step": state.step.tolist(), "tokens": state.tokens.tolist(), "train_loss": state.train_loss.tolist(),
            "meta": state.meta}


DIGEST_META_LEFT_OUT = ("throughput", "writers")
"""Meta the digest leaves to the record: bookkeeping lists that grow with every evaluation or resume (several KB
of JSON to parse per store after a long run) and that aggregation never reads."""


def _digest_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in DIGEST_META_LEFT_OUT}


def _digest_payload(state: _State) -> tuple[bytes, int]:
    """The digest of a state (kislurm.retention.digest): what aggregation reads, one plain read instead of an HDF5 open."""
    p, n = state.probes, len(state.step)
    header = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "complete": state.complete, "n_steps": n,
              "n_probes": int(len(p.probe_fact_index)), "metric_names": list(state.metric_names),
              "meta": _digest_meta(state.meta)}
    metrics = state.metrics.reshape(n, len(state.metric_names))
    last = state.correct[-1].astype(bool) if n else np.zeros(0, bool)
    return digest.encode(header, [
        ("step", state.step.astype("<i8")), ("series", metrics.astype("<f4")),
        ("final", metrics[-1].astype("<f8") if n else np.zeros(0, "<f8")), ("last_correct", np.packbits(last)),
        ("probe_fact_index", narrow_index(p.probe_fact_index)), ("probe_heldout", np.packbits(p.probe_heldout)),
        ("fact_group", p.fact_group.astype(np.int8)),
        *([] if p.fact_frequency is None else [("fact_frequency", p.fact_frequency.astype("<i8"))])])


def read_digest(path: str | Path) -> StoreDigest:
    """What aggregation needs of one store, from the digest in its user block (kislurm.retention.digest). Files without one
    (written before digests existed) are read the long way (read_cell with the last probe row), with the same
    result. Raises StoreError as read_cell does. (A str path is kept as is: pathlib costs more than the read.)"""
    found = _retrying(_read_userblock, path)
    if found is None:
        return _digest_from_cell(read_cell(path, matrix="last", fact_ids=False))
    header, a = found
    try:
        names, n, n_probes = tuple(header["metric_names"]), int(header["n_steps"]), int(header["n_probes"])
        bits = lambda b: np.unpackbits(b, count=n_probes).view(bool)  # noqa: E731
        return StoreDigest(
            meta=header["meta"], complete=bool(header["complete"]), step=a["step"].astype(np.int64),
            metric_names=names, series=a["series"], final=dict(zip(names, a["final"].tolist())),
            last_correct=bits(a["last_correct"]) if n else None, probe_fact_index=a["probe_fact_index"],
            probe_heldout=bits(a["probe_heldout"]), fact_group=a["fact_group"],
            fact_frequency=a.get("fact_frequency"))
    except (KeyError, ValueError, TypeError) as exc:
        raise _damaged(path, exc) from None


def _read_userblock(path: str | Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The digest's header and arrays; None when the file has none, or one of another store schema (the HDF5
    reader then reports what is wrong with it)."""
    try:
        found = digest.read(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file; fix: check the path, or run the cell first") from None
    except OSError as exc:
        raise _Unreadable(f"{path}: unreadable ({_one_line(exc)}); fix: check the file system, then rerun") from None
    except (digest.DigestError, ValueError, TypeError, KeyError) as exc:
        raise _damaged(path, exc) from None
    if found is None or found[0].get("schema") != SCHEMA_NAME or found[0].get("schema_version") != SCHEMA_VERSION:
        return None
    return found


def _damaged(path: Path, exc: BaseException) -> _Unreadable:
    return _Unreadable(f"{path}: damaged retention store ({_one_line(exc)}); fix: delete it and rerun the cell (it "
                       "resumes from its last checkpoint)")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[h5f.FileID]:
    """The store opened read-only; any failure inside it but a StoreError becomes one 'damaged' line."""
    fid = _open_fid(path)
    try:
        yield fid
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure inside the file means it is damaged
        raise _damaged(path, exc) from None
    finally:
        fid.close()


def _digest_from_cell(rec: CellRecord) -> StoreDigest:
    names = tuple(rec.metrics)
    series = np.stack([rec.metrics[k] for k in names], 1) if names else np.zeros((len(rec.step), 0))
    return StoreDigest(_digest_meta(rec.meta), rec.complete, rec.step, names, series.astype(np.float32),
                       {k: float(v[-1]) for k, v in rec.metrics.items() if len(v)},
                       rec.probe_correct[-1].astype(bool) if rec.probe_correct is not None and len(rec.step)
                       else None, None if rec.probe_fact_index is None else narrow_index(rec.probe_fact_index),
                       rec.probe_heldout, rec.fact_group, rec.fact_frequency)


def _layout(f: h5py.File, state: _State) -> None:
    """Write the whole file; small series first so that the fast reader's bytes sit together."""
    for key, value in state.meta.items():  # for h5dump/xarray users; read_cell reads only the record below
        if value is not None:
            plain = isinstance(value, (str, float, bool)) or (isinstance(value, int) and -2**63 <= value < 2**63)
            f.attrs[key] = value if plain else json.dumps(value)
    f.attrs["status"] = "complete" if state.complete else "running"
    f.attrs["complete"] = np.uint8(state.complete)
    blob = json.dumps(_record_json(state), separators=(",", ":")).encode()
    f.attrs.create(RECORD_ATTR, np.array(blob, dtype=f"S{max(len(blob), 1)}"))
    p, n_probes = state.probes, len(state.probes.probe_fact_index)
    n_metrics = len(state.metric_names)

    def series(name: str, data: np.ndarray, chunk_rows: int = 256, **kw) -> h5py.Dataset:
        chunks = (chunk_rows,) + tuple(max(d, 1) for d in data.shape[1:])
        maxshape = (None,) + tuple(d or None for d in data.shape[1:])  # only the step axis grows
        return f.create_dataset(name, data=data, maxshape=maxshape, chunks=chunks, **kw)

    step = series("step", state.step)
    step.make_scale("step")
    tokens, loss = series("tokens", state.tokens), series("train_loss", state.train_loss)
    metrics = series("metrics", state.metrics.reshape(len(state.step), n_metrics), 64)
    names = np.array(state.metric_names, dtype=h5py.string_dtype())
    metrics.attrs["names"] = names
    metric = f.create_dataset("metric", data=names, dtype=h5py.string_dtype())
    metric.make_scale("metric")
    ids = [s.encode() for s in p.fact_ids]  # fixed-length UTF-8: read back vectorised, unlike variable-length
    width = max((len(s) for s in ids), default=0) or 1
    fact = f.create_dataset("fact", data=np.array(ids, dtype=h5py.string_dtype("utf-8", width)))
    fact.make_scale("fact")
    probe = f.create_dataset("probe", data=np.arange(n_probes, dtype=np.int64))
    probe.make_scale("probe")
    f.create_dataset("fact_group", data=p.fact_group).dims[0].attach_scale(fact)
    if p.fact_frequency is not None:
        f.create_dataset("fact_frequency", data=p.fact_frequency).dims[0].attach_scale(fact)
    f.create_dataset("probe_fact_index", data=p.probe_fact_index).dims[0].attach_scale(probe)
    f.create_dataset("probe_heldout", data=p.probe_heldout.astype(np.uint8)).dims[0].attach_scale(probe)
    rows = min(64, max(1, 8192 // max(n_probes, 1)))  # ~8 KB chunks: reading the last row inflates little
    matrices = [("probe_correct", state.correct)] + ([("probe_exact", state.exact)] if state.has_exact else [])
    for name, data in matrices:
        ds = series(name, data.reshape(len(state.step), n_probes), rows, compression="gzip", compression_opts=1)
        ds.attrs["meaning"] = f"bool as uint8: 1 = {MEANING[name]} at this step"
        ds.dims[1].attach_scale(probe)
    for ds in (tokens, loss, metrics, *(f[name] for name, _ in matrices)):
        ds.dims[0].attach_scale(step)
    metrics.dims[1].attach_scale(metric)


def _publish(path: Path, state: _State) -> tuple[int, int, int] | None:
    """Write the whole file under a temporary name, fsync, and rename it over `path`: complete or absent."""
    with publishing(path) as tmp:
        payload, header_len = _digest_payload(state)
        block = digest.userblock_size(payload)
        with h5py.File(tmp, "w", libver=LIBVER, locking=False, driver="core", backing_store=True,
                       **({"userblock_size": block} if block else {})) as f:
            _layout(f, state)  # the core driver assembles the file in memory and writes it out once at close
        if block:
            with open(tmp, "r+b") as fh:
                digest.write(fh, payload, header_len)
    return _stamp(path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of the file version at `path` (None if absent): a new version is a new inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class RetentionWriter:
    """Appends a cell's evaluations to its store; every call publishes a complete new file version."""

    def __init__(self, path: Path, state: _State, stamp: tuple[int, int, int]):
        self.path, self._state, self._stamp, self._closed = path, state, stamp, False

    @classmethod
    def open(cls, path: Path, meta: dict, fact_ids: list[str], fact_group, probe_fact_index,
             probe_heldout, fact_frequency=None) -> "RetentionWriter":
        """Create the store, or resume an existing one after checking it belongs to the same cell and probe set."""
        path = Path(path)
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"{path}: meta lacks {missing}; fix: pass at least {list(REQUIRED_META)}")
        meta = _check_json({k: v for k, v in meta.items() if k not in STORE_META}, f"{path}: meta")
        probes = _probes(fact_ids, fact_group, probe_fact_index, probe_heldout, fact_frequency)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a writer killed mid-publish; never visible to readers
        session = {"opened": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                   "kislurm_version": __version__, "git_commit": git_commit()}
        if path.exists():
            state = _resume_state(path, meta, probes)
            session["resumed_after_step"] = int(state.step[-1]) if len(state.step) else None
            writers = (state.meta.get("writers") or [])[-(MAX_WRITERS - 1):] + [session]
            state = _replace(state, meta={**state.meta, **meta, "writers": writers})
        else:
            own = {"schema_version": SCHEMA_VERSION, "kislurm_version": __version__, "git_commit": git_commit(),
                   "created": session["opened"], "writers": [session]}
            n = len(probes.probe_fact_index)
            state = _State(meta={**meta, **own}, complete=False, probes=probes, metric_names=(), has_exact=False,
                           step=np.zeros(0, np.int64), tokens=np.zeros(0, np.int64),
                           train_loss=np.zeros(0, np.float64), metrics=np.zeros((0, 0), np.float64),
                           correct=np.zeros((0, n), np.uint8), exact=None)
        return cls(path, state, _publish(path, state))

    def append(self, step: int, tokens: int, train_loss: float, metrics: dict[str, float],
               probe_correct: np.ndarray, probe_exact: np.ndarray | None, meta: dict[str, Any] | None = None) -> None:
        """Record one evaluation (and merge `meta`, as update_meta does, in the same write); on return it is
        durable, and a crash before return leaves it absent."""
        s = self._with_record(self._usable(), step, tokens, train_loss, metrics, probe_correct, probe_exact)
        self._commit(_replace(s, meta=self._merged_meta(s, meta)) if meta else s)

    def extend(self, records: list[tuple]) -> None:
        """Record many evaluations in one publish (imports, benchmarks): all of them durable, or none.

        Each record is the argument tuple of `append` (step, tokens, train_loss, metrics, correct, exact)."""
        s = self._usable()
        for record in records:
            s = self._with_record(s, *record)
        self._commit(s)

    def _with_record(self, s: _State, step: int, tokens: int, train_loss: float, metrics: dict[str, float],
                     probe_correct: np.ndarray, probe_exact: np.ndarray | None) -> _State:
        """The state with one more evaluation, after checking it fits the stored ones."""
        if s.complete:
            raise StoreError(f"{self.path}: the cell is marked complete; fix: truncate_after(step) to reopen it, "
                             "or delete the file to rerun the cell")
        if len(s.step) and int(step) <= int(s.step[-1]):
            raise ValueError(f"{self.path}: step {step} is not after the last stored step {int(s.step[-1])}; "
                             "fix: call truncate_after(step) when resuming from an earlier checkpoint")
        names = s.metric_names if len(s.step) else tuple(metrics)
        if set(metrics) != set(names) or len(metrics) != len(names):
            raise ValueError(f"{self.path}: metrics {sorted(metrics)} differ from the stored {sorted(names)}; "
                             "fix: report the same metrics at every evaluation")
        n = len(s.probes.probe_fact_index)
        correct = _as_bits(probe_correct, n, "probe_correct")
        has_exact = s.has_exact if len(s.step) else probe_exact is not None
        if (probe_exact is not None) != has_exact:
            raise ValueError(f"{self.path}: probe_exact is {'missing' if has_exact else 'given'} but the stored "
                             "evaluations differ; fix: keep exact match on or off for the whole cell")
        exact = _as_bits(probe_exact, n, "probe_exact")[None] if has_exact else None
        row = np.array([[float(metrics[k]) for k in names]], np.float64)
        new = _replace(s, metric_names=names, has_exact=has_exact,
                       step=np.append(s.step, np.int64(step)), tokens=np.append(s.tokens, np.int64(tokens)),
                       train_loss=np.append(s.train_loss, np.float64(train_loss)),
                       metrics=np.concatenate([s.metrics.reshape(len(s.step), len(names)), row]),
                       correct=np.concatenate([s.correct, correct[None]]),
                       exact=np.concatenate([s.exact, exact]) if s.exact is not None and len(s.step) else exact)
        return new

    def meta(self) -> dict[str, Any]:
        """The store's metadata as last written (on resume: what the interrupted run had written)."""
        return dict(self._state.meta)

    def steps(self) -> list[int]:
        return [int(x) for x in self._usable().step]

    def truncate_after(self, step: int) -> None:
        """Drop evaluations after `step` (resuming from an earlier checkpoint); dropping any reopens the cell."""
        s = self._usable()
        keep = s.step <= int(step)
        if keep.all():
            return
        k = int(keep.sum())
        self._commit(_replace(s, complete=False, step=s.step[:k], tokens=s.tokens[:k], train_loss=s.train_loss[:k],
                              metrics=s.metrics[:k], correct=s.correct[:k],
                              exact=s.exact[:k] if s.exact is not None else None))

    def update_meta(self, **values: Any) -> None:
        """Merge JSON-able values into meta (data statistics, throughput, ...); the store's own keys are refused."""
        s = self._usable()
        self._commit(_replace(s, meta=self._merged_meta(s, values)))

    def _merged_meta(self, s: _State, values: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(values) & {*STORE_META, "cell_id"})
        if owned:
            raise ValueError(f"{self.path}: update_meta may not change {owned}; fix: use other key names")
        return {**s.meta, **_check_json(values, f"{self.path}: update_meta values")}

    def mark_complete(self) -> None:
        s = self._usable()
        if not s.complete:
            self._commit(_replace(s, complete=True))

    def close(self) -> None:
        self._closed = True  # every call already published its file; nothing is buffered

    def __enter__(self) -> "RetentionWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _usable(self) -> _State:
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed; fix: RetentionWriter.open it again")
        return self._state

    def _commit(self, new: _State) -> None:
        """Publish `new`, refusing when another process replaced the file since this writer's last version."""
        if _stamp(self.path) != self._stamp:
            raise StoreError(f"{self.path}: changed or removed by another process since this writer last wrote it; "
                             "fix: run a single job per cell (look for a duplicate or requeued job), then reopen")
        self._stamp = _publish(self.path, new)
        self._state = new


def _replace(state: _State, **changes: Any) -> _State:
    return _State(**{**state.__dict__, **changes})


def _resume_state(path: Path, meta: dict, probes: _Probes) -> _State:
    rec = read_cell(path, matrix=True)
    if rec.meta.get("cell_id") != meta["cell_id"]:
        raise StoreError(f"{path}: holds cell {rec.meta.get('cell_id')!r}, not {meta['cell_id']!r}; fix: give each "
                         "cell its own folder, or delete the stale file")
    stored = _Probes(tuple(rec.fact_ids), rec.fact_group, rec.probe_fact_index, rec.probe_heldout,
                     probes.fact_frequency)     # the frequencies of this session (a fact table, not a result)
    if not _same_probes(stored, probes):
        raise StoreError(f"{path}: was written with a different probe set; fix: rerun the cell from scratch "
                         "(delete the file and its checkpoints) or restore the original prepared data")
    names = tuple(rec.metrics)
    return _State(meta=rec.meta, complete=rec.complete, probes=stored, metric_names=names,
                  has_exact=rec.probe_exact is not None, step=rec.step, tokens=rec.tokens,
                  train_loss=rec.train_loss,
                  metrics=np.stack([rec.metrics[k] for k in names], 1) if names else np.zeros((len(rec.step), 0)),
                  correct=rec.probe_correct.astype(np.uint8),
                  exact=None if rec.probe_exact is None else rec.probe_exact.astype(np.uint8))


@functools.lru_cache(maxsize=1)
def _fapl() -> h5p.PropFAID:
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5f.CLOSE_STRONG)
    fapl.set_file_locking(False, True)  # files are never modified in place: no lock needed, and none can fail
    return fapl


def _read_array(fid: h5f.FileID, name: bytes, dtype: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Low-level read (h5py's high-level lookups cost ~0.1 ms each, a tenth of the fast path's budget). The buffer
    always takes the dataset's own shape (h5py's low-level read does not check it); `shape` is then verified."""
    ds = h5d.open(fid, name)
    out = np.empty(ds.shape, dtype)
    if shape is not None and out.shape != shape:
        raise ValueError(f"dataset {name.decode()} has shape {out.shape}, the record says {shape}")
    if out.size:
        ds.read(h5s.ALL, h5s.ALL, out)
    return out


def _read_record(fid: h5f.FileID, path: Path) -> dict:
    try:
        attr = h5a.open(fid, RECORD_ATTR.encode())
    except KeyError:
        raise StoreError(f"{path}: HDF5 file is not a kislurm retention store (no {RECORD_ATTR!r} attribute); "
                         "fix: pass a cells/<name>/retention.h5 written by kislurm.retention.store") from None
    buf = np.empty((), f"S{attr.get_storage_size()}")
    attr.read(buf)
    record = json.loads(buf.item())
    if not isinstance(record, dict) or record.get("schema") != SCHEMA_NAME:
        raise StoreError(f"{path}: {RECORD_ATTR!r} does not describe a {SCHEMA_NAME} store; fix: pass a "
                         "cells/<name>/retention.h5 written by kislurm.retention.store")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        writer = record.get("meta", {}).get("kislurm_version", "<its writer>")
        fix = ("upgrade kislurm" if isinstance(version, int) and version > SCHEMA_VERSION else
               f"read it with kislurm {writer} or rerun the cell")
        raise StoreError(f"{path}: store schema version {version!r}, this kislurm reads {SCHEMA_VERSION}; fix: {fix}")
    return record


def _read_matrix(fid: h5f.FileID, name: bytes, n_steps: int, n_probes: int, last: bool) -> np.ndarray:
    """All rows, or only the last (one small chunk to inflate), as bool."""
    ds = h5d.open(fid, name)
    space = ds.get_space()
    if space.shape != (n_steps, n_probes):
        raise ValueError(f"{name.decode()} has shape {space.shape}, the record says {(n_steps, n_probes)}")
    start = max(n_steps - 1, 0) if last else 0
    out = np.empty((n_steps - start, n_probes), np.uint8)
    if out.size:
        space.select_hyperslab((start, 0), out.shape)
        ds.read(h5s.create_simple(out.shape), space, out)
    return out.astype(bool)


def _read_fact_ids(fid: h5f.FileID) -> list[str]:
    raw = _read_array(fid, b"fact", h5d.open(fid, b"fact").dtype)
    try:
        return raw.astype(str).tolist()  # vectorised, for ASCII ids
    except UnicodeDecodeError:
        return [x.decode() for x in raw]


def _open_fid(path: Path) -> h5f.FileID:
    try:
        return h5f.open(os.fsencode(path), h5f.ACC_RDONLY, _fapl())
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file; fix: check the path, or run the cell first") from None
    except OSError as exc:
        raise _Unreadable(f"{path}: not a readable HDF5 file ({_one_line(exc)}); fix: it is truncated or "
                          "damaged, delete it and rerun the cell") from None


def _read(path: Path, matrix: bool | str, fact_ids: bool = True) -> CellRecord:
    with _reading(path) as fid:
        record = _read_record(fid, path)
        n, names = record["n_steps"], record["metric_names"]
        step, tokens = np.array(record["step"], np.int64), np.array(record["tokens"], np.int64)
        loss = np.array(record["train_loss"], np.float64)
        if not len(step) == len(tokens) == len(loss) == n:
            raise ValueError(f"the record's series lengths {len(step)}, {len(tokens)}, {len(loss)} are not {n}")
        values = _read_array(fid, b"metrics", np.float64, (n, len(names)))
        probe = dict.fromkeys(("correct", "exact", "ids", "group", "index", "heldout", "frequency"))
        if matrix:
            last, n_probes = matrix == "last", record["n_probes"]
            probe["correct"] = _read_matrix(fid, b"probe_correct", n, n_probes, last)
            if record["probe_exact"]:
                probe["exact"] = _read_matrix(fid, b"probe_exact", n, n_probes, last)
            probe.update(ids=_read_fact_ids(fid) if fact_ids else None,
                         group=_read_array(fid, b"fact_group", np.int8),
                         index=_read_array(fid, b"probe_fact_index", np.int64),
                         heldout=_read_array(fid, b"probe_heldout", np.uint8).astype(bool),
                         frequency=_read_array(fid, b"fact_frequency", np.int64)
                         if record.get("fact_frequency") else None)
        return CellRecord(path=path, meta=record["meta"], complete=bool(record["complete"]), step=step,
                          tokens=tokens, train_loss=loss, metrics={k: values[:, j] for j, k in enumerate(names)},
                          probe_correct=probe["correct"], probe_exact=probe["exact"], fact_ids=probe["ids"],
                          fact_group=probe["group"], probe_fact_index=probe["index"], probe_heldout=probe["heldout"],
                          fact_frequency=probe["frequency"])


def read_cell(path: Path, matrix: bool | str = True, fact_ids: bool = True) -> CellRecord:
    """Read one store. matrix=False skips the probe matrices and metadata (about 1 ms per file, cold);
    matrix="last" reads only the last evaluation's row of each matrix, (1, P); fact_ids=False leaves the fact id
    strings unread (None: aggregation needs only their indices). Raises StoreError for missing/truncated/foreign
    files."""
    if matrix not in (True, False, "last"):
        raise ValueError(f"matrix={matrix!r}; fix: pass True, False or 'last'")
    return _retrying(_read, Path(path), matrix, fact_ids)


def _retrying(read: Any, path: Path, *args: Any) -> Any:
    """read(path, *args), again when the bytes were unreadable: a file replaced by its writer under a reader
    (NFS ESTALE) reads fine the next time; one damaged for good fails READ_RETRIES times."""
    for attempt in range(READ_RETRIES):
        try:
            return read(path, *args)
        except _Unreadable:
            if attempt + 1 == READ_RETRIES:
                raise
    raise AssertionError("unreachable")


def fact_correct(record: CellRecord, row: int = -1, group: int | None = None) -> np.ndarray:
    """(F,) share of each fact's probes answered correctly at one evaluation row (NaN for facts without probes);
    restricted to facts of `group` (0 general, 1 infused) when given. For bootstrapping over facts."""
    if record.probe_correct is None:
        raise ValueError(f"{record.path}: read without the probe matrix; fix: read_cell(path, matrix=True or 'last')")
    n_facts = len(record.fact_group)  # fact_ids may be unread (fact_ids=False)
    hits = np.bincount(record.probe_fact_index, weights=record.probe_correct[row], minlength=n_facts)
    count = np.bincount(record.probe_fact_index, minlength=n_facts)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(count > 0, hits / np.maximum(count, 1), math.nan)
    return score if group is None else score[record.fact_group == group]
