"""Every path pattern of a run folder, in one place (as submitit's JobPaths does for its logs).

    RUN/run.json                  the plan: config, cells, kislurm version (rewritten atomically at each submit)
    RUN/config.yaml               the experiment file as submitted
    RUN/data/                     prepared data shared by the run's cells (knowledge bases, tokenizer, indexed datasets)
    RUN/prepare.json              the preparation job's state (on a cluster, where it is a job the cells wait on)
    RUN/cells/NAME/cell.json      one cell's effective config and id
    RUN/cells/NAME/STATUS         one word (PENDING, RUNNING, DONE, FAILED) plus a heartbeat line
    RUN/cells/NAME/retention.h5   the retention store (kislurm.retention.store)
    RUN/cells/NAME/checkpoints/   megatron dist_checkpointing checkpoints
    RUN/cells/NAME/log.txt        the cell's training log
    RUN/cells/NAME/ranks/K.json   rank K's last error in its latest session (written by that rank alone)
    RUN/cells/NAME/downstream.json  downstream scores of the cell's final weights (kislurm downstream)
    RUN/cells/NAME/downstream/tasks/WHEN/  the local lm-eval task files those scores were computed on
    RUN/cells/NAME/tensorboard/   TensorBoard event files (kislurm.train.monitor): steps/ against step, tokens/ against tokens
    RUN/submissions.jsonl         every submission of a cell (append-only: cell, job id, why, what it waits on)
    RUN/preflight/LAYOUT/         one layout's preflight job: its scratch cells and report.json
    RUN/submitit/                 submitit's job files and stdout/stderr (%A_%a per array task)
    RUN/reports/                  aggregation outputs (tables, plots, summary; law.json is the fitted law)
    RUN/reports/nightly/          dated nightly aggregations and the `latest` link (jobs/nightly)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CELLS = "cells"
CELL_SPEC = "cell.json"
STORE = "retention.h5"
"""The names aggregation joins as strings for speed (10,000 pathlib joins cost ~0.1 s); every other reader uses
RunPaths / CellPaths."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "run.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cells(self) -> Path:
        return self.root / CELLS

    def cell_names(self) -> list[str]:
        """The cells planned in the run folder, sorted: every folder under RUN/cells that holds a cell.json. The
        one scanner of a run's cells (status, submit, export, downstream and the ladder all ask it)."""
        return sorted(p.parent.name for p in self.cells.glob(f"*/{CELL_SPEC}")) if self.cells.is_dir() else []

    @property
    def submitit(self) -> Path:
        return self.root / "submitit"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def nightly(self) -> Path:
        """The nightly aggregation's dated report folders and its `latest` link."""
        return self.reports / "nightly"

    @property
    def law(self) -> Path:
        """The fitted scaling law that `kislurm aggregate` publishes and `kislurm validate` extrapolates."""
        return self.reports / "law.json"

    @property
    def submissions(self) -> Path:
        """Append-only log of every submission (kislurm.cluster.submissions.Submission, one JSON line each)."""
        return self.root / "submissions.jsonl"

    def preflight(self, layout: str) -> Path:
        """One preflight layout's folder: its scratch training folders and report.json."""
        return self.root / "preflight" / layout

    def preflight_report(self, layout: str) -> Path:
        return self.preflight(layout) / "report.json"

    @property
    def preparation(self) -> Path:
        """The preparation job's state on a cluster: job id, running / done / failed, its error."""
        return self.root / "prepare.json"

    def cell(self, name: str) -> "CellPaths":
        return CellPaths(self.cells / name)


@dataclass(frozen=True)
class CellPaths:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / CELL_SPEC

    @property
    def status(self) -> Path:
        return self.root / "STATUS"

    @property
    def store(self) -> Path:
        return self.root / STORE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of the cell (`tensorboard --logdir RUN` finds every cell's)."""
        return self.root / "tensorboard"

    @property
    def downstream_results(self) -> Path:
        """Downstream scores of the cell's final weights (kislurm.cluster.downstream_job)."""
        return self.root / "downstream.json"

    def downstream_tasks(self, when: str) -> Path:
        """The lm-eval task files written for one evaluation (`final`, or a rank's in-loop folder)."""
        return self.root / "downstream" / "tasks" / when

    def rank_report(self, rank: int) -> Path:
        return self.ranks / f"{rank}.json"
