"""Nightly aggregation of one or more run folders into dated reports, safe to run unattended.

    python -m kislurm.analysis.nightly RUN [RUN ...] [--reports DIR] [--keep N]     (or jobs/nightly.py, the same)

- Writes REPORTS/YYYY-MM-DD/ (default REPORTS = the first RUN's reports/nightly) and points REPORTS/latest at it
  (an atomic symlink swap); keeps the newest N dated folders (default 30).
- Never runs twice at once: a second instance finds the lock held, says so and exits 0.
- Incremental: the summary cache lives in REPORTS, so each night reads only stores that are new or grew.
- Exit status: 0 when reports were written (unreadable or unfinished cells are listed in them, not failures);
  1 on a real failure (a missing run folder, an unwritable report folder, a bug).

cron (every night at 02:15):
    15 2 * * * cd /path/to/kislurm && .venv/bin/python jobs/nightly.py /scratch/runs/paper >> ~/kislurm-nightly.log 2>&1
Slurm scrontab (`scrontab -e`), where login nodes forbid cron:
    #SCRON --time=00:30:00 --cpus-per-task=2
    15 2 * * * cd /path/to/kislurm && .venv/bin/python jobs/nightly.py /scratch/runs/paper
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

from kislurm.paths import RunPaths
from kislurm.publish import publish


def _swap_latest(reports: Path, dated: Path) -> None:
    tmp = reports / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(dated.name)
    publish(tmp, reports / "latest")


def _prune(reports: Path, keep: int) -> None:
    dated = sorted(p for p in reports.iterdir() if p.is_dir() and not p.is_symlink() and p.name[:2] == "20")
    for old in dated[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reports", type=Path, default=None)
    parser.add_argument("--keep", type=int, default=30)
    args = parser.parse_args(argv)
    reports = args.reports or RunPaths(args.runs[0]).nightly
    try:
        reports.mkdir(parents=True, exist_ok=True)
        lock = open(reports / ".nightly.lock", "w")
    except OSError as e:
        print(f"nightly: cannot write reports to {reports}: {e.strerror}; fix: pass --reports to a writable folder",
              file=sys.stderr)
        return 1
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"nightly: another aggregation holds {reports / '.nightly.lock'}; nothing to do")
        return 0
    from kislurm.analysis.aggregate import CACHE_NAME, AggregateError, aggregate_runs

    dated = reports / time.strftime("%Y-%m-%d")
    t0 = time.time()
    try:
        result = aggregate_runs(args.runs, out=dated, cache=reports / CACHE_NAME)
    except (AggregateError, FileNotFoundError) as e:
        print(f"nightly: error: {e}", file=sys.stderr)
        return 1
    _swap_latest(reports, dated)
    _prune(reports, args.keep)
    print(f"nightly: {time.strftime('%Y-%m-%d %H:%M:%S')} read {result.n_read} new or changed stores, "
          f"{len(result.unreadable)} unreadable, {len(result.excluded)} excluded, in {time.time() - t0:.1f} s; "
          f"reports in {dated}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
