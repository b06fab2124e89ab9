"""`kislurm census --cluster slurm` on the project's test Slurm: one array task per shard, the same counts as the
local process pool."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from kislurm.cli import main
from test_census import DOCS, FACTS

pytestmark = pytest.mark.slurm


def test_census_as_a_slurm_array_counts_what_the_local_pool_counts(slurm_cluster, tmp_path):
    inputs = []
    for part in range(3):                    # one shard per file: three array tasks
        path = tmp_path / f"part{part}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{DOCS[(i + part) % len(DOCS)]} #{part}.{i}"}) + "\n"
                                for i in range(40)))
        inputs.append(str(path))
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    common = ["census", *inputs, "--facts", str(facts), "--select", "1"]
    on_slurm = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "slurm"), "--cluster", "slurm", "--cpus",
                                         "1", "--time", "5"])
    assert on_slurm.exit_code == 0, on_slurm.output
    tasks = sorted(p.name for p in (tmp_path / "slurm" / "submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 3 and len({t.split("_")[0] for t in tasks}) == 1, tasks      # one array of three tasks
    local = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "local"), "--workers", "2"])
    assert local.exit_code == 0, local.output
    assert "120 documents in 3 shards" in on_slurm.output and "120 documents in 3 shards" in local.output
    for name in ("census.jsonl", "general_probes.jsonl"):
        assert (tmp_path / "slurm" / name).read_text() == (tmp_path / "local" / name).read_text()
    assert any(json.loads(line)["docs_both"] > 0 for line in (tmp_path / "local" / "census.jsonl").open())
