"""Benchmark: the cost of one checkpoint save at a DP=2 layout on CPU, the old way against the new, same run.

    python tools/bench_checkpoint.py [--layers 8] [--hidden 512] [--repeats 3]

Two gloo ranks (submitit's local executor) hold the same model and CPU AdamW state (replicated over DP, as every
CPU and every non-distributed-optimizer cell is). Each repeat saves it twice, alternating:
  old: megatron's default save strategy, what kislurm used before: the replicated tensors are written by DP rank 0;
  new: kislurm.train.checkpoint.save: megatron's fully parallel strategy deals the writes over the DP ranks.
Reported per rank: best save seconds, bytes written, and the peak resident memory added during the save (sampled
every 5 ms). The GPU difference (megatron's distributed optimizer, whose `fully_reshardable` format gathers every
DP shard on DP rank 0 while `dp_reshardable` writes each rank's shard in place) cannot run on a CPU-only machine;
its size is printed from the parameter count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import submitit


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """The largest resident set seen while active, sampled every 5 ms."""

    def __enter__(self):
        self.start, self.peak, self._stop = _rss(), _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def added(self) -> int:
        return self.peak - self.start


def _rank_task(folder: str, layers: int, hidden: int, repeats: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from kislurm.train import checkpoint
    from kislurm.plan.presets import ModelPreset
    from kislurm.plan.training import TrainConfig
    from kislurm.train.distributed import init_model_parallel, seed_all, teardown
    from kislurm.train.model import build_model
    from kislurm.train.trainer import CpuAdamW, zero_adam_state
    from kislurm.train.workarounds import use_in_process_results_queue

    torch.set_num_threads(1)
    ctx = init_model_parallel(1, expected_world=2)
    try:
        seed_all(0)
        preset = ModelPreset(num_layers=layers, hidden_size=hidden, num_attention_heads=8, seq_length=128)
        model = build_model(preset, 8192, 0.02, "fp32")
        optimizer = CpuAdamW(list(model.named_parameters()), TrainConfig())
        zero_adam_state(optimizer.optimizer)
        out = {"rank": ctx.rank, "params": sum(p.numel() for p in model.parameters())}
        for r in range(repeats):
            for way in ("old", "new"):
                target = Path(folder) / f"{way}{r}"
                if ctx.rank == 0:
                    (target / "ck").mkdir(parents=True)
                dist.barrier()
                with _PeakRss() as mem:
                    t0 = time.perf_counter()
                    if way == "old":
                        use_in_process_results_queue()
                        model_sd = model.sharded_state_dict()
                        dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(
                            model_sd), "rng_state": checkpoint.rng_state_object(False)}, str(target / "ck"))
                    else:
                        checkpoint.save(target, 1, model, optimizer, "bench", {})
                    seconds = time.perf_counter() - t0
                dist.barrier()
                files = target.rglob(f"__{ctx.rank}_*.distcp")
                written = sum(f.stat().st_size for f in files)
                best = out.setdefault(way, {"seconds": float("inf"), "bytes": 0, "rss_added": 0})
                best.update(seconds=min(best["seconds"], seconds), bytes=written,
                            rss_added=max(best["rss_added"], mem.added))
        return out
    finally:
        teardown(ctx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kislurm-bench-ckpt-"))
    try:
        executor = submitit.LocalExecutor(folder=work / "jobs")
        executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=30)
        ranks = sorted(executor.submit(_rank_task, str(work / "saves"), args.layers, args.hidden,
                                       args.repeats).results(), key=lambda r: r["rank"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = ranks[0]["params"]
    print(f"model: {args.layers} layers, hidden {args.hidden}, {n / 1e6:.1f}M parameters; state written per save "
          f"{(ranks[0]['old']['bytes'] + ranks[1]['old']['bytes']) / 1e6:.0f} MB; DP=2, gloo, best of {args.repeats}")
    print("| way | rank | save s | MB written | peak RSS added MB |")
    print("|---|---|---|---|---|")
    for way in ("old", "new"):
        for r in ranks:
            m = r[way]
            print(f"| {way} | {r['rank']} | {m['seconds']:.3f} | {m['bytes'] / 1e6:.0f} | {m['rss_added'] / 1e6:.0f} |")
    slow = {way: max(r[way]["seconds"] for r in ranks) for way in ("old", "new")}
    share = ranks[0]["new"]["bytes"] / max(1, ranks[0]["old"]["bytes"])
    print(f"ratios new/old: save time {slow['new'] / slow['old']:.2f}, bytes written by DP rank 0 {share:.2f}, "
          f"rank 0 peak RSS added {ranks[0]['new']['rss_added'] / max(1, ranks[0]['old']['rss_added']):.2f}")
    for size, params, dp in (("1.3B", 1.3e9, 8), ("3B", 3.0e9, 8)):
        print(f"GPU, {size} at DP={dp}: fully_reshardable gathers {12 * params / 1e9:.0f} GB of optimizer state "
              f"(fp32 main weights and two moments) on DP rank 0 at every save; dp_reshardable writes "
              f"{12 * params / dp / 1e9:.1f} GB per rank in place (only the final save gathers)")


if __name__ == "__main__":
    main()
