"""Benchmark a cell's data preparation at paper scale against megatron-core's own index cost, measured in the same run.

    python tools/bench_prepare.py [--budgets 1e9 1e10 1e11] [--ratios 0.3 0.9] [--json out.json]

One synthetic run (2,000 entities x 3 relations per base: 6,000 facts per stream), seq_length 2048. For each cell
(token budget x ratio x policy), three fresh processes, each measured for wall time, peak RSS (the process's
ru_maxrss, Python, torch and megatron imports included) and bytes written:
  prep:     data.prepare (loads the shared base) + data.knowledge_stream (builds the cell's stream): what `kislurm
            submit` does on the submitting machine before anything is queued;
  cell:     data.cell_dataset: megatron's blend and GPT indices for the cell plus kislurm's exposure count from
            them (what a cell job does before training);
  megatron: megatron-core alone: BlendedMegatronDatasetBuilder over GPTDataset on the same two prefixes with the
            same weights and sample count, into a fresh cache: the floor every cell pays whatever kislurm does.
Times in the table are the phase's own (process start and imports excluded; megatron: its build call alone); the
totals for the largest cells are wall times of the processes.
fixed_exposures uses, per cell, the exposures (a multiple of the pass units) at which about 90% of the base fits, so
every cell infuses about the same facts (otherwise a 6,000-fact base cannot fill a 100B-token cell at any r).
The base itself (tokenizer, bases, probes, general stream) is built once for the run and reported on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ = 2048


def _data(policy: str = "fixed_facts", exposures: int = 100):
    from kislurm.plan.config import DataConfig, KnowledgeBaseSpec
    return DataConfig(general=KnowledgeBaseSpec(2000, 3, 60), knowledge=KnowledgeBaseSpec(2000, 3, 60),
                      policy=policy, exposures_per_fact=exposures)


def _cell(data, ratio: float, tokens: int):
    from kislurm.plan.config import EvalConfig
    from kislurm.plan.presets import BUILTIN_PRESETS
    from kislurm.plan.training import TrainConfig
    from kislurm.plan.grid import Cell
    preset = dataclasses.replace(BUILTIN_PRESETS["cpu-xxs"], seq_length=SEQ)
    return Cell("bench", ratio, tokens, 0, preset, data, TrainConfig(), EvalConfig())


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


# ----------------------------------------------------------------------------------------------------------------------
# Phases (each runs in its own process)
# ----------------------------------------------------------------------------------------------------------------------


def phase_base(work: str) -> dict:
    from kislurm.data import prepare as D
    p = D.prepare(_data(), Path(work) / "data", SEQ)
    return {"root": str(p.root), "bytes": _bytes(Path(work) / "data")}


def phase_prep(work: str, policy: str, exposures: int, ratio: float, tokens: int) -> dict:
    from kislurm.data import prepare as D
    p = D.prepare(_data(policy, exposures), Path(work) / "data", SEQ)
    before = _bytes(p.root)
    info = D.knowledge_stream(p, _cell(p.data, ratio, tokens))
    return {"bytes": _bytes(p.root) - before, "stream": Path(info["prefix"]).parent.name, "epochs": info["epochs"],
            "units": info["units"], "facts": info["facts"], "sharing": info["neighbour_sharing"]}


def phase_cell(work: str, policy: str, exposures: int, ratio: float, tokens: int) -> dict:
    from kislurm.data import prepare as D
    p = D.prepare(_data(policy, exposures), Path(work) / "data", SEQ)
    before = _bytes(p.cache)
    _, stats = D.cell_dataset(p, _cell(p.data, ratio, tokens))
    keep = ("n_samples", "knowledge_samples", "knowledge_share_positions", "exposures_per_fact_min",
            "exposures_per_fact_max", "infused_facts", "neighbour_sharing_max", "neighbour_sharing_mean")
    return {"bytes": _bytes(p.cache) - before, **{k: stats[k] for k in keep}, "weights": stats["blend_weights"]}


def phase_megatron(work: str, policy: str, exposures: int, ratio: float, tokens: int, cache: str) -> dict:
    """megatron-core alone on the cell's two prefixes, with the weights kislurm chose, into a fresh cache."""
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from kislurm.data import prepare as D
    p = D.prepare(_data(policy, exposures), Path(work) / "data", SEQ)
    cell = _cell(p.data, ratio, tokens)
    info = D.knowledge_stream(p, cell)
    weights = D.blend_weights(cell.n_samples, info["k_docs"])
    config = GPTDatasetConfig(
        random_seed=0, sequence_length=SEQ, blend=([p.general_prefix, info["prefix"]], weights), split="1,0,0",
        path_to_cache=cache, tokenizer=p.tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=True, create_attention_mask=False, add_extra_token_to_sequence=False,
        mid_level_dataset_surplus=0.0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    t = time.perf_counter()
    BlendedMegatronDatasetBuilder(GPTDataset, [cell.n_samples, 0, 0], lambda: True, config).build()
    return {"build_s": time.perf_counter() - t, "bytes": _bytes(Path(cache))}


PHASES = {"base": phase_base, "prep": phase_prep, "cell": phase_cell, "megatron": phase_megatron}


def _child(phase: str, args: list) -> None:
    import logging
    import torch
    import torch.distributed  # noqa: F401  (imports are not preparation: every phase loads them before timing)
    from megatron.core.datasets import blended_megatron_dataset_builder, gpt_dataset, indexed_dataset  # noqa: F401
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    t = time.perf_counter()
    out = PHASES[phase](*args)
    out["seconds"] = time.perf_counter() - t     # the phase, imports excluded
    print("RESULT " + json.dumps(out))


def run_phase(phase: str, *args) -> dict:
    """Run one phase in a fresh process; its wall time, peak RSS (ru_maxrss) and the phase's own result."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", phase, json.dumps(list(args))],
                                stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)          # this child's own rusage (peak RSS)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read().strip()
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed: {errors.splitlines()[-1] if errors else proc.returncode}")
    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = wall
    res["rss_gb"] = usage.ru_maxrss / 2**20                  # ru_maxrss is in KiB on Linux
    return res


def _exposures_at(work: str, ratio: float, tokens: int) -> int:
    """fixed_exposures: the exposures (a multiple of the pass units) at which about 90% of the base fits."""
    import numpy as np

    from kislurm.data import prepare as D
    from kislurm.data.encoding import Sentences
    from kislurm.data.streams import PASS_UNITS
    p = D.prepare(_data(), Path(work) / "data", SEQ)
    s = Sentences.load(p.root / "knowledge_sentences.npz")
    k = _cell(p.data, ratio, tokens).knowledge_samples
    e = int(k * SEQ * 0.97 / (0.9 * s.n_facts * float(np.mean(s.lengths))))
    return max(PASS_UNITS, e - e % PASS_UNITS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[1e9, 1e10, 1e11])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.9])
    ap.add_argument("--policies", nargs="+", default=["fixed_facts", "fixed_exposures"])
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], json.loads(args.child[1]))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
        base = run_phase("base", work)
        print(f"cpus: {os.cpu_count()}; base (tokenizer, 2 x 6,000 facts, probes, general stream): "
              f"{base['wall_s']:.1f} s, {base['rss_gb']:.2f} GB peak, {base['bytes'] / 1e6:.1f} MB (once per run)")
        print("| tokens | r | policy | E | stream | prep s / GB / MB | cell s / GB / MB | megatron s / GB / MB | "
              "cell/megatron time, RSS, disk | share-r | exposures | sharing max/mean |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for tokens in [int(b) for b in args.budgets]:
            for ratio in args.ratios:
                for policy in args.policies:
                    e = _exposures_at(work, ratio, tokens) if policy == "fixed_exposures" else 100
                    prep = run_phase("prep", work, policy, e, ratio, tokens)
                    cell = run_phase("cell", work, policy, e, ratio, tokens)
                    cache = str(Path(work) / f"megatron-{len(rows)}")
                    mega = run_phase("megatron", work, policy, e, ratio, tokens, cache)
                    row = {"tokens": tokens, "ratio": ratio, "policy": policy, "exposures": e, "prep": prep,
                           "cell": cell, "megatron": mega}
                    rows.append(row)
                    share = cell["knowledge_share_positions"] / ratio - 1
                    print(f"| {tokens / 1e9:g}B | {ratio} | {policy} | {e if policy == 'fixed_exposures' else '-'} | "
                          f"{prep['facts']} facts x {prep['units']} units, {prep['epochs']} epochs | "
                          f"{prep['seconds']:.1f} / {prep['rss_gb']:.2f} / {prep['bytes'] / 1e6:.1f} | "
                          f"{cell['seconds']:.1f} / {cell['rss_gb']:.2f} / {cell['bytes'] / 1e6:.0f} | "
                          f"{mega['build_s']:.2f} / {mega['rss_gb']:.2f} / {mega['bytes'] / 1e6:.0f} | "
                          f"{cell['seconds'] / mega['build_s']:.2f}, {cell['rss_gb'] / mega['rss_gb']:.2f}, "
                          f"{cell['bytes'] / max(mega['bytes'], 1):.2f} | {share:+.2e} | "
                          f"{cell['exposures_per_fact_min']}-{cell['exposures_per_fact_max']} | "
                          f"{cell['neighbour_sharing_max']:.3f} / {cell['neighbour_sharing_mean']:.4f} |", flush=True)
                    shutil_rm(cache)
        top = max((r["tokens"], r["ratio"]) for r in rows)
        for w in (r for r in rows if (r["tokens"], r["ratio"]) == top):
            total_s = w["prep"]["wall_s"] + w["cell"]["wall_s"]   # process start and imports included
            print(f"largest cell ({w['tokens'] / 1e9:g}B, r={w['ratio']}, {w['policy']}): prep + cell "
                  f"{total_s:.0f} s (target 300 s), peak {max(w['prep']['rss_gb'], w['cell']['rss_gb']):.2f} GB "
                  f"(target 4), written {(w['prep']['bytes'] + w['cell']['bytes']) / 1e9:.2f} GB (target 2)")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "cells": rows}, indent=1))


def shutil_rm(path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
