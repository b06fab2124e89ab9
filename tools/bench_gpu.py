"""GPU training throughput: model FLOPs utilisation of the paper presets, and kislurm vs plain PyTorch, same run.

For each preset (TP=1 on one GPU) it trains kislurm's Trainer (megatron-core GPT, bf16, megatron's distributed
optimizer, megatron's local layers with torch's fused attention: the presets' default transformer_impl) on
random tokens, then a plain-PyTorch GPT of identical shape (bf16 autocast over fp32 weights, fused AdamW, torch's
fused attention) on the same samples. Reports tokens/s, MFU (dense bf16 peak: 989 TFLOP/s on an H100/H200) and the
ratio kislurm / plain.

    python tools/bench_gpu.py                               # 137M and 1.3B
    python tools/bench_gpu.py --presets 350M --mbs 8 --gbs 32 --json out.json

Target (issue #4): MFU >= 40% for 1.3B.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from bench_train import PlainGPT, RandomTokens
from kislurm import distributed
from kislurm.config import BUILTIN_PRESETS, DataConfig, EvalConfig, TrainConfig
from kislurm.model import have_transformer_engine, padded_vocab_size
from kislurm.plan import Cell
from kislurm.train import Trainer, lr_at

DEFAULT_BATCH = {"137M": (16, 64), "350M": (8, 32), "760M": (8, 32), "1.3B": (8, 32), "3B": (4, 16)}
"""(micro, global) batch per preset; on one GPU, several micro-batches per step as in a real cell."""


def plain_tokens_per_s(cell: Cell, data: RandomTokens, vocab: int, warmup: int, steps: int) -> float:
    """The same training step written plainly: bf16 autocast, fused AdamW, masked-mean loss, clipping."""
    t, dev = cell.train, torch.device("cuda")
    model = PlainGPT(cell.model, vocab).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": plain, "weight_decay": 0}],
                            lr=t.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cell.steps, t)
        opt.zero_grad(set_to_none=True)
        first = step * t.global_batch_size
        batches = [{k: torch.stack([data[i][k] for i in range(j, j + t.micro_batch_size)]).to(dev)
                    for k in ("tokens", "labels", "loss_mask", "position_ids")}
                   for j in range(first, first + t.global_batch_size, t.micro_batch_size)]
        n_tok = sum(b["loss_mask"].sum() for b in batches)
        loss = torch.zeros((), device=dev)
        for b in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                per_token = model(b["tokens"], b["position_ids"], b["labels"])
            summed = (per_token.float() * b["loss_mask"]).sum()
            (summed / n_tok).backward()
            loss += summed.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        opt.step()
        float(loss)  # the trainer reads its loss every step too
    torch.cuda.synchronize()
    return steps * t.global_batch_size * cell.model.seq_length / (time.perf_counter() - start)


def bench(name: str, mbs: int, gbs: int, warmup: int, steps: int, vocab: int, plain: bool) -> dict:
    preset = dataclasses.replace(BUILTIN_PRESETS[name], tensor_parallel=1, data_parallel=1)
    total = warmup + steps
    cell = Cell(size=name, ratio=0.5, tokens=total * gbs * preset.seq_length, seed=0, model=preset,
                data=DataConfig(), train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs), eval=EvalConfig())
    data = RandomTokens(cell.n_samples, preset.seq_length, vocab)
    ctx = distributed.init_model_parallel(tp=1, device="gpu")
    torch.cuda.reset_peak_memory_stats()
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
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
            del trainer  # free the GPU for the baseline
    finally:
        distributed.teardown(ctx)
        torch.cuda.empty_cache()
    print(f"{name}: {row['params_total'] / 1e6:,.0f}M params, mbs {mbs} gbs {gbs} seq {preset.seq_length}: "
          f"{row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}, peak {row['peak_mem_gib']:.1f} GiB", flush=True)
    if plain:
        tps = plain_tokens_per_s(cell, data, padded_vocab_size(vocab), warmup, steps)
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
