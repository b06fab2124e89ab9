"""Tests of kislurm.retention.store on real HDF5 files: round trip, resume, crash safety under SIGKILL, concurrent reading."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from kislurm.retention import digest, store
from kislurm.retention.store import (SCHEMA_VERSION, RetentionWriter, StoreError, fact_correct, git_commit,
                                     read_cell)

REPO = Path(__file__).resolve().parents[1]

# Shared by the tests and the writer subprocesses: every record is a pure function of its step, so a reader can
# tell a complete record from a partial or mixed one.
COMMON = r'''
import numpy as np
N_FACTS, N_PROBES = 40, 120
PROBES = dict(fact_ids=["générale:0:ville"] + [f"general:{i}:city" for i in range(1, N_FACTS)],
              fact_group=np.arange(N_FACTS) % 2, probe_fact_index=np.arange(N_PROBES) % N_FACTS,
              probe_heldout=np.arange(N_PROBES) % 3 == 0)
METRICS = ["general_acc", "infused_acc", "general_acc_cc", "infused_acc_cc"]

def make_meta(cell_id="abc123", **extra):
    cfg = {"cell_id": cell_id, "size": "cpu-tiny", "ratio": 0.1, "tokens": 10000, "seed": 0}
    return {"cell_id": cell_id, "name": f"cpu-tiny_r0.1_{cell_id}", "size": "cpu-tiny", "ratio": 0.1,
            "tokens": 10000, "seed": 0, "config": cfg, "params_total": 12345, "params_non_embedding": 6789,
            "n_choices": 4, "data_stats": {"knowledge_share": 0.1}, **extra}

def record_for(step, exact=True):
    rng = np.random.default_rng(step)
    return dict(step=step, tokens=step * 1024, train_loss=1.0 / step,
                metrics={m: step + j / 10 for j, m in enumerate(METRICS)},
                probe_correct=rng.random(N_PROBES) < 0.5,
                probe_exact=(rng.random(N_PROBES) < 0.3) if exact else None)
'''
exec(COMMON)  # defines N_FACTS, N_PROBES, PROBES, METRICS, make_meta, record_for

WRITER = COMMON + r'''
import sys
from kislurm.retention.store import RetentionWriter
w = RetentionWriter.open(sys.argv[1], make_meta(), **PROBES)
done = w.steps()
print("ready", done[-1] if done else 0, flush=True)
step, stop = (done[-1] if done else 0), int(sys.argv[2])
while step < stop:
    step += 1
    w.append(**record_for(step))
    print(step, flush=True)
'''


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _writer(path: Path, stop: int = 10**9) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(stop)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _open(path: Path, **meta) -> RetentionWriter:
    return RetentionWriter.open(path, make_meta(**meta), **PROBES)


def _assert_records(rec, steps) -> None:
    """The record holds exactly `steps`, each equal to record_for(step): nothing partial, nothing mixed."""
    assert rec.step.tolist() == list(steps)
    for i, s in enumerate(steps):
        want = record_for(s)
        assert rec.tokens[i] == want["tokens"] and rec.train_loss[i] == want["train_loss"]
        assert [rec.metrics[m][i] for m in METRICS] == [want["metrics"][m] for m in METRICS]
        if rec.probe_correct is not None:
            np.testing.assert_array_equal(rec.probe_correct[i], want["probe_correct"])
            np.testing.assert_array_equal(rec.probe_exact[i], want["probe_exact"])


# ------------------------------------------------------------------------------------------------------ writer API
def test_round_trip(tmp_path):
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        for s in (10, 20, 30):
            w.append(**record_for(s))
        assert w.steps() == [10, 20, 30]
    rec = read_cell(path)
    _assert_records(rec, [10, 20, 30])
    assert rec.probe_correct.dtype == bool and rec.probe_correct.shape == (3, N_PROBES)
    assert rec.fact_ids == PROBES["fact_ids"] and not rec.complete
    np.testing.assert_array_equal(rec.fact_group, PROBES["fact_group"])
    np.testing.assert_array_equal(rec.probe_fact_index, PROBES["probe_fact_index"])
    np.testing.assert_array_equal(rec.probe_heldout, PROBES["probe_heldout"])
    assert list(rec.metrics) == METRICS
    meta = rec.meta
    assert {k: meta[k] for k in make_meta()} == make_meta()
    assert meta["schema_version"] == SCHEMA_VERSION and meta["kislurm_version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*", meta["created"])
    assert meta["git_commit"] == git_commit()

    with h5py.File(path, "r") as f:  # the datasets and the record's copy of the series agree
        assert f["step"][()].tolist() == [10, 20, 30] and f["tokens"][()].tolist() == rec.tokens.tolist()
        np.testing.assert_array_equal(f["train_loss"][()], rec.train_loss)
        np.testing.assert_array_equal(f["metrics"][()], np.stack([rec.metrics[m] for m in METRICS], 1))

    fast = read_cell(path, matrix=False)
    _assert_records(fast, [10, 20, 30])
    assert fast.probe_correct is None and fast.fact_ids is None

    last = read_cell(path, matrix="last")
    assert last.probe_correct.shape == (1, N_PROBES)
    np.testing.assert_array_equal(last.probe_correct[0], record_for(30)["probe_correct"])


def test_git_commit_is_the_source_tree_head():
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        pytest.skip("git is not installed")
    assert git_commit() == (head.stdout.strip() if head.returncode == 0 else None)


def test_without_exact_match_and_nan_metrics(tmp_path):
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        rec = record_for(1, exact=False)
        rec["metrics"]["general_acc"] = float("nan")
        w.append(**rec)
        with pytest.raises(ValueError, match="probe_exact"):
            w.append(**record_for(2))
    got = read_cell(path)
    assert got.probe_exact is None and np.isnan(got.metrics["general_acc"][0])


def test_resume_keeps_appending_and_records_sessions(tmp_path):
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        w.append(**record_for(1))
        w.append(**record_for(2))
    created = read_cell(path).meta["created"]
    with _open(path, data_stats={"knowledge_share": 0.2}) as w:
        assert w.steps() == [1, 2]
        w.append(**record_for(3))
    rec = read_cell(path)
    _assert_records(rec, [1, 2, 3])
    assert rec.meta["created"] == created and rec.meta["data_stats"] == {"knowledge_share": 0.2}
    assert [s["resumed_after_step"] for s in rec.meta["writers"][1:]] == [2]


def test_open_refuses_another_cell_or_probe_set(tmp_path):
    path = tmp_path / "retention.h5"
    _open(path).close()
    with pytest.raises(StoreError, match=f"{re.escape(str(path))}: holds cell 'abc123', not 'other'.*fix:"):
        _open(path, cell_id="other")
    probes = {**PROBES, "probe_heldout": ~PROBES["probe_heldout"]}
    with pytest.raises(StoreError, match="different probe set"):
        RetentionWriter.open(path, make_meta(), **probes)
    with pytest.raises(ValueError, match="meta lacks"):
        RetentionWriter.open(tmp_path / "x.h5", {"cell_id": "x"}, **PROBES)
    with pytest.raises(ValueError, match="probe metadata shapes disagree"):
        RetentionWriter.open(tmp_path / "x.h5", make_meta(), **{**PROBES, "probe_heldout": [True]})
    with pytest.raises(ValueError, match="outside fact_ids"):
        RetentionWriter.open(tmp_path / "x.h5", make_meta(),
                             **{**PROBES, "probe_fact_index": PROBES["probe_fact_index"] + 1})


def test_append_checks_shapes_order_and_metrics(tmp_path):
    w = _open(tmp_path / "retention.h5")
    w.append(**record_for(5))
    with pytest.raises(ValueError, match="not after the last stored step 5"):
        w.append(**record_for(5))
    bad = record_for(6)
    with pytest.raises(ValueError, match=r"probe_correct has shape \(119,\)"):
        w.append(**{**bad, "probe_correct": bad["probe_correct"][:-1]})
    with pytest.raises(ValueError, match="differ from the stored"):
        w.append(**{**bad, "metrics": {"general_acc": 0.5}})
    with pytest.raises(ValueError, match="values other than 0/1"):
        w.append(**{**bad, "probe_correct": np.full(N_PROBES, 2)})
    assert w.steps() == [5] and read_cell(w.path).step.tolist() == [5]


def test_truncate_after_and_mark_complete(tmp_path):
    path = tmp_path / "retention.h5"
    w = _open(path)
    for s in (1, 2, 3, 4):
        w.append(**record_for(s))
    w.truncate_after(2)
    assert w.steps() == [1, 2]
    _assert_records(read_cell(path), [1, 2])
    w.append(**record_for(3))
    w.mark_complete()
    rec = read_cell(path)
    assert rec.complete and rec.step.tolist() == [1, 2, 3]
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete" and f.attrs["complete"] == 1
    with pytest.raises(StoreError, match="marked complete"):
        w.append(**record_for(4))
    w.truncate_after(0)  # reopens the cell: no records left
    assert not read_cell(path).complete and w.steps() == []
    w.close()
    with pytest.raises(StoreError, match="writer is closed"):
        w.steps()


def test_update_meta_round_trip(tmp_path):
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        w.update_meta(throughput={"tokens_per_s": 1234.5}, data_stats={"exposures": np.arange(1, 4)},
                      infused=np.int64(7))
        with pytest.raises(ValueError, match="may not change"):
            w.update_meta(cell_id="other")
        with pytest.raises(ValueError, match="not JSON-able"):
            w.update_meta(bad=object())
    meta = read_cell(path, matrix=False).meta
    assert meta["throughput"] == {"tokens_per_s": 1234.5} and meta["data_stats"] == {"exposures": [1, 2, 3]}
    assert meta["infused"] == 7
    with h5py.File(path, "r") as f:  # every meta key is also a plain attribute, for h5dump/xarray users
        assert json.loads(f.attrs["config"]) == make_meta()["config"]
        assert f.attrs["params_total"] == 12345 and f.attrs["schema_version"] == SCHEMA_VERSION
        assert json.loads(f.attrs["throughput"]) == {"tokens_per_s": 1234.5}


def test_append_merges_meta_in_the_same_write(tmp_path):
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        w.append(**record_for(1), meta={"throughput": [{"step": 1, "tokens_per_s": 10.0}]})
        stamp = path.stat().st_mtime_ns
        with pytest.raises(ValueError, match="may not change"):
            w.append(**record_for(2), meta={"cell_id": "other"})
        assert path.stat().st_mtime_ns == stamp and w.steps() == [1]  # refused whole: no record without its meta
        w.append(**record_for(2), meta={"throughput": [{"step": 1, "tokens_per_s": 10.0},
                                                       {"step": 2, "tokens_per_s": 11.0}]})
        assert [e["step"] for e in w.meta()["throughput"]] == [1, 2]
    rec = read_cell(path, matrix=False)
    assert rec.step.tolist() == [1, 2] and rec.meta["throughput"][1]["tokens_per_s"] == 11.0


def test_dimension_scales(tmp_path):
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        w.append(**record_for(1))
        w.append(**record_for(2))
    with h5py.File(path, "r") as f:
        assert f["step"].is_scale and f["metric"].is_scale and f["probe"].is_scale and f["fact"].is_scale
        for name in ("tokens", "train_loss", "metrics", "probe_correct", "probe_exact"):
            assert f[name].dims[0][0].name == "/step", name
        assert f["metrics"].dims[1][0].name == "/metric"
        assert list(f["metrics"].attrs["names"]) == METRICS
        assert f["probe_correct"].dims[1][0].name == "/probe"
        assert f["fact_group"].dims[0][0].name == "/fact" and f["probe_heldout"].dims[0][0].name == "/probe"
        assert f["probe_correct"].compression == "gzip" and f["probe_correct"].maxshape == (None, N_PROBES)
        assert f["metrics"].maxshape[0] is None and f["step"].maxshape == (None,)


def test_a_reader_holding_the_file_keeps_its_snapshot(tmp_path):
    path = tmp_path / "retention.h5"
    w = _open(path)
    w.append(**record_for(1))
    with h5py.File(path, "r") as held:  # plain h5py, default file locking: nothing blocks the writer
        w.append(**record_for(2))
        w.mark_complete()
        assert held["step"][()].tolist() == [1] and held.attrs["status"] == "running"
        np.testing.assert_array_equal(held["probe_correct"][0], record_for(1)["probe_correct"])
    rec = read_cell(path)
    assert rec.complete and rec.step.tolist() == [1, 2]


def test_second_writer_is_detected(tmp_path):
    path = tmp_path / "retention.h5"
    a = _open(path)
    a.append(**record_for(1))
    b = _open(path)  # e.g. a requeued job while the old one still runs
    b.append(**record_for(2))
    with pytest.raises(StoreError, match="changed or removed by another process"):
        a.append(**record_for(2))
    _assert_records(read_cell(path), [1, 2])


def test_stale_temp_files_removed_and_permissions_follow_umask(tmp_path):
    path = tmp_path / "retention.h5"
    stale = tmp_path / ".retention.h5.999.deadbeef.tmp"
    stale.write_bytes(b"half a file")
    _open(path).close()
    assert not stale.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_fact_correct(tmp_path):
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        w.append(**record_for(1))
    rec = read_cell(path, matrix="last")
    want = np.array([rec.probe_correct[0][PROBES["probe_fact_index"] == i].mean() for i in range(N_FACTS)])
    np.testing.assert_allclose(fact_correct(rec), want)
    np.testing.assert_allclose(fact_correct(rec, group=1), want[1::2])
    with pytest.raises(ValueError, match="without the probe matrix"):
        fact_correct(read_cell(path, matrix=False))


# ------------------------------------------------------------------------------------------------ damaged files
def _assert_store_error(path: Path, pattern: str) -> None:
    with pytest.raises(StoreError) as info:
        read_cell(path, matrix=False)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and "; fix: " in msg, msg
    assert re.search(pattern, msg), msg


def test_damaged_and_foreign_files_raise_store_error(tmp_path):
    good = tmp_path / "good.h5"
    with _open(good) as w:
        w.append(**record_for(1))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_store_error(truncated, "not a readable HDF5 file .*truncated")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(20000))
    _assert_store_error(garbage, "not a readable HDF5 file")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    _assert_store_error(empty, "not a readable HDF5 file")
    _assert_store_error(tmp_path / "missing.h5", "no such file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    _assert_store_error(foreign, "not a kislurm retention store")
    newer = tmp_path / "newer.h5"
    newer.write_bytes(data)
    with h5py.File(newer, "a") as f:
        record = json.loads(f.attrs["kislurm_record"])
        f.attrs["kislurm_record"] = np.bytes_(json.dumps({**record, "schema_version": SCHEMA_VERSION + 1}))
    _assert_store_error(newer, "schema version 2, this kislurm reads 1; fix: upgrade kislurm")
    gutted = tmp_path / "gutted.h5"
    gutted.write_bytes(data)
    with h5py.File(gutted, "a") as f:
        del f["metrics"]
    _assert_store_error(gutted, "damaged retention store .*metrics")
    shrunk = tmp_path / "shrunk.h5"
    shrunk.write_bytes(data)
    with h5py.File(shrunk, "a") as f:
        f["metrics"].resize((0, len(METRICS)))
    _assert_store_error(shrunk, r"damaged retention store \(dataset metrics has shape \(0, 4\)")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data)
    with h5py.File(cut, "a") as f:
        f["probe_correct"].resize((0, N_PROBES))
    read_cell(cut, matrix=False)  # the fast path does not look at the matrices
    with pytest.raises(StoreError, match=r"damaged retention store \(probe_correct has shape \(0, 120\)"):
        read_cell(cut, matrix="last")
    with pytest.raises(StoreError, match="delete it and rerun"):
        RetentionWriter.open(truncated, make_meta(), **PROBES)


def test_unreadable_reads_are_retried_then_reported(tmp_path, monkeypatch):
    """A reader that loses a file replaced under it (NFS ESTALE) reads the new version instead of failing."""
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        w.append(**record_for(1))
    real, calls = store._read, []

    def flaky(p, matrix, fact_ids=True):
        calls.append(p)
        if len(calls) == 1:
            raise store._Unreadable(f"{p}: stale file handle; fix: none")
        return real(p, matrix, fact_ids)

    monkeypatch.setattr(store, "_read", flaky)
    assert read_cell(path).step.tolist() == [1] and len(calls) == 2
    monkeypatch.setattr(store, "_read", real)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"x" * 100)
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        read_cell(garbage)


# ------------------------------------------------------------------------------------------- crashes and readers
def _forked_writer(path: Path) -> tuple[int, "object"]:
    """A writer child process (forked: no interpreter start-up per kill) that reports each step on a pipe after
    its append returned."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            w = _open(path)
            done = w.steps()
            step = done[-1] if done else 0
            os.write(write_fd, f"ready {step}\n".encode())
            while True:
                step += 1
                w.append(**record_for(step))
                os.write(write_fd, f"{step}\n".encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            os.write(write_fd, f"error {exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, os.fdopen(read_fd, "r")


def test_sigkill_at_random_moments_never_leaves_a_partial_append(tmp_path):
    """20 SIGKILLs at random moments of one writer after another on the same file. Precisely: after each kill the
    file holds the steps whose append had returned (reported on the pipe) or those plus the single step in flight,
    each record complete (equal to record_for(step)); the next writer resumes after the last visible step."""
    path, rnd = tmp_path / "retention.h5", random.Random(1234)
    visible: list[int] = []
    mid_publish = in_flight_visible = 0
    git_commit()  # cached before forking, so each writer's open is quick
    for kill in range(20):
        pid, pipe = _forked_writer(path)
        reports = 0 if kill % 7 == 3 else rnd.randint(1, 5)  # "ready" and a few steps (0: kill during open)
        lines = [pipe.readline().strip() for _ in range(reports)]
        time.sleep(rnd.uniform(0.0, 0.03))  # then kill at a random moment of the append cycle
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        lines += pipe.read().splitlines()  # whole lines: a "ready N" is not step N (a fast child gets there first)
        pipe.close()
        mid_publish += any(tmp_path.glob(".retention.h5.*.tmp"))
        assert not [x for x in lines if x.startswith("error")], lines
        reported = [int(x) for x in lines if x.isdigit()]
        if not path.exists():
            assert not visible and not reported
            continue
        rec = read_cell(path)
        expected = visible + reported
        if rec.step.tolist() != expected:
            in_flight_visible += 1
            expected = expected + [(expected[-1] if expected else 0) + 1]
        _assert_records(rec, expected)
        assert expected == list(range(1, len(expected) + 1))
        visible = expected
    assert len(visible) >= 20, "the writers barely ran: the kills came too early to test appends"
    assert mid_publish > 0, "no kill landed while a new version was being written"
    _open(path).close()  # the next writer removes what killed ones left behind
    assert not list(tmp_path.glob(".retention.h5.*.tmp"))
    print(f"\n{len(visible)} steps, {mid_publish} kills mid-publish, {in_flight_visible} in-flight appends visible")


def test_reader_sees_consistent_growing_series_while_writer_appends(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "READ_RETRIES", 1)  # locally every version must read at the first attempt
    path = tmp_path / "retention.h5"
    proc = _writer(path, stop=40)
    seen, reads = [], 0
    while proc.poll() is None:
        if path.exists():
            rec = read_cell(path, matrix=reads % 2 == 0)  # never raises: every version is complete
            _assert_records(rec, list(range(1, len(rec.step) + 1)))
            assert not seen or len(rec.step) >= seen[-1]
            seen.append(len(rec.step))
            reads += 1
        time.sleep(0.002)  # leave the writer a core
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    final = read_cell(path)
    _assert_records(final, list(range(1, 41)))
    assert len(set(seen)) > 5, f"reads did not overlap the writes: {sorted(set(seen))}"


def _digest_fields(d):
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.__dict__.items()}


def test_digest_equals_the_full_read_and_old_files_fall_back(tmp_path, monkeypatch):
    """read_digest (the user block, one plain read) gives what the datasets give; a store without a digest (written
    before digests existed, or with one too large to keep) is read the long way with the same result; an empty
    store has an empty digest; the user block leaves the file an ordinary HDF5 file."""
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        assert store.read_digest(path).final == {} and store.read_digest(path).last_correct is None
        for step in (1, 2, 3):
            w.append(**record_for(step))
    assert path.read_bytes().startswith(digest.MAGIC)
    with h5py.File(path, "r") as f:
        assert f.userblock_size >= 512 and f["step"][:].tolist() == [1, 2, 3]
    fast = store.read_digest(path)
    slow = store._digest_from_cell(read_cell(path, matrix="last", fact_ids=False))
    assert _digest_fields(fast) == _digest_fields(slow)
    assert fast.final["general_acc"] == read_cell(path).metrics["general_acc"][-1]  # full precision
    old = tmp_path / "old" / "retention.h5"
    monkeypatch.setattr(digest, "userblock_size", lambda payload: 0)
    with _open(old) as w:
        for step in (1, 2, 3):
            w.append(**record_for(step))
    with h5py.File(old, "r") as f:
        assert f.userblock_size == 0
    from_old = _digest_fields(store.read_digest(old))
    assert from_old == _digest_fields(store._digest_from_cell(read_cell(old, matrix="last", fact_ids=False)))
    assert "writers" not in from_old["meta"] and "writers" in read_cell(old).meta  # bookkeeping stays in the record
    session = ("created", "git_commit")  # when and by whom each file was written differ
    for d in (from_old, want := _digest_fields(fast)):
        d["meta"] = {k: v for k, v in d["meta"].items() if k not in session}
    assert from_old == want


def test_digest_of_a_truncated_or_edited_file_is_not_trusted(tmp_path):
    """The digest is intact in a truncated copy (it sits at the start): its recorded file size gives the copy
    away; a damaged digest fails its checksum. Both are one-line 'damaged' errors, never silently wrong data."""
    path = tmp_path / "retention.h5"
    with _open(path) as w:
        w.append(**record_for(1))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[:-1000])
    with pytest.raises(StoreError, match=r"damaged retention store \(the file is \d+ bytes, its writer wrote"):
        store.read_digest(truncated)
    flipped = bytearray(data)
    flipped[digest.PREFIX.size + 40] ^= 0xFF
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="checksum does not match.*; fix: delete it and rerun"):
        store.read_digest(bad)
    huge = bytearray(data)  # a damaged length field must not make the reader allocate it
    huge[24:32] = (2**60).to_bytes(8, "little")
    bad.write_bytes(bytes(huge))
    with pytest.raises(StoreError, match="prefix is damaged"):
        store.read_digest(bad)
