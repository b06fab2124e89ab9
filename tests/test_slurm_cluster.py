"""Real submitit jobs on the project's single-node Slurm cluster: arrays, failures, cancellation, timeout requeue.

These check the cluster that tools/slurm_cluster.sh builds behaves like a production one in the ways kislurm relies
on: `executor.batch()` makes one job array that honours its parallelism, job states come from accounting (so a
cancelled job is seen as done instead of hanging a waiter), and a Checkpointable that reaches its time limit gets
submitit's signal, is requeued and resumes from its checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from slurm_fixtures import SlurmCluster, connect, max_array_size

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]

# The jobs unpickle these functions on the node, where this test module is not importable: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# sbatch --signal=USR2@S is sent at the controller's first 30-s periodic check at which the job has less than S + 30
# seconds left. With a 1-minute limit submitit's default S=90 fires at the first check after the job starts, 0-30 s
# in, which can precede Python installing submitit's handler (then USR2 kills the task). S=5 fires 25-55 s after the
# start, always after the handler is in place, and 30 s before the time-limit kill.
TIMEOUT_SIGNAL_DELAY_S = 5


def _executor(folder: Path, **parameters: object) -> submitit.AutoExecutor:
    """A real submitit Slurm executor; one CPU per task unless told otherwise."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**{"timeout_min": 5, "cpus_per_task": 1, **parameters})
    return executor


def _wait_for_state(job: submitit.Job, wanted: str, timeout_s: float = 60.0) -> str:
    """Poll sacct (forced, 1 s apart) until the job's state starts with `wanted`; return the full state."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = job.watcher.get_state(job.job_id, mode="force")
        if state.split(" ")[0] == wanted:
            return state
        time.sleep(1.0)
    raise AssertionError(f"job {job.job_id} is {state!r} after {timeout_s:.0f} s, expected {wanted}")


def _sacct_states(job_id: str) -> list[str]:
    """Every accounting record of a job, requeued runs included (sacct --duplicates)."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "State"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return [line.split(" ")[0] for line in out.splitlines() if line.strip()]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


# ----------------------------------------------------------------------------------------------------------------
# functions that run on the node


def _square_slowly(x: int, seconds: float) -> dict:
    """x*x, with when this task ran and which array task Slurm says it is."""
    start = time.time()
    time.sleep(seconds)
    return {
        "value": x * x,
        "array_job_id": os.environ["SLURM_ARRAY_JOB_ID"],
        "array_task_id": int(os.environ["SLURM_ARRAY_TASK_ID"]),
        "start": start,
        "end": time.time(),
    }


def _raise_value_error(message: str) -> None:
    raise ValueError(message)


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


class _ResumesAfterTimeout(submitit.helpers.Checkpointable):
    """Runs past its time limit until checkpointed once; the requeued run then returns at once."""

    def __init__(self) -> None:
        self.checkpoints = 0

    def __call__(self, x: int) -> dict:
        if self.checkpoints == 0:
            time.sleep(170)  # longer than the limit: only the timeout signal ends this run in time
            return {"interrupted": False}
        return {"x": x, "checkpoints": self.checkpoints, "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        self.checkpoints += 1
        return super().checkpoint(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# tests


def test_batch_is_one_array_with_parallelism_two(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path, slurm_array_parallelism=2)
    with executor.batch():
        jobs = [executor.submit(_square_slowly, x, 4.0) for x in range(4)]
    results = [job.result() for job in jobs]

    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_{i}" for i in range(4)]
    assert [r["value"] for r in results] == [0, 1, 4, 9]
    assert [r["array_task_id"] for r in results] == [0, 1, 2, 3]
    assert {r["array_job_id"] for r in results} == {array_id}
    assert "#SBATCH --array=0-3%2" in jobs[0].paths.submission_file.read_text()
    # two CPUs and %2: two tasks run side by side, never three
    assert _max_overlap([(r["start"], r["end"]) for r in results]) == 2
    for job in jobs:
        assert _wait_for_state(job, "COMPLETED", timeout_s=30) == "COMPLETED"


def test_failing_task_raises_with_remote_traceback(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _executor(tmp_path).submit(_raise_value_error, "kislurm-remote-boom-4821")
    with pytest.raises(FailedJobError) as caught:
        job.result()
    message = str(caught.value)
    assert "Traceback (most recent call last)" in message
    assert "ValueError: kislurm-remote-boom-4821" in message
    assert "_raise_value_error" in message
    assert _wait_for_state(job, "FAILED", timeout_s=30) == "FAILED"


def test_cancelled_job_reads_cancelled_and_done(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _executor(tmp_path).submit(_sleep, 300.0)
    _wait_for_state(job, "RUNNING", timeout_s=60)
    job.cancel()
    _wait_for_state(job, "CANCELLED", timeout_s=60)
    assert job.state.startswith("CANCELLED")  # sacct says e.g. "CANCELLED by 0"
    assert job.done()
    with pytest.raises(UncompletedJobError):
        job.result()  # returns (after submitit's 15 s grace for the result file) instead of hanging


@pytest.mark.skipif(os.geteuid() != 0, reason="tools/slurm_cluster.sh start must run as root")
def test_max_array_size_3_caps_array_indices_and_is_restored(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path, slurm_array_parallelism=2)
    with max_array_size(slurm_cluster, 3) as small:
        assert small.max_array_size == 3
        with executor.batch():
            jobs = [executor.submit(_square_slowly, x, 0.0) for x in range(3)]
        assert [job.result()["value"] for job in jobs] == [0, 1, 4]
        with pytest.raises(FailedJobError, match="Invalid job array specification"):
            with executor.batch():  # index 3 >= MaxArraySize, and submitit does not split arrays itself
                for x in range(4):
                    executor.submit(_square_slowly, x, 0.0)
    assert connect(slurm_cluster.base).max_array_size == slurm_cluster.max_array_size


def test_checkpointable_is_signalled_requeued_and_resumes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path, timeout_min=1, slurm_signal_delay_s=TIMEOUT_SIGNAL_DELAY_S)
    job = executor.submit(_ResumesAfterTimeout(), 7)
    script = job.paths.submission_file.read_text()
    assert "#SBATCH --time=1" in script and f"#SBATCH --signal=USR2@{TIMEOUT_SIGNAL_DELAY_S}" in script

    assert job.result() == {"x": 7, "checkpoints": 1, "restarts": 1}
    log = (job.stdout() or "") + (job.stderr() or "")  # one log per task, appended across runs
    assert "Caught signal SIGUSR2" in log
    assert "Calling checkpoint method" in log
    assert f"Requeued job {job.job_id}" in log
    # the result file exists a moment before the job ends: wait for accounting to record the end
    assert _wait_for_state(job, "COMPLETED", timeout_s=30) == "COMPLETED"
    states = _sacct_states(job.job_id)
    assert states == ["REQUEUED", "COMPLETED"], states

