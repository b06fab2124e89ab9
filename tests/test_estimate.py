"""Memory and cost estimates: against the measured 1.3B GPU run, and how the plan uses them to choose layouts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kislurm.plan import estimate
from kislurm.plan.config import ConfigError
from kislurm.plan.loader import config_from_dict, config_to_dict, load_config
from kislurm.plan.presets import BUILTIN_PRESETS
from kislurm.plan.training import TrainConfig
from kislurm.plan.estimate import memory_per_rank, padded_vocab_size
from kislurm.plan.grid import expand, resolve_layouts

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper.yaml"
LADDER = ["137M-llama", "350M-llama", "760M-llama", "1.3B-llama", "3B-llama"]


def test_memory_estimate_within_15_percent_of_the_measured_1_3b_run():
    """README "On a GPU" (tools/bench_gpu.py): 1.3B at TP=1 on one H100, micro batch 8, global 32, sequence 2048,
    bf16, megatron's distributed optimizer, GPT-2's vocabulary: 54.0 GiB peak (torch.cuda.max_memory_allocated)."""
    preset = dataclasses.replace(BUILTIN_PRESETS["1.3B"], tensor_parallel=1, data_parallel=1)
    train = TrainConfig(micro_batch_size=8, global_batch_size=32, precision="bf16")
    got = memory_per_rank(preset, train, padded_vocab_size(50257)).total_gib
    assert abs(got - 54.0) / 54.0 < 0.15, got


def test_distributed_optimizer_shards_only_the_optimizer_state():
    preset = dataclasses.replace(BUILTIN_PRESETS["1.3B"], tensor_parallel=1, data_parallel=8)
    train = TrainConfig(micro_batch_size=4, global_batch_size=512, precision="bf16")
    sharded = memory_per_rank(preset, train, 50304)
    whole = memory_per_rank(preset, train, 50304, distributed_optimizer=False)
    assert sharded.optimizer == pytest.approx(whole.optimizer / 8)
    assert (sharded.weights, sharded.gradients, sharded.activations) == (whole.weights, whole.gradients,
                                                                         whole.activations)
    n = BUILTIN_PRESETS["1.3B"].param_counts(50304)["total"]
    assert whole.optimizer == 12 * n  # fp32 master weights + two Adam moments, each 4 bytes a parameter


def test_tensor_parallel_shrinks_everything_but_the_replicated_part():
    train = TrainConfig(micro_batch_size=4, global_batch_size=32, precision="bf16")
    preset = BUILTIN_PRESETS["3B-llama"]
    by_tp = [memory_per_rank(preset, train, 50304, tp=t) for t in (1, 2, 4, 8)]
    assert all(a.total > b.total for a, b in zip(by_tp, by_tp[1:]))
    # weights per rank fall towards the replicated norms only; activations towards the replicated tensors
    assert by_tp[-1].weights < by_tp[0].weights / 7
    assert by_tp[-1].activations > by_tp[0].activations / 8


def test_cpu_fp32_estimate_counts_four_byte_weights_and_no_master_copy():
    preset = BUILTIN_PRESETS["cpu-s"]
    est = memory_per_rank(preset, TrainConfig(), 512)
    n = preset.param_counts(512)["total"]
    assert (est.weights, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)


def test_gpu_hours_use_the_trainers_flops_formula():
    preset = BUILTIN_PRESETS["1.3B"]
    flops = estimate.flops_per_token(preset, 50304)
    non_embedding = preset.param_counts(50304)["non_embedding"]
    assert 6 * non_embedding < flops < 6 * preset.param_counts(50304)["total"] * 1.2
    hours = estimate.gpu_hours(preset, 10**9, 50304, mfu=0.5, peak_flops=1e15)
    assert hours == pytest.approx(1e9 * flops / 0.5e15 / 3600)
    # the grid of the issue: ~18,000 H100-hours for the GPT-2 paper ladder at 50% MFU (6ND over 80 cells)
    cfg = load_config(PAPER, {"grid.sizes": ["137M", "350M", "760M", "1.3B", "3B"], "executor.mfu": 0.5})
    total = sum(estimate.gpu_hours(c.model, c.n_samples * c.model.seq_length, 50304, 0.5, 989e12)
                for c in expand(cfg))
    assert 16_000 < total < 21_000, total


def test_plan_picks_tp1_for_the_llama_paper_ladder_on_80gb_and_more_on_smaller_gpus():
    cfg = resolve_layouts(load_config(PAPER))
    assert cfg.executor.gpu_memory_gb == 80
    assert {s: cfg.presets[s].tensor_parallel for s in cfg.grid.sizes} == dict.fromkeys(LADDER, 1)
    small = resolve_layouts(load_config(PAPER, {"executor.gpu_memory_gb": 16}))
    tps = [small.presets[s].tensor_parallel for s in LADDER]
    assert tps == sorted(tps) and tps[0] == 1 and tps[-1] > 1  # bigger models need more TP, the smallest none
    for s in LADDER:  # the smallest TP that fits: one step down does not
        p = small.presets[s]
        assert estimate.fits(memory_per_rank(p, small.train, 50304), 16)
        if p.tensor_parallel > 1:
            smaller = max(t for t in estimate.tp_candidates(p, 8) if t < p.tensor_parallel)
            assert not estimate.fits(memory_per_rank(p, small.train, 50304, tp=smaller), 16)


def test_resolved_config_round_trips_with_the_chosen_tp_and_the_same_cell_ids():
    """The run folder stores the resolved config: a compute node re-expanding it gets the submitted layout."""
    cfg = load_config(PAPER, {"executor.gpu_memory_gb": 16})
    resolved = resolve_layouts(cfg)
    again = config_from_dict(config_to_dict(resolved))
    assert [c.model.tensor_parallel for c in expand(again)] == [c.model.tensor_parallel for c in expand(resolved)]
    assert all(isinstance(c.model.tensor_parallel, int) for c in expand(again))
    assert [c.cell_id for c in expand(again)] == [c.cell_id for c in expand(cfg)]


def test_layouts_that_cannot_fit_are_refused_in_one_line():
    fixed = {"grid": {"sizes": ["big"]}, "executor": {"gpu_memory_gb": 80},
             "train": {"micro_batch_size": 8, "global_batch_size": 32},
             "models": {"big": {"num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                                "seq_length": 2048, "device": "gpu", "tensor_parallel": 1}}}
    cases = [
        (fixed, "model 'big' at tensor_parallel 1 needs about .* GiB per GPU, over 90% of executor.gpu_memory_gb 80; "
                "fix: set tensor_parallel: auto"),
        ({**fixed, "executor": {"gpu_memory_gb": 8}, "models": {"big": {**fixed["models"]["big"],
                                                                     "tensor_parallel": "auto"}}},
         "model 'big' does not fit executor.gpu_memory_gb 8 at any tensor_parallel up to 8"),
        ({"grid": {"sizes": ["1.3B-llama"]}}, "has tensor_parallel: auto but executor.gpu_memory_gb is unset; fix:"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            resolve_layouts(config_from_dict(data))
        assert "\n" not in str(e.value)
    # without gpu_memory_gb nothing is checked, and expand alone never refuses a fixed layout
    unchecked = {**fixed, "executor": {}}
    assert resolve_layouts(config_from_dict(unchecked)).presets["big"].tensor_parallel == 1
    assert len(expand(config_from_dict(fixed))) == 3


def test_plan_vocab_size_reads_the_tokenizer_file(tmp_path):
    from kislurm.data.tokenizer import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=200)
    tok.save(tmp_path / "tokenizer.json")
    data = config_from_dict({"data": {"tokenizer": str(tmp_path / "tokenizer.json")}}).data
    assert estimate.plan_vocab_size(data) == padded_vocab_size(tok.vocab_size)
    absent = config_from_dict({"data": {"tokenizer": str(tmp_path / "absent.json")}}).data
    assert estimate.plan_vocab_size(absent) == padded_vocab_size(estimate.GPT2_VOCAB)
    assert estimate.plan_vocab_size(config_from_dict({}).data) == 512

