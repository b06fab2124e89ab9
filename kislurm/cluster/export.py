"""`kislurm export RUN --out DIR`: every DONE cell's kept weights as a HuggingFace folder.

    DIR/<cell_id>/config.json, model.safetensors, generation_config.json   (LlamaForCausalLM or GPT2LMHeadModel)
    DIR/<cell_id>/tokenizer.json, tokenizer_config.json, ...                (PreTrainedTokenizerFast: eos = kislurm's
                                                                             end-of-document token, len = the vocab)
    DIR/<cell_id>/kislurm.json                                              cell id, size, ratio, control, seed, the
                                                                             store's last metrics, the source checkpoint

The weights are the cell's CKPT/final (train.keep_final: weights) or its newest full checkpoint (keep_final: full),
loaded into a one-process TP=1 fp32 CPU model through megatron-core's distributed checkpointing, which reshards a
checkpoint written at any TP degree; kislurm.plan.hf maps that model to transformers. Each folder is written under a
temporary name and renamed into place, so DIR never holds half an export. Every selected cell is checked before the
first one is written: a refusal leaves DIR as it was.

Locally the cells are exported in this process, one after another; on Slurm (`--slurm`) as one CPU array task per cell
through submitit.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kislurm.errors import KislurmError
from kislurm.paths import CellPaths, RunPaths
from kislurm.publish import atomic_write_json, publish, temp_name
from kislurm.cluster.status import recorded_cell

META = "kislurm.json"


class ExportError(KislurmError, ValueError):
    """A cell that cannot be exported as asked; one line naming the cell, the problem and the fix."""


@dataclass(frozen=True)
class ExportJob:
    """One cell to export: where its weights are and where its folder goes."""

    run: Path
    cell: str
    cell_id: str
    weights: Path
    out: Path


def _weights_of(cp: CellPaths, name: str, keep_final: str) -> Path:
    """The cell's kept weights: CKPT/final, else its newest full checkpoint; ExportError when it kept none."""
    from kislurm.train import checkpoint

    final = cp.checkpoints / checkpoint.FINAL_DIR
    if (final / checkpoint.META_FILE).is_file():
        return final
    latest = checkpoint.find_latest(cp.checkpoints)
    if latest is not None:
        return latest.path
    raise ExportError(f"cell {name} kept no weights (train.keep_final: {keep_final}); fix: train it again with "
                      "train.keep_final: weights (delete its folder and resubmit), or leave it out with --cells")


def _check_destination(out: Path, cell_id: str, run: Path) -> None:
    """DIR/<cell_id> may be new or an earlier export of the same cell of the same run (replaced); nothing else."""
    if (out / META).is_file() and (out / "config.json").is_file():
        other = json.loads((out / META).read_text()).get("cell_id")
        raise ExportError(f"{out} is itself the export of cell {other}; fix: pass a folder for many cells "
                          "(its parent, or a new one) as --out")
    target = out / cell_id
    if not target.exists():
        return
    meta = target / META
    try:
        held = json.loads(meta.read_text())
    except (OSError, ValueError):
        held = None
    if held is None or held.get("cell_id") != cell_id or held.get("run") != str(run):
        who = "something that is not a kislurm export" if held is None else \
            f"cell {held.get('cell_id')} of run {held.get('run')}"
        raise ExportError(f"{target} already holds {who}; fix: choose another --out folder, or remove {target}")


def plan_export(run_root: Path, out: Path, cells: str | None = None) -> list[ExportJob]:
    """The cells to export, every one checked (done, weights kept, destination free) before anything is written.

    Without `cells` every DONE cell with kept weights is exported and the others are skipped; a --cells GLOB
    (fnmatch over cell folder names or ids) makes each matched cell required: one not done, or without weights,
    is refused.
    """
    from kislurm.cluster.status import run_status

    run = RunPaths(Path(run_root).resolve())
    out = Path(out).resolve()
    if not run.config.is_file():
        raise ExportError(f"{run.root}: not a run folder (no config.yaml); fix: pass the folder `kislurm submit` "
                          "created (output_root/name)")
    names = run.cell_names()
    if cells is not None:
        names = [n for n in names if fnmatch.fnmatch(n, cells) or fnmatch.fnmatch(n.rsplit("_", 1)[-1], cells)]
        if not names:
            raise ExportError(f"--cells {cells!r} matches no cell of {run.root}; fix: see `kislurm status "
                              f"{run.root}` for the cell names")
    jobs: list[ExportJob] = []
    for row in run_status(run, names):
        name = row["cell"]
        if row["state"] != "done":
            if cells is None:
                continue
            raise ExportError(f"cell {name} is {row['state']}, not done; fix: wait until `kislurm status {run.root}` "
                              "shows it done, or leave it out with --cells")
        cell = recorded_cell(run, name)
        try:
            weights = _weights_of(run.cell(name), name, cell.train.keep_final)
        except ExportError:
            if cells is None:
                continue
            raise
        _check_destination(out, cell.cell_id, run.root)
        jobs.append(ExportJob(run=run.root, cell=name, cell_id=cell.cell_id, weights=weights, out=out))
    if not jobs:
        raise ExportError(f"{run.root}: no cell is done with kept weights (train.keep_final: weights or full); "
                          "fix: wait for the cells (`kislurm status`), or rerun them with train.keep_final: weights")
    return jobs


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def cell_record(run: RunPaths, cell: Any, weights: Path, step: int, kind: str) -> dict[str, Any]:
    """kislurm.json of an export: the cell's coordinates and the store's last metrics."""
    from kislurm.retention.store import read_cell

    rec = read_cell(run.cell(cell.name).store, matrix=False)
    last = {k: float(v[-1]) for k, v in rec.metrics.items()} if len(rec.step) else {}
    return {"cell_id": cell.cell_id, "name": cell.name, "run": str(run.root), "size": cell.size, "ratio": cell.ratio,
            "control": cell.control, "seed": cell.seed, "tokens": cell.tokens, "family": kind,
            "checkpoint": str(weights), "checkpoint_step": step,
            "store_step": int(rec.step[-1]) if len(rec.step) else None, "metrics": _finite(last),
            "model": json.loads(json.dumps(cell.to_json()["model"]))}


def export_cell(job: ExportJob, log: Callable[[str], None] = print) -> Path:
    """Write DIR/<cell_id> for one cell (in this process: it sets up, then tears down, a one-process TP=1 group)."""
    from kislurm.data.prepare import load_prepared
    from kislurm.plan import hf

    transformers = hf.require_hf()
    run = RunPaths(job.run)
    cell = recorded_cell(run, job.cell)
    prepared = load_prepared(cell.data, run.data, cell.model.seq_length)
    preset = hf.on_cpu_tp1(cell.model)
    model_sd, meta = megatron_weights(preset, prepared.tokenizer.vocab_size, job.weights)
    tok = prepared.tokenizer
    model = hf.hf_model(preset, model_sd, tok.vocab_size, tok.eod, tok.pad)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.tok, eos_token=tok.tok.id_to_token(tok.eod), bos_token=tok.tok.id_to_token(tok.eod),
        pad_token=tok.tok.id_to_token(tok.pad), model_max_length=cell.model.seq_length)
    if len(fast) != tok.vocab_size:
        raise ExportError(f"cell {cell.name}: the HF tokenizer has {len(fast)} tokens, kislurm's {tok.vocab_size}; "
                          "fix: a bug in the export of this tokenizer")
    final = job.out / job.cell_id
    tmp = temp_name(final)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        atomic_write_json(tmp / META, cell_record(run, cell, job.weights, int(meta.get("step", -1)),
                                                  hf.family(preset)))
        _shared(tmp)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {cell.name} -> {final} ({type(model).__name__}, step {meta.get('step')})")
    return final


def _shared(folder: Path) -> None:
    """Files readable as the run's files are (0666 less the umask): transformers writes its weights 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_folder(tmp: Path, final: Path) -> None:
    """Publish `tmp` as `final`; an earlier export of the same cell is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = temp_name(final)
        final.rename(old)
    publish(tmp, final, replace=False)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def megatron_weights(preset: Any, vocab_size: int, weights: Path) -> tuple[dict[str, Any], dict]:
    """The TP=1 state dict of a kept checkpoint (any TP degree: dist_checkpointing reshards) and its kislurm.json;
    in this process, inside its own one-process megatron group unless one is already set up at TP=1."""
    from megatron.core import parallel_state

    from kislurm.train import checkpoint, distributed
    from kislurm.train.model import build_model

    owned = not parallel_state.model_parallel_is_initialized()
    if owned:
        distributed.init_model_parallel(1, 1, "cpu")
    elif parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ExportError("export needs a TP=1 process; fix: run it outside a tensor-parallel job")
    try:
        model = build_model(preset, vocab_size, 0.02, "fp32")
        with warnings.catch_warnings():  # torch.distributed.checkpoint's deprecation notices, under megatron
            warnings.simplefilter("ignore", FutureWarning)
            meta = checkpoint.load_weights(weights, model)
        return {k: v for k, v in model.state_dict().items()}, meta
    finally:
        if owned:
            distributed.teardown()


def export_run(run_root: Path, out: Path, cells: str | None = None, log: Callable[[str], None] = print,
               in_process: bool = False) -> list[Path]:
    """Export every selected cell (checked first, all of them); returns the folders written. A run whose executor
    is Slurm exports as one CPU array task per cell (waited for), unless `in_process`; other runs in this process."""
    from kislurm.plan import hf
    from kislurm.plan.loader import load_config

    hf.require_hf()
    jobs = plan_export(run_root, out, cells)
    cfg = load_config(RunPaths(jobs[0].run).config)
    if cfg.executor.cluster == "slurm" and not in_process:
        return export_on_slurm(cfg, jobs, log)
    return [export_cell(job, log) for job in jobs]


def export_on_slurm(cfg: Any, jobs: list[ExportJob], log: Callable[[str], None] = print) -> list[Path]:
    """One CPU array task per cell (the preparation job's resources: partition, CPUs, time, setup lines)."""
    from kislurm.cluster.arrays import cpu_task_parameters, run_array, slurm_executor

    executor = slurm_executor(RunPaths(jobs[0].run).submitit / "export", cpu_task_parameters(cfg, "export"),
                              cfg.executor.array_parallelism)
    written, failures = run_array(executor, export_cell, [(job.cell, (job,)) for job in jobs], "export", log)
    if failures:
        raise ExportError("; ".join(f.line("export") for f in failures)
                          + "; fix: run `kislurm export` again (done cells are replaced)")
    return written
