"""The `kislurm` command line: plan, prepare, submit, status, aggregate, fit, demo.

Every command turns a known failure (bad config, missing file, no Slurm, corrupt store) into one line on stderr
and a non-zero exit; a traceback means a bug in kislurm.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import warnings

import click

from . import __version__
from .config import ConfigError, ExperimentConfig, load_config
from .paths import RunPaths
from .plan import Cell, expand, run_dir

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")  # expected on CPU: noise

# Known failure types: shown as one line, exit 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    errors = list(_USER_ERRORS)
    for module, name in (("submit", "SubmitError"), ("store", "StoreError"), ("knowledge", "DataError"),
                         ("distributed", "TrainError"), ("aggregate", "AggregateError"),
                         ("measurements_csv", "MeasurementError"), ("evaluate", "EvalError")):
        try:
            errors.append(getattr(importlib.import_module(f"kislurm.{module}"), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)



class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            click.echo(f"kislurm: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\nkislurm: interrupted; running cells were stopped, finished cells are kept: run the same "
                       "command again to resume", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="kislurm")
def main() -> None:
    """Knowledge-infusion scaling-law experiments: plan a grid of model sizes x infusion ratios, submit it to Slurm
    (or run it locally), record retention in HDF5, and fit the collapse-point scaling law.

    \b
    Typical use:
      kislurm plan configs/demo.yaml          # the grid and its resources; submits nothing
      kislurm submit configs/demo.yaml        # run every cell not yet done
      kislurm status runs/demo                # where each cell stands
      kislurm aggregate runs/demo             # collapse points, the law, reports
    """


def _load(config: str, overrides: tuple[str, ...] = ()) -> tuple[ExperimentConfig, list[Cell]]:
    import yaml

    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set grid.seeds=[1]")
        parsed[key] = yaml.safe_load(value)
    cfg = load_config(config, parsed)
    return cfg, expand(cfg)


_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a config key (dotted, YAML value), e.g. --set grid.seeds=[1]. Repeatable.")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
def plan(config: str, overrides: tuple[str, ...]) -> None:
    """Show the grid of CONFIG as a table of cells with their resources. Submits nothing."""
    from .submit import describe

    cfg, cells = _load(config, overrides)
    rows = describe(cells, cfg.executor)
    cols = ["cell", "steps", "nodes", "tasks_per_node", "gpus_per_node", "timeout_min"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    g = cfg.grid
    click.echo(f"\n{len(cells)} cells = {len(g.sizes)} sizes x {len(g.ratios)} ratios x {len(g.token_budgets)} "
               f"token budgets x {len(g.seeds)} seeds; executor: {cfg.executor.cluster}; run folder: {run_dir(cfg)}")


def load_cell_job():
    """jobs/run_cell.py's CellJob, pickled by value so compute nodes need only the kislurm package."""
    import cloudpickle

    path = REPO / "jobs" / "run_cell.py"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the node entry is missing; fix: install kislurm from its source tree "
                                "(pip install -e .)")
    spec = importlib.util.spec_from_file_location("kislurm_jobs_run_cell", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return module.CellJob()


def submit_run(cfg: ExperimentConfig, cells: list[Cell], force: bool = False, wait: bool = True) -> RunPaths:
    """Write the plan, prepare shared data, submit what is not done, and (locally) wait with a progress bar."""
    from tqdm import tqdm

    from .submit import RESUBMIT, cells_to_run, check_cluster, submit_cells, write_plan

    check_cluster(cfg.executor)
    run = write_plan(cfg, cells, force=force)
    states = cells_to_run(run, cells)
    todo = [c for c, s in states if s in RESUBMIT]
    skipped = {s: sum(1 for _, t in states if t == s) for s in {t for _, t in states} if s not in RESUBMIT}
    click.echo(f"{run.root}: {len(todo)} of {len(cells)} cells to submit"
               + (f" (skipping {', '.join(f'{n} {s}' for s, n in sorted(skipped.items()))})" if skipped else ""))
    if not todo:
        return run
    from . import data

    data.prepare_run(cfg, todo)   # the shared data's one writer, before any job: cells then only read it
    job = load_cell_job()
    if cfg.executor.cluster == "local":
        bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not wait)
        jobs = submit_cells(cfg, run, todo, job, progress=bar.update)
        bar.close()
    else:
        jobs = submit_cells(cfg, run, todo, job)
        click.echo(f"submitted {len(jobs)} cells: job ids {', '.join(sorted({j.job_id.split('_')[0] for j in jobs}))}")
    if cfg.executor.cluster != "slurm":
        failed = []
        for cell, j in zip(todo, jobs):
            try:
                j.result()
            except Exception as e:  # noqa: BLE001 - report every failed cell, then exit non-zero
                failed.append(f"{cell.name}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e)}")
        if failed:
            for line in failed:
                click.echo(f"kislurm: cell failed: {line}", err=True)
            click.echo(f"kislurm: error: {len(failed)} of {len(todo)} cells failed; see their log.txt under "
                       f"{run.cells}; rerun `kislurm submit` to retry only those", err=True)
            sys.exit(1)
    return run


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the sbatch script(s) that would be submitted; submit nothing.")
@click.option("--force", is_flag=True, help="Add cells even where the same coordinates exist with another config.")
@_set_option
def submit(config: str, dry_run: bool, force: bool, overrides: tuple[str, ...]) -> None:
    """Submit every cell of CONFIG that is not done, pending or running (job arrays on Slurm; local processes
    otherwise, waiting for them). Resubmitting reruns only missing, failed and cancelled cells."""
    from .submit import dry_run as render

    cfg, cells = _load(config, overrides)
    if dry_run:
        click.echo(render(cfg, cells))
        return
    submit_run(cfg, cells, force=force)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
def prepare(config: str, overrides: tuple[str, ...]) -> None:
    """Build everything the cells of CONFIG read (tokenizer, knowledge bases, probes, streams) and check every cell's
    blend. Cells never build shared data: they read what this published."""
    from tqdm import tqdm

    from .data import prepare_run

    cfg, cells = _load(config, overrides)
    with tqdm(total=len(cells), desc="prepare", unit="cell") as bar:
        summary = prepare_run(cfg, cells, progress=bar.update)
    built = summary["built"]
    click.echo(f"{summary['data']}: {summary['cells']} cells, {summary['streams']} knowledge streams; "
               f"{len(built)} published now ({summary['bytes_written'] / 1e6:.1f} MB) in {summary['seconds']:.1f} s"
               + (": " + ", ".join(built) if built else " (everything was already prepared)"))


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cell, for scripts.")
def status(run: str, as_json: bool) -> None:
    """One row per cell of RUN: state, step, last retention (sacct polled once for all cells)."""
    from .status import run_status

    rows = run_status(RunPaths(Path(run)))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    cols = ["cell", "state", "step", "general_acc", "infused_acc", "job"]
    fmt = {"general_acc": lambda v: "" if v is None else f"{v:.3f}", "infused_acc": lambda v: "" if v is None
           else f"{v:.3f}"}
    table = [[fmt.get(c, lambda v: "" if v is None else str(v))(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    click.echo(f"\n{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default: RUN/reports).")
@click.option("--config", type=click.Path(dir_okay=False), help="Analysis settings (default: the run's config).")
def aggregate(runs: tuple[str, ...], out: Optional[str], config: Optional[str]) -> None:
    """Read every retention store under RUNS, find each size's collapse point and fit the scaling law."""
    from .aggregate import aggregate_runs

    result = aggregate_runs([Path(r) for r in runs], out=Path(out) if out else None,
                            config=Path(config) if config else None, echo=click.echo)
    click.echo(result.table_markdown)
    click.echo(result.law_text)
    click.echo(f"reports written to {result.out}")


@main.command()
@click.argument("csv", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default="fit-report", show_default=True,
              help="Report folder.")
@click.option("--unit", type=click.Choice(["odds", "tokens", "exposures"]), default="odds", show_default=True)
@click.option("--target", "targets", multiple=True, metavar="NAME=PARAMS",
              help="Predict r* for a size, e.g. --target 7B=6.5e9. Repeatable.")
def fit(csv: str, out: str, unit: str, targets: tuple[str, ...]) -> None:
    """Collapse detection and law fit on a plain CSV of results from other tools (columns: params, ratio,
    retention; optional: tokens, seed, n_facts)."""
    from .aggregate import fit_measurements_csv

    named = {}
    for t in targets:
        name, sep, value = t.partition("=")
        if not sep:
            raise ConfigError(f"--target {t!r}: expected NAME=PARAMS, e.g. 7B=6.5e9")
        named[name] = float(value)
    result = fit_measurements_csv(Path(csv), Path(out), unit=unit, targets=named)
    click.echo(result.table_markdown)
    click.echo(result.law_text)
    click.echo(f"reports written to {result.out}")


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), default=str(DEMO_CONFIG), show_default=True)
@_set_option
def demo(config: str, overrides: tuple[str, ...]) -> None:
    """Run the embedded default end to end on this machine (CPU, gloo, tiny models, submitit's local executor):
    train every cell, then aggregate. Interrupt with Ctrl-C and run again: finished cells are not re-run."""
    from .aggregate import aggregate_runs

    cfg, cells = _load(config, overrides)
    t0 = time.time()
    run = submit_run(cfg, cells)
    click.echo(f"trained {len(cells)} cells in {time.time() - t0:.0f} s")
    result = aggregate_runs([run.root], echo=click.echo)
    click.echo(result.table_markdown)
    click.echo(result.law_text)
    click.echo(f"reports written to {result.out}  (total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
