"""Training throughput: kislurm's megatron-core trainer vs a plain-PyTorch GPT of identical shape, same run.

Reports wall-clock tokens/s and tokens per CPU-second (one thread, so CPU time is what the step costs, insensitive
to other processes on a shared machine).

The baseline is kislurm.train.baseline's nanoGPT-style model (here GPT-2-shaped: learned positions, pre-LN blocks with
biases, GELU MLP, tied output layer) with the same layers, width, heads, MLP width, sequence length and padded
vocabulary, trained with the same AdamW, batch sizes, masked-mean loss and gradient clipping, on the same samples
(the implementation `kislurm preflight` measures against too). Rounds alternate between the two so
machine load hits both alike; the medians are compared.

    python tools/bench_train.py                       # cpu-xl shape
    python tools/bench_train.py --layers 6 --hidden 320 --heads 5 --seq 128   # the 11M shape of megatron-cpu.md

Target: ratio (kislurm / plain) >= 0.8.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kislurm.train import distributed
from kislurm.train.baseline import PlainTrainer
from kislurm.plan.config import DataConfig, EvalConfig
from kislurm.plan.presets import ModelPreset
from kislurm.plan.training import TrainConfig
from kislurm.train.model import padded_vocab_size
from kislurm.plan.grid import Cell
from kislurm.train.trainer import Trainer


class RandomTokens(torch.utils.data.Dataset):
    """Pre-generated random samples in megatron GPTDataset's item format (indexing costs nothing)."""

    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.pos = torch.arange(seq)
        self.mask = torch.ones(seq)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": self.mask, "position_ids": self.pos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--mbs", type=int, default=16)
    ap.add_argument("--gbs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    preset = ModelPreset(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                         seq_length=args.seq)
    total = args.steps * (args.rounds + 1)
    cell = Cell(size="bench", ratio=0.5, tokens=total * args.gbs * args.seq, seed=0, model=preset, data=DataConfig(),
                train=TrainConfig(micro_batch_size=args.mbs, global_batch_size=args.gbs), eval=EvalConfig())
    data = RandomTokens(cell.n_samples, args.seq, args.vocab)
    ctx = distributed.init_model_parallel(tp=1)
    try:
        with tempfile.TemporaryDirectory() as ckpt:
            ours = Trainer(cell, data, Path(ckpt), args.vocab, ctx, log=lambda _m: None)
            plain = PlainTrainer(preset, cell.train, data, padded_vocab_size(args.vocab), cell.steps, args.gbs)
            n_plain = sum(p.numel() for p in plain.model.parameters())
            assert n_plain == ours.params["total"], (n_plain, ours.params)
            ours.train_steps(args.steps // 2)  # warm-up
            plain.train_steps(args.steps // 2)
            k, p, kc, pc = [], [], [], []
            tokens = args.steps * args.gbs * args.seq
            for _ in range(args.rounds):
                c0 = time.process_time()
                k.append(ours.train_steps(args.steps)["tokens_per_s"])
                c1 = time.process_time()
                p.append(plain.train_steps(args.steps))
                c2 = time.process_time()
                kc.append(tokens / (c1 - c0))
                pc.append(tokens / (c2 - c1))
    finally:
        distributed.teardown(ctx)
    km, pm = statistics.median(k), statistics.median(p)
    cpu_ratio = statistics.median(a / b for a, b in zip(kc, pc))
    print(f"shape: layers={args.layers} hidden={args.hidden} heads={args.heads} seq={args.seq} "
          f"vocab={padded_vocab_size(args.vocab)} params={n_plain:,} mbs={args.mbs} gbs={args.gbs} "
          f"threads={args.threads}")
    print(f"kislurm (megatron-core) tokens/s: median {km:,.0f}  rounds {[round(x) for x in k]}")
    print(f"plain PyTorch GPT      tokens/s: median {pm:,.0f}  rounds {[round(x) for x in p]}")
    print(f"ratio kislurm/plain: wall {km / pm:.2f}, CPU time {cpu_ratio:.2f} (median of paired rounds; "
          f"CPU time is the figure to trust on a shared machine; target >= 0.8)")
    if not math.isfinite(km / pm):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
