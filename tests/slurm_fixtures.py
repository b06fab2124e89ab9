"""Pytest fixture for the project's test Slurm cluster (started by tools/slurm_cluster.sh; one or several nodes).

`slurm_cluster` finds the cluster through `$KISLURM_SLURM_BASE/env.sh` (default base /tmp/kislurm-slurm), checks that
the controller, the node and accounting answer, exports SLURM_CONF for the session (submitit's sbatch/sacct/scancel
subprocesses and the jobs inherit it) and yields a `SlurmCluster`. When the cluster is not up the test is skipped with
the command that starts it, or fails when KISLURM_REQUIRE_SLURM=1 (CI), so a broken cluster never passes silently.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "SlurmCluster", "SlurmUnavailable", "base_of", "cluster_of", "connect", "job_requeue", "max_array_size",
    "read_env_sh", "slurm_base", "slurm_cluster", "wait_for_cells", "wait_until_queue_empty", "two_nodes", "plan",
    "all_done", "sacct", "job_of", "SHAPE", "TINY",
]

DEFAULT_BASE = Path("/tmp/kislurm-slurm")
REQUIRE_ENV = "KISLURM_REQUIRE_SLURM"
START_HINT = "run tools/slurm_cluster.sh start"
CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "slurm_cluster.sh"
_CLIENT_TIMEOUT_S = 15
_UP_STATES = {"idle", "mix", "alloc"}


class SlurmUnavailable(RuntimeError):
    """The test cluster is not usable; the message is one line naming the problem."""


@dataclass(frozen=True)
class SlurmCluster:
    """Where the running test cluster lives and what it allows."""

    base: Path
    conf: Path
    node: str
    max_array_size: int
    nodes: tuple[str, ...] = ()
    """Every node's name (kn1, kn2, ... when the cluster was started with --nodes 2 or more)."""


def slurm_base() -> Path:
    """The cluster's base folder: $KISLURM_SLURM_BASE, else the script's default."""
    return Path(os.environ.get("KISLURM_SLURM_BASE") or DEFAULT_BASE)


def read_env_sh(path: Path) -> dict[str, str]:
    """Parse the `export NAME=VALUE` lines that tools/slurm_cluster.sh writes (values shell-quoted)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            values[name] = value
    return values


def _client(args: list[str], conf: Path) -> str:
    """Run a Slurm client against `conf`; its stdout, or SlurmUnavailable with its complaint."""
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S)
    except FileNotFoundError as err:
        raise SlurmUnavailable(f"{args[0]} is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise SlurmUnavailable(f"`{' '.join(args)}` did not answer in {_CLIENT_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip().strip("*")]
        raise SlurmUnavailable(f"`{' '.join(args)}` failed: {lines[0] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def connect(base: Path) -> SlurmCluster:
    """Check that the cluster under `base` is up (controller, node, accounting) and describe it."""
    env_sh = base / "env.sh"
    if not env_sh.is_file():
        raise SlurmUnavailable(f"{env_sh} does not exist")
    conf_value = read_env_sh(env_sh).get("SLURM_CONF")
    if not conf_value or not Path(conf_value).is_file():
        raise SlurmUnavailable(f"{env_sh} names no existing SLURM_CONF")
    conf = Path(conf_value)
    if "is UP" not in _client(["scontrol", "ping"], conf):
        raise SlurmUnavailable(f"slurmctld is down (see {base / 'log' / 'slurmctld.log'})")
    rows = [line.split() for line in _client(["sinfo", "-h", "-N", "-o", "%N %t"], conf).splitlines() if line.strip()]
    down = [" ".join(r) for r in rows if len(r) < 2 or r[1] not in _UP_STATES]
    if not rows or down:
        raise SlurmUnavailable(f"a node is not usable (sinfo: {'; '.join(down) or 'no node'})")
    _client(["sacct", "-n", "-X", "-S", "now"], conf)
    config = _client(["scontrol", "show", "config"], conf)
    max_array = next((ln.split("=", 1)[1].strip() for ln in config.splitlines() if ln.startswith("MaxArraySize")), "0")
    return SlurmCluster(base=base, conf=conf, node=rows[0][0], max_array_size=int(max_array),
                        nodes=tuple(sorted({r[0] for r in rows})))


def wait_until_queue_empty(timeout_s: float = 60.0) -> None:
    """Block until squeue lists no job (pending, running or completing); AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True,
                               timeout=_CLIENT_TIMEOUT_S).stdout.strip()
        if not queue:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"Slurm jobs still queued after {timeout_s:.0f} s: {queue.splitlines()}")
        time.sleep(1.0)


def wait_for_cells(run, done, timeout_s: float = 600.0) -> list[dict]:
    """Poll `kislurm status`'s rows of a run (sacct once per poll) until `done(rows)`; AssertionError after
    `timeout_s` with every cell's state and error."""
    from kislurm.cluster.status import run_status

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = run_status(run)
        if done(rows):
            return rows
        time.sleep(1.0)
    raise AssertionError(f"timed out; states: {[(r['cell'], r['state'], r.get('error')) for r in run_status(run)]}")


def _restart(cluster: SlurmCluster, max_array: int, job_requeue: int = 1) -> None:
    """`tools/slurm_cluster.sh start` for the running cluster (same base, ports and nodes) with these settings."""
    env = {**os.environ, **read_env_sh(cluster.base / "env.sh"), "KISLURM_SLURM_MAX_ARRAY_SIZE": str(max_array),
           "KISLURM_SLURM_JOB_REQUEUE": str(job_requeue)}
    proc = subprocess.run([str(CLUSTER_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"{CLUSTER_SCRIPT} start failed: {proc.stderr.strip().splitlines()[-1:]}")


@contextmanager
def max_array_size(cluster: SlurmCluster, value: int) -> Iterator[SlurmCluster]:
    """Run the block with MaxArraySize=value (array task indices 0..value-1), then restore the cluster's own.

    Restarts slurmctld and slurmd (a few seconds each way; root only), each time once the queue is empty so no job
    is caught half-launched. Usage: `with max_array_size(slurm_cluster, 3) as small: ...`.
    """
    wait_until_queue_empty()
    try:
        _restart(cluster, value)
        yield connect(cluster.base)
    finally:
        wait_until_queue_empty()
        _restart(cluster, cluster.max_array_size)


@contextmanager
def job_requeue(cluster: SlurmCluster, value: int) -> Iterator[SlurmCluster]:
    """Run the block on a cluster with JobRequeue=value (0: requeue refused, as at some sites), then restore 1.

    Restarts slurmctld and slurmd each way once the queue is empty, as `max_array_size` does."""
    wait_until_queue_empty()
    try:
        _restart(cluster, cluster.max_array_size, job_requeue=value)
        yield connect(cluster.base)
    finally:
        wait_until_queue_empty(timeout_s=600)
        _restart(cluster, cluster.max_array_size)


def _connect_or_problem(base: Path) -> SlurmCluster | str:
    """The cluster, or a one-line problem that says how to start it."""
    try:
        return connect(base)
    except SlurmUnavailable as err:
        return f"Slurm test cluster at {base} is not up ({err}); {START_HINT}"


SECOND_CLUSTER_FILES = frozenset({"test_slurm_nodes.py"})
"""Test files whose tests use the second cluster ($KISLURM_SLURM_BASE_B, which `tools/dev test` starts beside the
first), so the two halves of the Slurm tests wait in parallel; tests/conftest.py gives each half its own xdist group."""
DEFAULT_BASE_B = Path("/tmp/kislurm-slurm-b")


def cluster_of(test_file: Path) -> str:
    """Which cluster ("a" or "b") the tests of a file use; also their xdist group's suffix."""
    return "b" if test_file.name in SECOND_CLUSTER_FILES and os.environ.get("KISLURM_SLURM_BASE_B") != "" else "a"


def base_of(cluster: str) -> Path:
    """The base folder of cluster "a" ($KISLURM_SLURM_BASE) or "b" ($KISLURM_SLURM_BASE_B, default
    /tmp/kislurm-slurm-b)."""
    return slurm_base() if cluster == "a" else Path(os.environ.get("KISLURM_SLURM_BASE_B") or DEFAULT_BASE_B)


_FOUND: dict[Path, SlurmCluster | str] = {}
"""Each cluster is checked once per test session (per xdist worker)."""


@pytest.fixture
def slurm_cluster(request, monkeypatch) -> Iterator[SlurmCluster]:
    """The running test cluster of this test's file, with SLURM_CONF exported for the test; skip (or fail in CI)
    when it is down."""
    base = base_of(cluster_of(Path(str(request.node.fspath))))
    if base not in _FOUND:
        _FOUND[base] = _connect_or_problem(base)
    found = _FOUND[base]
    if isinstance(found, str):
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{found} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(found)
    monkeypatch.setenv("SLURM_CONF", str(found.conf))
    yield found


# ---------------------------------------------------------------------------------------------------------------------
# Cells across the test cluster's two nodes (tests/test_slurm_nodes.py, tests/test_slurm_signals.py)
# ---------------------------------------------------------------------------------------------------------------------

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SHAPE = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 32}


@pytest.fixture
def two_nodes(slurm_cluster):
    if len(slurm_cluster.nodes) < 2:
        problem = f"the test cluster has one node ({slurm_cluster.node}); fix: tools/slurm_cluster.sh start --nodes 2"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return slurm_cluster


def plan(root: Path, tp: int, dp: int, per_node: int, **overrides):
    """A one-cell tiny grid at layout TP x DP with `per_node` ranks on each node, on Slurm."""
    from kislurm.plan.loader import load_config
    from kislurm.plan.grid import expand

    cfg = load_config(TINY, {"output_root": str(root), "executor.cluster": "slurm", "executor.time": "10",
                             "executor.tasks_per_node": per_node, "grid.sizes": ["m"], "grid.ratios": [0.5],
                             "train.micro_batch_size": 16 // dp,
                             "models.m": {**SHAPE, "tensor_parallel": tp, "data_parallel": dp}, **overrides})
    return cfg, expand(cfg)


def all_done(rows: list[dict]) -> bool:
    return all(r["state"] == "done" for r in rows)


def sacct(job_id: str, fields: str) -> list[str]:
    return subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", fields], capture_output=True,
                          text=True, check=True, timeout=60).stdout.split()


def job_of(run, cell) -> str:
    from kislurm.cluster.submissions import latest_submissions

    return latest_submissions(run)[cell.name].job_id
