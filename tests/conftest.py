"""Shared test setup: one torch thread (2-core CI), the Slurm cluster fixture from tests/slurm_fixtures.py,
`--cells slow|fast` (tests/cell_speed.py) to run the suite with cells slowed down or twice as fast, and the helpers
and fixtures several test files share (a prepared tiny world, simulated measurements, a retention store, two-task
submitit jobs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:  # the fixture module is optional until the Slurm tests exist
    from slurm_fixtures import *  # noqa: F401,F403
except ImportError:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--cells", choices=("normal", "slow", "fast"), default=os.environ.get("KISLURM_TEST_CELLS",
                     "normal"), help="run every cell slowed down or twice as fast (tests/cell_speed.py)")


def pytest_configure(config):
    import cell_speed

    cell_speed.apply(config.getoption("--cells"))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`), the Slurm tests of one cluster run in one worker, in file order:
    they share that cluster, and some restart it with other settings once its queue is empty. The clusters' groups
    (slurm_fixtures.cluster_of) and everything else spread over the workers, so the Slurm tests' waiting overlaps
    the CPU-bound tests.

    A module that wants its other tests in one worker too (to build its module-scoped fixtures once) says so with
    `XDIST_GROUP = "name"`; its Slurm tests still go with their cluster."""
    from slurm_fixtures import cluster_of

    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group(f"slurm-{cluster_of(Path(str(item.fspath)))}"))
        elif getattr(getattr(item, "module", None), "XDIST_GROUP", None):
            item.add_marker(pytest.mark.xdist_group(item.module.XDIST_GROUP))


def pytest_runtest_setup(item):
    import cell_speed

    cell_speed.HALVING["on"] = item.get_closest_marker("config_as_written") is None


# ---------------------------------------------------------------------------------------------------------------------
# A prepared tiny world (knowledge bases, tokenizer, streams, probes), built once per test session
# ---------------------------------------------------------------------------------------------------------------------

TINY_SEQ = 32


def tiny_data():
    """30 general and 60 knowledge entities x 2 relations x 8 values, a 300-token vocabulary."""
    from kislurm.plan.config import DataConfig, KnowledgeBaseSpec

    return DataConfig(general=KnowledgeBaseSpec(30, 2, 8), knowledge=KnowledgeBaseSpec(60, 2, 8), vocab_size=300)


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory):
    """kislurm.data.prepare.prepare(tiny_data(), ..., TINY_SEQ): cells only read it, so every test may share it."""
    from kislurm.data import prepare as D

    return D.prepare(tiny_data(), tmp_path_factory.mktemp("prepared_tiny"), TINY_SEQ)


# ---------------------------------------------------------------------------------------------------------------------
# Simulated measurements: logistic retention in the log-odds of r around a known r*, binomial noise over facts
# ---------------------------------------------------------------------------------------------------------------------


def simulate_cells(rng: np.random.Generator, size: str, params: float, r_star: float, ratios, *,
                   n_facts: int = 200, seeds=(0,), tokens: float = 1e6, steepness: float | None = None,
                   plateau: float = 0.95, floor: float = 0.1, **fields: Any) -> list:
    """One size's cells: each fact answered correctly with the curve's probability at the cell's ratio. A field
    given as a callable is evaluated at the ratio (e.g. exposures_per_fact=lambda r: 800 * r)."""
    from kislurm.analysis.collapse import Logistic, Measurement, ratio_axis

    curve = Logistic(plateau, floor, float(ratio_axis(r_star)), steepness or 3.0 / (1.0 - r_star))
    out = []
    for seed in seeds:
        for r in ratios:
            fc = (rng.random(n_facts) < curve(np.array([r]))[0]).astype(float)
            extra = {k: v(r) if callable(v) else v for k, v in fields.items()}
            out.append(Measurement(size, params, r, tokens, seed, float(fc.mean()), fc, **extra))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# A retention store with one evaluation
# ---------------------------------------------------------------------------------------------------------------------


def make_store(path: Path, name: str, complete: bool, ratio: float = 0.5, acc: float = 0.9, size: str = "cpu-s",
               params: float = 1e5) -> None:
    """A real HDF5 store of a two-fact cell with one evaluation at step 10, complete or not."""
    from kislurm.retention.store import RetentionWriter

    meta = {"cell_id": name[-10:], "name": name, "size": size, "ratio": ratio, "tokens": 1000, "seed": 0,
            "config": {}, "params_total": params, "params_non_embedding": params, "n_choices": 4, "data_stats": {}}
    w = RetentionWriter.open(path, meta, ["f0", "f1"], np.array([0, 1], np.int8), np.array([0, 0, 1, 1]),
                             np.array([False, True, False, True]))
    w.append(10, 320, 2.0, {"general_acc": acc, "infused_acc": 0.5}, np.array([1, 1, 0, 1], bool), None)
    if complete:
        w.mark_complete()
    w.close()


# ---------------------------------------------------------------------------------------------------------------------
# Two ranks through submitit's local executor (the same environment a Slurm task gets)
# ---------------------------------------------------------------------------------------------------------------------


def run_two_tasks(folder: Path, fn: Callable[..., Any], *args: Any, timeout_min: int = 10) -> list[Any]:
    """fn(*args) in each task of a 2-task submitit local job; the results in task order. The module defining `fn`
    is pickled by value, so the job need not import the test module."""
    import cloudpickle
    import submitit

    module = sys.modules[fn.__module__]
    cloudpickle.register_pickle_by_value(module)
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), old_path or ""])
    try:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=timeout_min)
        return executor.submit(fn, *args).results()
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
