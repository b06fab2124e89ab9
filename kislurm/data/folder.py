"""The prepared-data folder: what a run's cells share (`PreparedData`) and how it is published, by one writer.

Shared data has one writer, preparation (kislurm.data.prepare.prepare_run, i.e. `kislurm prepare`), which writes into
a private temporary folder (named by host and pid) and publishes it with one atomic rename (`publish_folder`); a
published folder is complete and never rewritten. Correctness does not rest on flock (node-local on Lustre with
localflock): the lock (`locked`) only spares builders on one machine a duplicate build, and a temporary folder is
removed only by its writer, or when its writer ran on this machine and is gone. Cells read and never build shared
data: a stream they find missing (`publishing_stream`) is a one-line error naming `kislurm prepare`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from kislurm.data.encoding import Sentences
from kislurm.data.knowledge import KnowledgeBase, ProbeSet, Templates, load_templates
from kislurm.data.tokenizer import Tokenizer
from kislurm.errors import DataError
from kislurm.plan.config import DataConfig
from kislurm.publish import publish


@dataclass(frozen=True)
class PreparedData:
    """Everything shared by a run's cells (built once; loading it is cheap)."""

    root: Path
    tokenizer: Tokenizer
    probes: ProbeSet
    general: KnowledgeBase
    knowledge: KnowledgeBase
    data: DataConfig
    seq_length: int
    general_prefix: str        # megatron prefix of the general stream (ours, or the user's corpus)
    general_is_facts: bool     # the general stream is built from the general base (exposures countable)
    manifest: dict
    readonly: bool = False     # loaded by a cell (load_prepared): a missing stream is an error, never built

    def cell_cache(self, cell) -> Path:
        """Megatron's index cache of one cell: a folder of its own, so each cache has one writer (the cell's rank
        0) and no lock is needed across nodes."""
        return self.cache / f"cell-{cell.cell_id}"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def templates(self) -> Templates:
        """Every relation's templates, as preparation saved them."""
        return load_templates(self.root / "templates.json")

    def knowledge_sentences(self) -> Sentences:
        """The knowledge base's training sentences (tokenized once by preparation), loaded once per process for
        the latest folder asked: planning many cells reads them once."""
        key = str(self.root)
        if _SENTENCES.get("key") != key:
            _SENTENCES.update(key=key, value=Sentences.load(self.root / "knowledge_sentences.npz"))
        return _SENTENCES["value"]


_SENTENCES: dict = {}


@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Exclusive lock on data_dir/.lock: spares concurrent builders on one machine a duplicate build. Correctness
    never depends on it (flock may be node-local on Lustre, and varies on NFS): publishing is an atomic rename of a
    private temporary folder, and only this machine's temporary folders of dead processes are removed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            for stale in data_dir.glob("**/.tmp-*"):
                if _abandoned(stale.name):
                    shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


HOST = socket.gethostname().replace("-", "_")


def _abandoned(tmp_name: str) -> bool:
    """A temporary folder (.tmp-NAME-HOST-PID-RANDOM) whose writer ran on this machine and is gone. Folders of
    other machines, or not named so, are never touched: their writer may still be running."""
    parts = tmp_name.rsplit("-", 3)
    if len(parts) != 4 or parts[1] != HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def publish_folder(final: Path, data_dir: Path) -> Iterator[Path]:
    """A private temporary folder renamed to `final` on success (one atomic rename; if another writer published
    `final` first, that copy is kept and ours discarded) and removed on error: only our own is ever removed.

    Each publication appends a line to data_dir/builds.log: the record that shows a build was reused, not redone.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            publish(tmp, final, replace=False)
        except OSError:
            if not final.is_dir():
                raise
            return            # published by another writer meanwhile: identical content (same inputs, seeded)
        with open(data_dir / "builds.log", "a") as log:
            log.write(f"{final.relative_to(data_dir)} pid={os.getpid()}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def publishing_stream(prepared: PreparedData, out: Path, cell, what: str) -> Iterator[Optional[Path]]:
    """A private folder to build the stream folder `out` in, published on exit, when preparation finds it missing;
    None when it is published (the caller then builds nothing). A cell (prepared.readonly) finding it missing fails
    in one line naming `kislurm prepare`."""
    if not out.is_dir() and prepared.readonly:
        raise DataError(f"{out}: cell {cell.name}'s {what} stream is not prepared; fix: run `kislurm prepare "
                        "CONFIG` (the same config and --set options) before the cells")
    if out.is_dir():
        yield None
        return
    with locked(prepared.root.parent):
        if out.is_dir():
            yield None
            return
        with publish_folder(out, prepared.root.parent) as tmp:
            yield tmp


def stream_info(out: Path) -> dict:
    """The info.json of a published stream folder."""
    return json.loads((out / "info.json").read_text())
