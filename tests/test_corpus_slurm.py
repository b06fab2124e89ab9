"""`kislurm corpus` on the project's two-node test Slurm: one array task per shard, the same bytes as a local build,
then a grid trains with that corpus (a WordNet slice) as its general stream, its probes real capitals it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kislurm.cli import main, submit_run
from kislurm.data.sources import slurm_shard_executor
from kislurm.data.corpus import build_corpus
from kislurm.data.tokenizer import train_bpe
from kislurm.data.wordnet import capital_documents, wordnet_installed, write_wordnet_jsonl
from kislurm.plan.config import load_config
from kislurm.plan.grid import expand
from slurm_fixtures import wait_for_cells

pytestmark = pytest.mark.slurm
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
def test_corpus_as_a_slurm_array_then_a_grid_trains_on_it(slurm_cluster, tmp_path):
    if not wordnet_installed():
        pytest.fail("WordNet is not installed; fix: tools/dev test installs it (apt-get install wordnet-base)")
    src = tmp_path / "wn.jsonl"
    write_wordnet_jsonl(src, limit=2500)
    stated = capital_documents()
    with src.open("a", encoding="utf-8") as f:              # the slice holds every capital its probes ask for
        f.writelines(json.dumps({"text": text}) + "\n" for text, _ in stated)
    tok = tmp_path / "tok.json"
    train_bpe((json.loads(line)["text"] for line in src.open()), 3000).save(tok)   # the fact sentences fit seq_length
    executor = slurm_shard_executor(tmp_path / "submitit", None, 1, 10)
    shard_bytes = src.stat().st_size // 3 + 1
    on_slurm = build_corpus([str(src)], tmp_path / "slurm" / "wn", tokenizer=tok, executor=executor,
                            shard_bytes=shard_bytes, keep_shards=True, progress=False)
    tasks = sorted(p.name for p in (tmp_path / "submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert on_slurm.shards == 3 and len(tasks) == 3 and len({t.split("_")[0] for t in tasks}) == 1, tasks  # 1 array
    local = build_corpus([str(src)], tmp_path / "local" / "wn", tokenizer=tok, progress=False)
    for ext in (".bin", ".idx"):
        assert Path(on_slurm.prefix + ext).read_bytes() == Path(local.prefix + ext).read_bytes()

    probes = tmp_path / "capitals.jsonl"
    probes.write_text("".join(json.dumps(fact) + "\n" for _, fact in stated[:12]))
    templates = tmp_path / "t.yaml"
    templates.write_text("capital_of: {train: ['{subject} is the capital of {object}'], heldout: []}\n")
    cfg = load_config(TINY, {"output_root": str(tmp_path / "runs"), "executor.cluster": "slurm",
                             "executor.time": "10", "grid.sizes": ["cpu-xxs"], "grid.ratios": [0.5],
                             "data.general_prefix": on_slurm.prefix, "data.tokenizer": str(tok),
                             "data.general_probes": str(probes), "data.templates_file": str(templates)})
    run = submit_run(cfg, expand(cfg))
    prep = run.root / "prepare.json"      # a failed preparation leaves the cell waiting on it: stop there
    rows = wait_for_cells(run, lambda rows: all(r["state"] in ("done", "failed") for r in rows) or (
        prep.is_file() and json.loads(prep.read_text()).get("state") == "failed"))
    assert [r["state"] for r in rows] == ["done"], rows
    shown = CliRunner().invoke(main, ["status", str(run.root), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)[0]["state"] == "done"
