"""`kislurm corpus` on the project's two-node test Slurm: one array task per shard, the same bytes as a local build,
then a grid trains with that corpus (a WordNet slice) as its general stream, its probes real capitals it names: the
config route (data.general_corpus), whose shards `kislurm submit` queues as an array ahead of the preparation job."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kislurm.cli import main
from kislurm.orchestrate.run import submit_run
from kislurm.cluster.status import preparation_state
from kislurm.cluster.scheduler import release
from kislurm.cluster.submit import submit_corpus_shards, submit_preparation, write_plan
from kislurm.data.sources import slurm_shard_executor
from kislurm.data.corpus import build_corpus
from kislurm.data.tokenizer import train_bpe
from kislurm.data.wordnet import capital_documents, wordnet_installed, write_wordnet_jsonl
from kislurm.plan.loader import load_config
from kislurm.plan.grid import expand
from slurm_fixtures import wait_for_cells

pytestmark = pytest.mark.slurm
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def array_tasks(folder: Path, job: str) -> list[str]:
    """The submitit task folders (JOB_INDEX) of one array."""
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(rf"{job}_\d+", p.name))


def slurm_config(tmp_path: Path, name: str, overrides: dict):
    return load_config(TINY, {"name": name, "output_root": str(tmp_path / "runs"), "executor.cluster": "slurm",
                              "executor.time": "10", "executor.prepare_time": "10", "grid.sizes": ["cpu-xxs"],
                              "grid.ratios": [0.5], **overrides})


def test_corpus_as_a_slurm_array_then_a_grid_trains_on_it(slurm_cluster, tmp_path):
    """`kislurm corpus --cluster slurm` gives a local build's bytes; then data.general_corpus on the same files:
    `kislurm submit` queues one shard task per file ahead of the preparation job (which only merges), the cell
    trains on the corpus, and a second experiment on the same files and tokenizer queues no shard array."""
    if not wordnet_installed():
        pytest.fail("WordNet is not installed; fix: tools/dev test installs it (apt-get install wordnet-base)")
    src = tmp_path / "wn.jsonl"
    write_wordnet_jsonl(src, limit=2500)
    stated = capital_documents()
    with src.open("a", encoding="utf-8") as f:              # the slice holds every capital its probes ask for
        f.writelines(json.dumps({"text": text}) + "\n" for text, _ in stated)
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "wn-a.jsonl").write_text("".join(lines[:len(lines) // 2]), encoding="utf-8")
    (tmp_path / "wn-b.jsonl").write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
    inputs = [str(tmp_path / "wn-*.jsonl")]
    tok = tmp_path / "tok.json"
    train_bpe((json.loads(line)["text"] for line in lines), 3000).save(tok)   # the fact sentences fit seq_length
    executor = slurm_shard_executor(tmp_path / "submitit", None, 1, 10)
    shard_bytes = src.stat().st_size // 3 + 1
    on_slurm = build_corpus(inputs, tmp_path / "slurm" / "wn", tokenizer=tok, executor=executor,
                            shard_bytes=shard_bytes, keep_shards=True, progress=False)
    tasks = sorted(p.name for p in (tmp_path / "submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert on_slurm.shards == len(tasks) > 2 and len({t.split("_")[0] for t in tasks}) == 1, tasks  # 1 array
    local = build_corpus([str(src)], tmp_path / "local" / "wn", tokenizer=tok, progress=False)
    for ext in (".bin", ".idx"):
        assert Path(on_slurm.prefix + ext).read_bytes() == Path(local.prefix + ext).read_bytes()

    probes = tmp_path / "capitals.jsonl"
    probes.write_text("".join(json.dumps(fact) + "\n" for _, fact in stated[:12]))
    templates = tmp_path / "t.yaml"
    templates.write_text("capital_of: {train: ['{subject} is the capital of {object}'], heldout: []}\n")
    data = {"data.general_corpus": {"files": inputs, "json_key": "text"}, "data.tokenizer": str(tok),
            "data.general_probes": str(probes), "data.templates_file": str(templates)}
    cfg = slurm_config(tmp_path, "wn-one", data)
    run = submit_run(cfg, expand(cfg))
    queued = json.loads((run.root / "prepare.json").read_text())
    corpus, prep = queued["corpus_job"], queued["job"]
    assert int(corpus) < int(prep), queued                   # the shard array is queued ahead of the preparation
    rows = wait_for_cells(run, lambda rows: all(r["state"] in ("done", "failed", "cancelled") for r in rows))
    assert [r["state"] for r in rows] == ["done"], rows
    assert len(array_tasks(run.submitit, corpus)) == 2       # one task per file (each under 64 MB: one shard)
    finished = json.loads((run.root / "prepare.json").read_text())
    assert finished["state"] == "done" and finished["corpus_job"] == corpus, finished
    prefix = next((tmp_path / "runs" / "corpora").glob("*/general.idx")).with_suffix("")
    for ext in (".bin", ".idx"):                             # the merge of the array's shards: the same bytes
        assert Path(f"{prefix}{ext}").read_bytes() == Path(on_slurm.prefix + ext).read_bytes()
    assert not Path(f"{prefix}.shards").exists()
    shown = CliRunner().invoke(main, ["status", str(run.root), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)[0]["state"] == "done"

    again = slurm_config(tmp_path, "wn-two", data)
    assert submit_corpus_shards(again, write_plan(again, expand(again))) is None   # what `kislurm submit` asks


def test_a_failed_corpus_shard_fails_the_preparation_in_one_line(slurm_cluster, tmp_path):
    """A shard task that fails (a malformed JSON line) records one line as the preparation's error and cancels the
    preparation job and the cells, which would otherwise wait forever on a dependency never satisfied."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"Paris is the capital of France {i}"}) + "\n" for i in range(50)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    tok = tmp_path / "tok.json"
    train_bpe((json.loads(line)["text"] for line in good.open()), 300).save(tok)
    probes = tmp_path / "capitals.jsonl"
    probes.write_text(json.dumps({"subject": "Paris", "relation": "capital_of", "object": "France"}) + "\n")
    cfg = slurm_config(tmp_path, "bad", {"data.general_corpus": {"files": [str(bad)]},
                                         "data.tokenizer": str(tok), "data.general_probes": str(probes)})
    run = submit_run(cfg, expand(cfg))
    rows = wait_for_cells(run, lambda rows: all(r["state"] in ("done", "failed", "cancelled") for r in rows))
    record = json.loads((run.root / "prepare.json").read_text())
    assert record["state"] == "failed" and record["error"].startswith(f"corpus shard {bad}"), record
    assert "\n" not in record["error"] and f"{bad}:2: malformed JSON" in record["error"], record
    assert [r["state"] for r in rows] == ["cancelled"], rows
    assert rows[0]["error"] == f"preparation job {record['job']} failed: {record['error']}", rows


def test_a_shard_task_that_ends_without_a_word_fails_the_preparation_naming_it(slurm_cluster, tmp_path):
    """A shard task killed outright (out of memory, a lost node) records nothing itself. The preparation job waits
    on the array with afterany, so it still runs, finds the shard unpublished and fails in one line naming it,
    instead of pending for ever on an afterok never satisfied. The task here is cancelled while the chain is still
    held, so that it never runs whatever the machine's speed."""
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for i, f in enumerate(files):
        f.write_text("".join(json.dumps({"text": f"Rome is the capital of Italy {i} {j}"}) + "\n" for j in range(20)))
    tok = tmp_path / "tok.json"
    train_bpe((json.loads(line)["text"] for f in files for line in f.open()), 300).save(tok)
    probes = tmp_path / "capitals.jsonl"
    probes.write_text(json.dumps({"subject": "Rome", "relation": "capital_of", "object": "Italy"}) + "\n")
    cfg = slurm_config(tmp_path, "killed", {"data.general_corpus": {"files": [str(f) for f in files]},
                                            "data.tokenizer": str(tok), "data.general_probes": str(probes)})
    run = write_plan(cfg, expand(cfg))
    array = submit_corpus_shards(cfg, run)                   # held, as `kislurm submit` queues it
    subprocess.run(["scancel", f"{array}_1"], check=True, timeout=60)  # the task of b.jsonl ends without a word
    prep = submit_preparation(cfg, run, [], after=array)
    release(prep)
    release(array)
    deadline = time.monotonic() + 600
    while preparation_state(run).get("state") not in ("failed", "done"):
        assert time.monotonic() < deadline, f"the preparation job {prep} never ended: {preparation_state(run)}"
        time.sleep(1)
    error = preparation_state(run).get("error", "")
    shard = f"{files[1]} bytes 0-{files[1].stat().st_size}"
    assert error.startswith(f"corpus shard {shard} was not published (1 of 2 shards missing; array job {array}:"), error
    assert "fix: " in error and "\n" not in error
