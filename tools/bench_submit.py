"""Benchmark: planning and dry-run of a 10,000-cell grid, and `status` over 10,000 cells.

    python tools/bench_submit.py [--cells 10000]

Targets (issue 8): plan + dry run within 2 s; status issues at most one sacct call per poll whatever the number of
cells. sacct is replaced by a counting stand-in on PATH for the status part, so the count is exact and no cluster
is needed; everything else (config, plan, submitit's sbatch renderer, status logic) is the real code.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

from kislurm.plan.loader import config_from_dict
from kislurm.plan.grid import expand
from kislurm.cluster.status import run_status
from kislurm.cluster.submissions import Submission, record_submissions
from kislurm.cluster.submit import describe, dry_run, write_plan


def grid(n_cells: int, root: str) -> dict:
    sizes = ["cpu-xxs", "cpu-xs", "cpu-s", "cpu-m", "cpu-l", "cpu-xl", "137M", "350M", "760M", "1.3B"]
    ratios = n_cells // (len(sizes) * 10)
    return {"output_root": root, "name": "bench",
            "grid": {"sizes": sizes, "ratios": [(i + 1) / (ratios + 1) for i in range(ratios)],
                     "token_budgets": [10**6 * (i + 1) for i in range(10)]},
            "executor": {"cluster": "slurm", "partition": "gpu", "max_array_size": 1001}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg = config_from_dict(grid(args.cells, tmp))
        cells = expand(cfg)
        rows = describe(cells, cfg.executor)
        scripts = dry_run(cfg, cells)
        t_plan = time.perf_counter() - t0
        print(f"plan + dry run of {len(cells)} cells ({scripts.count('#!/bin/bash')} arrays, {len(rows)} rows): "
              f"{t_plan:.2f} s (target <= 2 s: {'ok' if t_plan <= 2 else 'MISSED'})")

        run = write_plan(cfg, cells)
        record_submissions(run, [Submission(c.name, f"{1000 + i // 1000}_{i % 1000}", "slurm", 0.0)
                                 for i, c in enumerate(cells)])
        bindir = Path(tmp) / "bin"
        bindir.mkdir()
        log = Path(tmp) / "sacct.calls"
        fake = bindir / "sacct"
        fake.write_text(f"#!/bin/sh\necho call >> {log}\nfor j in $(seq 1000 1009); do echo \"$j|RUNNING\"; done\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
        t0 = time.perf_counter()
        status = run_status(run)
        t_status = time.perf_counter() - t0
        calls = len(log.read_text().splitlines())
        print(f"status of {len(status)} cells: {t_status:.2f} s, sacct calls: {calls} (target <= 1: "
              f"{'ok' if calls <= 1 else 'MISSED'})")
        print(json.dumps({"cells": len(cells), "plan_dry_run_s": round(t_plan, 3), "status_s": round(t_status, 3),
                          "sacct_calls": calls}))
        sys.exit(0 if t_plan <= 2 and calls <= 1 else 1)


if __name__ == "__main__":
    main()
