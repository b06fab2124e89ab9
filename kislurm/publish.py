"""Publishing a file or folder atomically: written under a temporary name next to it, fsync'ed, renamed over it.

Readers (other ranks, other nodes over NFS, the aggregator) see the old version or the new one, never a part; the
parent folder is fsync'ed after the rename so that the new name survives a node crash. Every writer in kislurm goes
through `publish` (the temporary name is the caller's: some callers parse theirs to clean up after a crash), or,
for an append-only log, through `append_lines`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator


def fsync_path(path: Path, strict: bool = True) -> None:
    """fsync a file (errors raise: NFS reports ENOSPC/EIO here) or a folder (not strict: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if strict:
            raise


def publish(tmp: Path, final: Path, replace: bool = True) -> None:
    """fsync `tmp` (a file, a folder or a symlink), rename it to `final`, fsync the parent folder.

    replace=False: os.rename, which refuses to replace a non-empty folder (the caller decides who won a race).
    """
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_symlink():
        fsync_path(tmp, strict=not tmp.is_dir())
    (os.replace if replace else os.rename)(tmp, final)
    fsync_path(final.parent, strict=False)  # durability of the rename across a node crash; atomicity holds anyway


def temp_name(final: Path) -> Path:
    """A private temporary name next to `final` (hidden; unique per process and call)."""
    return final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextlib.contextmanager
def publishing(final: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a new empty temporary file next to `final` (mode 0666 less the umask, as run files are shared); on a
    normal exit publish it over `final`, on an error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else temp_name(final)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # honours the umask (mkstemp gives 0600)
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see the old or the new file."""
    with publishing(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines to a log in one write, then fsync: a crash mid-way loses at most the lines being written,
    never earlier ones (a reader skips a torn last line). Logs grow by appends, so they are never renamed over."""
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
