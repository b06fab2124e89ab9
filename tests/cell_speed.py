"""The suite with its cells slowed down or twice as fast: `pytest --cells slow|fast` (or KISLURM_TEST_CELLS).

A test whose result depends on how fast a cell runs is a defect (these machines differ 2x in speed). Running the
whole suite both ways finds them:
  slow  every training step takes at least SLOW_STEP_S (KISLURM_MIN_STEP_S, inherited by every cell process and
        Slurm job), several times a tiny cell's own step time on this project's 2-core machine;
  fast  the project's tiny.yaml and demo.yaml train half their token budget, with evaluation and
        checkpoint intervals halved so that each cell makes as many evaluations in half the steps. Values a test
        sets itself (--set / overrides) are left alone: a test that builds its timing on its own numbers keeps them.
Subprocesses (the CLI run as a command, submitit's cell processes) get the same through the sitecustomize in
tests/cell_speed_shim, which `apply` puts on PYTHONPATH.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "KISLURM_TEST_CELLS"
SLOW_STEP_S = "0.05"
HERE = Path(__file__).resolve().parent
REPO_CONFIGS = HERE.parent / "configs"
MODES = ("normal", "slow", "fast")
HALVING = {"on": True}
"""Off during a test marked config_as_written (conftest), which pins what the configs hold as written."""
FAST_CONFIGS = {REPO_CONFIGS / "tiny.yaml", REPO_CONFIGS / "demo.yaml"}
"""The configs whose cells the tests train (paper.yaml is only planned and rendered: its reference stays)."""


def apply(mode: str) -> None:
    """Make this process, and every process it starts, run cells in `mode`."""
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {MODES}")
    os.environ[ENV] = mode
    if mode == "slow":
        from kislurm.train.trainer import MIN_STEP_ENV

        os.environ.setdefault(MIN_STEP_ENV, SLOW_STEP_S)
    elif mode == "fast":
        path = os.pathsep.join([str(HERE / "cell_speed_shim"), str(HERE), os.environ.get("PYTHONPATH", "")])
        os.environ["PYTHONPATH"] = path.rstrip(os.pathsep)
        _halve_repo_configs()


def _halve_repo_configs() -> None:
    import kislurm.cli
    import kislurm.plan.loader

    original = kislurm.plan.loader.load_config
    if getattr(original, "cell_speed", False):
        return

    def load_config(path, overrides=None):
        overrides = dict(overrides or {})
        if HALVING["on"] and Path(path).resolve() in FAST_CONFIGS:
            own = original(path)
            halved = {"grid.token_budgets": [max(1, t // 2) for t in own.grid.token_budgets],
                      "train.eval_interval": max(1, own.train.eval_interval // 2),
                      "train.checkpoint_interval": own.train.checkpoint_interval // 2}
            overrides = {**halved, **overrides}
        return original(path, overrides)

    load_config.cell_speed = True
    kislurm.plan.loader.load_config = load_config
    kislurm.cli.load_config = load_config
