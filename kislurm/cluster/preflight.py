"""Preflight: one short job per distinct layout of a grid, at that exact layout, before the allocation is spent.

A grid of 80 cells has a handful of layouts (architecture x TP x PP x DP x device); each gets a job of a few
minutes on the real cluster, on random tokens, that checks what no single-GPU machine can:

- tp_groups_on_one_host: every TP group's ranks report the same host name (TP all-reduces every layer; across
  nodes it would crawl). A layout whose TP group must span nodes is refused before anything is submitted;
- resume_exact: train N steps; train N/2, checkpoint, drop the trainer, resume in a new one and finish: the
  losses must equal the uninterrupted ones (sharded checkpoints across the layout's ranks; on a GPU both runs use
  torch's deterministic math attention, see _resume_check; Transformer Engine's attention is not covered by that);
- tp_matches_tp1: where the layout has TP > 1, the same job re-forms its ranks as TP=1 x DP=world and trains the
  same N steps from the same seed: the losses must agree within a tolerance. CPU presets initialise weights the
  same way at every TP (kislurm.train.model); GPU presets initialise from per-TP-rank streams, so there the check is
  skipped and says so;
- throughput: tokens/s and (on GPU) MFU at the layout;
- baseline (a measurement, not a check): after the megatron steps, rank 0 alone trains the plain-PyTorch GPT of
  identical shape (kislurm.train.baseline) for the same steps on one device at TP=1, on one DP rank's share of each
  global batch, while the other ranks wait. The report holds both throughputs per GPU (megatron's: the job's
  tokens/s over its world size, so TP and DP communication count against it), their ratio megatron / plain and,
  on GPU, both MFUs. Where the plain model does not fit one GPU (TP chosen for memory) it is skipped and says so.
  With min_baseline_ratio (`kislurm preflight --min-baseline-ratio`; off by default) it becomes the check
  baseline_ratio. On CPU the ratio compares megatron's ranks sharing the cores with one process alone;
- dp_eval: retention evaluation split over the DP ranks (what every cell does) against every rank scoring every
  candidate, on the same weights and a random probe set: the per-probe results must be identical, and each rank's
  share is reported (skipped at DP=1: nothing to split).

Each layout writes RUN/preflight/<layout>/report.json; `kislurm preflight CONFIG` prints one line per layout.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kislurm.plan.config import DataConfig, EvalConfig, ExperimentConfig
from kislurm.plan.presets import ModelPreset, effective_train
from kislurm.plan.training import TrainConfig
from kislurm.plan.estimate import plan_vocab_size
from kislurm.plan.grid import Cell
from kislurm.paths import RunPaths
from kislurm.publish import atomic_write_text
from kislurm.cluster.executors import resources_for
from kislurm.errors import SubmitError

PREFLIGHT_TIMEOUT_MIN = 20
"""Time limit of one preflight job."""


class PreflightError(SubmitError):
    """A layout that cannot be preflighted (or run) as configured; one line naming the problem and the fix."""


@dataclass(frozen=True)
class Layout:
    """One distinct (architecture, TP, PP, DP, device) of the grid, with the cells that use it."""

    size: str
    model: ModelPreset
    cells: int
    nodes: int
    tasks_per_node: int

    @property
    def name(self) -> str:
        m = self.model
        return f"{self.size}_tp{m.tensor_parallel}_pp{m.pipeline_parallel}_dp{m.data_parallel}_{m.device}"


def _shape(model: ModelPreset) -> ModelPreset:
    return dataclasses.replace(model, timeout_min=1)  # the time limit is not part of a layout


def distinct_layouts(cfg: ExperimentConfig, cells: list[Cell]) -> list[Layout]:
    """The grid's layouts in first-seen order; refuses one whose TP group would span nodes."""
    seen: dict[ModelPreset, list[Any]] = {}
    for c in cells:
        key = _shape(c.model)
        if key not in seen:
            seen[key] = [c.size, 0]
        seen[key][1] += 1
    layouts = []
    for model, (size, n) in seen.items():
        res = resources_for(model, cfg.executor)
        layout = Layout(size, model, n, res.nodes, res.tasks_per_node)
        check_placement(layout)
        layouts.append(layout)
    return layouts


def check_placement(layout: Layout) -> None:
    """TP groups are consecutive ranks (megatron's order, TP fastest) and submitit fills nodes in rank order, so a
    TP group stays on one host exactly when it divides the tasks of a node."""
    tp = layout.model.tensor_parallel
    if layout.nodes > 1 and layout.tasks_per_node % tp:
        raise PreflightError(
            f"layout {layout.name}: a TP group of {tp} ranks would span nodes of {layout.tasks_per_node} tasks; fix: "
            f"choose tensor_parallel dividing executor.gpus_per_node ({layout.tasks_per_node}) or more GPUs per node")


class RandomTokens:
    """Seeded random token sequences in megatron GPTDataset's item format (item i depends only on i)."""

    def __init__(self, n: int, seq: int, vocab: int):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import torch

        row = torch.randint(0, self.vocab, (self.seq + 1,), generator=torch.Generator().manual_seed(i))
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def preflight_cell(layout: Layout, train: TrainConfig, steps: int) -> Cell:
    """A cell of `steps` steps at the layout, checkpointing only when told to."""
    t = dataclasses.replace(train, eval_interval=max(1, steps), log_interval=max(1, steps), checkpoint_interval=0)
    tokens = steps * t.global_batch_size * layout.model.seq_length
    return Cell(size=f"preflight-{layout.size}", ratio=0.5, tokens=tokens, seed=0, model=layout.model,
                data=DataConfig(), train=t, eval=EvalConfig())


def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")


def _train(cell: Cell, data: RandomTokens, folder: Path, vocab: int, ctx: Any,
           upto: Optional[int] = None) -> tuple[list[float], dict]:
    """Train the cell in `folder` (resuming from its checkpoint), to the end or to step `upto` then checkpoint."""
    from kislurm.train.trainer import Trainer

    trainer = Trainer(cell, data, folder, vocab, ctx, log=lambda _m: None)
    target = upto or trainer.total_steps
    if trainer.step == 0 and target > 1:
        trainer.train_steps(1)  # the first step builds buffers and kernels: kept out of the throughput
    out = trainer.train_steps(target - trainer.step)
    if upto is not None:
        trainer.save_checkpoint()
    losses = list(trainer.losses)
    del trainer
    _free()
    return losses, out


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _hosts_of_tp_groups() -> list[list[str]]:
    """Node names of every TP group's ranks (gathered over the whole world): the scheduler's node name, since
    several Slurm nodes may share one host name."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kislurm.cluster.cell_session import node_name

    mine = (parallel_state.get_tensor_model_parallel_rank(), node_name())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return [[h for _, h in everyone[i:i + tp]] for i in range(0, len(everyone), tp)]


def preflight_job(layout: Layout, train: TrainConfig, steps: int, vocab: int, folder: str,
                  tolerance: float = 1e-5, min_baseline_ratio: Optional[float] = None) -> Optional[dict]:
    """Run in every task of the layout's job; rank 0 writes and returns the report."""
    from kislurm.train import distributed

    root = Path(folder)
    cell = preflight_cell(layout, train, steps)
    data = RandomTokens(cell.n_samples, layout.model.seq_length, vocab)
    ctx = distributed.setup(layout.model)
    checks: dict[str, dict] = {}
    try:
        groups = _hosts_of_tp_groups()
        checks["tp_groups_on_one_host"] = {"ok": all(len(set(g)) == 1 for g in groups), "hosts": groups}
        reference, speed = _train(cell, data, root / "uninterrupted", vocab, ctx)
        checks["resume_exact"] = _resume_check(cell, data, root, vocab, ctx, reference, tolerance)
        checks["tp_matches_tp1"] = _tp1_check(layout, cell, data, root, vocab, ctx, reference, tolerance)
        checks["dp_eval"] = _dp_eval_check(cell, vocab, ctx)
        baseline = _baseline(layout, cell, data, vocab, ctx, speed)
        if min_baseline_ratio is not None:
            checks["baseline_ratio"] = baseline_ratio_check(baseline, min_baseline_ratio)
        report = {"layout": layout.name, "size": layout.size, "tp": layout.model.tensor_parallel,
                  "dp": layout.model.data_parallel, "world": ctx.world_size, "nodes": layout.nodes,
                  "steps": steps, "losses": reference, "tokens_per_s": speed.get("tokens_per_s"),
                  "mfu": speed.get("mfu"), "baseline": baseline, "checks": checks,
                  "passed": all(c["ok"] for c in checks.values() if c["ok"] is not None)}
        if ctx.is_main:
            atomic_write_text(root / "report.json", json.dumps(report, indent=1))
            return report
        return None
    finally:
        distributed.teardown(ctx)


def _resume_check(cell: Cell, data: RandomTokens, root: Path, vocab: int, ctx: Any, reference: list[float],
                  tolerance: float) -> dict:
    """Train to half way, checkpoint, drop the trainer, resume in a new one: the losses of the uninterrupted run.

    On a GPU the fused attention kernels' backward passes are not bitwise reproducible from run to run, so both
    runs compared there use torch's math kernel (as tests/test_gpu.py does) at micro batch 1, where its score
    matrices fit; the micro batch changes only the summation order of the same global-batch mean.
    """
    import contextlib

    steps = cell.steps
    half = max(1, steps // 2)
    guard: Any = contextlib.nullcontext()
    if ctx.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        guard = sdpa_kernel(SDPBackend.MATH)
        cell = dataclasses.replace(cell, train=dataclasses.replace(cell.train, micro_batch_size=1))
    with guard:
        if ctx.device.type == "cuda":
            reference, _ = _train(cell, data, root / "uninterrupted-math", vocab, ctx)
        _train(cell, data, root / "resumed", vocab, ctx, upto=half)
        resumed, _ = _train(cell, data, root / "resumed", vocab, ctx)
    diff = _max_diff(resumed, reference)
    return {"ok": diff <= tolerance, "max_abs_diff": diff, "saved_at": half}


def _tp1_check(layout: Layout, cell: Cell, data: RandomTokens, root: Path, vocab: int, ctx: Any,
               reference: list[float], tolerance: float) -> dict:
    """The same steps re-formed as TP=1 x DP=world over the job's ranks (only where that comparison means
    something: TP > 1, CPU initialisation, a global batch that splits over world ranks)."""
    from kislurm.train import distributed

    m, t = layout.model, cell.train
    if m.tensor_parallel == 1:
        return {"ok": None, "skipped": "the layout is TP=1"}
    if m.device == "gpu":
        return {"ok": None, "skipped": "GPU presets initialise weights per TP rank, so TP=k and TP=1 differ at step 0"}
    world = ctx.world_size
    if t.global_batch_size % world:
        return {"ok": None, "skipped": f"global batch {t.global_batch_size} does not split over {world} DP ranks"}
    flat = dataclasses.replace(m, tensor_parallel=1, data_parallel=world)
    # the micro batch changes only the summation order: the loss is the mean over the global batch
    micro = math.gcd(t.micro_batch_size, t.global_batch_size // world)
    flat_cell = dataclasses.replace(cell, model=flat, train=dataclasses.replace(t, micro_batch_size=micro))
    flat_ctx = distributed.init_model_parallel(tp=1, pp=1, device=m.device, expected_world=world)
    tp1, _ = _train(flat_cell, data, root / "tp1", vocab, flat_ctx)
    distributed.init_model_parallel(tp=m.tensor_parallel, pp=m.pipeline_parallel, device=m.device)  # as it was
    diff = _max_diff(tp1, reference)
    return {"ok": diff <= tolerance, "max_abs_diff": diff}


def _dp_eval_check(cell: Cell, vocab: int, ctx: Any, n_probes: int = 64, n_choices: int = 4) -> dict:
    """Sharded evaluation equals unsharded on this layout: the same model (seeded like the cell), random probes in
    enough batches that every DP rank scores some; every rank gets the same answer (the results are all-reduced)."""
    import numpy as np

    from kislurm.train.distributed import seed_all
    from kislurm.retention.evaluate import evaluate_retention, score_candidates, strictly_best
    from kislurm.data.knowledge import ProbeSet
    from kislurm.train.model import build_model, resolve_precision

    if ctx.dp == 1:
        return {"ok": None, "skipped": "data_parallel 1: nothing to split"}
    seed_all(cell.seed)
    model = build_model(cell.model, vocab, cell.train.init_std, resolve_precision(cell.model, cell.train.precision))
    rng = np.random.default_rng(cell.seed)
    width = max(2, min(8, cell.model.seq_length // 4))
    probes = ProbeSet(
        fact_ids=[f"preflight:{i}:rel" for i in range(n_probes)],
        fact_group=(np.arange(n_probes) % 2).astype(np.int8), fact_index=np.arange(n_probes, dtype=np.int64),
        heldout=np.zeros(n_probes, dtype=bool),
        prompt=[rng.integers(0, vocab, rng.integers(1, width + 1)).astype(np.int32) for _ in range(n_probes)],
        candidates=[[rng.integers(0, vocab, rng.integers(1, 4)).astype(np.int32) for _ in range(n_choices)]
                    for _ in range(n_probes)],
        answer=rng.integers(0, n_choices, n_probes).astype(np.int64), n_choices=n_choices)
    batch = max(1, n_probes * n_choices // (4 * ctx.dp))  # four batches per DP rank
    sharded = evaluate_retention(model, probes, batch)
    scores, exact = score_candidates(model, probes, batch)  # every rank scores every candidate
    same = bool(np.array_equal(sharded.probe_correct, strictly_best(scores, probes.answer))
                and np.array_equal(sharded.probe_exact, exact))
    diff = float(np.abs(sharded.scores - scores).max())
    del model
    _free()
    return {"ok": same and diff == 0.0, "max_abs_diff": diff, "candidates": n_probes * n_choices,
            "scored_on_this_rank": sharded.scored_here}


def _baseline(layout: Layout, cell: Cell, data: RandomTokens, vocab: int, ctx: Any, speed: dict) -> dict:
    """Rank 0 times the plain-PyTorch GPT of the same shape on one device (see the module docstring); every
    rank gets the same answer (broadcast), so the report and the barrier agree."""
    import torch
    import torch.distributed as dist

    from kislurm.train.baseline import plain_tokens_per_s
    from kislurm.train.model import padded_vocab_size

    m, t = layout.model, cell.train
    share = t.global_batch_size // m.data_parallel  # samples one DP rank trains per step
    result: list[Any] = [None]
    if ctx.is_main:
        try:
            plain = plain_tokens_per_s(m, t, data, padded_vocab_size(vocab), max(1, cell.steps - 1), share,
                                       ctx.device, warmup=1 if cell.steps > 1 else 0)
            result = [{"tokens_per_s": plain}]
        except torch.cuda.OutOfMemoryError:
            result = [{"skipped": f"the plain model does not fit one GPU at micro batch {t.micro_batch_size}"}]
        except Exception as e:  # noqa: BLE001 - a broken baseline is reported, never hangs the other ranks
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result = [{"skipped": f"the plain model failed: {type(e).__name__} {first}".strip()}]
        _free()
    dist.broadcast_object_list(result, src=0)
    out: dict[str, Any] = {"device": "rank 0, TP=1", "samples_per_step": share,
                           "megatron_tokens_per_s_per_rank": speed.get("tokens_per_s", 0.0) / ctx.world_size,
                           **result[0]}
    if "tokens_per_s" in out:
        out["ratio"] = out["megatron_tokens_per_s_per_rank"] / out["tokens_per_s"]
        mfu = speed.get("mfu")  # megatron's per-GPU MFU; the plain model counts the same FLOPs per token
        out["mfu"] = mfu / out["ratio"] if mfu is not None and out["ratio"] > 0 else None
    return out


def baseline_ratio_check(baseline: dict, minimum: float) -> dict:
    """The optional check: megatron's per-GPU throughput at least `minimum` x the plain model's."""
    if "ratio" not in baseline:
        return {"ok": None, "skipped": baseline.get("skipped", "no baseline"), "minimum": minimum}
    return {"ok": baseline["ratio"] >= minimum, "ratio": baseline["ratio"], "minimum": minimum}


def run_preflight(cfg: ExperimentConfig, layouts: list[Layout], steps: int, folder: Path,
                  min_baseline_ratio: Optional[float] = None) -> list[dict]:
    """Submit one job per layout (local executor or Slurm, as the config says), wait, return the reports."""
    from kislurm.cluster.executors import make_executor

    vocab = plan_vocab_size(cfg.data)
    run = RunPaths(folder)
    jobs = []
    for layout in layouts:
        res = dataclasses.replace(resources_for(layout.model, cfg.executor),
                                  timeout_min=PREFLIGHT_TIMEOUT_MIN)
        executor = make_executor(cfg, run, res)
        out = run.preflight(layout.name)
        out.mkdir(parents=True, exist_ok=True)
        train = effective_train(cfg.train, layout.model)  # with the size's own overrides
        jobs.append((layout, executor.submit(preflight_job, layout, train, steps, vocab, str(out),
                                             min_baseline_ratio=min_baseline_ratio)))
    reports = []
    for layout, job in jobs:
        try:
            reports.append(next(r for r in job.results() if r is not None))
        except Exception as e:  # noqa: BLE001 - a crashed job is a failed preflight, reported in one line
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            reports.append({"layout": layout.name, "passed": False, "error": last, "checks": {}})
    return reports


def summary_line(report: dict) -> str:
    """One line per layout: pass/fail, each check, throughput."""
    if "error" in report:
        return f"{report['layout']}: FAILED (job error: {report['error']})"
    parts = []
    for name, c in report["checks"].items():
        state = "skipped" if c["ok"] is None else ("ok" if c["ok"] else "FAILED")
        extra = f" ({c['max_abs_diff']:.2e})" if "max_abs_diff" in c else ""
        parts.append(f"{name} {state}{extra}")
    speed = f"{report['tokens_per_s']:,.0f} tokens/s" if report.get("tokens_per_s") else ""
    mfu = f", MFU {report['mfu']:.1%}" if report.get("mfu") else ""
    base = report.get("baseline") or {}
    if "ratio" in base:
        plain = (f"; plain PyTorch {base['tokens_per_s']:,.0f} tokens/s on one device, ratio {base['ratio']:.2f} "
                 "(megatron per rank / plain)")
    else:
        plain = f"; plain PyTorch skipped ({base['skipped']})" if "skipped" in base else ""
    return (f"{report['layout']}: {'passed' if report['passed'] else 'FAILED'}; {'; '.join(parts)}; "
            f"{speed}{mfu}{plain}")


def passed_report(folder: Path, layout: Layout) -> Optional[dict]:
    """The layout's preflight report in the run folder, if it exists and passed."""
    try:
        report = json.loads(RunPaths(folder).preflight_report(layout.name).read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("passed") else None


def ensure_preflights(cfg: ExperimentConfig, cells: list[Cell], steps: int = 20) -> list[dict]:
    """`kislurm submit --after-preflight`: every distinct layout of `cells` must have a passing preflight report;
    layouts without one are preflighted now (waiting for their jobs). Raises PreflightError naming the layouts
    that failed, so nothing is submitted on a layout that did not pass."""
    from kislurm.plan.grid import run_dir

    folder = run_dir(cfg)
    layouts = distinct_layouts(cfg, cells)
    missing = [layout for layout in layouts if passed_report(folder, layout) is None]
    reports = run_preflight(cfg, missing, steps, folder) if missing else []
    failed = [r["layout"] for r in reports if not r["passed"]]
    if failed:
        raise PreflightError(f"preflight failed for {', '.join(failed)} (reports in {folder / 'preflight'}); fix: "
                             "read the failed checks, change the layout, then submit again")
    return reports

