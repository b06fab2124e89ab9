"""The store's digest: what aggregation reads of a retention store, kept in the HDF5 file's user block.

Why the user block: aggregating thousands of stores is bounded by opening them. libhdf5 spends ~0.3 ms of CPU
opening and closing a file before anything is read; a plain read of the file's first 16 KB costs ~0.03 ms, and
decoding the digest ~0.15 ms more (tools/bench_store.py compares them). HDF5
reserves the user block (a power-of-two prefix of the file, >= 512 bytes) for the application and ignores it, so
the file stays an ordinary HDF5 file for h5py, h5dump, xarray and kislurm's own readers, and its datasets stay the
reference copy. The writer publishes the whole file atomically (kislurm.retention.store), so the digest and the datasets
always describe the same version.

Layout (DIGEST_VERSION 1), little-endian:
  PREFIX  magic (16 bytes), digest version (u32), header length (u32), payload length (u64), file size (u64),
          CRC-32 of the payload (u32), 4 bytes padding
  payload header JSON {schema, schema_version, complete, n_steps, n_probes, metric_names, meta, arrays: [[name,
          dtype, shape], ...]}, then each array's bytes in that order, each starting on an 8-byte boundary:
          step (S,) int64, series (S, M) float32, final (M,) float64, last_correct (P bits), probe_fact_index (P,)
          narrowest unsigned int, probe_heldout (P bits), fact_group (F,) int8, and optionally fact_frequency (F,)
          int64 (readers look arrays up by name, so an older reader ignores it).
The file size and the checksum catch a truncated copy or an in-place edit: such a file is reported, not trusted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kislurm.errors import DigestError  # noqa: F401 (re-exported)

MAGIC = b"\x89KISLURM-DIGEST\n"
DIGEST_VERSION = 1
PREFIX = struct.Struct("<16sIIQQI4x")
FIRST_READ = 16384          # covers the digest of 100 evaluations x 20 metrics x 1,000 probes in one read
MAX_USERBLOCK = 1 << 26     # a digest beyond 64 MiB (a million evaluations) is not written: readers use the datasets


@dataclass(frozen=True)
class StoreDigest:
    """The aggregation view of a store: small, and read with one plain file read."""

    meta: dict                            # the store's meta but its bookkeeping lists (store.DIGEST_META_LEFT_OUT)
    complete: bool
    step: np.ndarray                      # (S,) int64
    metric_names: tuple[str, ...]
    series: np.ndarray                    # (S, M) float32
    final: dict[str, float]               # each metric at the last evaluation (float64)
    last_correct: np.ndarray | None       # (P,) bool, the last evaluation
    probe_fact_index: np.ndarray | None   # (P,) narrow_index form
    probe_heldout: np.ndarray | None      # (P,) bool
    fact_group: np.ndarray | None         # (F,) int8
    fact_frequency: np.ndarray | None = None   # (F,) int64, where the store has one


def narrow_index(index: np.ndarray) -> np.ndarray:
    """Non-negative indices in the narrowest unsigned little-endian type that holds them (the digest's form:
    digests of thousands of cells travel between processes and into the aggregation cache)."""
    index = np.asarray(index)
    top = int(index.max()) if index.size else 0
    return index.astype(np.dtype(np.min_scalar_type(top)).newbyteorder("<"))


def encode(header: dict, arrays: list[tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    """(payload, header length): the header JSON (the arrays' names, dtypes and shapes added), padded to 8 bytes,
    then the arrays, each padded to 8 bytes (so every array starts aligned)."""
    header = {**header, "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays]}
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [head + b" " * (-len(head) % 8)]
    for _, a in arrays:
        raw = np.ascontiguousarray(a).tobytes()
        parts.append(raw + b"\0" * (-len(raw) % 8))
    return b"".join(parts), len(parts[0])


def userblock_size(payload: bytes) -> int:
    """The user block to reserve for a payload (a power of two >= 512, as HDF5 requires), or 0 for none."""
    need = PREFIX.size + len(payload)
    return 0 if need > MAX_USERBLOCK else max(512, 1 << (need - 1).bit_length())


def write(fh, payload: bytes, header_len: int) -> None:
    """Fill the user block of an HDF5 file already written and closed (`fh` open r+b): the file size is final."""
    size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    fh.write(PREFIX.pack(MAGIC, DIGEST_VERSION, header_len, len(payload), size, zlib.crc32(payload)) + payload)


def read(path: str | Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(header, arrays) of the file's digest; None if it has none (written before digests, or by a newer format).
    Raises OSError as open() does, DigestError when the digest does not match the file."""
    with open(path, "rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):  # no read-ahead: the digest is all that is read, not the whole file
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        data = fh.read(FIRST_READ)
        if len(data) < PREFIX.size or not data.startswith(MAGIC):
            return None
        _, version, header_len, payload_len, size, crc = PREFIX.unpack_from(data)
        if version != DIGEST_VERSION:
            return None
        if payload_len > MAX_USERBLOCK or header_len > payload_len:
            raise DigestError(f"the digest's prefix is damaged (payload {payload_len} bytes, header {header_len})")
        end = PREFIX.size + payload_len
        if len(data) < end:
            data += fh.read(end - len(data))
        actual = os.fstat(fh.fileno()).st_size
    if actual != size:
        raise DigestError(f"the file is {actual} bytes, its writer wrote {size}: truncated or modified")
    payload = memoryview(data)[PREFIX.size:end]
    if len(payload) != payload_len or zlib.crc32(payload) != crc:
        raise DigestError("the digest's checksum does not match: the file is damaged")
    header = json.loads(bytes(payload[:header_len]))
    arrays, offset = {}, header_len
    for name, dtype, shape in header.pop("arrays"):
        dt, count = _dtype(dtype), math.prod(shape)
        arrays[name] = np.frombuffer(payload, dt, count, offset).reshape(shape)
        n = dt.itemsize * count
        offset += n + (-n % 8)
    return header, arrays


@functools.lru_cache(maxsize=64)
def _dtype(text: str) -> np.dtype:
    return np.dtype(text)  # parsing a dtype string costs more than reading the array
