"""GPU training throughput: model FLOPs utilisation of the paper presets, and kislurm vs plain PyTorch, same run.

For each preset (TP=1 on one GPU) it trains kislurm's Trainer (megatron-core GPT, bf16, megatron's distributed
optimizer, megatron's local layers with torch's fused attention: the presets' default transformer_impl) on
random tokens, then the plain-PyTorch GPT of identical shape of kislurm.train.baseline (bf16 autocast over fp32 weights,
fused AdamW, torch's fused attention; the one `kislurm preflight` measures against) on the same samples. Reports
tokens/s, MFU (dense bf16 peak: 989 TFLOP/s on an H100/H200), the ratio kislurm / plain, and the peak memory with
what was still allocated when the preset started (a previous preset's leftovers would count in its peak).

    python tools/bench_gpu.py                               # 137M and 1.3B
    python tools/bench_gpu.py --presets 350M --mbs 8 --gbs 32 --json out.json

Target (issue #4): MFU >= 40% for 1.3B.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
from pathlib import Path

import torch

from bench_train import RandomTokens
from kislurm.train import distributed
from kislurm.train.baseline import plain_tokens_per_s
from kislurm.plan.config import DataConfig, EvalConfig
from kislurm.plan.presets import BUILTIN_PRESETS
from kislurm.plan.training import TrainConfig
from kislurm.train.model import have_transformer_engine, padded_vocab_size
from kislurm.plan.grid import Cell
from kislurm.train.trainer import Trainer

DEFAULT_BATCH = {"137M": (16, 64), "350M": (8, 32), "760M": (8, 32), "1.3B": (8, 32), "3B": (4, 16)}
"""(micro, global) batch per preset; on one GPU, several micro-batches per step as in a real cell."""


def bench(name: str, mbs: int, gbs: int, warmup: int, steps: int, vocab: int, plain: bool) -> dict:
    preset = dataclasses.replace(BUILTIN_PRESETS[name], tensor_parallel=1, data_parallel=1)
    total = warmup + steps
    cell = Cell(size=name, ratio=0.5, tokens=total * gbs * preset.seq_length, seed=0, model=preset,
                data=DataConfig(), train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs), eval=EvalConfig())
    data = RandomTokens(cell.n_samples, preset.seq_length, vocab)
    ctx = distributed.init_model_parallel(tp=1, device="gpu")
    gc.collect()  # megatron's DDP sits in a reference cycle: a previous preset's buffers go only with a collection
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the peak restarts from what is still allocated: recorded below
    at_start = torch.cuda.memory_allocated()
    try:
        with tempfile.TemporaryDirectory() as ckpt:
            trainer = Trainer(cell, data, Path(ckpt), vocab, ctx, log=lambda _m: None)
            trainer.train_steps(warmup)
            torch.cuda.synchronize()
            out = trainer.train_steps(steps)
            row = {"preset": name, "params_total": trainer.params["total"],
                   "params_non_embedding": trainer.params["non_embedding"], "micro_batch": mbs, "global_batch": gbs,
                   "seq": preset.seq_length, "vocab": padded_vocab_size(vocab), "steps": steps,
                   "tokens_per_s": out["tokens_per_s"], "mfu": out["mfu"], "loss": out["loss"],
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "allocated_at_start_gib": at_start / 2**30}
            del trainer  # free the GPU for the baseline
    finally:
        distributed.teardown(ctx)
        gc.collect()  # the trainer's DDP buffers (the reference cycle above) before the baseline runs
        torch.cuda.empty_cache()
    print(f"{name}: {row['params_total'] / 1e6:,.0f}M params, mbs {mbs} gbs {gbs} seq {preset.seq_length}: "
          f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}, peak {row['peak_mem_gib']:.1f} GiB "
          f"({row['allocated_at_start_gib']:.2f} GiB allocated before the model)", flush=True)
    if plain:
        tps = plain_tokens_per_s(cell.model, cell.train, data, padded_vocab_size(vocab), steps, gbs, "cuda", warmup)
        gc.collect()
        row.update(plain_tokens_per_s=tps, plain_mfu=row["mfu"] * tps / row["tokens_per_s"],
                   ratio=row["tokens_per_s"] / tps)
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["137M", "1.3B"])
    ap.add_argument("--mbs", type=int, help="micro-batch (default: per preset)")
    ap.add_argument("--gbs", type=int, help="global batch (default: per preset)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=50257, help="tokenizer size (GPT-2's by default)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-PyTorch baseline")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA GPU visible; fix: run it on a GPU node")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          "layers: megatron local + torch SDPA (transformer_impl: local; Transformer Engine "
          f"{'installed' if have_transformer_engine() else 'not installed'}, opt-in only)")
    rows = []
    for name in args.presets:
        mbs, gbs = DEFAULT_BATCH.get(name, (4, 16))
        row = bench(name, args.mbs or mbs, args.gbs or gbs, args.warmup, args.steps, args.vocab, not args.no_plain)
        rows.append(row)
        if "ratio" in row:
            print(f"{name}: plain PyTorch {row['plain_tokens_per_s']:,.0f} tokens/s (MFU {row['plain_mfu']:.1%}), "
                  f"ratio kislurm/plain {row['ratio']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "transformer_engine": have_transformer_engine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
