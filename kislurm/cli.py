"""The `kislurm` command line: plan, prepare, submit, status, aggregate, fit, demo.

It parses options, calls the stage that does the work (what to submit when is kislurm.orchestrate's) and formats
the answer. Every command turns a known failure (bad config, missing file, no Slurm, corrupt store) into one line
on stderr and a non-zero exit (cells that failed here: one line each, then the count; exit 1); a traceback means a
bug in kislurm.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import warnings

import click

from kislurm import __version__
from kislurm.errors import CellsFailed, KislurmError
from kislurm.plan.config import ConfigError, ExperimentConfig
from kislurm.plan.loader import load_config
from kislurm.paths import RunPaths
from kislurm.plan.grid import Cell, expand, resolve_layouts, run_dir

def shipped_config(name: str) -> Path:
    """A config of the project's configs/: in the source tree, else where `pip install .` put it (data_files)."""
    source = Path(__file__).resolve().parents[1] / "configs" / name
    return source if source.exists() else Path(sys.prefix) / "share" / "kislurm" / "configs" / name


DEMO_CONFIG = shipped_config("demo.yaml")

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")  # expected on CPU: noise

# Known failure types: shown as one line, exit 2 (every kislurm error derives from KislurmError).
_USER_ERRORS: tuple[type[BaseException], ...] = (KislurmError, FileNotFoundError)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CellsFailed as e:  # cells that ran here: each failed one, then the count and the fix
            for line in e.failures:
                click.echo(f"kislurm: cell failed: {line}", err=True)
            click.echo(f"kislurm: error: {e}", err=True)
            sys.exit(1)
        except _USER_ERRORS as e:
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
    cfg = resolve_layouts(load_config(config, parsed))  # TP auto resolved and layouts checked before any write
    return cfg, expand(cfg)


_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a config key (dotted, YAML value), e.g. --set grid.seeds=[1]. Repeatable.")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
def plan(config: str, overrides: tuple[str, ...]) -> None:
    """Show the grid of CONFIG as a table of cells with their resources. Submits nothing."""
    from kislurm.cluster.submit import describe

    cfg, cells = _load(config, overrides)
    rows = describe(cells, cfg.executor)
    costs = _cost_columns(cfg, cells)
    for r, c in zip(rows, costs):
        r.update(c)
    cols = ["cell", "steps", "nodes", "tasks_per_node", "gpus_per_node", "timeout_min", "tp", "mem_gib_per_gpu",
            "gpu_hours"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    click.echo("".join(_override_lines(cfg)), nl=False)
    g = cfg.grid
    if g.adaptive:
        click.echo(_ladder_line(cfg, cells))
        return
    click.echo(f"\n{len(cells)} cells = {len(g.sizes)} sizes x {len(g.ratios)} ratios x {len(g.token_budgets)} "
               f"token budgets x {len(g.seeds)} seeds; executor: {cfg.executor.cluster}; run folder: {run_dir(cfg)}")
    click.echo(_cost_summary(cfg, cells))


def _override_lines(cfg: ExperimentConfig) -> list[str]:
    """One line per grid size whose preset overrides training settings (ModelPreset.train)."""
    out = []
    for size in cfg.grid.sizes:
        o = cfg.presets[size].train
        changes = {k: v for k, v in dataclasses.asdict(o).items() if v is not None} if o else {}
        if changes:
            out.append(f"{size}: train overrides " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                               for k, v in changes.items()) + "\n")
    return out


def _cost_columns(cfg: ExperimentConfig, cells: list[Cell]) -> list[dict[str, str]]:
    """Per cell: its TP degree, estimated peak memory of one rank, and GPU-hours (kislurm.plan.estimate)."""
    from kislurm.plan.estimate import cell_costs, plan_vocab_size

    vocab = plan_vocab_size(cfg.data)
    out = []
    for c in cells:
        cost = cell_costs(c.model, c.train, cfg.executor, c.n_samples * c.model.seq_length, vocab)
        out.append({"tp": str(c.model.tensor_parallel), "mem_gib_per_gpu": f"{cost['mem_gib']:.1f}"
                    if c.model.device == "gpu" else "-",
                    "gpu_hours": "-" if cost["gpu_hours"] is None else f"{cost['gpu_hours']:,.0f}"})
    return out


def _cost_summary(cfg: ExperimentConfig, cells: list[Cell]) -> str:
    """One line: total GPU-hours and the assumptions behind the memory and cost columns."""
    from kislurm.plan.estimate import FIT_FRACTION, plan_vocab_size, total_gpu_hours

    vocab = plan_vocab_size(cfg.data)
    ex = cfg.executor
    hours = total_gpu_hours(cells, ex, vocab)
    if hours is None:
        return "no GPU cells: memory and GPU-hour estimates apply to device: gpu presets"
    limit = f"fits {FIT_FRACTION:.0%} of executor.gpu_memory_gb {ex.gpu_memory_gb:g} GiB" if ex.gpu_memory_gb \
        else "not checked (executor.gpu_memory_gb unset)"
    return f"estimated {hours:,.0f} GPU-hours in all at {_pricing(cfg)}; memory per GPU (vocabulary {vocab}): {limit}"


def _pricing(cfg: ExperimentConfig) -> str:
    """The GPU-hour model's assumptions (kislurm.plan.estimate.cell_gpu_hours), as every estimate states them."""
    ex = cfg.executor
    return f"MFU {ex.mfu:.0%} of {ex.gpu_peak_tflops:g} TFLOP/s (executor.mfu, gpu_peak_tflops)"


def _hours(hours: Optional[float]) -> str:
    if hours is None:
        return "no GPU cells"
    return f"~{hours:,.0f} GPU-h" if hours >= 100 else f"~{hours:.3g} GPU-h"


def _ladder_line(cfg: ExperimentConfig, first: list[Cell]) -> str:
    """Expected cells and GPU-hours of an adaptive ladder against the fixed grid of its start ratios on every size."""
    from kislurm.orchestrate.ladder import ladder_estimate

    e, g = ladder_estimate(cfg, first), cfg.grid
    return (f"\nadaptive ladder: {e.now} cells now (the two smallest sizes on {len(g.start_ratios)} start ratios), "
            f"{e.more} more expected ({g.rung_points} ratios per further size, placed from the law as each rung "
            f"finishes): {e.now + e.more} cells, {_hours(e.hours)}, against {e.fixed_cells} cells, "
            f"{_hours(e.fixed_hours)} for the start ratios on every size, at {_pricing(cfg)}; executor: "
            f"{cfg.executor.cluster}; run folder: {run_dir(cfg)}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the sbatch script(s) that would be submitted; submit nothing.")
@click.option("--force", is_flag=True, help="Add cells even where the same coordinates exist with another config.")
@click.option("--after-preflight", is_flag=True,
              help="Submit only once every distinct layout of the cells has a passing preflight report; layouts "
                   "without one are preflighted first (as `kislurm preflight` does), and a failure submits nothing.")
@_set_option
def submit(config: str, dry_run: bool, force: bool, after_preflight: bool, overrides: tuple[str, ...]) -> None:
    """Submit every cell of CONFIG that is not done, pending or running (job arrays on Slurm; local processes
    otherwise, waiting for them). Resubmitting reruns only missing, failed and cancelled cells."""
    from kislurm.cluster.submit import dry_run as render

    cfg, cells = _load(config, overrides)
    if dry_run:
        click.echo(render(cfg, cells))
        return
    if after_preflight:
        from kislurm.cluster.preflight import ensure_preflights, summary_line

        for report in ensure_preflights(cfg, cells):
            click.echo(summary_line(report))
        click.echo("preflight: every layout passed")
    if cfg.grid.adaptive:
        from kislurm.orchestrate.ladder import submit_ladder

        submit_ladder(cfg, force=force, echo=click.echo)
        return
    from kislurm.orchestrate.run import submit_run

    submit_run(cfg, cells, force=force, echo=click.echo)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--steps", default=20, show_default=True, help="Training steps per check (a few minutes on a GPU).")
@click.option("--dry-run", is_flag=True, help="List the distinct layouts and their jobs; run nothing.")
@click.option("--min-baseline-ratio", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Fail a layout whose megatron tokens/s per GPU is below this fraction of the plain-PyTorch "
                   "GPT's on one GPU, same job (default: measured and reported, never checked).")
@_set_option
def preflight(config: str, steps: int, dry_run: bool, min_baseline_ratio: Optional[float],
              overrides: tuple[str, ...]) -> None:
    """One short job per distinct layout of CONFIG, at that layout, on random tokens: TP groups on one host, exact
    checkpoint-resume, TP=k against TP=1 losses (CPU), tokens/s and MFU, and the same-job ratio to a plain-PyTorch
    GPT of identical shape. Reports: RUN/preflight/<layout>/."""
    from kislurm.cluster.preflight import distinct_layouts, run_preflight, summary_line

    cfg, cells = _load(config, overrides)
    layouts = distinct_layouts(cfg, cells)
    for layout in layouts:
        click.echo(f"{layout.name}: {layout.cells} cells, {layout.nodes} node(s) x {layout.tasks_per_node} tasks")
    if dry_run or steps < 2:
        return
    reports = run_preflight(cfg, layouts, steps, run_dir(cfg), min_baseline_ratio=min_baseline_ratio)
    for report in reports:
        click.echo(summary_line(report))
    failed = [r["layout"] for r in reports if not r["passed"]]
    if failed:
        click.echo(f"kislurm: error: preflight failed for {', '.join(failed)}; see {run_dir(cfg) / 'preflight'}",
                   err=True)
        sys.exit(1)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
def prepare(config: str, overrides: tuple[str, ...]) -> None:
    """Build everything the cells of CONFIG read (tokenizer, knowledge bases, probes, streams) and check every cell's
    blend. Cells never build shared data: they read what this published."""
    from tqdm import tqdm

    from kislurm.data.prepare import prepare_run

    cfg, cells = _load(config, overrides)
    with tqdm(total=len(cells), desc="prepare", unit="cell") as bar:
        summary = prepare_run(cfg, cells, progress=bar.update)
    built = summary["built"]
    click.echo(f"{summary['data']}: {summary['cells']} cells, {summary['streams']} knowledge streams; "
               f"{len(built)} published now ({summary['bytes_written'] / 1e6:.1f} MB) in {summary['seconds']:.1f} s"
               + (": " + ", ".join(built) if built else " (everything was already prepared)"))


def _int_list(ctx: Any, param: Any, value: Optional[str]) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers, e.g. 1,10,100") from None


def shard_cluster_options(command: Any) -> Any:
    """--cluster/--partition/--cpus/--time of the shard-parallel commands (census, corpus): with --cluster slurm the
    map over shards is a submitit array (kislurm.data.sources.slurm_shard_executor)."""
    options = [
        click.option("--cluster", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                     help="slurm: one array task per unfinished shard (submitit)."),
        click.option("--partition", help="Slurm partition (with --cluster slurm)."),
        click.option("--cpus", type=click.IntRange(min=1), default=2, show_default=True, help="CPUs per Slurm task."),
        click.option("--time", "time_min", type=click.IntRange(min=1), default=60, show_default=True,
                     help="Minutes per Slurm task."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--facts", "facts", required=True, type=click.Path(dir_okay=False),
              help="General facts: triplet JSONL (optional subject_aliases / object_aliases lists).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Census folder (created if missing).")
@click.option("--knowledge", type=click.Path(dir_okay=False), help="Knowledge facts to check for contamination.")
@click.option("--json-key", default="text", show_default=True, help="The JSONL/parquet field holding the text.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Local processes.")
@click.option("--shard-mb", type=click.IntRange(min=1), default=256, show_default=True,
              help="Shard size of uncompressed JSONL / parquet (MB).")
@click.option("--select", "select", type=click.IntRange(min=1), default=None,
              help="Write general_probes.jsonl: the facts with docs_both >= K that are not nested.")
@click.option("--bands", callback=_int_list, default=None, help="Band edges of docs_both for --select, e.g. 1,10,100.")
@click.option("--per-band", type=click.IntRange(min=1), default=None, help="At most N probes per band (seeded).")
@shard_cluster_options
def census(inputs: tuple[str, ...], facts: str, out: str, knowledge: Optional[str], json_key: str, workers: int,
           shard_mb: int, select: Optional[int], bands: tuple[int, ...], per_band: Optional[int], cluster: str,
           partition: Optional[str], cpus: int, time_min: int) -> None:
    """Count in how many documents of INPUT... (paths or globs: JSONL, .gz, .zst, parquet, text) each fact's subject,
    object and both occur (exact string, no letter or digit beside it, every occurrence, aliases). Writes
    OUT/census.jsonl; resumable: a rerun reuses the shards already counted (docs/census.md)."""
    from kislurm.data.census import Selection, run_census
    from kislurm.data.sources import slurm_shard_executor

    if (bands or per_band) and select is None:
        raise click.UsageError("--bands/--per-band need --select K")
    selection = Selection(select, bands, per_band) if select is not None else None
    executor = slurm_shard_executor(Path(out) / "submitit", partition, cpus, time_min) if cluster == "slurm" else None
    s = run_census(inputs, facts, out, knowledge, json_key, workers, shard_mb << 20, selection, executor=executor)
    line = (f"{out}: {s['documents']} documents in {s['shards']} shards; {s['facts_cooccurring']} of {s['facts']} "
            f"facts co-occur in at least one document ({s['facts_nested']} nested)")
    if "contaminated" in s:
        line += (f"; {s['contaminated']} of {s['knowledge']} knowledge facts contaminated "
                 f"({s['knowledge_cooccurring']} co-occur, {s['knowledge_sharing_a_pair']} share a pair)")
    if "selected" in s:
        line += f"; {s['selected']} general probes selected {s['selected_per_band']}"
    click.echo(line)


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", "out_prefix", required=True, metavar="PREFIX", help="Writes PREFIX.bin and PREFIX.idx.")
@click.option("--tokenizer", type=click.Path(dir_okay=False), help="A tokenizers JSON file (default: train a BPE on "
              "a sample of the corpus, saved as PREFIX.tokenizer.json).")
@click.option("--eod", metavar="TOKEN", help="End-of-document token (default: the first of <|endoftext|>, </s>, "
              "<|end_of_text|> the tokenizer holds).")
@click.option("--json-key", default="text", show_default=True, help="The key (or parquet column) holding the text.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes (each encode_batch already uses every core).")
@click.option("--vocab-size", type=click.IntRange(min=300), default=32000, show_default=True,
              help="Vocabulary of the trained tokenizer (without --tokenizer).")
@click.option("--shard-mb", type=click.IntRange(min=1), default=64, show_default=True,
              help="Byte range per shard of an uncompressed JSONL file.")
@click.option("--keep-shards", is_flag=True, help="Keep PREFIX.shards/ (the per-shard datasets) after the merge.")
@shard_cluster_options
def corpus(inputs: tuple[str, ...], out_prefix: str, tokenizer: Optional[str], eod: Optional[str], json_key: str,
           workers: int, vocab_size: int, shard_mb: int, keep_shards: bool, cluster: str, partition: Optional[str],
           cpus: int, time_min: int) -> None:
    """Tokenize INPUT... (JSONL, .jsonl.gz, .jsonl.zst, parquet, .txt; paths or quoted globs) into one megatron-core
    indexed dataset PREFIX.bin/.idx, end-of-document after every document, as Megatron-LM's preprocess_data.py
    --append-eod. Sharded and resumable: run the same command again after a kill or a time limit."""
    from kislurm.data.corpus import build_corpus
    from kislurm.data.sources import slurm_shard_executor

    executor = slurm_shard_executor(Path(f"{out_prefix}.shards") / "submitit", partition, cpus, time_min) \
        if cluster == "slurm" else None
    report = build_corpus(inputs, out_prefix, tokenizer=tokenizer, eod=eod, json_key=json_key, workers=workers,
                          executor=executor, shard_bytes=shard_mb << 20, vocab_size=vocab_size,
                          keep_shards=keep_shards)
    click.echo(report.line())


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cell, for scripts.")
def status(run: str, as_json: bool) -> None:
    """One row per cell of RUN: state, step, last retention (sacct polled once for all cells)."""
    from kislurm.cluster.status import preparation_state, run_status

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
    prep = preparation_state(RunPaths(Path(run)))
    if prep:
        click.echo(f"preparation job {prep.get('job')}: {prep.get('state')}"
                   + (f": {prep['error']}" if prep.get("error") else ""))
    for r in rows:  # what a failed cell said, and why a cell was resubmitted
        for key in ("error", "note"):
            if r.get(key):
                click.echo(f"{r['cell']}: {key}: {r[key]}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    click.echo(f"\n{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of the exports (one per cell id).")
@click.option("--cells", "cells", metavar="GLOB", help="Only the cells whose folder name or id matches (then each "
              "must be done with kept weights).")
@click.option("--in-process", is_flag=True, help="Export in this process even when the run's executor is Slurm "
              "(default there: one CPU array task per cell).")
def export(run: str, out: str, cells: Optional[str], in_process: bool) -> None:
    """Every DONE cell of RUN with kept weights as a HuggingFace folder OUT/<cell_id> (docs/huggingface.md)."""
    from kislurm.cluster.export import export_run

    written = export_run(Path(run), Path(out), cells, log=click.echo, in_process=in_process)
    click.echo(f"{len(written)} cell(s) exported to {Path(out).resolve()}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default: RUN/reports).")
@click.option("--config", type=click.Path(dir_okay=False), help="Analysis settings (default: the run's config).")
def aggregate(runs: tuple[str, ...], out: Optional[str], config: Optional[str]) -> None:
    """Read every retention store under RUNS, find each size's collapse point and fit the scaling law."""
    from kislurm.analysis.aggregate import aggregate_runs

    result = aggregate_runs([Path(r) for r in runs], out=Path(out) if out else None,
                            config=Path(config) if config else None, echo=click.echo)
    click.echo(result.table_markdown)
    click.echo(result.law_text)
    if getattr(result, "bands", None):   # a result cached before bands existed has none
        click.echo(f"retention by frequency band: {result.out / 'bands.md'}")
    if getattr(result, "heldout", None):
        click.echo(f"held-out general loss against ratio: {result.out / 'heldout.md'}")
    click.echo(f"reports written to {result.out}")


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--tasks", required=True, metavar="TASKS",
              help="Comma-separated lm-eval tasks: names (arc_easy, piqa...), task YAML paths, or kislurm_probes.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Documents per task (default: all).")
def downstream(run: str, tasks: str, limit: Optional[int]) -> None:
    """Score every finished cell's final weights on lm-eval TASKS through kislurm's scorer (needs kislurm[eval]):
    one Slurm array task per cell when the run's executor is Slurm, else one after another here. Results go to each
    cell's downstream.json; tasks already scored with this lm-eval version are skipped."""
    from kislurm.cluster.downstream_job import score_run

    paths = RunPaths(Path(run))
    if not paths.config.is_file():
        raise ConfigError(f"{run}: not a run folder (no config.yaml); fix: pass runs/NAME of a submitted run")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    done, waiting = score_run(paths, names, limit, log=click.echo)
    click.echo(f"{len(done)} cells scored or up to date" + (f"; {len(waiting)} not finished yet (skipped): "
                                                          + ", ".join(waiting) if waiting else ""))


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
    from kislurm.analysis.aggregate import fit_measurements_csv

    named = {}
    for t in targets:
        name, sep, value = t.partition("=")
        if not sep:
            raise ConfigError(f"--target {t!r}: expected NAME=PARAMS, e.g. 7B=6.5e9")
        named[name] = float(value)
    result = fit_measurements_csv(Path(csv), Path(out), unit=unit, targets=named)
    click.echo(result.table_markdown)
    click.echo(result.law_text)
    if getattr(result, "bands", None):   # a result cached before bands existed has none
        click.echo(f"retention by frequency band: {result.out / 'bands.md'}")
    click.echo(f"reports written to {result.out}")


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--size", required=True, help="The validation size (listed under analysis.validate_sizes).")
@click.option("--points", type=int, default=5, show_default=True, help="Ratios to train (>= 4).")
@click.option("--dry-run", is_flag=True, help="Show the cells and their estimated GPU-hours; submit nothing.")
def validate(run: str, size: str, points: int, dry_run: bool) -> None:
    """Train a held-out SIZE of RUN at ratios placed around the law's predicted r* (spaced in log-odds, widened so
    the collapse is bracketed), submitted as `kislurm submit` does; aggregate afterwards for the comparison."""
    from kislurm.orchestrate.validation import plan_validation, submit_validation, validation_cost

    cfg, vp = plan_validation(RunPaths(Path(run)), size, points)
    p = vp.prediction
    click.echo(f"{size} (N={vp.params:.3g}): predicted r* {p.r_star:.3g} [{p.r_lo:.3g}, {p.r_hi:.3g}], width "
               f"{p.width if p.width is not None else float('nan'):.3g}; "
               f"ratios {', '.join(f'{r:g}' for r in vp.ratios)}")
    if dry_run:
        cost = validation_cost(cfg, vp)
        for c, hours in cost.cells:
            click.echo(f"  {c.name}  steps {c.steps}  {_hours(hours)}")
        click.echo(f"{len(vp.cells)} cells, {_hours(cost.hours)}; a full sweep of {size} on the grid: "
                   f"{cost.sweep_cells} cells, {_hours(cost.sweep_hours)} (at {_pricing(cfg)})")
        return
    submit_validation(cfg, vp, echo=click.echo)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
def pilot(config: str, overrides: tuple[str, ...]) -> None:
    """Before the grid: train the smallest size of CONFIG at the lowest and the highest ratio, and refuse the grid
    (one line, exit 2) unless retention at the low ratio sits well above chance and the high ratio loses it."""
    from kislurm.analysis.pilot import judge
    from kislurm.orchestrate.validation import run_pilot

    cfg, _ = _load(config, overrides)
    cells, result = run_pilot(cfg, echo=click.echo)
    if result is None:
        click.echo(f"pilot: {', '.join(c.name for c in cells)} not finished yet; run `kislurm pilot {config}` again "
                   "when they are done")
        return
    click.echo(judge(result))


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), default=str(DEMO_CONFIG), show_default=True)
@_set_option
@click.option("--validate", "validate_size", metavar="SIZE",
              help="Then train SIZE (a larger preset, e.g. cpu-xl), never fitted, at 5 ratios placed around the "
                   "law's prediction, and report predicted against observed.")
@click.option("--controls", is_flag=True,
              help="Run configs/demo-controls.yaml instead: the demo's world under infusion, fixed_general, dilution "
                   "and staged (issue 17), on a reduced ratio grid (about 80 cells).")
def demo(config: str, overrides: tuple[str, ...], validate_size: Optional[str], controls: bool = False) -> None:
    """Run the embedded default end to end on this machine (CPU, gloo, tiny models, submitit's local executor):
    train every cell, then aggregate. Interrupt with Ctrl-C and run again: finished cells are not re-run."""
    from kislurm.orchestrate.validation import run_demo

    if controls:
        config = str(shipped_config("demo-controls.yaml"))
    if validate_size:  # held out of the fit from the start; the analysis settings change no cell id
        overrides = (*overrides, f"analysis.validate_sizes=[{validate_size}]")
    cfg, cells = _load(config, overrides)
    t0 = time.time()
    result = run_demo(cfg, cells, validate_size, echo=click.echo)
    click.echo(result.table_markdown)
    click.echo(result.law_text)
    click.echo(f"reports written to {result.out}  (total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
