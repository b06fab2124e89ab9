"""Per-cell work after a run (`kislurm export`, `kislurm downstream`) as one submitit array task per cell, waited for.

The login node does no heavy work: each cell's task runs on a node, and the command waits for all of them, so it
ends with every result or with one line per failed task, naming its stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class TaskFailure:
    """One array task that ended without a result: the cell it was for, its job id, its stderr, Slurm's last word."""

    cell: str
    job_id: str
    stderr: Path
    reason: str

    def line(self, what: str) -> str:
        return f"the {what} task of cell {self.cell} ({self.job_id}) failed: {self.reason}; see {self.stderr}"


def cpu_task_parameters(cfg: Any, what: str) -> dict[str, Any]:
    """sbatch options of one CPU task per cell: the preparation job's (partition, CPUs, time, setup lines), not
    held, named kislurm-NAME-WHAT."""
    from kislurm.cluster.executors import preparation_parameters

    params = preparation_parameters(cfg.executor, f"kislurm-{cfg.name}")
    params["job_name"] = f"kislurm-{cfg.name}-{what}"
    params["additional_parameters"] = {k: v for k, v in params["additional_parameters"].items() if k != "hold"}
    return params


def slurm_executor(folder: Path, params: dict[str, Any], parallelism: int) -> Any:
    """A submitit Slurm executor writing its logs under `folder`/JOBID, with these sbatch options."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()}, slurm_array_parallelism=parallelism)
    return executor


def submit_array(executor: Any, fn: Callable[..., Any], calls: list[tuple[str, tuple]], what: str,
                 log: Callable[[str], None] = print) -> list[tuple[str, Any]]:
    """Submit `fn(*args)` for each (cell name, args) of `calls` as one array of `executor` (submitit's batch());
    returns (cell name, submitit job) pairs for `wait_array`."""
    with executor.batch():
        submitted = [executor.submit(fn, *args) for _, args in calls]
    log(f"submitted {len(submitted)} {what} task(s) as Slurm array {submitted[0].job_id.split('_')[0]}")
    return [(cell, job) for (cell, _), job in zip(calls, submitted)]


def wait_array(submitted: list[tuple[str, Any]]) -> tuple[list[Any], list[TaskFailure]]:
    """Wait for every task; returns the results of those that finished, in order, and the failures."""
    import submitit

    results, failures = [], []
    for cell, task in submitted:
        try:
            results.append(task.result())
        except submitit.core.utils.UncompletedJobError as e:
            failures.append(TaskFailure(cell, task.job_id, Path(task.paths.stderr), failure_reason(e)))
    return results, failures


def failure_reason(error: Exception) -> str:
    """One line from submitit's error: the last line of the task's traceback when its function raised (the
    kislurm error that names the fix), else Slurm's state ("has not produced any output (state: TIMEOUT)")."""
    import submitit

    lines = [line.strip() for line in str(error).strip().splitlines()]
    if isinstance(error, submitit.core.utils.FailedJobError):
        dividers = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
        trace = [line for line in lines[dividers[0] + 1:dividers[1]] if line] if len(dividers) >= 2 else []
        if trace:
            return trace[-1][:300]
    return next((line for line in lines if "has not produced any output" in line), lines[0] if lines else "?")[:300]


def run_array(executor: Any, fn: Callable[..., Any], calls: list[tuple[str, tuple]], what: str,
              log: Callable[[str], None] = print) -> tuple[list[Any], list[TaskFailure]]:
    """`submit_array`, then `wait_array`: one array, waited for."""
    return wait_array(submit_array(executor, fn, calls, what, log))
