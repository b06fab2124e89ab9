"""Benchmark: what in-loop downstream evaluation (eval.downstream) adds to a cell's time, as a ratio.

    python tools/bench_downstream.py [--config configs/tiny.yaml] [--size cpu-xs] [--tokens 40960]
                                     [--eval-interval 8] [--every 1] [--tasks kislurm_probes] [--repeats 2]

The same cell (same id: eval settings are not part of it) runs to completion through the compute-node entry
(jobs/run_cell.py, the real training, evaluation and store) twice per repeat, in fresh run folders whose data is
prepared before timing: once without downstream tasks (the baseline) and once with them, alternating so that a
change in the machine's load hits both. Reported: the best wall and CPU seconds (CPU of the child process, the
steadier figure on a shared machine) of each, and downstream / baseline. Needs kislurm[eval].
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, str(REPO / "jobs" / "run_cell.py")]


def prepared_cell(root: Path, args: argparse.Namespace, tasks: list[str]):
    """A planned, prepared one-cell run under `root` (preparation is not timed)."""
    from kislurm.cluster.submit import write_plan
    from kislurm.data.prepare import prepare_run
    from kislurm.plan.loader import load_config
    from kislurm.plan.grid import expand

    cfg = load_config(args.config, {"output_root": str(root), "grid.sizes": [args.size], "grid.ratios": [0.5],
                                    "grid.token_budgets": [args.tokens], "train.eval_interval": args.eval_interval,
                                    "eval.downstream.tasks": tasks, "eval.downstream.every": args.every})
    cell = expand(cfg)[0]
    run = write_plan(cfg, [cell])
    prepare_run(cfg, [cell])
    return run, cell


def timed_cell(root: Path, args: argparse.Namespace, tasks: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds of one cell run to completion, and its evaluations."""
    run, cell = prepared_cell(root, args, tasks)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([*ENTRY, str(run.root), cell.name], check=True, capture_output=True, timeout=3600)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, len(cell.eval_steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--size", default="cpu-xs")
    p.add_argument("--tokens", type=int, default=40960)
    p.add_argument("--eval-interval", type=int, default=8)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--tasks", default="kislurm_probes", help="comma-separated eval.downstream.tasks")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    best = {"baseline": (float("inf"), float("inf")), "downstream": (float("inf"), float("inf"))}
    with tempfile.TemporaryDirectory(prefix="kislurm-bench-downstream-") as tmp:
        for i in range(args.repeats):
            for name, t in (("baseline", []), ("downstream", tasks)):
                wall, cpu, evals = timed_cell(Path(tmp) / f"{name}{i}", args, t)
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
                print(f"repeat {i + 1} {name:10s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  ({evals} evaluations)")
    (bw, bc), (dw, dc) = best["baseline"], best["downstream"]
    print(f"\ncell {args.size}, {args.tokens} tokens, evaluation every {args.eval_interval} steps, downstream "
          f"{','.join(tasks)} every {args.every} evaluation(s); best of {args.repeats}")
    print(f"baseline   wall {bw:7.2f} s  cpu {bc:7.2f} s")
    print(f"downstream wall {dw:7.2f} s  cpu {dc:7.2f} s")
    print(f"ratio (downstream / baseline): wall {dw / bw:.2f}x, cpu {dc / bc:.2f}x")


if __name__ == "__main__":
    main()
